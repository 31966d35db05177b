//! The driver's gRPC shell: authenticates each call, takes the lock, hands the event to the
//! [`DriverCore`], publishes the progress it produced, wakes whoever waits, and answers. The
//! heartbeat monitor is here too: a clock tick is an event like any other.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast};
use tonic::{Request, Response, Status};

use super::core::{DriverCore, PollAnswer, Progress, Registration, TaskOutcome};
use super::journal::Journal;
use super::plans::StagePlans;
use super::scheduler::{LossReason, TaskFailure, TaskId};
use crate::rpc::{self, FailureKind, task_report::Outcome};
use crate::shuffle::PeerClients;
use crate::summary::StageCounters;
use kiln_api::tls::TlsIdentity;

/// How long a poll with free slots waits for work before answering empty.
const LONG_POLL: Duration = Duration::from_millis(500);

/// What the lock guards: the core and the stage plans it resolves.
pub(crate) struct DriverState {
    pub core: DriverCore,
    pub plans: StagePlans,
}

/// The driver's state and the ways it tells others that it changed.
pub(crate) struct Shared {
    state: Mutex<DriverState>,
    /// Wakes long polls: new work may be available.
    work: Notify,
    /// Wakes the job runner: a stage finished or the job failed.
    changed: Notify,
    pub progress: broadcast::Sender<Progress>,
    pub spec_json: String,
    /// This driver run's id: output attempts are staged under it.
    pub job_id: String,
    /// This driver's epoch: executors follow only the highest they have seen.
    pub epoch: u64,
    /// The job's identity across driver runs (a ComputeJob's uid).
    pub job_uid: String,
    token: Option<String>,
    pub heartbeat_timeout: Duration,
    /// The driver's identity, when the job's connections are TLS.
    pub tls: Option<TlsIdentity>,
    /// Block-service clients of the executors (results are fetched with them), one
    /// connection per executor for the driver's life.
    pub peers: PeerClients,
}

impl Shared {
    pub fn new(
        core: DriverCore,
        run_id: String,
        spec_json: String,
        token: Option<String>,
        job_uid: Option<String>,
        heartbeat_timeout: Duration,
    ) -> Self {
        let job_id = run_id;
        Self {
            epoch: core.driver_epoch(),
            state: Mutex::new(DriverState {
                core,
                plans: StagePlans::default(),
            }),
            work: Notify::new(),
            changed: Notify::new(),
            progress: broadcast::channel(8192).0,
            spec_json,
            job_uid: job_uid.unwrap_or_else(|| job_id.clone()),
            job_id,
            token,
            heartbeat_timeout,
            tls: None,
            peers: PeerClients::default(),
        }
    }

    /// The same, with the driver's TLS identity.
    pub fn with_tls(mut self, tls: Option<TlsIdentity>) -> Self {
        self.peers = PeerClients::new(tls.clone());
        self.tls = tls;
        self
    }

    /// Feeds the state an event: runs `f` under the lock, then publishes the progress it
    /// produced and, when the core says something changed, wakes polls and the runner.
    pub fn act<R>(&self, f: impl FnOnce(&mut DriverState) -> R) -> R {
        let (r, progress, changed) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut state);
            (r, state.core.take_progress(), state.core.take_changed())
        };
        for p in progress {
            let _ = self.progress.send(p);
        }
        if changed {
            self.work.notify_waiters();
            self.changed.notify_waiters();
        }
        r
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&DriverCore) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()).core)
    }

    /// Waits until the state changes or `timeout` passes; `check` runs first and again after
    /// each change, and the wait ends when it returns something.
    pub async fn wait_for<R>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&DriverCore) -> Option<R>,
    ) -> R {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(r) = self.read(&mut check) {
                return r;
            }
            let _ = tokio::time::timeout(timeout, changed).await;
        }
    }

    fn check_token(&self, token: &str) -> Result<(), Status> {
        match &self.token {
            Some(t) if !secrets_match(t, token) => Err(Status::unauthenticated(
                "this executor does not carry the job's token",
            )),
            _ => Ok(()),
        }
    }
}

/// Compares secrets in time that depends on their lengths only.
pub(crate) fn secrets_match(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Declares executors lost when their heartbeats stop.
pub(crate) async fn monitor_heartbeats(shared: Arc<Shared>, timeout: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        shared.act(|s| s.core.expire(Instant::now(), timeout));
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

fn counters_of(m: rpc::TaskMetrics) -> StageCounters {
    StageCounters {
        shuffle_bytes_written: m.shuffle_bytes_written,
        remote_bytes_fetched: m.remote_bytes_fetched,
        local_bytes_fetched: m.local_bytes_fetched,
        spill_count: m.spill_count,
        spilled_bytes: m.spilled_bytes,
        output_rows: m.output_rows,
        files_written: m.files_written,
    }
}

/// When the caller saw an executor go, from Unix milliseconds (0: unknown).
fn instant_of_unix_ms(ms: u64) -> Option<Instant> {
    if ms == 0 {
        return None;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Instant::now().checked_sub(Duration::from_millis(now_ms.saturating_sub(ms)))
}

#[tonic::async_trait]
impl rpc::driver_server::Driver for DriverService {
    async fn register(
        &self,
        request: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let held: Vec<(u32, u64, Vec<u32>)> = req
            .held_stages
            .into_iter()
            .map(|h| (h.stage_id, h.fingerprint, h.partitions))
            .collect();
        let journal = Journal::decode(&req.journal);
        let answer = self.shared.act(|s| {
            s.core.register(
                &req.executor_id,
                &req.flight_address,
                &held,
                journal,
                Instant::now(),
            )
        });
        if let Registration::Refused(why) = answer {
            return Err(Status::failed_precondition(why));
        }
        tracing::info!(executor = %req.executor_id, address = %req.flight_address, "executor registered");
        Ok(Response::new(rpc::RegisterResponse {
            job_spec_json: self.shared.spec_json.clone(),
            job_id: self.shared.job_id.clone(),
            heartbeat_timeout_ms: self.shared.heartbeat_timeout.as_millis() as u64,
            epoch: self.shared.epoch,
        }))
    }

    async fn poll_tasks(
        &self,
        request: Request<rpc::PollRequest>,
    ) -> Result<Response<rpc::PollResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let held: BTreeSet<(TaskId, u32)> = req
            .held
            .iter()
            .map(|t| {
                (
                    TaskId {
                        stage: t.stage_id,
                        partition: t.partition,
                    },
                    t.attempt,
                )
            })
            .collect();
        for round in 0..2 {
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let answer = self.shared.act(|s| {
                if req.draining && round == 0 {
                    s.core
                        .decommission(&req.executor_id, "SIGTERM", None, Instant::now());
                }
                let answer = s.core.poll(
                    &req.executor_id,
                    req.free_slots as usize,
                    &held,
                    round == 1,
                    Instant::now(),
                );
                let (tasks, drops, journal, migrations, cancels) = match answer {
                    PollAnswer::Wait => return None,
                    PollAnswer::Decommissioned => {
                        return Some(rpc::PollResponse {
                            decommissioned: true,
                            ..Default::default()
                        });
                    }
                    PollAnswer::Shutdown => {
                        return Some(rpc::PollResponse {
                            shutdown: true,
                            ..Default::default()
                        });
                    }
                    PollAnswer::UnknownExecutor => {
                        return Some(rpc::PollResponse {
                            unknown_executor: true,
                            ..Default::default()
                        });
                    }
                    PollAnswer::Work {
                        tasks,
                        drops,
                        journal,
                        migrations,
                        cancels,
                    } => (tasks, drops, journal, migrations, cancels),
                };
                let mut defs = Vec::with_capacity(tasks.len());
                for (task, attempt) in tasks {
                    match s.plans.encoded(task.stage, &s.core) {
                        Ok(plan) => defs.push(rpc::TaskDefinition {
                            stage_id: task.stage,
                            partition: task.partition,
                            attempt,
                            plan: plan.to_vec(),
                            fingerprint: s.plans.fingerprint(task.stage),
                        }),
                        Err(e) => {
                            s.core
                                .task_unsendable(&req.executor_id, task, attempt, e.to_string())
                        }
                    }
                }
                Some(rpc::PollResponse {
                    tasks: defs,
                    drop_stages: drops,
                    journal: journal.unwrap_or_default(),
                    migrations: migrations
                        .into_iter()
                        .map(|m| rpc::BlockMigration {
                            stage_id: m.task.stage,
                            partition: m.task.partition,
                            source_executor: m.source,
                            source_address: m.source_address,
                            reduce_partitions: m.blocks,
                            fingerprint: m.fingerprint,
                        })
                        .collect(),
                    cancel: cancels
                        .into_iter()
                        .map(|(task, attempt)| rpc::TaskAttempt {
                            stage_id: task.stage,
                            partition: task.partition,
                            attempt,
                        })
                        .collect(),
                    ..Default::default()
                })
            });
            if let Some(response) = answer {
                return Ok(Response::new(response));
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
        let outcome = match req.outcome {
            Some(Outcome::Success(s)) => {
                TaskOutcome::Succeeded(counters_of(s.metrics.unwrap_or_default()))
            }
            Some(Outcome::Failure(f)) => {
                tracing::warn!(stage = task.stage, partition = task.partition, executor = %req.executor_id, error = %f.message, "task failed");
                TaskOutcome::Failed(failure_of(f))
            }
            None => return Err(Status::invalid_argument("a report needs an outcome")),
        };
        self.shared
            .act(|s| s.core.report(&req.executor_id, task, req.attempt, outcome));
        Ok(Response::new(rpc::ReportAck {}))
    }

    async fn executor_lost(
        &self,
        request: Request<rpc::ExecutorLostRequest>,
    ) -> Result<Response<rpc::ExecutorLostResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let reason = LossReason::parse(&req.reason).unwrap_or_else(|| {
            tracing::warn!(executor = %req.executor_id, reason = %req.reason, "unknown loss reason, taken as Failed");
            LossReason::Failed
        });
        let occurred = instant_of_unix_ms(req.occurred_unix_ms);
        let known = self.shared.act(|s| {
            let known = s.core.is_live(&req.executor_id);
            s.core
                .lose(&req.executor_id, reason, occurred, Instant::now());
            known
        });
        Ok(Response::new(rpc::ExecutorLostResponse { known }))
    }

    async fn decommission(
        &self,
        request: Request<rpc::DecommissionRequest>,
    ) -> Result<Response<rpc::DecommissionResponse>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        let occurred = instant_of_unix_ms(req.occurred_unix_ms);
        let known = self.shared.act(|s| {
            s.core
                .decommission(&req.executor_id, &req.cause, occurred, Instant::now())
        });
        Ok(Response::new(rpc::DecommissionResponse { known }))
    }

    async fn report_migration(
        &self,
        request: Request<rpc::MigrationReport>,
    ) -> Result<Response<rpc::ReportAck>, Status> {
        let req = request.into_inner();
        self.shared.check_token(&req.token)?;
        if !req.ok {
            tracing::warn!(executor = %req.executor_id, stage = req.stage_id, partition = req.partition, error = %req.message, "an output copy failed");
        }
        let task = TaskId {
            stage: req.stage_id,
            partition: req.partition,
        };
        self.shared.act(|s| {
            s.core
                .migrated(&req.executor_id, task, &req.source_executor, req.ok)
        });
        Ok(Response::new(rpc::ReportAck {}))
    }

    async fn job_status(
        &self,
        request: Request<rpc::JobStatusRequest>,
    ) -> Result<Response<rpc::JobStatusResponse>, Status> {
        self.shared.check_token(&request.into_inner().token)?;
        Ok(Response::new(self.shared.read(DriverCore::job_status)))
    }
}
