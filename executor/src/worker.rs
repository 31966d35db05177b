//! The executor process: serves its block store over Flight, registers with the driver, and
//! runs the tasks it is given (up to its slots at once), reporting each outcome.
//!
//! Nothing said on the wire is assumed to arrive. Every call has a deadline; a report is
//! sent again, with backoff and jitter, until the driver acknowledges it; each poll lists
//! the attempts this executor holds, so the driver reschedules one whose assignment or
//! report was lost; and an executor that cannot reach its driver for longer than the
//! heartbeat timeout exits instead of waiting forever.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec;
use futures::TryStreamExt;
use kiln_api::{JobSpec, parse_memory};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::blocks::BlockStore;
use crate::error::find_kiln_error;
use crate::plan::{KilnCodec, SinkExec, StagedAttempt};
use crate::rpc::{self, FailureKind, driver_client::DriverClient, task_report::Outcome};
use crate::session::{OPERATOR_MEMORY_FRACTION, executor_context};
use crate::shuffle::{BlockFlightService, PeerClients, ShuffleEnv, read_write_stats};
use crate::{Error, Result};

/// How long a starting executor keeps trying to reach its driver before it gives up (the
/// driver pod may still be starting).
const DRIVER_PATIENCE: Duration = Duration::from_secs(30);
/// The deadline of a registration or a report.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The deadline of a poll: the driver holds a poll for at most about a second.
const POLL_DEADLINE: Duration = Duration::from_secs(15);

/// Faults to inject, for tests of the paths that recover from lost messages.
#[derive(Debug, Default)]
pub struct Faults {
    /// Report sends to drop on the wire (each is sent again).
    drop_reports: AtomicU32,
    /// Reports to lose outright: the executor forgets the attempt as if its report had been
    /// acknowledged, and only the driver's reconciliation can notice.
    lose_reports: AtomicU32,
}

impl Faults {
    /// Reads `drop-report=N,lose-report=N` (either, both, or empty for none).
    pub fn parse(spec: &str) -> Result<Self> {
        let faults = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |reason: &str| Error::Driver(format!("--faults `{item}`: {reason}"));
            let (name, n) = item
                .split_once('=')
                .ok_or_else(|| bad("expected NAME=COUNT"))?;
            let n: u32 = n.parse().map_err(|_| bad("the count is not a number"))?;
            match name {
                "drop-report" => faults.drop_reports.store(n, Ordering::Relaxed),
                "lose-report" => faults.lose_reports.store(n, Ordering::Relaxed),
                _ => return Err(bad("known faults are drop-report and lose-report")),
            }
        }
        Ok(faults)
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// An attempt: `(stage, partition, attempt)`.
type AttemptKey = (u32, u32, u32);

/// What a task needs to run and report.
struct TaskEnv {
    ctx: Arc<SessionContext>,
    client: DriverClient<Channel>,
    executor_id: String,
    token: String,
    /// The driver run: output attempts stage under it.
    run_id: String,
    /// Attempts this executor holds: running, or reported and not yet acknowledged.
    held: Mutex<BTreeSet<AttemptKey>>,
    faults: Faults,
    /// How long a report is retried before the driver is taken to be gone.
    patience: Duration,
}

/// A request with a deadline.
fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// A pause of `base` plus up to half of it again, so executors retrying together spread out.
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// Executor settings.
#[derive(Clone, Debug)]
pub struct ExecutorOptions {
    /// The driver's control service, `http://host:port`.
    pub driver: String,
    /// This executor's id, unique within the job.
    pub executor_id: String,
    /// Address the Flight service binds to.
    pub bind_host: String,
    /// Host other executors reach this one at (default: `bind_host`).
    pub advertise_host: Option<String>,
    /// Concurrent tasks (default: from the job spec).
    pub slots: Option<u32>,
    /// Memory budget in bytes (default: `executors.memory` of the job spec).
    pub memory: Option<u64>,
    /// Where blocks and operators spill.
    pub work_dir: PathBuf,
    /// The per-job secret.
    pub token: String,
    /// Faults to inject, for tests (`drop-report=N,lose-report=N`; empty: none).
    pub faults: String,
}

async fn connect(driver: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(driver.to_string())
        .map_err(|source| Error::Connect {
            address: driver.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let started = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(source) if started.elapsed() > DRIVER_PATIENCE => {
                return Err(Error::Connect {
                    address: driver.into(),
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs an executor until the driver says the job is over.
pub async fn run_executor(opts: ExecutorOptions) -> Result<()> {
    let listener = TcpListener::bind((opts.bind_host.as_str(), 0))
        .await
        .map_err(|source| Error::Bind {
            address: opts.bind_host.clone(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| Error::Bind {
            address: opts.bind_host.clone(),
            source,
        })?
        .port();
    let advertise = opts.advertise_host.as_deref().unwrap_or(&opts.bind_host);
    let flight_address = format!("{advertise}:{port}");

    let faults = Faults::parse(&opts.faults)?;
    let mut client = DriverClient::new(connect(&opts.driver).await?)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let registered = client
        .register(with_deadline(
            rpc::RegisterRequest {
                executor_id: opts.executor_id.clone(),
                flight_address: flight_address.clone(),
                slots: opts.slots.unwrap_or(0),
                memory_bytes: opts.memory.unwrap_or(0),
                token: opts.token.clone(),
            },
            CALL_DEADLINE,
        ))
        .await
        .map_err(|s| Error::rpc("register", s))?
        .into_inner();
    let spec: JobSpec = serde_json::from_str(&registered.job_spec_json)
        .map_err(|e| Error::Driver(format!("job spec from driver: {e}")))?;
    let memory = match opts.memory {
        Some(m) => m,
        None => parse_memory(&spec.executors.memory)?,
    };
    let slots = opts.slots.unwrap_or_else(|| spec.executor_slots()).max(1) as usize;
    let block_budget = (memory as f64 * (1.0 - OPERATOR_MEMORY_FRACTION)) as u64;
    for dir in [opts.work_dir.join("blocks"), opts.work_dir.join("spill")] {
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
    }
    let store = Arc::new(BlockStore::new(block_budget, opts.work_dir.join("blocks")));
    let flight = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            FlightServiceServer::new(BlockFlightService::new(store.clone()))
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming(
            // The builder's nodelay applies only to listeners tonic binds itself; without it
            // every small response waits out the peer's delayed ACK (about 40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        );
    let flight = tokio::spawn(flight);
    tracing::info!(executor = %opts.executor_id, %flight_address, slots, memory, "executor registered");

    let env = Arc::new(ShuffleEnv {
        executor_id: opts.executor_id.clone(),
        store: store.clone(),
        peers: PeerClients::default(),
    });
    let ctx = Arc::new(executor_context(
        &spec,
        memory,
        opts.work_dir.join("spill"),
        env,
    )?);
    let patience = match registered.heartbeat_timeout_ms {
        0 => Duration::from_secs(spec.failure_policy.heartbeat_timeout_seconds.into()),
        ms => Duration::from_millis(ms),
    };
    let env = Arc::new(TaskEnv {
        ctx,
        client: client.clone(),
        executor_id: opts.executor_id.clone(),
        token: opts.token.clone(),
        run_id: registered.job_id.clone(),
        held: Mutex::new(BTreeSet::new()),
        faults,
        patience,
    });
    let result = work_loop(&env, &mut client, &store, slots).await;
    flight.abort();
    result
}

async fn work_loop(
    env: &Arc<TaskEnv>,
    client: &mut DriverClient<Channel>,
    store: &BlockStore,
    slots: usize,
) -> Result<()> {
    let mut running: JoinSet<()> = JoinSet::new();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        while running.try_join_next().is_some() {}
        let free = slots.saturating_sub(running.len());
        let held = env
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&(stage_id, partition, attempt)| rpc::TaskAttempt {
                stage_id,
                partition,
                attempt,
            })
            .collect();
        let polled = client
            .poll_tasks(with_deadline(
                rpc::PollRequest {
                    executor_id: env.executor_id.clone(),
                    free_slots: free as u32,
                    token: env.token.clone(),
                    held,
                },
                POLL_DEADLINE,
            ))
            .await;
        let response = match polled {
            Ok(r) => {
                unreachable_since = None;
                r.into_inner()
            }
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > env.patience {
                    tracing::error!(error = %status, silent_ms = since.elapsed().as_millis() as u64, "the driver is gone; exiting");
                    running.shutdown().await;
                    return Err(Error::rpc("poll_tasks", status));
                }
                tokio::time::sleep(jittered(Duration::from_millis(200))).await;
                continue;
            }
        };
        if !response.drop_stages.is_empty() {
            store.drop_stages(&response.drop_stages);
        }
        if response.shutdown {
            running.shutdown().await;
            return Ok(());
        }
        if response.unknown_executor {
            running.shutdown().await;
            return Err(Error::Driver(format!(
                "the driver declared executor {} lost",
                env.executor_id
            )));
        }
        for task in response.tasks {
            let key = (task.stage_id, task.partition, task.attempt);
            env.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
            let env = env.clone();
            running.spawn(async move {
                let report = run_task(&env, task).await;
                env.deliver(report).await;
                env.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
        }
        if running.len() >= slots {
            // Busy: wait for a slot, but poll at least every second as a heartbeat.
            let _ = tokio::time::timeout(Duration::from_secs(1), running.join_next()).await;
        }
    }
}

impl TaskEnv {
    /// Sends a report until the driver acknowledges it, with backoff and jitter; gives up
    /// when the driver has been unreachable for longer than the heartbeat timeout.
    async fn deliver(&self, report: rpc::TaskReport) {
        let (stage, partition) = (report.stage_id, report.partition);
        if Faults::take(&self.faults.lose_reports) {
            tracing::warn!(stage, partition, "fault: report lost, attempt forgotten");
            return;
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let outcome = if Faults::take(&self.faults.drop_reports) {
                Err(tonic::Status::unavailable(
                    "fault: report dropped on the wire",
                ))
            } else {
                self.client
                    .clone()
                    .report_task(with_deadline(report.clone(), CALL_DEADLINE))
                    .await
                    .map(drop)
            };
            match outcome {
                Ok(()) => return,
                Err(status) if started.elapsed() > self.patience => {
                    tracing::error!(stage, partition, error = %status, "report never acknowledged; the driver is gone");
                    return;
                }
                Err(status) => {
                    tracing::warn!(stage, partition, error = %status, "report not acknowledged; sending it again");
                    tokio::time::sleep(jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

async fn run_task(env: &TaskEnv, task: rpc::TaskDefinition) -> rpc::TaskReport {
    let started = Instant::now();
    let staged = StagedAttempt {
        run_id: env.run_id.clone(),
        stage: task.stage_id,
        attempt: task.attempt,
    };
    let outcome = match execute(&env.ctx, &task, staged).await {
        Ok(mut metrics) => {
            metrics.elapsed_ms = started.elapsed().as_millis() as u64;
            tracing::debug!(
                stage = task.stage_id,
                partition = task.partition,
                elapsed_ms = metrics.elapsed_ms,
                "task done"
            );
            Outcome::Success(rpc::TaskSuccess {
                metrics: Some(metrics),
            })
        }
        Err(e) => {
            tracing::warn!(stage = task.stage_id, partition = task.partition, error = %e, "task failed");
            Outcome::Failure(classify(&e))
        }
    };
    rpc::TaskReport {
        executor_id: env.executor_id.clone(),
        stage_id: task.stage_id,
        partition: task.partition,
        attempt: task.attempt,
        outcome: Some(outcome),
        token: env.token.clone(),
    }
}

async fn execute(
    ctx: &SessionContext,
    task: &rpc::TaskDefinition,
    staged: StagedAttempt,
) -> Result<rpc::TaskMetrics, DataFusionError> {
    let task_ctx = ctx.task_ctx();
    let mut plan =
        physical_plan_from_bytes_with_extension_codec(&task.plan, &task_ctx, &KilnCodec)?;
    // An output task writes into its attempt's own staging directory; the driver's job
    // commit moves the one attempt it chose into the output.
    if let Some(sink) = plan.downcast_ref::<SinkExec>() {
        plan = Arc::new(sink.staged(staged));
    }
    tracing::trace!(
        stage = task.stage_id,
        partition = task.partition,
        plan = %datafusion::physical_plan::displayable(plan.as_ref()).indent(true),
        "task plan"
    );
    let stream = plan.execute(task.partition as usize, task_ctx)?;
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let stats = read_write_stats(&batches);
    tracing::trace!(
        stage = task.stage_id,
        partition = task.partition,
        plan = %datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true),
        "task metrics"
    );
    let mut m = collect_metrics(&plan);
    m.output_rows = stats.iter().map(|s| s.1).sum();
    if plan.is::<SinkExec>() {
        m.files_written = stats
            .iter()
            .filter(|(p, rows, _)| *rows > 0 || *p == 0)
            .count() as u64;
    } else {
        m.shuffle_bytes_written = stats.iter().map(|s| s.2).sum();
    }
    Ok(m)
}

fn collect_metrics(plan: &std::sync::Arc<dyn ExecutionPlan>) -> rpc::TaskMetrics {
    let mut m = rpc::TaskMetrics::default();
    let _ = plan.apply(|node| {
        if let Some(set) = node.metrics() {
            let sum = |name: &str| set.sum_by_name(name).map_or(0, |v| v.as_usize() as u64);
            m.remote_bytes_fetched += sum("remote_bytes_fetched");
            m.local_bytes_fetched += sum("local_bytes_fetched");
            // Spill counters are built-in metric kinds, not named counters.
            m.spill_count += set.spill_count().unwrap_or(0) as u64;
            m.spilled_bytes += set.spilled_bytes().unwrap_or(0) as u64;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    m
}

/// Whose fault a failure is: a fetch of a lost block, the executor's environment (retry
/// elsewhere), or the task's own data (fail the job).
fn classify(e: &DataFusionError) -> rpc::TaskFailure {
    if let Some(Error::FetchFailed {
        executor,
        stage,
        map_partition,
        message,
        ..
    }) = find_kiln_error(e)
    {
        return rpc::TaskFailure {
            kind: FailureKind::Fetch as i32,
            message: message.clone(),
            fetch_executor: executor.clone(),
            fetch_stage: *stage,
            fetch_map_partition: *map_partition,
        };
    }
    let kind = match e.find_root() {
        DataFusionError::ResourcesExhausted(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_) => FailureKind::Executor,
        _ => FailureKind::Data,
    };
    rpc::TaskFailure {
        kind: kind as i32,
        message: e.to_string(),
        ..Default::default()
    }
}
