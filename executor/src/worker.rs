//! The executor process: serves its block store over Flight, registers with the driver, and
//! runs the tasks it is given (up to its slots at once), reporting each outcome.
use std::path::PathBuf;
use std::sync::Arc;
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
use crate::plan::{KilnCodec, SinkExec};
use crate::rpc::{self, FailureKind, driver_client::DriverClient, task_report::Outcome};
use crate::session::{OPERATOR_MEMORY_FRACTION, executor_context};
use crate::shuffle::{BlockFlightService, PeerClients, ShuffleEnv, read_write_stats};
use crate::{Error, Result};

/// How long an executor keeps trying to reach its driver before it gives up.
const DRIVER_PATIENCE: Duration = Duration::from_secs(30);

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

    let mut client = DriverClient::new(connect(&opts.driver).await?)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let registered = client
        .register(rpc::RegisterRequest {
            executor_id: opts.executor_id.clone(),
            flight_address: flight_address.clone(),
            slots: opts.slots.unwrap_or(0),
            memory_bytes: opts.memory.unwrap_or(0),
            token: opts.token.clone(),
        })
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
    let result = work_loop(&opts, &mut client, ctx, &store, slots).await;
    flight.abort();
    result
}

async fn work_loop(
    opts: &ExecutorOptions,
    client: &mut DriverClient<Channel>,
    ctx: Arc<SessionContext>,
    store: &BlockStore,
    slots: usize,
) -> Result<()> {
    let mut running: JoinSet<()> = JoinSet::new();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        while running.try_join_next().is_some() {}
        let free = slots.saturating_sub(running.len());
        let polled = client
            .poll_tasks(rpc::PollRequest {
                executor_id: opts.executor_id.clone(),
                free_slots: free as u32,
                token: opts.token.clone(),
            })
            .await;
        let response = match polled {
            Ok(r) => {
                unreachable_since = None;
                r.into_inner()
            }
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > DRIVER_PATIENCE {
                    return Err(Error::rpc("poll_tasks", status));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
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
                opts.executor_id
            )));
        }
        for task in response.tasks {
            let ctx = ctx.clone();
            let mut client = client.clone();
            let executor_id = opts.executor_id.clone();
            let token = opts.token.clone();
            running.spawn(async move {
                let report = run_task(&ctx, task, executor_id, token).await;
                for _ in 0..3 {
                    if client.report_task(report.clone()).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        if running.len() >= slots {
            // Busy: wait for a slot, but poll at least every second as a heartbeat.
            let _ = tokio::time::timeout(Duration::from_secs(1), running.join_next()).await;
        }
    }
}

async fn run_task(
    ctx: &SessionContext,
    task: rpc::TaskDefinition,
    executor_id: String,
    token: String,
) -> rpc::TaskReport {
    let started = Instant::now();
    let outcome = match execute(ctx, &task).await {
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
        executor_id,
        stage_id: task.stage_id,
        partition: task.partition,
        attempt: task.attempt,
        outcome: Some(outcome),
        token,
    }
}

async fn execute(
    ctx: &SessionContext,
    task: &rpc::TaskDefinition,
) -> Result<rpc::TaskMetrics, DataFusionError> {
    let task_ctx = ctx.task_ctx();
    let plan = physical_plan_from_bytes_with_extension_codec(&task.plan, &task_ctx, &KilnCodec)?;
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
