//! The driver's scheduler: a pure state machine over stages and tasks. It is fed events
//! (executors registering, polling, reporting, being lost) and answers with assignments and
//! state changes; it does no I/O, so every path is unit-tested with synthetic events.
//!
//! It also holds the lineage: for every stage output partition, which executor holds it and
//! which task produced it. When an executor goes, exactly the outputs that lived there and are
//! still needed are recomputed, walking up to their own inputs when those are gone too.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use kiln_api::FailurePolicy;

mod drain;
mod held;
mod types;

pub use kiln_api::LossReason;
pub use types::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum TaskState {
    Pending,
    Running { executor: ExecutorId, attempt: u32 },
    Done { executor: ExecutorId },
}

#[derive(Debug)]
struct StageState {
    status: StageStatus,
    inputs: Vec<u32>,
    tasks: Vec<TaskState>,
    failures: Vec<u32>,
    next_attempt: Vec<u32>,
    epoch: u64,
    attempts: u32,
    launched: u64,
    recomputed: u64,
    completed_once: Vec<bool>,
    pinned: bool,
    released: bool,
    preferred: Option<u32>,
    /// Its outputs live outside the executors (a sink's committed files): losing the
    /// executor that wrote one loses nothing.
    durable: bool,
}

#[derive(Debug)]
struct ExecutorInfo {
    address: String,
    running: BTreeSet<TaskId>,
    last_seen: Instant,
    /// Given notice: it takes no more tasks while its outputs move away.
    draining: bool,
}

/// The scheduler.
#[derive(Debug)]
pub struct Scheduler {
    policy: FailurePolicy,
    stages: BTreeMap<u32, StageState>,
    executors: BTreeMap<ExecutorId, ExecutorInfo>,
    lost: HashSet<ExecutorId>,
    losses: Vec<Loss>,
    outputs_lost: u64,
    failure: Option<JobFailure>,
    /// Attempts each executor is to stop (see `drain`).
    cancels: BTreeMap<ExecutorId, Vec<(TaskId, u32)>>,
}

impl Scheduler {
    /// A scheduler with the job's budgets.
    pub fn new(policy: FailurePolicy) -> Self {
        Self {
            policy,
            stages: BTreeMap::new(),
            executors: BTreeMap::new(),
            lost: HashSet::new(),
            losses: Vec::new(),
            outputs_lost: 0,
            failure: None,
            cancels: BTreeMap::new(),
        }
    }

    /// Adds a stage. `preferred` names a stage whose partition `p` this stage's task `p`
    /// reads whole (a cached dataset): the task prefers the executor holding it.
    pub fn add_stage(
        &mut self,
        id: u32,
        partitions: usize,
        inputs: Vec<u32>,
        preferred: Option<u32>,
    ) -> Vec<SchedulerEvent> {
        self.stages.insert(
            id,
            StageState {
                status: StageStatus::Unresolved,
                inputs,
                tasks: vec![TaskState::Pending; partitions],
                failures: vec![0; partitions],
                next_attempt: vec![0; partitions],
                epoch: 0,
                attempts: 1,
                launched: 0,
                recomputed: 0,
                completed_once: vec![false; partitions],
                pinned: false,
                released: false,
                preferred,
                durable: false,
            },
        );
        self.refresh()
    }

    /// Marks a stage whose outputs outlive the executors that wrote them (an output sink).
    pub fn set_durable(&mut self, stage: u32) {
        if let Some(s) = self.stages.get_mut(&stage) {
            s.durable = true;
        }
    }

    /// Keeps a stage's output needed after its consumers finish (cached datasets, results
    /// not yet fetched).
    pub fn pin(&mut self, stage: u32, pinned: bool) {
        if let Some(s) = self.stages.get_mut(&stage) {
            s.pinned = pinned;
        }
    }

    /// Releases every stage nothing needs any more and returns them, so executors can drop
    /// their blocks: a stage is kept while it is pinned, not yet complete, or an input
    /// (directly or further up the lineage) of a stage that is kept. Keeping the lineage of a
    /// cached dataset is what lets a lost cached partition be recomputed alone.
    pub fn collect_garbage(&mut self) -> Vec<u32> {
        let mut keep: BTreeSet<u32> = BTreeSet::new();
        let mut todo: Vec<u32> = self
            .stages
            .iter()
            .filter(|(_, s)| !s.released && (s.pinned || s.status != StageStatus::Succeeded))
            .map(|(id, _)| *id)
            .collect();
        while let Some(id) = todo.pop() {
            if keep.insert(id)
                && let Some(s) = self.stages.get(&id)
            {
                todo.extend(s.inputs.iter().copied());
            }
        }
        let mut released = Vec::new();
        for (id, s) in &mut self.stages {
            if !s.released && !keep.contains(id) {
                s.released = true;
                released.push(*id);
            }
        }
        released
    }

    /// The first unrecoverable failure, if any.
    pub fn failure(&self) -> Option<&JobFailure> {
        self.failure.as_ref()
    }

    /// Status of a stage.
    pub fn status(&self, stage: u32) -> Option<StageStatus> {
        self.stages.get(&stage).map(|s| s.status)
    }

    /// Bumped every time the stage is resolved: a plan encoded at an older epoch carries
    /// stale locations.
    pub fn epoch(&self, stage: u32) -> u64 {
        self.stages.get(&stage).map_or(0, |s| s.epoch)
    }

    /// Task attempts launched for the stage, and how many re-ran a partition that had
    /// already succeeded once (recomputation after a loss).
    pub fn launch_counts(&self, stage: u32) -> (u64, u64) {
        self.stages
            .get(&stage)
            .map_or((0, 0), |s| (s.launched, s.recomputed))
    }

    /// Executors lost so far, with their reasons.
    pub fn losses(&self) -> &[Loss] {
        &self.losses
    }

    /// Outputs lost (by executor losses and failed fetches) while still needed: each is
    /// recomputed once.
    pub fn outputs_lost(&self) -> u64 {
        self.outputs_lost
    }

    /// Live executors.
    pub fn executors(&self) -> impl Iterator<Item = &ExecutorId> {
        self.executors.keys()
    }

    /// The block-service addresses of the live executors.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.executors.values().map(|e| e.address.as_str())
    }

    /// Whether `executor` is registered and not lost.
    pub fn is_live(&self, executor: &str) -> bool {
        self.executors.contains_key(executor)
    }

    /// Whether the executor was declared lost (it must not come back under the same id).
    pub fn was_lost(&self, executor: &str) -> bool {
        self.lost.contains(executor)
    }

    /// Registers an executor. Returns false for an id that was declared lost.
    pub fn register_executor(&mut self, id: &str, address: &str, now: Instant) -> bool {
        if self.lost.contains(id) {
            return false;
        }
        let info = self
            .executors
            .entry(id.to_string())
            .or_insert_with(|| ExecutorInfo {
                address: address.to_string(),
                running: BTreeSet::new(),
                last_seen: now,
                draining: false,
            });
        info.address = address.to_string();
        info.last_seen = now;
        true
    }

    /// Records a heartbeat.
    pub fn heartbeat(&mut self, id: &str, now: Instant) {
        if let Some(e) = self.executors.get_mut(id) {
            e.last_seen = now;
        }
    }

    /// Executors silent for longer than `timeout`, with when they were last heard from.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<(ExecutorId, Instant)> {
        self.executors
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_seen) > timeout)
            .map(|(id, e)| (id.clone(), e.last_seen))
            .collect()
    }

    /// Where each partition of a succeeded stage lives: `(executor, address)` per partition.
    pub fn locations(&self, stage: u32) -> Option<Vec<(ExecutorId, String)>> {
        let s = self.stages.get(&stage)?;
        s.tasks
            .iter()
            .map(|t| match t {
                TaskState::Done { executor } => self
                    .executors
                    .get(executor)
                    .map(|e| (executor.clone(), e.address.clone())),
                _ => None,
            })
            .collect()
    }

    /// Hands `executor` up to `free` tasks, upstream stages first, tasks whose preferred
    /// data lives on this executor before others.
    pub fn assign(&mut self, executor: &str, free: usize) -> Vec<(TaskId, u32)> {
        if free == 0
            || self.failure.is_some()
            || self.executors.get(executor).is_none_or(|e| e.draining)
        {
            return Vec::new();
        }
        // A stage that lost an input since it was resolved waits for it again, whichever
        // way its tasks went back to pending (a loss, a decommission, a failed fetch).
        if self.wait_for_inputs() {
            self.refresh();
        }
        let mut picks: Vec<TaskId> = Vec::new();
        let runnable: Vec<u32> = self
            .stages
            .iter()
            .filter(|(_, s)| matches!(s.status, StageStatus::Resolved | StageStatus::Running))
            .map(|(id, _)| *id)
            .collect();
        for local_pass in [true, false] {
            for &sid in &runnable {
                let s = &self.stages[&sid];
                let holder = |p: usize| {
                    s.preferred
                        .and_then(|pref| self.stages.get(&pref))
                        .and_then(|ps| ps.tasks.get(p))
                        .and_then(|t| match t {
                            TaskState::Done { executor } => Some(executor.as_str()),
                            _ => None,
                        })
                };
                for (p, t) in s.tasks.iter().enumerate() {
                    if picks.len() == free {
                        break;
                    }
                    let id = TaskId {
                        stage: sid,
                        partition: p as u32,
                    };
                    if *t != TaskState::Pending || picks.contains(&id) {
                        continue;
                    }
                    // A task whose cached input lives on another live executor is left for
                    // it: reading locally saves moving the partition.
                    let take = match holder(p) {
                        Some(h) if h == executor => true,
                        Some(h) => !local_pass && self.executors.get(h).is_none_or(|e| e.draining),
                        None => !local_pass,
                    };
                    if take {
                        picks.push(id);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(picks.len());
        for id in picks {
            let s = self.stages.get_mut(&id.stage).expect("picked from stages");
            let p = id.partition as usize;
            let attempt = s.next_attempt[p];
            s.next_attempt[p] += 1;
            s.launched += 1;
            if s.completed_once[p] {
                s.recomputed += 1;
            }
            s.tasks[p] = TaskState::Running {
                executor: executor.to_string(),
                attempt,
            };
            s.status = StageStatus::Running;
            self.executors
                .get_mut(executor)
                .expect("checked above")
                .running
                .insert(id);
            out.push((id, attempt));
        }
        out
    }

    fn running_attempt(&self, task: TaskId, attempt: u32, executor: &str) -> bool {
        self.stages
            .get(&task.stage)
            .and_then(|s| s.tasks.get(task.partition as usize))
            .is_some_and(|t| {
                *t == TaskState::Running {
                    executor: executor.to_string(),
                    attempt,
                }
            })
    }

    /// A task attempt finished. Late or duplicate reports (an attempt that is no longer the
    /// running one, an executor declared lost) are ignored and return `false`.
    pub fn task_succeeded(
        &mut self,
        task: TaskId,
        attempt: u32,
        executor: &str,
    ) -> (bool, Vec<SchedulerEvent>) {
        if !self.running_attempt(task, attempt, executor) {
            return (false, Vec::new());
        }
        if let Some(e) = self.executors.get_mut(executor) {
            e.running.remove(&task);
        }
        let s = self.stages.get_mut(&task.stage).expect("checked");
        s.tasks[task.partition as usize] = TaskState::Done {
            executor: executor.to_string(),
        };
        s.completed_once[task.partition as usize] = true;
        let mut events = Vec::new();
        if s.tasks.iter().all(|t| matches!(t, TaskState::Done { .. })) {
            s.status = StageStatus::Succeeded;
            events.push(SchedulerEvent::StageSucceeded(task.stage));
            events.extend(self.refresh());
        }
        (true, events)
    }

    /// A task attempt failed.
    pub fn task_failed(
        &mut self,
        task: TaskId,
        attempt: u32,
        executor: &str,
        failure: TaskFailure,
    ) -> Vec<SchedulerEvent> {
        if !self.running_attempt(task, attempt, executor) {
            return Vec::new();
        }
        // An attempt that fails on an executor given notice is likely the notice's doing
        // (its machine is being taken apart): it is resubmitted counting nothing.
        let mut draining = false;
        if let Some(e) = self.executors.get_mut(executor) {
            e.running.remove(&task);
            draining = e.draining;
        }
        let p = task.partition as usize;
        match failure {
            TaskFailure::Data(message) => self.fail(JobFailure::Data { task, message }),
            TaskFailure::Executor(_) if draining => {
                let s = self.stages.get_mut(&task.stage).expect("checked");
                s.tasks[p] = TaskState::Pending;
                Vec::new()
            }
            TaskFailure::Executor(message) => {
                let s = self.stages.get_mut(&task.stage).expect("checked");
                s.tasks[p] = TaskState::Pending;
                s.failures[p] += 1;
                if s.failures[p] >= self.policy.max_task_attempts {
                    let failures = s.failures[p];
                    return self.fail(JobFailure::TaskAttempts {
                        task,
                        failures,
                        limit: self.policy.max_task_attempts,
                        last: message,
                    });
                }
                Vec::new()
            }
            TaskFailure::Fetch {
                executor: holder,
                stage,
                map_partition,
            } => {
                let s = self.stages.get_mut(&task.stage).expect("checked");
                s.tasks[p] = TaskState::Pending;
                let mut events = Vec::new();
                let held_there = self
                    .stages
                    .get(&stage)
                    .and_then(|s| s.tasks.get(map_partition as usize))
                    .is_some_and(|t| {
                        *t == TaskState::Done {
                            executor: holder.clone(),
                        }
                    });
                if held_there {
                    events.extend(self.lose_outputs(&[(stage, map_partition)], true));
                }
                events.extend(self.refresh());
                events
            }
        }
    }

    /// An executor is gone: its running tasks go back to pending and the outputs that lived
    /// only there are recomputed where still needed. A loss whose reason counts against the
    /// budget ([`LossReason::counts_against_budget`]) counts toward `maxExecutorLosses`, and
    /// its running tasks and resubmitted stages count as failed attempts; a reclaim counts
    /// nowhere. Said again of an executor declared lost by its silence, it settles the
    /// reason (see [`Scheduler::executor_silent`]).
    pub fn executor_lost(&mut self, id: &str, reason: LossReason) -> Vec<SchedulerEvent> {
        if !self.executors.contains_key(id) {
            return self.settle_silence(id, reason);
        }
        self.executor_gone(id, reason, reason.counts_against_budget(), false)
    }

    /// An executor stopped sending heartbeats. Whether that is its fault (a hung process) or
    /// not (its node died) only someone who sees the node can tell: the loss counts nowhere
    /// until [`Scheduler::executor_lost`] settles its reason.
    pub fn executor_silent(&mut self, id: &str) -> Vec<SchedulerEvent> {
        self.executor_gone(id, LossReason::HeartbeatTimeout, false, true)
    }

    fn executor_gone(
        &mut self,
        id: &str,
        reason: LossReason,
        counted: bool,
        unsettled: bool,
    ) -> Vec<SchedulerEvent> {
        let Some(info) = self.executors.remove(id) else {
            return Vec::new();
        };
        self.cancels.remove(id);
        self.lost.insert(id.to_string());
        self.losses.push(Loss {
            executor: id.to_string(),
            reason,
            outputs_lost: 0,
            counted,
            unsettled,
        });
        if let Some(failed) = self.over_loss_budget(id, reason) {
            return failed;
        }
        let mut events = Vec::new();
        let max_attempts = self.policy.max_task_attempts;
        for task in info.running {
            let s = self
                .stages
                .get_mut(&task.stage)
                .expect("running task has a stage");
            let p = task.partition as usize;
            s.tasks[p] = TaskState::Pending;
            if counted {
                s.failures[p] += 1;
                let failures = s.failures[p];
                if failures >= max_attempts {
                    return self.fail(JobFailure::TaskAttempts {
                        task,
                        failures,
                        limit: max_attempts,
                        last: format!("executor {id} lost ({})", reason.as_str()),
                    });
                }
            }
        }
        let held: Vec<(u32, u32)> = self
            .stages
            .iter()
            .filter(|(_, s)| !s.durable)
            .flat_map(|(sid, s)| {
                s.tasks
                    .iter()
                    .enumerate()
                    .filter_map(move |(p, t)| match t {
                        TaskState::Done { executor } if executor == id => Some((*sid, p as u32)),
                        _ => None,
                    })
            })
            .collect();
        let before = self.outputs_lost;
        events.extend(self.lose_outputs(&held, counted));
        if let Some(loss) = self.losses.last_mut() {
            loss.outputs_lost = self.outputs_lost - before;
        }
        events.extend(self.refresh());
        events
    }

    /// The loss of an executor declared lost by its silence gets its settled reason; one
    /// that counts is checked against the budget now.
    fn settle_silence(&mut self, id: &str, reason: LossReason) -> Vec<SchedulerEvent> {
        let Some(loss) = self
            .losses
            .iter_mut()
            .rev()
            .find(|l| l.executor == id && l.unsettled)
        else {
            return Vec::new();
        };
        loss.unsettled = false;
        loss.reason = reason;
        loss.counted = reason.counts_against_budget();
        self.over_loss_budget(id, reason).unwrap_or_default()
    }

    /// The job's failure when the counted losses exceed `maxExecutorLosses`.
    fn over_loss_budget(&mut self, id: &str, reason: LossReason) -> Option<Vec<SchedulerEvent>> {
        let counted = self.losses.iter().filter(|l| l.counted).count() as u32;
        (counted > self.policy.max_executor_losses).then(|| {
            self.fail(JobFailure::ExecutorLosses {
                lost: counted,
                limit: self.policy.max_executor_losses,
                executor: id.to_string(),
                reason,
            })
        })
    }

    /// An output could not be read where the scheduler placed it (a result fetch that
    /// failed): it is recomputed if still needed, as after a failed shuffle fetch.
    pub fn output_lost(
        &mut self,
        stage: u32,
        partition: u32,
        executor: &str,
    ) -> Vec<SchedulerEvent> {
        let held_there = self
            .stages
            .get(&stage)
            .and_then(|s| s.tasks.get(partition as usize))
            .is_some_and(|t| matches!(t, TaskState::Done { executor: e } if e == executor));
        if !held_there {
            return Vec::new();
        }
        let mut events = self.lose_outputs(&[(stage, partition)], true);
        events.extend(self.refresh());
        events
    }

    fn needed(&self, stage: u32) -> bool {
        let Some(s) = self.stages.get(&stage) else {
            return false;
        };
        !s.released
            && (s.pinned
                || self.stages.values().any(|c| {
                    !c.released && c.inputs.contains(&stage) && c.status != StageStatus::Succeeded
                }))
    }

    /// Outputs gone: recomputed where still needed. `counted`: a stage resubmitted for them
    /// uses one of its `maxStageAttempts` (not after a reclaim).
    fn lose_outputs(&mut self, outputs: &[(u32, u32)], counted: bool) -> Vec<SchedulerEvent> {
        let mut by_stage: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &(sid, p) in outputs {
            by_stage.entry(sid).or_default().push(p);
        }
        let mut events = Vec::new();
        // Consumers before their inputs (ids follow dependency order): a consumer that must
        // rerun makes its inputs needed again.
        for (sid, partitions) in by_stage.into_iter().rev() {
            let needed = self.needed(sid);
            let s = self.stages.get_mut(&sid).expect("output of a known stage");
            let partitions_lost = partitions.len();
            for p in partitions {
                s.tasks[p as usize] = TaskState::Pending;
            }
            if !needed {
                // Recomputed only if a stage that reads it runs again.
                continue;
            }
            self.outputs_lost += partitions_lost as u64;
            if s.status == StageStatus::Succeeded {
                s.attempts += u32::from(counted);
                if s.attempts > self.policy.max_stage_attempts {
                    let attempts = s.attempts;
                    events.extend(self.fail(JobFailure::StageAttempts {
                        stage: sid,
                        attempts,
                        limit: self.policy.max_stage_attempts,
                    }));
                    return events;
                }
                s.status = StageStatus::Resolved;
            }
            // Consumers that have not finished must wait for the recomputed partitions.
            let consumers: Vec<u32> = self
                .stages
                .iter()
                .filter(|(_, c)| c.inputs.contains(&sid) && c.status != StageStatus::Succeeded)
                .map(|(id, _)| *id)
                .collect();
            for c in consumers {
                self.stages.get_mut(&c).expect("known").status = StageStatus::Unresolved;
            }
        }
        // A stage whose own inputs are gone waits for them (walking up the lineage).
        self.wait_for_inputs();
        events
    }

    /// Stages still to run wait for inputs that lost partitions, and those inputs (lost
    /// while nothing read them, so left as they were) are recomputed, up the lineage.
    /// Returns whether any stage changed.
    fn wait_for_inputs(&mut self) -> bool {
        let mut changed = false;
        loop {
            let mut again = false;
            let ids: Vec<u32> = self.stages.keys().copied().collect();
            for sid in ids {
                let s = &self.stages[&sid];
                if s.status == StageStatus::Succeeded || s.released {
                    continue;
                }
                for i in s.inputs.clone() {
                    if let Some(input) = self.stages.get_mut(&i)
                        && input.status == StageStatus::Succeeded
                        && !input
                            .tasks
                            .iter()
                            .all(|t| matches!(t, TaskState::Done { .. }))
                    {
                        input.status = StageStatus::Unresolved;
                        input.released = false;
                        again = true;
                    }
                }
                let s = &self.stages[&sid];
                if matches!(s.status, StageStatus::Resolved | StageStatus::Running)
                    && !self.inputs_complete(sid)
                {
                    self.stages.get_mut(&sid).expect("known").status = StageStatus::Unresolved;
                    again = true;
                }
            }
            if !again {
                return changed;
            }
            changed = true;
        }
    }

    fn inputs_complete(&self, stage: u32) -> bool {
        self.stages[&stage].inputs.iter().all(|i| {
            self.stages.get(i).is_some_and(|s| {
                s.status == StageStatus::Succeeded
                    && s.tasks.iter().all(|t| matches!(t, TaskState::Done { .. }))
            })
        })
    }

    fn refresh(&mut self) -> Vec<SchedulerEvent> {
        let mut events = Vec::new();
        let ids: Vec<u32> = self.stages.keys().copied().collect();
        for sid in ids {
            if self.stages[&sid].status == StageStatus::Unresolved && self.inputs_complete(sid) {
                let s = self.stages.get_mut(&sid).expect("known");
                s.epoch += 1;
                let started = s.tasks.iter().any(|t| *t != TaskState::Pending);
                s.status = if s.tasks.iter().all(|t| matches!(t, TaskState::Done { .. })) {
                    StageStatus::Succeeded
                } else if started {
                    StageStatus::Running
                } else {
                    StageStatus::Resolved
                };
                events.push(SchedulerEvent::StageResolved(sid));
            }
        }
        events
    }

    fn fail(&mut self, reason: JobFailure) -> Vec<SchedulerEvent> {
        if self.failure.is_none() {
            self.failure = Some(reason.clone());
            vec![SchedulerEvent::JobFailed(reason)]
        } else {
            Vec::new()
        }
    }

    /// Tasks of each stage by state, for progress: `(done, total)`.
    pub fn progress(&self, stage: u32) -> (usize, usize) {
        self.stages.get(&stage).map_or((0, 0), |s| {
            (
                s.tasks
                    .iter()
                    .filter(|t| matches!(t, TaskState::Done { .. }))
                    .count(),
                s.tasks.len(),
            )
        })
    }
}

#[cfg(test)]
mod tests;
