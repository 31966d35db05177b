//! The driver's control service and the state it guards: the scheduler, the stage plans
//! (encoded for executors once per resolution), per-stage counters and progress events.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec;
use kiln_api::JobSpec;
use tokio::sync::{Notify, broadcast};
use tonic::{Request, Response, Status};

use super::scheduler::{LossReason, Scheduler, SchedulerEvent, TaskFailure, TaskId};
use crate::plan::KilnCodec;
use crate::rpc::{self, FailureKind, task_report::Outcome};
use crate::shuffle::{Location, ShuffleReaderExec};
use crate::summary::{
    JobSummary, LossSummary, RecoverySummary, StageCounters, StageSummary, StepSummary, Totals,
};
use crate::{Error, Result};

/// How long a poll with free slots waits for work before answering empty.
const LONG_POLL: Duration = Duration::from_millis(500);

/// Progress of a job, for bars and logs.
#[derive(Clone, Debug)]
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
    /// An executor was lost.
    ExecutorLost { executor: String, reason: String },
    /// An executor registered.
    ExecutorRegistered { executor: String },
    /// An iterative step started an iteration.
    Iteration {
        step: String,
        iteration: u32,
        of: u32,
    },
}

pub(crate) struct StageRecord {
    pub plan: Arc<dyn ExecutionPlan>,
    pub step: String,
    pub description: String,
    pub shuffle: bool,
    pub partitions: usize,
    pub encoded: Option<(u64, Bytes)>,
    pub counters: StageCounters,
}

/// When a loss happened, was seen, and was made good.
pub(crate) struct LossTiming {
    /// When the executor went, if known (a kill the runner made, a pod's deletion, the last
    /// heartbeat of a silent executor).
    pub occurred: Option<Instant>,
    /// When the driver declared it lost.
    pub detected: Instant,
    /// Live executors just before the loss.
    pub width_before: usize,
    /// When as many executors were live again.
    pub full_width: Option<Instant>,
}

pub(crate) struct DriverState {
    pub sched: Scheduler,
    /// One per `sched.losses()`, in the same order.
    pub loss_timings: Vec<LossTiming>,
    pub stages: BTreeMap<u32, StageRecord>,
    pub drops: HashMap<String, Vec<u32>>,
    pub shutdown: bool,
    pub registered: BTreeSet<String>,
    pub departed: BTreeSet<String>,
    /// Iterations run by each iterative step.
    pub iterations: HashMap<String, u32>,
}

pub(crate) struct Shared {
    pub state: Mutex<DriverState>,
    /// Wakes long polls: new work may be available.
    pub work: Notify,
    /// Wakes the job runner: a stage finished or the job failed.
    pub changed: Notify,
    pub progress: broadcast::Sender<Progress>,
    spec_json: String,
    job_id: String,
    token: Option<String>,
    /// When the driver started: loss times in the summary count from here.
    pub started: Instant,
}

impl Shared {
    pub fn new(spec: &JobSpec, token: Option<String>) -> Result<Self> {
        let spec_json = serde_json::to_string(spec).map_err(|e| Error::Driver(e.to_string()))?;
        Ok(Self {
            state: Mutex::new(DriverState {
                sched: Scheduler::new(spec.failure_policy.clone()),
                loss_timings: Vec::new(),
                stages: BTreeMap::new(),
                drops: HashMap::new(),
                shutdown: false,
                registered: BTreeSet::new(),
                departed: BTreeSet::new(),
                iterations: HashMap::new(),
            }),
            work: Notify::new(),
            changed: Notify::new(),
            progress: broadcast::channel(8192).0,
            spec_json,
            job_id: uuid::Uuid::new_v4().to_string(),
            token,
            started: Instant::now(),
        })
    }

    fn check_token(&self, token: &str) -> Result<(), Status> {
        match &self.token {
            Some(t) if t != token => Err(Status::unauthenticated(
                "this executor does not carry the job's token",
            )),
            _ => Ok(()),
        }
    }

    pub fn emit(&self, p: Progress) {
        let _ = self.progress.send(p);
    }

    /// Acts on scheduler events: progress and wake-ups.
    pub fn handle(&self, events: Vec<SchedulerEvent>) {
        for e in events {
            match e {
                SchedulerEvent::StageSucceeded(stage) => self.emit(Progress::StageDone { stage }),
                SchedulerEvent::StageResolved(_) => {}
                SchedulerEvent::JobFailed(reason) => tracing::error!(%reason, "job failed"),
            }
        }
        self.work.notify_waiters();
        self.changed.notify_waiters();
    }

    pub fn executor_lost(&self, executor: &str, reason: LossReason, occurred: Option<Instant>) {
        let mut state = self.state.lock().unwrap();
        self.lose(&mut state, executor, reason, occurred);
    }

    fn lose(
        &self,
        state: &mut DriverState,
        executor: &str,
        reason: LossReason,
        occurred: Option<Instant>,
    ) {
        if !state.sched.is_live(executor) {
            return;
        }
        tracing::warn!(executor, reason = reason.as_str(), "executor lost");
        let width_before = state.live_width();
        let events = state.sched.executor_lost(executor, reason);
        state.loss_timings.push(LossTiming {
            occurred,
            detected: Instant::now(),
            width_before,
            full_width: None,
        });
        self.emit(Progress::ExecutorLost {
            executor: executor.to_string(),
            reason: reason.as_str().to_string(),
        });
        self.handle(events);
    }

    /// Notes that `step` finished iteration `n`.
    pub fn record_iteration(&self, step: &str, n: u32) {
        self.state
            .lock()
            .unwrap()
            .iterations
            .insert(step.to_string(), n);
    }

    pub fn begin_shutdown(&self) {
        self.state.lock().unwrap().shutdown = true;
        self.work.notify_waiters();
    }

    pub fn live_executors(&self) -> usize {
        self.state.lock().unwrap().live_width()
    }

    /// Progress so far, for the operator.
    pub fn job_status(&self) -> rpc::JobStatusResponse {
        let state = self.state.lock().unwrap();
        let mut status = rpc::JobStatusResponse::default();
        for id in state.stages.keys() {
            let (done, total) = state.sched.progress(*id);
            status.stages_total += 1;
            status.stages_done += u32::from(done == total);
            status.tasks_done += done as u64;
            status.tasks_total += total as u64;
            status.partitions_recomputed += state.sched.launch_counts(*id).1;
        }
        status.executors_live = state.live_width() as u32;
        status.executors_lost = state.sched.losses().len() as u32;
        status.last_lost_executor = state
            .sched
            .losses()
            .last()
            .map(|l| l.executor.clone())
            .unwrap_or_default();
        status.lost_executors = state
            .sched
            .losses()
            .iter()
            .map(|l| rpc::LostExecutor {
                executor_id: l.executor.clone(),
                reason: l.reason.as_str().to_string(),
            })
            .collect();
        status
    }

    /// The summary of what ran so far.
    pub fn summary(&self, spec: &JobSpec) -> JobSummary {
        let state = self.state.lock().unwrap();
        let mut stages = Vec::new();
        let mut totals = Totals::default();
        for (id, rec) in &state.stages {
            let (attempts, recomputed) = state.sched.launch_counts(*id);
            totals.tasks += rec.partitions as u64;
            totals.attempts += attempts;
            totals.recomputed += recomputed;
            totals.counters.add(&rec.counters);
            stages.push(StageSummary {
                id: *id,
                step: rec.step.clone(),
                description: rec.description.clone(),
                shuffle: rec.shuffle,
                tasks: rec.partitions as u64,
                attempts,
                recomputed,
                counters: rec.counters.clone(),
            });
        }
        let steps = spec
            .steps
            .iter()
            .filter_map(|step| {
                let own: Vec<&StageSummary> =
                    stages.iter().filter(|s| s.step == step.name).collect();
                (!own.is_empty()).then(|| StepSummary {
                    name: step.name.clone(),
                    cached: step.cache != kiln_api::CacheLevel::None,
                    stages: own.iter().map(|s| s.id).collect(),
                    tasks: own.iter().map(|s| s.tasks).sum(),
                    attempts: own.iter().map(|s| s.attempts).sum(),
                    iterations: state.iterations.get(&step.name).copied(),
                })
            })
            .collect();
        let recovery = state.recovery(self.started);
        JobSummary {
            executors: state.registered.len() as u64,
            stages,
            totals,
            steps,
            recovery,
            ..Default::default()
        }
    }
}

impl DriverState {
    /// Live executors that have not been told to leave.
    pub fn live_width(&self) -> usize {
        self.sched
            .executors()
            .filter(|e| !self.departed.contains(*e))
            .count()
    }

    /// Losses and what they cost.
    fn recovery(&self, started: Instant) -> RecoverySummary {
        let ms = |d: Duration| d.as_millis() as u64;
        let mut recovery = RecoverySummary {
            outputs_lost: self.sched.outputs_lost(),
            ..Default::default()
        };
        for (loss, t) in self.sched.losses().iter().zip(&self.loss_timings) {
            *recovery
                .executors_lost
                .entry(loss.reason.as_str().to_string())
                .or_default() += 1;
            recovery.losses.push(LossSummary {
                executor: loss.executor.clone(),
                reason: loss.reason.as_str().to_string(),
                at_ms: ms(t.detected.saturating_duration_since(started)),
                outputs_lost: loss.outputs_lost,
                detection_ms: t
                    .occurred
                    .map(|o| ms(t.detected.saturating_duration_since(o))),
                full_width_ms: t
                    .full_width
                    .map(|f| ms(f.saturating_duration_since(t.occurred.unwrap_or(t.detected)))),
            });
        }
        recovery
    }

    /// Marks losses made good once as many executors are live as before them.
    fn note_width(&mut self, now: Instant) {
        let width = self.live_width();
        for t in &mut self.loss_timings {
            if t.full_width.is_none() && width >= t.width_before {
                t.full_width = Some(now);
            }
        }
    }

    /// The stage's plan with its readers pointing at the current locations of their inputs,
    /// encoded once per resolution.
    fn encoded(&mut self, stage: u32) -> Result<Bytes> {
        let epoch = self.sched.epoch(stage);
        let rec = self
            .stages
            .get(&stage)
            .ok_or_else(|| Error::Driver(format!("unknown stage {stage}")))?;
        if let Some((e, bytes)) = &rec.encoded
            && *e == epoch
        {
            return Ok(bytes.clone());
        }
        let sched = &self.sched;
        let resolved = rec
            .plan
            .clone()
            .transform_up(|node| {
                let Some(r) = node.downcast_ref::<ShuffleReaderExec>() else {
                    return Ok(Transformed::no(node));
                };
                let locations = sched
                    .locations(r.stage())
                    .ok_or_else(|| {
                        datafusion::error::DataFusionError::Internal(format!(
                            "stage {} read before its input stage {} completed",
                            stage,
                            r.stage()
                        ))
                    })?
                    .into_iter()
                    .map(|(executor, address)| Location { executor, address })
                    .collect();
                Ok(Transformed::yes(
                    Arc::new(r.resolved(locations)) as Arc<dyn ExecutionPlan>
                ))
            })
            .map_err(|source| Error::CodecPlan {
                action: "resolve",
                stage,
                source,
            })?
            .data;
        let bytes = physical_plan_to_bytes_with_extension_codec(resolved, &KilnCodec).map_err(
            |source| Error::CodecPlan {
                action: "encode",
                stage,
                source,
            },
        )?;
        self.stages.get_mut(&stage).expect("checked").encoded = Some((epoch, bytes.clone()));
        Ok(bytes)
    }
}

/// Declares executors lost when their heartbeats stop.
pub(crate) async fn monitor_heartbeats(shared: Arc<Shared>, timeout: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let mut state = shared.state.lock().unwrap();
        for (executor, last_seen) in state.sched.expired(Instant::now(), timeout) {
            shared.lose(
                &mut state,
                &executor,
                LossReason::HeartbeatTimeout,
                Some(last_seen),
            );
        }
    }
}

pub(crate) struct DriverService {
    shared: Arc<Shared>,
}

impl DriverService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn failure_of(f: rpc::TaskFailure) -> TaskFailure {
    match FailureKind::try_from(f.kind).unwrap_or(FailureKind::Unspecified) {
        FailureKind::Data => TaskFailure::Data(f.message),
        FailureKind::Fetch => TaskFailure::Fetch {
            executor: f.fetch_executor,
            stage: f.fetch_stage,
            map_partition: f.fetch_map_partition,
        },
        FailureKind::Executor | FailureKind::Unspecified => TaskFailure::Executor(f.message),
    }
}

#[tonic::async_trait]
impl rpc::driver_server::Driver for DriverService {
    async fn register(
        &self,
        request: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        {
            let mut state = self.shared.state.lock().unwrap();
            if !state
                .sched
                .register_executor(&req.executor_id, &req.flight_address, Instant::now())
            {
                return Err(Status::failed_precondition(format!(
                    "executor {} was declared lost; register under a new id",
                    req.executor_id
                )));
            }
            state.registered.insert(req.executor_id.clone());
            state.note_width(Instant::now());
        }
        tracing::info!(executor = %req.executor_id, address = %req.flight_address, "executor registered");
        self.shared.emit(Progress::ExecutorRegistered {
            executor: req.executor_id,
        });
        self.shared.work.notify_waiters();
        Ok(Response::new(rpc::RegisterResponse {
            job_spec_json: self.shared.spec_json.clone(),
            job_id: self.shared.job_id.clone(),
        }))
    }

    async fn poll_tasks(
        &self,
        request: Request<rpc::PollRequest>,
    ) -> Result<Response<rpc::PollResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        for round in 0..2 {
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.shared.state.lock().unwrap();
                if state.shutdown {
                    state.departed.insert(req.executor_id.clone());
                    return Ok(Response::new(rpc::PollResponse {
                        shutdown: true,
                        ..Default::default()
                    }));
                }
                if !state.sched.is_live(&req.executor_id) {
                    return Ok(Response::new(rpc::PollResponse {
                        unknown_executor: true,
                        ..Default::default()
                    }));
                }
                state.sched.heartbeat(&req.executor_id, Instant::now());
                let drops = state.drops.remove(&req.executor_id).unwrap_or_default();
                let assigned = state
                    .sched
                    .assign(&req.executor_id, req.free_slots as usize);
                if !assigned.is_empty() || !drops.is_empty() || round == 1 || req.free_slots == 0 {
                    let mut tasks = Vec::with_capacity(assigned.len());
                    for (TaskId { stage, partition }, attempt) in assigned {
                        match state.encoded(stage) {
                            Ok(plan) => tasks.push(rpc::TaskDefinition {
                                stage_id: stage,
                                partition,
                                attempt,
                                plan: plan.to_vec(),
                            }),
                            Err(e) => {
                                let events = state.sched.task_failed(
                                    TaskId { stage, partition },
                                    attempt,
                                    &req.executor_id,
                                    TaskFailure::Data(e.to_string()),
                                );
                                self.shared.handle(events);
                            }
                        }
                    }
                    return Ok(Response::new(rpc::PollResponse {
                        tasks,
                        drop_stages: drops,
                        ..Default::default()
                    }));
                }
            }
            let _ = tokio::time::timeout(LONG_POLL, notified).await;
        }
        unreachable!("the second round always answers")
    }

    async fn report_task(
        &self,
        request: Request<rpc::TaskReport>,
    ) -> Result<Response<rpc::ReportAck>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let task = TaskId {
            stage: req.stage_id,
            partition: req.partition,
        };
        let mut state = self.shared.state.lock().unwrap();
        let events = match req.outcome {
            Some(Outcome::Success(s)) => {
                let (counted, events) =
                    state
                        .sched
                        .task_succeeded(task, req.attempt, &req.executor_id);
                if counted {
                    let m = s.metrics.unwrap_or_default();
                    let (done, total) = state.sched.progress(task.stage);
                    if let Some(rec) = state.stages.get_mut(&task.stage) {
                        rec.counters.add(&StageCounters {
                            shuffle_bytes_written: m.shuffle_bytes_written,
                            remote_bytes_fetched: m.remote_bytes_fetched,
                            local_bytes_fetched: m.local_bytes_fetched,
                            spill_count: m.spill_count,
                            spilled_bytes: m.spilled_bytes,
                            output_rows: m.output_rows,
                            files_written: m.files_written,
                        });
                    }
                    self.shared.emit(Progress::TaskDone {
                        stage: task.stage,
                        done,
                        total,
                    });
                }
                events
            }
            Some(Outcome::Failure(f)) => {
                tracing::warn!(stage = task.stage, partition = task.partition, executor = %req.executor_id, error = %f.message, "task failed");
                state
                    .sched
                    .task_failed(task, req.attempt, &req.executor_id, failure_of(f))
            }
            None => return Err(Status::invalid_argument("a report needs an outcome")),
        };
        self.shared.handle(events);
        Ok(Response::new(rpc::ReportAck {}))
    }

    async fn executor_lost(
        &self,
        request: Request<rpc::ExecutorLostRequest>,
    ) -> Result<Response<rpc::ExecutorLostResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let known = self
            .shared
            .state
            .lock()
            .unwrap()
            .sched
            .is_live(&req.executor_id);
        let reason = LossReason::parse(&req.reason).unwrap_or_else(|| {
            tracing::warn!(executor = %req.executor_id, reason = %req.reason, "unknown loss reason, taken as Failed");
            LossReason::Failed
        });
        // When the caller saw the executor go, if it says (wall clock, milliseconds).
        let occurred = (req.occurred_unix_ms > 0)
            .then(|| {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_millis() as u64;
                Instant::now().checked_sub(Duration::from_millis(
                    now_ms.saturating_sub(req.occurred_unix_ms),
                ))
            })
            .flatten();
        self.shared
            .executor_lost(&req.executor_id, reason, occurred);
        Ok(Response::new(rpc::ExecutorLostResponse { known }))
    }

    async fn job_status(
        &self,
        request: Request<rpc::JobStatusRequest>,
    ) -> Result<Response<rpc::JobStatusResponse>, Status> {
        self.shared.check_token(&request.into_inner().token)?;
        Ok(Response::new(self.shared.job_status()))
    }
}
