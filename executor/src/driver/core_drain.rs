//! Draining an executor given notice, in the core: which outputs move where, the copies
//! handed to the targets with their next poll, what arrived, and when the executor may
//! leave. The scheduler says which outputs live only on the executor and moves their
//! locations; this part pairs them with targets and keeps the bookkeeping.
//!
//! The attempts it was running carry on for up to `CONTINUE_WINDOW` and are resubmitted
//! elsewhere only then; an output one of them makes there moves off like the others.
//!
//! An executor leaves once every copy arrived or failed, its continuing attempts ended,
//! and the tasks that were reading its outputs then (their plans name it) have finished, or
//! `DRAIN_DEADLINE` after its notice
//! (its grace period ends anyway); it is then lost with reason `Drained`, which counts
//! against no budget, and what did not move is recomputed from lineage.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{DriverCore, ExecutorId, LossReason, LossTiming, Progress, TaskId};

/// The longest a drain waits for its copies before the executor is told to leave.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(90);

/// How long after its notice a draining executor's running attempts may still finish
/// there: below the shortest common notice (GCP's 30 s), so that what they made can still
/// move before the machine goes. Past it they are resubmitted elsewhere.
pub(crate) const CONTINUE_WINDOW: Duration = Duration::from_secs(25);

/// One output to copy from a decommissioned executor, as its target gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Migration {
    /// The task whose output moves.
    pub task: TaskId,
    /// The executor it moves from, and its block-service address.
    pub source: ExecutorId,
    pub source_address: String,
    /// Blocks the task wrote (one per reduce partition; 1 for pass-through outputs).
    pub blocks: u32,
    /// The stage plan's fingerprint, kept with the copy.
    pub fingerprint: u64,
}

/// An executor being drained.
#[derive(Debug)]
pub(super) struct Drain {
    /// When it was given notice.
    started: Instant,
    /// Its block-service address, where copies read from.
    address: String,
    /// Outputs with no target yet: no executor was left to take them.
    unplaced: Vec<TaskId>,
    /// Copies handed out or queued and not yet reported.
    pending: BTreeSet<TaskId>,
    /// Stages whose outputs it held.
    stages: BTreeSet<u32>,
    /// Once every copy is in: the attempts then reading those stages, which may still
    /// fetch from it.
    readers: Option<Vec<(TaskId, u32)>>,
}

/// What the core keeps of drains.
#[derive(Debug, Default)]
pub(super) struct Drains {
    /// Executors being drained.
    draining: BTreeMap<ExecutorId, Drain>,
    /// Copies waiting for their target's next poll.
    queued: BTreeMap<ExecutorId, Vec<Migration>>,
    /// Copies under way: task → (source, target).
    in_flight: BTreeMap<TaskId, (ExecutorId, ExecutorId)>,
    /// Outputs moved instead of recomputed.
    pub migrated: u64,
}

impl DriverCore {
    /// `executor` was given notice (`cause`: what said so). It takes no more tasks; its
    /// running tasks carry on there for up to `CONTINUE_WINDOW`, then are resubmitted
    /// elsewhere without counting as failures; the outputs
    /// still needed that only it holds are shared out to the other live executors, most
    /// urgent first, spreading them over the targets holding least. `occurred`: when the
    /// notice was given, if known (the job runs short from then). Returns whether the
    /// executor was live.
    pub fn decommission(
        &mut self,
        executor: &str,
        cause: &str,
        occurred: Option<Instant>,
        now: Instant,
    ) -> bool {
        if self.drains.draining.contains_key(executor) {
            return true;
        }
        let Some(address) = self.sched.address(executor).map(str::to_string) else {
            return false;
        };
        let width_before = self.serving_width();
        let Some(outputs) = self.sched.decommission(executor) else {
            return false;
        };
        self.loss_timings
            .push(LossTiming::new(executor, occurred, now, width_before));
        tracing::warn!(
            executor,
            cause,
            outputs = outputs.len(),
            "executor given notice: draining"
        );
        self.drains.draining.insert(
            executor.to_string(),
            Drain {
                started: now,
                address,
                unplaced: outputs.clone(),
                pending: BTreeSet::new(),
                stages: outputs.iter().map(|t| t.stage).collect(),
                readers: None,
            },
        );
        self.place_migrations();
        let moving = self.drains.draining[executor].pending.len();
        self.outbox.push(Progress::ExecutorDraining {
            executor: executor.to_string(),
            outputs: moving,
        });
        self.changed = true;
        true
    }

    /// Shares the outputs of draining executors that have no target yet out to the live
    /// executors not draining, spreading them over those holding least. With none (every
    /// executor was given notice at once), they wait for the replacements to register.
    pub(super) fn place_migrations(&mut self) {
        let mut load: Vec<(usize, ExecutorId)> = self
            .outputs_held()
            .into_iter()
            .filter(|(e, _)| !self.sched.is_draining(e))
            .map(|(e, n)| (n, e))
            .collect();
        if load.is_empty() {
            return;
        }
        for (source, drain) in &mut self.drains.draining {
            for task in std::mem::take(&mut drain.unplaced) {
                let Some(info) = self.stages.get(&task.stage) else {
                    continue;
                };
                load.sort();
                let (held, target) = &mut load[0];
                *held += 1;
                self.drains
                    .queued
                    .entry(target.clone())
                    .or_default()
                    .push(Migration {
                        task,
                        source: source.clone(),
                        source_address: drain.address.clone(),
                        blocks: info.blocks_per_task,
                        fingerprint: info.fingerprint,
                    });
                self.drains
                    .in_flight
                    .insert(task, (source.clone(), target.clone()));
                drain.pending.insert(task);
            }
        }
        self.changed = true;
    }

    /// A copy of `task`'s output from `source` arrived on `target` (`ok`) or failed.
    /// Returns whether the copy is now where the output lives.
    pub fn migrated(&mut self, target: &str, task: TaskId, source: &str, ok: bool) -> bool {
        if self.drains.in_flight.get(&task) != Some(&(source.to_string(), target.to_string())) {
            return false;
        }
        self.drains.in_flight.remove(&task);
        if let Some(d) = self.drains.draining.get_mut(source) {
            d.pending.remove(&task);
        }
        self.changed = true;
        let moved = ok && self.sched.move_output(task, source, target);
        if moved {
            self.drains.migrated += 1;
            // It landed on an executor given notice meanwhile: it moves on from there.
            if let Some(d) = self.drains.draining.get_mut(target) {
                d.unplaced.push(task);
                d.stages.insert(task.stage);
                self.place_migrations();
            }
        } else {
            tracing::warn!(
                stage = task.stage,
                partition = task.partition,
                source,
                target,
                ok,
                "output copy not used; it is recomputed if still needed"
            );
        }
        moved
    }

    /// An attempt continuing on draining `executor` won: its output moves off like those
    /// the executor held at its notice, if still needed.
    pub(super) fn made_while_draining(&mut self, executor: &str, task: TaskId) {
        if !self.sched.worth_moving(task) {
            return;
        }
        let Some(d) = self.drains.draining.get_mut(executor) else {
            return;
        };
        d.unplaced.push(task);
        d.stages.insert(task.stage);
        d.readers = None;
        self.place_migrations();
    }

    /// Copies queued for `executor`, handed over with its poll.
    pub(super) fn take_migrations(&mut self, executor: &str) -> Vec<Migration> {
        self.drains.queued.remove(executor).unwrap_or_default()
    }

    /// For a poll of a draining executor: `Some(true)` when it may leave (every copy
    /// arrived or failed and the tasks reading its outputs then finished, or the deadline
    /// passed), `Some(false)` until then, `None` when it is not draining.
    pub(super) fn drain_done(&mut self, executor: &str, now: Instant) -> Option<bool> {
        let d = self.drains.draining.get_mut(executor)?;
        let waited = now.duration_since(d.started);
        if waited > DRAIN_DEADLINE {
            return Some(true);
        }
        if self.sched.continuing_on(executor) > 0 {
            if waited <= CONTINUE_WINDOW {
                return Some(false);
            }
            self.sched.abandon_continuing(executor);
        }
        if !d.pending.is_empty() || !d.unplaced.is_empty() {
            return Some(false);
        }
        let readers = d
            .readers
            .get_or_insert_with(|| self.sched.running_readers(&d.stages));
        readers.retain(|(task, attempt)| self.sched.is_running(*task, *attempt));
        Some(readers.is_empty())
    }

    /// The executor leaves after its drain: lost as `Drained`, counted nowhere; outputs
    /// that did not move are recomputed.
    pub(super) fn finish_drain(&mut self, executor: &str, now: Instant) {
        self.lose(executor, LossReason::Drained, Some(now), now);
    }

    /// Forgets the copies from or to an executor that is gone: those from it can no longer
    /// arrive, those to it go to another target.
    pub(super) fn drop_drains_of(&mut self, executor: &str) {
        self.drains.draining.remove(executor);
        self.drains.queued.remove(executor);
        for q in self.drains.queued.values_mut() {
            q.retain(|m| m.source != executor);
        }
        let gone: Vec<(TaskId, ExecutorId)> = self
            .drains
            .in_flight
            .iter()
            .filter(|(_, (s, t))| s == executor || t == executor)
            .map(|(task, (s, _))| (*task, s.clone()))
            .collect();
        for (task, source) in gone {
            self.drains.in_flight.remove(&task);
            if let Some(d) = self.drains.draining.get_mut(&source) {
                // Its target went: the copy goes elsewhere (see `place_migrations`).
                d.pending.remove(&task);
                d.unplaced.push(task);
            }
        }
    }

    /// Whether `executor` is being drained.
    pub(super) fn is_draining(&self, executor: &str) -> bool {
        self.drains.draining.contains_key(executor)
    }

    /// Executors being drained.
    pub fn draining(&self) -> impl Iterator<Item = &ExecutorId> {
        self.drains.draining.keys()
    }

    /// Outputs moved off drained executors instead of recomputed.
    pub fn partitions_migrated(&self) -> u64 {
        self.drains.migrated
    }
}
