//! `DriverCore`: every piece of the driver's state, and one method per event that changes
//! it. Executors registering, polling, reporting and being lost; the job runner submitting a
//! step's stages, releasing what it no longer needs and recording iterations. Each method
//! answers with what to do next; progress for bars and logs collects in an outbox the shell
//! drains. No locks, no I/O, no clock of its own (callers pass `now`): the gRPC service
//! (`service.rs`) and the job runner (`runner.rs`) are thin shells around it, and the unit
//! tests (`core_tests.rs`) drive it with synthetic events.
//!
//! Where each piece of state lives:
//! - the stage graph, task attempts, the executor registry and block locations (the lineage):
//!   the inner [`Scheduler`];
//! - what each stage is for and what its tasks counted: [`StageInfo`] in `stages`;
//! - which attempt of each output partition commits: `commits`;
//! - losses and how long each took to make good: `loss_timings`;
//! - stages whose blocks executors may drop, per executor: `drops`;
//! - iterations of iterative steps: `iterations`;
//! - executors being drained and the copies of their outputs: `drains`, with the events
//!   that feed it in `core_drain.rs`;
//! - what a replacement driver takes over (the executors' holdings, the journal of the
//!   driver before it) and what it hands on (its own journal): `resume`, with the
//!   events that feed it in `core_resume.rs`;
//! - what the core says of the job (the operator's status, the final summary):
//!   `core_status.rs`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kiln_api::FailurePolicy;

use super::journal::{CommitRecord, Journal};
use super::scheduler::{
    ExecutorId, JobFailure, LossReason, Scheduler, SchedulerEvent, StageStatus, TaskFailure, TaskId,
};
use crate::summary::StageCounters;

/// Progress of a job, for bars and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A stage was submitted.
    StageSubmitted {
        stage: u32,
        step: String,
        description: String,
        tasks: usize,
        /// Whether it hash-partitions its output for a shuffle.
        shuffle: bool,
    },
    /// A task of the stage finished; `done` of `total` partitions are complete.
    TaskDone {
        stage: u32,
        done: usize,
        total: usize,
    },
    /// Every partition of the stage is complete.
    StageDone { stage: u32 },
    /// A replacement driver took the stage over complete from the executors' holdings (and
    /// the journal): nothing of it reruns.
    StageResumed { stage: u32 },
    /// An executor was lost.
    ExecutorLost { executor: String, reason: String },
    /// An executor was given notice; `outputs` of its outputs are being copied away.
    ExecutorDraining { executor: String, outputs: usize },
    /// An executor registered, serving blocks at `address`.
    ExecutorRegistered { executor: String, address: String },
    /// An iterative step started an iteration.
    Iteration {
        step: String,
        iteration: u32,
        of: u32,
    },
}

/// A stage as the job runner submits it (its plan stays with the runner's plans).
#[derive(Clone, Debug)]
pub(crate) struct StageSubmission {
    /// Stage id (ids follow dependency order).
    pub id: u32,
    /// What it runs, for people.
    pub description: String,
    /// Partitions, one task each.
    pub partitions: usize,
    /// Stages it reads.
    pub inputs: Vec<u32>,
    /// A stage whose partition `p` its task `p` reads whole (run where that lives).
    pub preferred: Option<u32>,
    /// Whether it hash-partitions its output for a shuffle.
    pub shuffle: bool,
    /// Whether it writes the job's output (its results outlive executors and commit).
    pub sink: bool,
    /// Its plan's fingerprint: outputs of an earlier driver's stage are adopted only for the
    /// same plan.
    pub fingerprint: u64,
    /// Blocks each task writes (its reduce partitions; 1 for pass-through outputs).
    pub blocks_per_task: u32,
}

/// What the core keeps of each stage besides its place in the graph.
#[derive(Clone, Debug)]
pub(crate) struct StageInfo {
    pub step: String,
    pub description: String,
    pub shuffle: bool,
    pub partitions: usize,
    pub fingerprint: u64,
    pub blocks_per_task: u32,
    pub counters: StageCounters,
}

/// When a loss happened, was seen, and was made good. A drained executor's starts with
/// its notice: the job runs short from then, not from when it finally leaves.
#[derive(Clone, Debug)]
struct LossTiming {
    /// The executor lost (or given notice).
    executor: ExecutorId,
    /// When the executor went, if known (a kill the runner made, a pod's deletion, the last
    /// heartbeat of a silent executor, the notice of a drained one).
    occurred: Option<Instant>,
    /// When the driver declared it lost.
    detected: Instant,
    /// Executors taking tasks just before the loss.
    width_before: usize,
    /// When as many executors took tasks again.
    full_width: Option<Instant>,
}

impl LossTiming {
    /// A loss (or notice) of `executor` the driver learnt of `now`, with `width_before`
    /// executors taking tasks.
    fn new(executor: &str, occurred: Option<Instant>, now: Instant, width_before: usize) -> Self {
        Self {
            executor: executor.to_string(),
            occurred: occurred.map(|o| o.min(now)),
            detected: now,
            width_before,
            full_width: None,
        }
    }
}

/// The answer to a registration.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registration {
    /// Welcome.
    Accepted,
    /// The id was declared lost: it must not come back under it.
    Refused(String),
}

/// The answer to a poll.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PollAnswer {
    /// The job is over: finish and exit.
    Shutdown,
    /// The driver does not know this executor (it was declared lost).
    UnknownExecutor,
    /// Tasks to run (attempt numbers with them), stages whose blocks may go, and the
    /// journal when it changed since the executor last got it.
    Work {
        tasks: Vec<(TaskId, u32)>,
        drops: Vec<u32>,
        journal: Option<Vec<u8>>,
        migrations: Vec<Migration>,
        /// Attempts to stop: a draining executor's, resubmitted elsewhere.
        cancels: Vec<(TaskId, u32)>,
    },
    /// The executor was drained: nothing it holds is needed here any more; exit.
    Decommissioned,
    /// Nothing yet: wait for news before answering (a long poll).
    Wait,
}

/// How a task attempt ended, as its executor reports it.
#[derive(Clone, Debug)]
pub(crate) enum TaskOutcome {
    /// It succeeded, with what it counted.
    Succeeded(StageCounters),
    /// It failed.
    Failed(TaskFailure),
}

/// Where a stage the runner waits for stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StageOutcome {
    /// Still running (or recomputing lost partitions).
    Waiting,
    /// Every partition is complete.
    Succeeded,
    /// The job cannot go on.
    Failed(JobFailure),
}

/// The driver's state.
#[derive(Debug)]
pub(crate) struct DriverCore {
    sched: Scheduler,
    stages: BTreeMap<u32, StageInfo>,
    /// Output stage → partition → the one attempt allowed to commit it.
    commits: BTreeMap<u32, BTreeMap<u32, CommitRecord>>,
    /// This driver's run (its output attempts stage under it) and epoch, what it took over
    /// and what it hands on.
    resume: core_resume::Resume,
    loss_timings: Vec<LossTiming>,
    drains: core_drain::Drains,
    drops: HashMap<ExecutorId, Vec<u32>>,
    registered: BTreeSet<ExecutorId>,
    departed: BTreeSet<ExecutorId>,
    iterations: HashMap<String, u32>,
    shutdown: bool,
    started: Instant,
    outbox: Vec<Progress>,
    /// Something changed that may give waiting polls work or the runner news.
    changed: bool,
}

impl DriverCore {
    /// A core for a job with these budgets, started at `now`, for driver run `run_id` of
    /// epoch `epoch` (1 for a job's first driver).
    pub fn new(policy: FailurePolicy, run_id: &str, epoch: u64, now: Instant) -> Self {
        Self {
            sched: Scheduler::new(policy),
            stages: BTreeMap::new(),
            commits: BTreeMap::new(),
            resume: core_resume::Resume::new(run_id, epoch),
            loss_timings: Vec::new(),
            drains: core_drain::Drains::default(),
            drops: HashMap::new(),
            registered: BTreeSet::new(),
            departed: BTreeSet::new(),
            iterations: HashMap::new(),
            shutdown: false,
            started: now,
            outbox: Vec::new(),
            changed: false,
        }
    }

    /// Progress since the last call, for the shell to publish.
    pub fn take_progress(&mut self) -> Vec<Progress> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether anything changed since the last call that waiting polls or the runner must
    /// look at (a poll that only took work changes nothing for the others).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    // ---- events from executors -------------------------------------------------------

    /// An executor announces itself, with what it holds from an earlier driver of the job
    /// (`held`: stage, plan fingerprint, partitions) and the newest journal it was sent.
    pub fn register(
        &mut self,
        executor: &str,
        address: &str,
        held: &[(u32, u64, Vec<u32>)],
        journal: Option<Journal>,
        now: Instant,
    ) -> Registration {
        // A live id stays with the process that registered it: another, even one holding
        // the job's token, cannot take it over and have peers fetch its blocks from it. The
        // same process registering again (its answer was lost) is welcome.
        if let Some(live) = self.sched.address(executor)
            && live != address
        {
            return Registration::Refused(format!(
                "executor {executor} is registered and live at {live}; an id cannot be registered again from {address}"
            ));
        }
        if !self.sched.register_executor(executor, address, now) {
            return Registration::Refused(format!(
                "executor {executor} was declared lost; register under a new id"
            ));
        }
        self.registered.insert(executor.to_string());
        self.changed = true;
        self.note_width(now);
        self.outbox.push(Progress::ExecutorRegistered {
            executor: executor.to_string(),
            address: address.to_string(),
        });
        self.take_over(executor, held, journal);
        // Outputs of drains that had nowhere to go move here.
        self.place_migrations();
        Registration::Accepted
    }

    /// An executor asks for work with `free` slots, saying which attempts it holds (running,
    /// or finished with the report not yet acknowledged). `last_round`: answer even with
    /// nothing to give (the long poll has waited long enough). A draining executor gets no
    /// tasks; it is told to leave once its outputs moved.
    pub fn poll(
        &mut self,
        executor: &str,
        free: usize,
        held: &BTreeSet<(TaskId, u32)>,
        last_round: bool,
        now: Instant,
    ) -> PollAnswer {
        if self.shutdown {
            self.departed.insert(executor.to_string());
            return PollAnswer::Shutdown;
        }
        if !self.sched.is_live(executor) {
            return PollAnswer::UnknownExecutor;
        }
        self.sched.heartbeat(executor, now);
        for task in self.sched.reconcile(executor, held) {
            self.changed = true;
            tracing::warn!(
                executor,
                stage = task.stage,
                partition = task.partition,
                "the executor does not hold a task the driver gave it (an assignment or its report was lost); rescheduled"
            );
        }
        match self.drain_done(executor, now) {
            Some(true) => {
                self.finish_drain(executor, now);
                return PollAnswer::Decommissioned;
            }
            Some(false) => {
                let cancels = self.sched.take_cancels(executor);
                if cancels.is_empty() && !last_round {
                    return PollAnswer::Wait;
                }
                return PollAnswer::Work {
                    tasks: Vec::new(),
                    drops: self.drops.remove(executor).unwrap_or_default(),
                    journal: self.journal_for(executor),
                    migrations: Vec::new(),
                    cancels,
                };
            }
            None => {}
        }
        let tasks = self.sched.assign(executor, free);
        let migrations = self.take_migrations(executor);
        let cancels = self.sched.take_cancels(executor);
        let drops = self.drops.get(executor).map_or(0, Vec::len);
        let nothing = tasks.is_empty() && migrations.is_empty() && cancels.is_empty();
        if nothing && drops == 0 && !last_round && free > 0 {
            return PollAnswer::Wait;
        }
        PollAnswer::Work {
            tasks,
            drops: self.drops.remove(executor).unwrap_or_default(),
            journal: self.journal_for(executor),
            migrations,
            cancels,
        }
    }

    /// A task attempt ended. Returns whether it counted as the partition's success (late
    /// and duplicate reports, those of attempts no longer current, and failures do not).
    pub fn report(
        &mut self,
        executor: &str,
        task: TaskId,
        attempt: u32,
        outcome: TaskOutcome,
    ) -> bool {
        match outcome {
            TaskOutcome::Succeeded(counters) => {
                let (counted, events) = self.sched.task_succeeded(task, attempt, executor);
                if counted {
                    let fingerprint = self.stages.get(&task.stage).map_or(0, |s| s.fingerprint);
                    if let Some(commits) = self.commits.get_mut(&task.stage) {
                        // The first success is the one attempt whose files the job commits.
                        commits
                            .entry(task.partition)
                            .or_insert_with(|| CommitRecord {
                                stage: task.stage,
                                fingerprint,
                                partition: task.partition,
                                run_id: self.resume.run_id.clone(),
                                attempt,
                                rows: counters.output_rows,
                                files: counters.files_written,
                            });
                        self.resume.journal_changed();
                    }
                    if let Some(info) = self.stages.get_mut(&task.stage) {
                        info.counters.add(&counters);
                    }
                    if self.is_draining(executor) {
                        self.made_while_draining(executor, task);
                    }
                    let (done, total) = self.sched.progress(task.stage);
                    self.outbox.push(Progress::TaskDone {
                        stage: task.stage,
                        done,
                        total,
                    });
                }
                self.handle(events);
                counted
            }
            TaskOutcome::Failed(failure) => {
                let events = self.sched.task_failed(task, attempt, executor, failure);
                self.handle(events);
                false
            }
        }
    }

    /// Someone (the operator, the local runner) saw `executor` go; `occurred` is when, if
    /// known. Said of an executor already declared lost by its silence, it settles why.
    /// Returns whether the executor was live.
    pub fn lose(
        &mut self,
        executor: &str,
        reason: LossReason,
        occurred: Option<Instant>,
        now: Instant,
    ) -> bool {
        if !self.sched.is_live(executor) {
            let events = self.sched.executor_lost(executor, reason);
            self.handle(events);
            return false;
        }
        self.lose_now(executor, reason, false, occurred, now);
        true
    }

    fn lose_now(
        &mut self,
        executor: &str,
        reason: LossReason,
        silent: bool,
        occurred: Option<Instant>,
        now: Instant,
    ) {
        tracing::warn!(executor, reason = reason.as_str(), "executor lost");
        // A drained executor's timing began with its notice.
        let timed = self.is_draining(executor);
        self.drop_drains_of(executor);
        let width_before = self.serving_width();
        let events = if silent {
            self.sched.executor_silent(executor)
        } else {
            self.sched.executor_lost(executor, reason)
        };
        // Copies that were going to it go to another target.
        self.place_migrations();
        if !timed {
            self.loss_timings
                .push(LossTiming::new(executor, occurred, now, width_before));
        }
        self.outbox.push(Progress::ExecutorLost {
            executor: executor.to_string(),
            reason: reason.as_str().to_string(),
        });
        self.handle(events);
    }

    /// Declares lost every executor silent for longer than `timeout`, as
    /// `HeartbeatTimeout` counted nowhere until someone who sees its node settles why.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<ExecutorId> {
        let expired = self.sched.expired(now, timeout);
        for (executor, last_seen) in &expired {
            self.lose_now(
                executor,
                LossReason::HeartbeatTimeout,
                true,
                Some(*last_seen),
                now,
            );
        }
        expired.into_iter().map(|(e, _)| e).collect()
    }

    // ---- events from the job runner --------------------------------------------------

    /// Submits a step's stages, in dependency order; the last one stays pinned (needed after
    /// its consumers finish) when `keep_final`.
    pub fn submit(&mut self, step: &str, stages: Vec<StageSubmission>, keep_final: bool) -> u32 {
        let final_stage = stages.last().expect("a plan has at least one stage").id;
        for stage in stages {
            self.outbox.push(Progress::StageSubmitted {
                stage: stage.id,
                step: step.to_string(),
                description: stage.description.clone(),
                tasks: stage.partitions,
                shuffle: stage.shuffle,
            });
            self.stages.insert(
                stage.id,
                StageInfo {
                    step: step.to_string(),
                    description: stage.description,
                    shuffle: stage.shuffle,
                    partitions: stage.partitions,
                    fingerprint: stage.fingerprint,
                    blocks_per_task: stage.blocks_per_task,
                    counters: StageCounters::default(),
                },
            );
            let events =
                self.sched
                    .add_stage(stage.id, stage.partitions, stage.inputs, stage.preferred);
            if stage.sink {
                self.sched.set_durable(stage.id);
                self.commits.insert(stage.id, BTreeMap::new());
            }
            self.handle(events);
            self.adopt(stage.id);
        }
        self.sched.pin(final_stage, keep_final);
        final_stage
    }

    /// Where a stage the runner waits for stands.
    pub fn outcome(&self, stage: u32) -> StageOutcome {
        if let Some(failure) = self.sched.failure() {
            return StageOutcome::Failed(failure.clone());
        }
        match self.sched.status(stage) {
            Some(StageStatus::Succeeded) => StageOutcome::Succeeded,
            _ => StageOutcome::Waiting,
        }
    }

    /// A result or cached dataset no longer needed: it, and the lineage only it kept, go.
    pub fn release(&mut self, stage: u32) {
        self.changed = true;
        self.sched.pin(stage, false);
        self.collect_garbage();
    }

    /// Stages nothing needs any more: never recomputed, their blocks dropped by executors
    /// at their next poll.
    pub fn collect_garbage(&mut self) {
        let stages = self.sched.collect_garbage();
        if stages.is_empty() {
            return;
        }
        let executors: Vec<ExecutorId> = self.sched.executors().cloned().collect();
        for e in executors {
            self.drops.entry(e).or_default().extend_from_slice(&stages);
        }
    }

    /// A result partition could not be fetched from `executor`: recompute it.
    pub fn result_lost(&mut self, stage: u32, partition: u32, executor: &str) {
        let events = self.sched.output_lost(stage, partition, executor);
        self.handle(events);
    }

    /// An iterative step started iteration `iteration` of at most `of`.
    pub fn iteration_started(&mut self, step: &str, iteration: u32, of: u32) {
        self.outbox.push(Progress::Iteration {
            step: step.to_string(),
            iteration,
            of,
        });
    }

    /// Notes that `step` finished iteration `n`.
    pub fn iteration_done(&mut self, step: &str, n: u32) {
        self.iterations.insert(step.to_string(), n);
    }

    /// The job is over: polls are answered with shutdown from now on.
    pub fn begin_shutdown(&mut self) {
        self.changed = true;
        self.shutdown = true;
    }

    /// A task could not be handed out (its plan did not encode): it fails on its own data.
    pub fn task_unsendable(&mut self, executor: &str, task: TaskId, attempt: u32, why: String) {
        let events = self
            .sched
            .task_failed(task, attempt, executor, TaskFailure::Data(why));
        self.handle(events);
    }

    // ---- queries ------------------------------------------------------------------------

    /// The attempt of each partition of output stage `stage` that commits.
    pub fn commits(&self, stage: u32) -> Vec<CommitRecord> {
        self.commits
            .get(&stage)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Where each partition of a complete stage lives: `(executor, address)` per partition.
    pub fn locations(&self, stage: u32) -> Option<Vec<(ExecutorId, String)>> {
        self.sched.locations(stage)
    }

    /// Bumped each time the stage is resolved: a plan encoded at an older epoch carries stale
    /// locations.
    pub fn epoch(&self, stage: u32) -> u64 {
        self.sched.epoch(stage)
    }

    /// What the core keeps of a stage.
    pub fn stage(&self, stage: u32) -> Option<&StageInfo> {
        self.stages.get(&stage)
    }

    /// Live executors that have not been told to leave.
    fn live(&self) -> impl Iterator<Item = &ExecutorId> {
        self.sched
            .executors()
            .filter(|e| !self.departed.contains(*e))
    }

    /// How many executors are live and not told to leave.
    pub fn live_width(&self) -> usize {
        self.live().count()
    }

    /// Live executors taking tasks: those not draining.
    fn serving_width(&self) -> usize {
        self.live().filter(|e| !self.sched.is_draining(e)).count()
    }

    /// Live executors, with how many outputs still needed each holds.
    pub fn outputs_held(&self) -> BTreeMap<ExecutorId, usize> {
        let mut held = self.sched.needed_outputs_by_executor();
        held.retain(|e, _| !self.departed.contains(e));
        held
    }

    /// Whether an executor serving blocks at `address` is registered and live.
    pub fn serves_at(&self, address: &str) -> bool {
        self.sched.addresses().any(|a| a == address)
    }

    /// Whether `executor` is registered and not lost.
    pub fn is_live(&self, executor: &str) -> bool {
        self.sched.is_live(executor)
    }

    // ---- inner -----------------------------------------------------------------------

    fn handle(&mut self, events: Vec<SchedulerEvent>) {
        self.changed = true;
        for e in events {
            match e {
                SchedulerEvent::StageSucceeded(stage) => {
                    self.outbox.push(Progress::StageDone { stage })
                }
                SchedulerEvent::StageResolved(_) => {}
                SchedulerEvent::JobFailed(reason) => tracing::error!(%reason, "job failed"),
            }
        }
    }

    /// Marks losses made good once as many executors take tasks as before them.
    fn note_width(&mut self, now: Instant) {
        let width = self.serving_width();
        for t in &mut self.loss_timings {
            if t.full_width.is_none() && width >= t.width_before {
                t.full_width = Some(now);
            }
        }
    }
}

#[path = "core_drain.rs"]
mod core_drain;
#[path = "core_resume.rs"]
mod core_resume;
#[path = "core_status.rs"]
mod core_status;

#[cfg(test)]
use core_drain::CONTINUE_WINDOW;
pub(crate) use core_drain::Migration;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
