//! Taking over from an earlier driver of the job, and handing on to a later one.
//!
//! A replacement driver plans the job again from its spec; each stage it submits carries
//! its plan's fingerprint. Executors that outlived the earlier driver register with the
//! new one listing the task outputs they hold (per stage and fingerprint) and the newest
//! journal they were sent. A partition whose output a live executor holds for the same
//! plan is adopted as done there; an output partition the journal says was committed is
//! adopted with its attempt's files. Only the rest runs. A stage taken over whole counts
//! as resumed.
use std::collections::{BTreeMap, HashMap};

use super::{CommitRecord, DriverCore, ExecutorId, Journal, Progress, StageStatus};

/// Who a committed output partition of an earlier driver counts as done by: no executor
/// (its files outlive whoever wrote them).
const EARLIER_DRIVER: &str = "(an earlier driver)";

/// What the core keeps for resuming.
#[derive(Debug)]
pub(super) struct Resume {
    /// This driver's run: its output attempts stage under it.
    pub run_id: String,
    /// This driver's epoch (1 for the job's first driver).
    pub epoch: u64,
    /// The journal of the newest earlier driver, as the executors handed it over.
    prior: Journal,
    /// Stage and plan fingerprint → partition → the executor holding its output.
    holdings: BTreeMap<(u32, u64), BTreeMap<u32, ExecutorId>>,
    /// Stages this driver took over whole.
    resumed: u64,
    /// Bumped whenever the journal this driver hands on changes.
    version: u64,
    /// The version each executor has.
    sent: HashMap<ExecutorId, u64>,
}

impl Resume {
    pub fn new(run_id: &str, epoch: u64) -> Self {
        Self {
            run_id: run_id.to_string(),
            epoch,
            prior: Journal::default(),
            holdings: BTreeMap::new(),
            resumed: 0,
            version: 0,
            sent: HashMap::new(),
        }
    }

    /// The journal changed: executors get it with their next poll answer.
    pub fn journal_changed(&mut self) {
        self.version += 1;
    }
}

impl DriverCore {
    /// This driver's epoch (1 for the job's first driver).
    pub fn driver_epoch(&self) -> u64 {
        self.resume.epoch
    }

    /// Driver losses the job survived so far.
    pub fn driver_losses(&self) -> u32 {
        u32::try_from(self.resume.epoch.saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// Stages taken over whole by replacement drivers, this one included.
    pub fn stages_resumed(&self) -> u64 {
        self.resume.prior.stages_resumed + self.resume.resumed
    }

    /// What this driver hands on: its epoch, the stages resumed so far, and every output
    /// partition committed (its own and those of earlier drivers, adopted or not yet).
    pub fn journal(&self) -> Journal {
        let mut commits: Vec<CommitRecord> = self
            .commits
            .values()
            .flat_map(|c| c.values().cloned())
            .collect();
        for c in &self.resume.prior.commits {
            let adopted = self
                .commits
                .get(&c.stage)
                .is_some_and(|own| own.contains_key(&c.partition));
            if !adopted {
                commits.push(c.clone());
            }
        }
        Journal {
            epoch: self.resume.epoch,
            stages_resumed: self.stages_resumed(),
            commits,
        }
    }

    /// The journal, encoded, if `executor` does not have the newest.
    pub(super) fn journal_for(&mut self, executor: &str) -> Option<Vec<u8>> {
        let version = self.resume.version;
        let sent = self.resume.sent.entry(executor.to_string()).or_default();
        if *sent >= version {
            return None;
        }
        *sent = version;
        Some(self.journal().encode())
    }

    /// Takes in what a registering executor holds from an earlier driver, and the journal
    /// it kept; adopts what matches stages already submitted.
    pub(super) fn take_over(
        &mut self,
        executor: &str,
        held: &[(u32, u64, Vec<u32>)],
        journal: Option<Journal>,
    ) {
        if let Some(j) = journal
            && j.epoch < self.resume.epoch
            && j.epoch > self.resume.prior.epoch
        {
            tracing::info!(
                executor,
                epoch = j.epoch,
                commits = j.commits.len(),
                "took over the journal of an earlier driver"
            );
            self.resume.prior = j;
            self.resume.journal_changed();
        }
        for (stage, fingerprint, partitions) in held {
            let holders = self
                .resume
                .holdings
                .entry((*stage, *fingerprint))
                .or_default();
            for p in partitions {
                holders.insert(*p, executor.to_string());
            }
        }
        let stages: Vec<u32> = self.stages.keys().copied().collect();
        for stage in stages {
            self.adopt(stage);
        }
    }

    /// Marks done the partitions of submitted stage `stage` still pending whose output an
    /// earlier driver left: blocks a live executor holds, output partitions committed.
    pub(super) fn adopt(&mut self, stage: u32) {
        let Some(fingerprint) = self.stages.get(&stage).map(|s| s.fingerprint) else {
            return;
        };
        if self.sched.status(stage) == Some(StageStatus::Succeeded) {
            return;
        }
        let untouched = self.sched.progress(stage).0 == 0;
        let mut adopted = 0usize;
        let mut events = Vec::new();
        if let Some(holders) = self.resume.holdings.get(&(stage, fingerprint)) {
            for (p, executor) in holders {
                if self.sched.is_live(executor)
                    && let Some(ev) = self.sched.adopt(stage, *p, executor)
                {
                    adopted += 1;
                    events.extend(ev);
                }
            }
        }
        if self.commits.contains_key(&stage) {
            let committed: Vec<CommitRecord> = self
                .resume
                .prior
                .commits
                .iter()
                .filter(|c| c.stage == stage && c.fingerprint == fingerprint)
                .cloned()
                .collect();
            for c in committed {
                let Some(ev) = self.sched.adopt(stage, c.partition, EARLIER_DRIVER) else {
                    continue;
                };
                adopted += 1;
                events.extend(ev);
                if let Some(info) = self.stages.get_mut(&stage) {
                    info.counters.output_rows += c.rows;
                    info.counters.files_written += c.files;
                }
                self.commits
                    .entry(stage)
                    .or_default()
                    .insert(c.partition, c);
            }
        }
        if adopted == 0 {
            return;
        }
        let whole = untouched && self.sched.status(stage) == Some(StageStatus::Succeeded);
        tracing::info!(
            stage,
            partitions = adopted,
            whole,
            "adopted outputs an earlier driver left"
        );
        if whole {
            self.resume.resumed += 1;
            self.resume.journal_changed();
            self.outbox.push(Progress::StageResumed { stage });
        }
        self.handle(events);
    }
}
