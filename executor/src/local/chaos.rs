//! Chaos for local mode and tests: kill (or pause) an executor process at a chosen point of
//! the job, the way a spot reclaim would, or kill the driver, the way losing its node
//! would; repeatable with a seed. A pure state machine fed
//! the driver's progress events; the local runner carries out what it decides.
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use crate::driver::Progress;
use crate::{Error, Result};

/// When a chaos event fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChaosPoint {
    /// Once the stage has completed.
    AfterStage(u32),
    /// Between iterations: as iteration `n` of an iterative step starts.
    Iteration(u32),
    /// Once `percent` of the stage's tasks are done; with no stage, the first shuffle stage
    /// (one that hash-partitions its output) with at least two tasks.
    StageProgress {
        /// The stage, or any shuffle stage.
        stage: Option<u32>,
        /// Share of its tasks done, 1 to 100.
        percent: u8,
    },
}

/// What happens to the chosen executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChaosAction {
    /// SIGKILL: the process and its blocks are gone, as on a reclaimed spot node.
    Kill,
    /// SIGSTOP for this long, then SIGCONT: a slow or frozen executor.
    Pause(Duration),
    /// SIGTERM: notice, as a pod being evicted or its node drained gets; the executor
    /// drains (its outputs move to others) and leaves.
    Drain,
    /// SIGKILL taken for the executor's own crash, not a reclaim: it counts against
    /// `maxExecutorLosses`.
    Crash,
}

/// Which executor a chaos event hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChaosTarget {
    /// One of the live executors, chosen with the seed.
    Random,
    /// The live executor holding the most outputs still needed: the costliest loss.
    Busiest,
    /// This executor.
    Executor(String),
    /// The driver: it is killed (a replacement takes the executors over).
    Driver,
}

/// One chaos event: `stage=3,at=50%`, `after-stage=2,executor=exec-1`, `at=50%,pause=3s`,
/// `after-stage=2,drain`, `iteration=5`, `driver,after-stage=2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChaosEvent {
    /// When.
    pub point: ChaosPoint,
    /// What.
    pub action: ChaosAction,
    /// Whom.
    pub target: ChaosTarget,
}

impl fmt::Display for ChaosEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.target == ChaosTarget::Driver {
            write!(f, "driver,")?;
        }
        match &self.point {
            ChaosPoint::AfterStage(s) => write!(f, "after-stage={s}")?,
            ChaosPoint::Iteration(n) => write!(f, "iteration={n}")?,
            ChaosPoint::StageProgress { stage, percent } => {
                if let Some(s) = stage {
                    write!(f, "stage={s},")?;
                }
                write!(f, "at={percent}%")?;
            }
        }
        match &self.target {
            ChaosTarget::Executor(e) => write!(f, ",executor={e}")?,
            ChaosTarget::Busiest => write!(f, ",executor=busiest")?,
            ChaosTarget::Random | ChaosTarget::Driver => {}
        }
        match self.action {
            ChaosAction::Pause(d) => write!(f, ",pause={}ms", d.as_millis())?,
            ChaosAction::Drain => write!(f, ",drain")?,
            ChaosAction::Crash => write!(f, ",crash")?,
            ChaosAction::Kill => {}
        }
        Ok(())
    }
}

fn bad(spec: &str, why: impl Into<String>) -> Error {
    Error::Chaos {
        spec: spec.to_string(),
        reason: why.into(),
    }
}

fn parse_duration(spec: &str, v: &str) -> Result<Duration> {
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((v, "s"), |i| v.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| bad(spec, format!("`{v}` is not a duration like 3s or 500ms")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad(spec, format!("unknown unit in `{v}` (ms, s or m)"))),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl std::str::FromStr for ChaosEvent {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let mut stage = None;
        let mut after = None;
        let mut iteration = None;
        let mut percent = None;
        let mut action = ChaosAction::Kill;
        let mut target = ChaosTarget::Random;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "driver" {
                target = ChaosTarget::Driver;
                continue;
            }
            if part == "drain" || part == "crash" {
                action = if part == "drain" {
                    ChaosAction::Drain
                } else {
                    ChaosAction::Crash
                };
                continue;
            }
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(spec, format!("`{part}` is not key=value")))?;
            let number = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| bad(spec, format!("{key}: `{v}` is not a stage number")))
            };
            match key {
                "stage" if value == "any" => {}
                "stage" => stage = Some(number(value)?),
                "after-stage" => after = Some(number(value)?),
                "iteration" => iteration = Some(number(value)?),
                "at" => {
                    let p: u8 = value
                        .strip_suffix('%')
                        .and_then(|v| v.parse().ok())
                        .filter(|p| (1..=100).contains(p))
                        .ok_or_else(|| bad(spec, format!("at: `{value}` is not 1% to 100%")))?;
                    percent = Some(p);
                }
                "executor" if value == "random" => {}
                "executor" if value == "busiest" => target = ChaosTarget::Busiest,
                "executor" => target = ChaosTarget::Executor(value.to_string()),
                "pause" => action = ChaosAction::Pause(parse_duration(spec, value)?),
                "kill" | "signal" if value == "kill" || value == "true" => {}
                _ => {
                    return Err(bad(
                        spec,
                        format!(
                            "unknown key `{key}` (use driver, drain, crash, stage, at, after-stage, iteration, executor, pause)"
                        ),
                    ));
                }
            }
        }
        if target == ChaosTarget::Driver && action != ChaosAction::Kill {
            return Err(bad(
                spec,
                "the driver can only be killed, not paused, drained or crashed",
            ));
        }
        if let Some(n) = iteration {
            if after.is_some() || percent.is_some() || stage.is_some() {
                return Err(bad(
                    spec,
                    "iteration=N stands alone: no stage, at or after-stage",
                ));
            }
            return Ok(ChaosEvent {
                point: ChaosPoint::Iteration(n),
                action,
                target,
            });
        }
        let point = match (after, percent) {
            (Some(_), Some(_)) => return Err(bad(spec, "give either after-stage or at, not both")),
            (Some(s), None) if stage.is_none() => ChaosPoint::AfterStage(s),
            (Some(_), None) => return Err(bad(spec, "after-stage already names the stage")),
            (None, Some(percent)) => ChaosPoint::StageProgress { stage, percent },
            (None, None) => match stage {
                Some(s) => ChaosPoint::StageProgress {
                    stage: Some(s),
                    percent: 50,
                },
                None => {
                    return Err(bad(
                        spec,
                        "say when: after-stage=K, or at=P% (with stage=K)",
                    ));
                }
            },
        };
        Ok(ChaosEvent {
            point,
            action,
            target,
        })
    }
}

/// A small deterministic generator (SplitMix64): the same seed picks the same executors.
#[derive(Clone, Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Whom an order hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Victim {
    /// This executor.
    Executor(String),
    /// The driver.
    Driver,
}

/// An order to carry out now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChaosOrder {
    /// Whom.
    pub victim: Victim,
    /// What to do to it.
    pub action: ChaosAction,
    /// The event that fired, for logs.
    pub event: String,
}

/// The chaos state machine.
#[derive(Clone, Debug)]
pub struct Chaos {
    pending: Vec<ChaosEvent>,
    rng: SplitMix,
    shuffle_stages: HashSet<u32>,
}

impl Chaos {
    /// Chaos that fires `events`, each once, choosing random targets with `seed`.
    pub fn new(events: Vec<ChaosEvent>, seed: u64) -> Self {
        Self {
            pending: events,
            rng: SplitMix(seed),
            shuffle_stages: HashSet::new(),
        }
    }

    /// Whether every event has fired.
    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Feeds one progress event; returns the orders it triggers. `live` gives the executors
    /// that can be hit now, with the number of needed outputs each holds; it is asked only
    /// when an event fires.
    pub fn observe(
        &mut self,
        event: &Progress,
        live: impl FnOnce() -> BTreeMap<String, usize>,
    ) -> Vec<ChaosOrder> {
        let mut live = Some(live);
        let mut known: Option<BTreeMap<String, usize>> = None;
        if let Progress::StageSubmitted {
            stage,
            shuffle: true,
            tasks,
            ..
        } = event
            && *tasks >= 2
        {
            self.shuffle_stages.insert(*stage);
        }
        let mut orders = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let fires = match (&self.pending[i].point, event) {
                (ChaosPoint::AfterStage(s), Progress::StageDone { stage }) => s == stage,
                (ChaosPoint::Iteration(n), Progress::Iteration { iteration, .. }) => n == iteration,
                (
                    ChaosPoint::StageProgress { stage, percent },
                    Progress::TaskDone {
                        stage: at,
                        done,
                        total,
                    },
                ) => {
                    let chosen = match stage {
                        Some(s) => s == at,
                        None => self.shuffle_stages.contains(at),
                    };
                    chosen && *total > 0 && done * 100 >= *percent as usize * total
                }
                _ => false,
            };
            if !fires {
                i += 1;
                continue;
            }
            let ev = self.pending.remove(i);
            let live = known.get_or_insert_with(|| live.take().map(|f| f()).unwrap_or_default());
            let victim = match &ev.target {
                ChaosTarget::Driver => Some(Victim::Driver),
                ChaosTarget::Executor(e) => Some(Victim::Executor(e.clone())),
                ChaosTarget::Random if live.is_empty() => None,
                ChaosTarget::Random => {
                    let k = (self.rng.next() % live.len() as u64) as usize;
                    live.keys().nth(k).cloned().map(Victim::Executor)
                }
                ChaosTarget::Busiest => live
                    .iter()
                    .max_by_key(|(id, held)| (**held, std::cmp::Reverse(*id)))
                    .map(|(id, _)| Victim::Executor(id.clone())),
            };
            if let Some(victim) = victim {
                orders.push(ChaosOrder {
                    victim,
                    action: ev.action,
                    event: ev.to_string(),
                });
            }
        }
        orders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> BTreeMap<String, usize> {
        (0..4)
            .map(|i| (format!("exec-{i}"), [2, 5, 5, 1][i]))
            .collect()
    }

    fn submitted(stage: u32, shuffle: bool) -> Progress {
        Progress::StageSubmitted {
            stage,
            step: "s".into(),
            description: String::new(),
            tasks: 10,
            shuffle,
        }
    }

    fn done(stage: u32, done: usize) -> Progress {
        Progress::TaskDone {
            stage,
            done,
            total: 10,
        }
    }

    #[test]
    fn parses_and_prints_events() {
        for spec in [
            "stage=3,at=50%",
            "after-stage=2,executor=exec-1",
            "at=30%,pause=2000ms",
            "iteration=4,executor=exec-2",
            "driver,after-stage=2",
            "driver,stage=3,at=50%",
        ] {
            let ev: ChaosEvent = spec.parse().unwrap();
            assert_eq!(ev.to_string(), spec);
        }
        let ev: ChaosEvent = "stage=any,at=50%,pause=3s".parse().unwrap();
        assert_eq!(ev.action, ChaosAction::Pause(Duration::from_secs(3)));
        for bad in [
            "",
            "at=0%",
            "at=150%",
            "stage=x",
            "when=now",
            "after-stage=1,at=5%",
            "driver,after-stage=1,pause=2s",
        ] {
            let err = bad.parse::<ChaosEvent>().unwrap_err();
            assert!(matches!(err, Error::Chaos { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn fires_once_at_the_chosen_progress_of_the_first_shuffle_stage() {
        let mut chaos = Chaos::new(vec!["at=50%".parse().unwrap()], 7);
        assert!(chaos.observe(&submitted(1, false), live).is_empty());
        assert!(
            chaos.observe(&done(1, 9), live).is_empty(),
            "not a shuffle stage"
        );
        chaos.observe(&submitted(2, true), live);
        assert!(chaos.observe(&done(2, 4), live).is_empty());
        let orders = chaos.observe(&done(2, 5), live);
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].action, ChaosAction::Kill);
        assert!(chaos.done());
        assert!(chaos.observe(&done(2, 6), live).is_empty());
    }

    #[test]
    fn the_seed_decides_the_target() {
        let pick = |seed| {
            let mut c = Chaos::new(vec!["after-stage=1".parse().unwrap()], seed);
            c.observe(&Progress::StageDone { stage: 1 }, live)[0]
                .victim
                .clone()
        };
        assert_eq!(pick(42), pick(42));
        let picks: std::collections::BTreeSet<String> = (0..32)
            .map(|seed| match pick(seed) {
                Victim::Executor(e) => e,
                Victim::Driver => panic!("an executor event hit the driver"),
            })
            .collect();
        assert!(picks.len() > 1, "{picks:?}");
        let mut busiest = Chaos::new(vec!["after-stage=1,executor=busiest".parse().unwrap()], 1);
        let orders = busiest.observe(&Progress::StageDone { stage: 1 }, live);
        assert_eq!(
            orders[0].victim,
            Victim::Executor("exec-1".into()),
            "most outputs, lowest id on a tie"
        );
        let mut driver = Chaos::new(vec!["driver,after-stage=1".parse().unwrap()], 1);
        let orders = driver.observe(&Progress::StageDone { stage: 1 }, live);
        assert_eq!(orders[0].victim, Victim::Driver);
    }
}
