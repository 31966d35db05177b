//! The executor process: serves its block store over Flight, registers with the driver, and
//! runs the tasks it is given (up to its slots at once), reporting each outcome.
//!
//! Nothing said on the wire is assumed to arrive. Every call has a deadline; a report is
//! sent again, with backoff and jitter, until the driver acknowledges it; each poll lists
//! the attempts this executor holds, so the driver reschedules one whose assignment or
//! report was lost; and an executor that cannot reach any driver for longer than
//! `failurePolicy.driverGraceSeconds` (at least the heartbeat timeout) exits instead of
//! waiting forever.
//!
//! The executor outlives its driver. What it holds for the job (the outputs of the tasks it
//! finished, and the newest driver journal it was sent) is kept across drivers in
//! [`Holdings`]; a replacement driver of a higher epoch takes the executor over with a
//! Flight `attach` action, and the executor registers with it, listing its holdings, so
//! the new driver adopts them instead of recomputing. A driver of an older epoch is
//! refused. The block service runs before the first registration, and a registration the
//! driver could not answer (it is starting, or was lost mid-call) is tried again, so an
//! executor whose first driver is lost before it registered waits to be taken over too.
//!
//! An executor given notice (SIGTERM: its pod is being deleted, evicted or its node drained)
//! drains: it abandons its running tasks (the driver resubmits them elsewhere, counting
//! nothing), takes no more, and keeps serving its blocks while the driver has other
//! executors copy those only it holds; it exits when the driver says nothing it holds is
//! needed any more, or when its driver is gone.
mod faults;
mod migrate;
mod tasks;

use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::prelude::SessionContext;
use kiln_api::tls::{self, Role, TlsIdentity};
use kiln_api::{JobSpec, LocationPolicy, parse_memory};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tonic::transport::Channel;

pub use faults::Faults;

use crate::blocks::BlockStore;
use crate::guard::{executor_policy, guarded_server};
use crate::rpc::{self, driver_client::DriverClient};
use crate::session::{OPERATOR_MEMORY_FRACTION, executor_context};
use crate::shuffle::{AttachHandler, AttachRequest, BlockFlightService, PeerClients, ShuffleEnv};
use crate::{Error, Result};

/// How long a starting executor keeps trying to reach its driver before it gives up (the
/// driver pod may still be starting).
const DRIVER_PATIENCE: Duration = Duration::from_secs(30);
/// The deadline of a registration or a report.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The deadline of a poll: the driver holds a poll for at most about a second.
const POLL_DEADLINE: Duration = Duration::from_secs(15);

/// An attempt: `(stage, partition, attempt)`.
type AttemptKey = (u32, u32, u32);

/// What the executor holds for the job, whichever driver it follows.
#[derive(Debug, Default)]
struct Holdings {
    /// Stage → the fingerprint of its plan and the partitions whose task finished here.
    stages: BTreeMap<u32, (u64, BTreeSet<u32>)>,
    /// The newest journal a driver sent.
    journal: Vec<u8>,
}

impl Holdings {
    /// A task of `stage` (planned as `fingerprint`) finished here, its blocks in the store.
    fn record(&mut self, stage: u32, fingerprint: u64, partition: u32) {
        let entry = self
            .stages
            .entry(stage)
            .or_insert_with(|| (fingerprint, BTreeSet::new()));
        if entry.0 != fingerprint {
            *entry = (fingerprint, BTreeSet::new());
        }
        entry.1.insert(partition);
    }

    fn drop_stages(&mut self, stages: &[u32]) {
        for s in stages {
            self.stages.remove(s);
        }
    }

    fn held(&self) -> Vec<rpc::HeldStage> {
        self.stages
            .iter()
            .map(|(stage, (fingerprint, partitions))| rpc::HeldStage {
                stage_id: *stage,
                fingerprint: *fingerprint,
                partitions: partitions.iter().copied().collect(),
            })
            .collect()
    }
}

/// Following one driver: what a task needs to run and report.
struct Session {
    ctx: Arc<SessionContext>,
    client: DriverClient<Channel>,
    executor_id: String,
    token: String,
    /// The driver run: output attempts stage under it.
    run_id: String,
    /// Attempts this executor holds: running, or reported and not yet acknowledged.
    held: Mutex<BTreeSet<AttemptKey>>,
    holdings: Arc<Mutex<Holdings>>,
    faults: Arc<Faults>,
    /// Flight clients to other executors, for copies of a drained executor's outputs.
    peers: Arc<PeerClients>,
    /// How long a report is retried before the driver is taken to be gone.
    patience: Duration,
    /// How long the executor waits for a driver, its own or a replacement, before it exits
    /// (`failurePolicy.driverGraceSeconds`).
    grace: Duration,
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
    /// Port the Flight service binds to (0: any free port).
    pub port: u16,
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
    /// The executor's identity (None: plain connections, no client certificates checked).
    pub tls: Option<TlsIdentity>,
    /// Where the job's HTTP inputs and output may connect, checked at each connection.
    pub locations: LocationPolicy,
}

/// How following one driver ended.
enum SessionEnd {
    /// The job is over.
    Shutdown,
    /// A driver of a higher epoch took this executor over.
    Attach(AttachRequest),
}

/// What the executor sets up once, from the first driver's answer.
struct Setup {
    ctx: Arc<SessionContext>,
    slots: usize,
    grace: Duration,
    peers: Arc<PeerClients>,
}

/// Runs an executor until a driver says the job is over.
///
/// Boxed here, so callers in other crates do not compile the whole future again.
pub fn run_executor(opts: ExecutorOptions) -> BoxFuture<'static, Result<()>> {
    Box::pin(run_executor_inner(opts))
}

async fn run_executor_inner(opts: ExecutorOptions) -> Result<()> {
    let bind_err = |source| Error::Bind {
        address: format!("{}:{}", opts.bind_host, opts.port),
        source,
    };
    let listener = TcpListener::bind((opts.bind_host.as_str(), opts.port))
        .await
        .map_err(bind_err)?;
    let port = listener.local_addr().map_err(bind_err)?.port();
    let advertise = opts.advertise_host.as_deref().unwrap_or(&opts.bind_host);
    let flight_address = format!("{advertise}:{port}");
    for dir in [opts.work_dir.join("blocks"), opts.work_dir.join("spill")] {
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
    }

    // The epoch of the newest driver followed (0: none yet) and news of a replacement.
    let epoch = Arc::new(AtomicU64::new(0));
    let (attach_tx, mut attach_rx) = mpsc::unbounded_channel::<AttachRequest>();
    let handler: AttachHandler = {
        let (epoch, token) = (epoch.clone(), opts.token.clone());
        Arc::new(move |request: AttachRequest| {
            if !crate::driver::secrets_match(&token, &request.token) {
                return Err(tonic::Status::unauthenticated(
                    "the attaching driver does not carry the job's token",
                ));
            }
            let newer = epoch
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                    (request.epoch > current).then_some(request.epoch)
                })
                .is_ok();
            if !newer {
                return Err(tonic::Status::failed_precondition(format!(
                    "this executor follows a driver of epoch {} already",
                    epoch.load(Ordering::SeqCst)
                )));
            }
            tracing::warn!(driver = %request.driver, epoch = request.epoch, "a replacement driver takes this executor over");
            let _ = attach_tx.send(request);
            Ok(())
        })
    };

    // The block service runs from the start, so that a replacement driver can take this
    // executor over even if the driver it was started with is lost before it registered.
    // Its memory budget is known once the first driver sent the job spec.
    let faults = Arc::new(Faults::parse(&opts.faults)?);
    let draining = Arc::new(Notice::default());
    let notice = notice_on_sigterm(draining.clone())?;
    let holdings = Arc::new(Mutex::new(Holdings::default()));
    let store = Arc::new(BlockStore::new(u64::MAX, opts.work_dir.join("blocks")));
    let service =
        FlightServiceServer::new(BlockFlightService::new(store.clone()).with_attach(handler))
            .max_encoding_message_size(usize::MAX);
    let mut server = guarded_server(
        opts.tls.as_ref(),
        executor_policy,
        "the executor's block service",
    )?;
    let flight = tokio::spawn(server.add_service(service).serve_with_incoming(
        // The builder's nodelay applies only to listeners tonic binds itself; without
        // it every small response waits out the peer's delayed ACK.
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
    ));
    let mut driver = opts.driver.clone();
    let mut setup: Option<Setup> = None;
    let result = loop {
        // A starting driver pod may not listen yet; a replacement is given the grace period.
        let wait = setup.as_ref().map_or(DRIVER_PATIENCE, |s| s.grace);
        let joined = join(&driver, &opts, &flight_address, &holdings, wait);
        let (mut client, registered) = tokio::select! {
            r = joined => match r {
                Ok(r) => r,
                Err(e) => break Err(e),
            },
            Some(req) = attach_rx.recv() => {
                driver = req.driver;
                continue;
            }
        };
        if registered.epoch < epoch.load(Ordering::SeqCst) {
            break Err(Error::Driver(format!(
                "driver {driver} has epoch {}, older than one this executor followed",
                registered.epoch
            )));
        }
        epoch.fetch_max(registered.epoch, Ordering::SeqCst);
        if setup.is_none() {
            let s = set_up(&opts, &registered, &store)?;
            tracing::info!(executor = %opts.executor_id, %flight_address, slots = s.slots, "executor registered");
            setup = Some(s);
        } else {
            tracing::info!(executor = %opts.executor_id, %driver, epoch = registered.epoch, "registered with a replacement driver");
        }
        let s = setup.as_ref().expect("set up above");
        let session = Arc::new(Session {
            ctx: s.ctx.clone(),
            client: client.clone(),
            executor_id: opts.executor_id.clone(),
            token: opts.token.clone(),
            run_id: registered.job_id.clone(),
            held: Mutex::new(BTreeSet::new()),
            holdings: holdings.clone(),
            faults: faults.clone(),
            peers: s.peers.clone(),
            patience: patience(&registered),
            grace: s.grace,
        });
        match work_loop(
            &session,
            &mut client,
            &store,
            s.slots,
            &draining,
            &mut attach_rx,
        )
        .await
        {
            Ok(SessionEnd::Shutdown) => break Ok(()),
            Ok(SessionEnd::Attach(req)) => driver = req.driver,
            Err(e) => break Err(e),
        }
    };
    flight.abort();
    notice.abort();
    result
}

/// Notice that this executor is going: set once, and waking whoever waits for it.
#[derive(Default)]
struct Notice {
    given: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Notice {
    fn is_given(&self) -> bool {
        self.given.load(Ordering::SeqCst)
    }

    /// Waits for notice (at once if it was given already).
    async fn given(&self) {
        let woken = self.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !self.is_given() {
            woken.await;
        }
    }
}

/// Gives notice when the process gets SIGTERM (its pod is going, with a grace period).
fn notice_on_sigterm(draining: Arc<Notice>) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Io {
        action: "listen for",
        path: PathBuf::from("SIGTERM"),
        source,
    })?;
    Ok(tokio::spawn(async move {
        if term.recv().await.is_some() {
            tracing::warn!(
                "SIGTERM: draining (no more tasks; blocks only this executor holds move to others)"
            );
            draining.given.store(true, Ordering::SeqCst);
            draining.wake.notify_waiters();
        }
    }))
}

/// How long the executor waits for a silent driver: the driver's heartbeat timeout.
fn patience(registered: &rpc::RegisterResponse) -> Duration {
    match registered.heartbeat_timeout_ms {
        0 => DRIVER_PATIENCE,
        ms => Duration::from_millis(ms),
    }
}

/// Registers with the driver, listing what this executor holds.
async fn register(
    client: &mut DriverClient<Channel>,
    opts: &ExecutorOptions,
    flight_address: &str,
    holdings: &Mutex<Holdings>,
) -> Result<rpc::RegisterResponse> {
    let (held_stages, journal) = {
        let h = holdings.lock().unwrap_or_else(|p| p.into_inner());
        (h.held(), h.journal.clone())
    };
    Ok(client
        .register(with_deadline(
            rpc::RegisterRequest {
                executor_id: opts.executor_id.clone(),
                flight_address: flight_address.to_string(),
                slots: opts.slots.unwrap_or(0),
                memory_bytes: opts.memory.unwrap_or(0),
                token: opts.token.clone(),
                held_stages,
                journal,
            },
            CALL_DEADLINE,
        ))
        .await
        .map_err(|s| Error::rpc("register", s))?
        .into_inner())
}

/// The session context, from the job spec the first driver sent; the block store gets the
/// memory budget the spec gives it.
fn set_up(
    opts: &ExecutorOptions,
    registered: &rpc::RegisterResponse,
    store: &Arc<BlockStore>,
) -> Result<Setup> {
    let spec: JobSpec = serde_json::from_str(&registered.job_spec_json)
        .map_err(|e| Error::Driver(format!("job spec from driver: {e}")))?;
    let memory = match opts.memory {
        Some(m) => m,
        None => parse_memory(&spec.executors.memory)?,
    };
    let slots = opts.slots.unwrap_or_else(|| spec.executor_slots()).max(1) as usize;
    store.set_budget((memory as f64 * (1.0 - OPERATOR_MEMORY_FRACTION)) as u64);
    // The scratch volume's limit, shared as memory is: operators' spill files and blocks.
    let disk = parse_memory(&spec.executors.disk)?;
    store.set_disk_budget((disk as f64 * (1.0 - OPERATOR_MEMORY_FRACTION)) as u64);
    let env = Arc::new(ShuffleEnv {
        executor_id: opts.executor_id.clone(),
        store: store.clone(),
        peers: PeerClients::new(opts.tls.clone()),
        replicas: Default::default(),
    });
    let ctx = Arc::new(executor_context(
        &spec,
        memory,
        disk,
        opts.work_dir.join("spill"),
        env,
        &opts.locations,
    )?);
    Ok(Setup {
        ctx,
        slots,
        grace: spec.failure_policy.driver_grace(),
        peers: Arc::new(PeerClients::new(opts.tls.clone())),
    })
}

/// Whether a failed connection or registration may succeed if tried again: the driver is
/// starting, going, or gone and about to be replaced. A refusal (the wrong token, an id
/// already registered) is final.
fn worth_retrying(e: &Error) -> bool {
    use tonic::Code;
    match e {
        Error::Connect { .. } => true,
        Error::Rpc { source, .. } => matches!(
            source.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// Connects to the driver at `driver` and registers, trying again (with backoff and
/// jitter) while the driver cannot answer, for up to `patience`.
async fn join(
    driver: &str,
    opts: &ExecutorOptions,
    flight_address: &str,
    holdings: &Mutex<Holdings>,
    patience: Duration,
) -> Result<(DriverClient<Channel>, rpc::RegisterResponse)> {
    let endpoint = tls::endpoint(driver, opts.tls.as_ref(), Role::Driver)
        .map_err(|source| Error::Connect {
            address: driver.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = async {
            let channel = endpoint.connect().await.map_err(|source| Error::Connect {
                address: driver.into(),
                source,
            })?;
            let mut client = DriverClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            let registered = register(&mut client, opts, flight_address, holdings).await?;
            Ok::<_, Error>((client, registered))
        };
        match attempt.await {
            Ok(joined) => return Ok(joined),
            Err(e) if worth_retrying(&e) && started.elapsed() < patience => {
                tracing::debug!(%driver, error = %e, "the driver cannot take this executor yet; trying again");
                tokio::time::sleep(jittered(pause)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for `f`, unless a replacement driver attaches first (the newest, if several did).
async fn or_attach<T>(
    attach: &mut mpsc::UnboundedReceiver<AttachRequest>,
    f: impl std::future::Future<Output = T>,
) -> std::result::Result<T, AttachRequest> {
    tokio::select! {
        t = f => Ok(t),
        Some(mut req) = attach.recv() => {
            while let Ok(newer) = attach.try_recv() {
                req = newer;
            }
            Err(req)
        }
    }
}

async fn work_loop(
    env: &Arc<Session>,
    client: &mut DriverClient<Channel>,
    store: &Arc<BlockStore>,
    slots: usize,
    draining: &Notice,
    attach: &mut mpsc::UnboundedReceiver<AttachRequest>,
) -> Result<SessionEnd> {
    let mut running: JoinSet<()> = JoinSet::new();
    // Each running attempt's handle, to stop it when the driver says so.
    let mut attempts: HashMap<(u32, u32, u32), AbortHandle> = HashMap::new();
    let mut copies: JoinSet<()> = JoinSet::new();
    let mut unreachable_since: Option<Instant> = None;
    // Tasks of the driver being left are abandoned: the new one reschedules what it needs.
    macro_rules! attached {
        ($req:expr) => {{
            running.shutdown().await;
            return Ok(SessionEnd::Attach($req));
        }};
    }
    loop {
        while running.try_join_next().is_some() {}
        while copies.try_join_next().is_some() {}
        attempts.retain(|_, handle| !handle.is_finished());
        // Given notice, running attempts carry on until they finish or the driver, its
        // time up, says to stop them (it then resubmits them elsewhere).
        let is_draining = draining.is_given();
        let free = if is_draining {
            0
        } else {
            slots.saturating_sub(running.len())
        };
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
        let poll = client.poll_tasks(with_deadline(
            rpc::PollRequest {
                executor_id: env.executor_id.clone(),
                free_slots: free as u32,
                token: env.token.clone(),
                held,
                draining: is_draining,
            },
            POLL_DEADLINE,
        ));
        // Notice arriving during a long poll is said at once, in a new poll.
        let poll = async {
            tokio::select! {
                p = poll => Some(p),
                _ = draining.given(), if !is_draining => None,
            }
        };
        let polled = match or_attach(attach, poll).await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(req) => attached!(req),
        };
        let response = match polled {
            Ok(r) => {
                unreachable_since = None;
                r.into_inner()
            }
            Err(status) if is_draining => {
                tracing::warn!(error = %status, "draining and the driver is unreachable; exiting");
                return Ok(SessionEnd::Shutdown);
            }
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > env.grace.max(env.patience) {
                    tracing::error!(error = %status, silent_ms = since.elapsed().as_millis() as u64, "the driver is gone and no replacement took over; exiting");
                    running.shutdown().await;
                    return Err(Error::rpc("poll_tasks", status));
                }
                if let Err(req) = or_attach(
                    attach,
                    tokio::time::sleep(jittered(Duration::from_millis(200))),
                )
                .await
                {
                    attached!(req);
                }
                continue;
            }
        };
        if !response.journal.is_empty() {
            env.holdings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .journal = response.journal;
        }
        if !response.drop_stages.is_empty() {
            store.drop_stages(&response.drop_stages);
            env.holdings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drop_stages(&response.drop_stages);
        }
        if response.shutdown {
            running.shutdown().await;
            return Ok(SessionEnd::Shutdown);
        }
        if response.decommissioned {
            tracing::info!("drained: nothing this executor holds is needed any more; exiting");
            // Attempts still running lost their race or ran out of time: not waited for.
            running.abort_all();
            copies.abort_all();
            return Ok(SessionEnd::Shutdown);
        }
        for c in response.cancel {
            let key = (c.stage_id, c.partition, c.attempt);
            if let Some(handle) = attempts.remove(&key) {
                tracing::info!(
                    stage = c.stage_id,
                    partition = c.partition,
                    attempt = c.attempt,
                    "another attempt of this task finished first; stopped"
                );
                handle.abort();
            }
            env.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        for m in response.migrations {
            let (env, store) = (env.clone(), store.clone());
            copies.spawn(async move { migrate::copy_output(&env, &store, m).await });
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
            let handle = running.spawn(async move {
                let report = tasks::run_task(&env, task).await;
                env.deliver(report).await;
                env.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
            attempts.insert(key, handle);
        }
        if running.len() >= slots {
            // Busy: wait for a slot, but poll at least every second as a heartbeat.
            let slot = async {
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_secs(1), running.join_next()) => {}
                    _ = draining.given(), if !is_draining => {}
                }
            };
            if let Err(req) = or_attach(attach, slot).await {
                attached!(req);
            }
        }
    }
}

impl Session {
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
