//! The driver: plans the job into stages, schedules tasks on executors through its control
//! service, tracks where every output lives, and assembles the result.
//!
//! - `core`: [`DriverCore`](core::DriverCore), all of the driver's state, fed events; pure
//!   (`core_resume.rs`: taking over from an earlier driver).
//! - `journal`: the facts a replacement driver needs that no block store tells; `attach`:
//!   taking over the executors an earlier driver left.
//! - `scheduler`: the stage graph and lineage inside the core.
//! - `plans`: stage plans, resolved and encoded for executors (the DataFusion part).
//! - `service`: the gRPC shell around the core, and the heartbeat monitor.
//! - `steps`: the job's steps in order; `runner`: running a step's stages; `iterate`:
//!   iterative steps (on `runner` only); `output`: the output commit protocol.
mod attach;
mod core;
mod iterate;
mod journal;
mod output;
mod plans;
mod runner;
pub mod scheduler;
mod service;
mod steps;

use futures::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::tls::TlsIdentity;
use kiln_api::{JobSpec, LocationPolicy};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub use self::core::Progress;
pub use output::SUCCESS_FILE;
pub(crate) use service::secrets_match;
use service::{DriverService, Shared};
pub use steps::JobOutcome;

use crate::guard::{driver_policy, guarded_server};
use crate::rpc::driver_server::DriverServer;
use crate::{Error, Result};

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Where the control service listens.
    pub bind: SocketAddr,
    /// The per-job secret executors must present (None: no authentication).
    pub token: Option<String>,
    /// An executor silent this long is declared lost.
    pub heartbeat_timeout: Duration,
    /// The job's identity across driver restarts (a ComputeJob's uid): a committed output
    /// that names it is this job's own, not another's. None: a fresh id for this run.
    pub job_uid: Option<String>,
    /// This driver's epoch: 1 for the job's first driver, higher for each replacement.
    pub epoch: u64,
    /// Block-service addresses of executors an earlier driver left: taken over at start.
    pub attach: Vec<String>,
    /// The driver's identity (None: plain connections, no client certificates checked).
    pub tls: Option<TlsIdentity>,
    /// Where the job's HTTP inputs may connect, checked at each connection.
    pub locations: LocationPolicy,
}

/// A cheap, cloneable handle on a running driver.
#[derive(Clone)]
pub struct DriverHandle {
    shared: Arc<Shared>,
}

impl DriverHandle {
    /// Declares an executor lost; `occurred` is when it went, if known.
    pub fn executor_lost(
        &self,
        executor: &str,
        reason: scheduler::LossReason,
        occurred: Option<std::time::Instant>,
    ) {
        self.shared.act(|s| {
            s.core
                .lose(executor, reason, occurred, std::time::Instant::now())
        });
    }

    /// Progress events of the job.
    pub fn subscribe(&self) -> broadcast::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// Live executors, with how many outputs still needed each holds.
    pub fn outputs_held(&self) -> std::collections::BTreeMap<String, usize> {
        self.shared.read(|core| core.outputs_held())
    }
}

/// A running driver.
pub struct Driver {
    shared: Arc<Shared>,
    address: SocketAddr,
    server: JoinHandle<()>,
    monitor: JoinHandle<()>,
    /// Executors of an earlier driver to take over before the job starts.
    attach: Vec<String>,
    token: String,
    locations: LocationPolicy,
}

impl Driver {
    /// Starts the control service for `spec`.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn start(spec: &JobSpec, options: DriverOptions) -> BoxFuture<'_, Result<Driver>> {
        Box::pin(Self::start_inner(spec, options))
    }

    async fn start_inner(spec: &JobSpec, options: DriverOptions) -> Result<Driver> {
        let listener = TcpListener::bind(options.bind)
            .await
            .map_err(|source| Error::Bind {
                address: options.bind.to_string(),
                source,
            })?;
        let address = listener.local_addr().map_err(|source| Error::Bind {
            address: options.bind.to_string(),
            source,
        })?;
        let spec_json = serde_json::to_string(spec).map_err(|e| Error::Driver(e.to_string()))?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let core = self::core::DriverCore::new(
            spec.failure_policy.clone(),
            &run_id,
            options.epoch.max(1),
            std::time::Instant::now(),
        );
        let shared = Arc::new(
            Shared::new(
                core,
                run_id,
                spec_json,
                options.token.clone(),
                options.job_uid,
                options.heartbeat_timeout,
            )
            .with_tls(options.tls.clone()),
        );
        let service = DriverServer::new(DriverService::new(shared.clone()))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let guarded = guarded_server(
            options.tls.as_ref(),
            driver_policy,
            "the driver's control service",
        )?
        .add_service(service);
        let server = tokio::spawn(async move {
            // The builder's nodelay applies only to listeners tonic binds itself; without it
            // every small response waits out the peer's delayed ACK (about 40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            if let Err(e) = guarded.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "driver control service stopped");
            }
        });
        let monitor = tokio::spawn(service::monitor_heartbeats(
            shared.clone(),
            options.heartbeat_timeout,
        ));
        Ok(Driver {
            shared,
            address,
            server,
            monitor,
            attach: options.attach,
            token: options.token.unwrap_or_default(),
            locations: options.locations,
        })
    }

    /// The control service's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Progress events of the job.
    pub fn subscribe(&self) -> broadcast::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// A handle for supervisors (the local runner): report losses, follow progress.
    pub fn handle(&self) -> DriverHandle {
        DriverHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs the job to its end, after taking over the executors an earlier driver left.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn run<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, Result<JobOutcome>> {
        Box::pin(self.run_inner(spec))
    }

    async fn run_inner(&self, spec: &JobSpec) -> Result<JobOutcome> {
        if !self.attach.is_empty() {
            let n = attach::attach_executors(&self.shared, self.address, &self.attach, &self.token)
                .await;
            tracing::info!(
                executors = n,
                of = self.attach.len(),
                "took over executors of an earlier driver"
            );
        }
        steps::run(&self.shared, spec, &self.locations).await
    }

    /// Stops serving at once, as a lost driver would: no goodbye to the executors, which
    /// keep their blocks for a replacement (local chaos).
    pub fn kill(self) {
        self.monitor.abort();
        self.server.abort();
    }

    /// The summary of what ran so far.
    pub fn summary(&self, spec: &JobSpec) -> crate::JobSummary {
        self.shared.read(|core| core.summary(spec))
    }

    /// Tells executors the job is over, gives them `grace` to hear it, and stops serving.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn shutdown(self, grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(self.shutdown_inner(grace))
    }

    async fn shutdown_inner(self, grace: Duration) {
        self.shared.act(|s| s.core.begin_shutdown());
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline
            && self.shared.read(|core| core.live_width()) > 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.monitor.abort();
        self.server.abort();
    }
}
