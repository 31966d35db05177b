//! Local mode: one driver and N executor processes on loopback, the same code paths as on a
//! cluster (real gRPC control, real Flight shuffle). A supervisor plays the operator's part:
//! when an executor process dies it tells the driver at once and starts a replacement under
//! a new id, within the job's loss budget. Chaos events kill or pause executors on purpose,
//! or kill the driver: a replacement of the next epoch then takes the executors over, as
//! the operator's replacement driver pod does.
//! An in-process variant runs the executors as tasks of this process instead.
pub mod chaos;
mod fleet;

use futures::future::BoxFuture;
use std::path::PathBuf;
use std::time::Duration;

use kiln_api::tls::{JobCredentials, Role, TlsIdentity};
use kiln_api::{JobSpec, LocationPolicy};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

pub use chaos::{Chaos, ChaosAction, ChaosEvent, ChaosPoint, ChaosTarget, Victim};
use fleet::{Addresses, Fleet, Launcher, NewDriver};

use crate::driver::{Driver, DriverOptions, JobOutcome, Progress};
use crate::worker::{ExecutorOptions, run_executor};
use crate::{Error, Result};

/// Local-mode settings.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Executors to start.
    pub executors: u32,
    /// Run executors inside this process instead of as child processes.
    pub in_process: bool,
    /// The `kiln` program to start executors with.
    pub program: PathBuf,
    /// Where executors keep spill files and logs.
    pub work_dir: PathBuf,
    /// An executor silent this long is declared lost.
    pub heartbeat_timeout: Duration,
    /// Chaos events to carry out (executor processes only).
    pub chaos: Vec<ChaosEvent>,
    /// Seed for chaos's random choices.
    pub chaos_seed: u64,
    /// Whether the job's connections are mutual TLS, with certificates made for this run
    /// alone and kept in memory (on by default; off only to measure what TLS costs).
    pub tls: bool,
}

impl LocalOptions {
    /// Options for `executors` child processes of `program`, with no chaos.
    pub fn new(executors: u32, program: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            executors,
            in_process: false,
            program,
            work_dir,
            heartbeat_timeout: Duration::from_secs(10),
            chaos: Vec::new(),
            chaos_seed: 0,
            tls: true,
        }
    }
}

enum Executors {
    Processes(JoinHandle<()>, tokio::sync::oneshot::Sender<()>),
    Tasks(Vec<JoinHandle<()>>),
}

/// What starting a driver of the job takes, the first or a replacement.
struct DriverSetup {
    token: String,
    job_uid: String,
    heartbeat_timeout: Duration,
    /// The driver's identity (None: plain connections).
    tls: Option<TlsIdentity>,
}

impl DriverSetup {
    async fn start(&self, spec: &JobSpec, epoch: u64, attach: Vec<String>) -> Result<Driver> {
        Driver::start(
            spec,
            DriverOptions {
                bind: "127.0.0.1:0".parse().expect("a socket address"),
                token: Some(self.token.clone()),
                heartbeat_timeout: self.heartbeat_timeout,
                job_uid: Some(self.job_uid.clone()),
                epoch,
                attach,
                tls: self.tls.clone(),
                // The machine is the user's own, its loopback services too.
                locations: LocationPolicy::local(),
            },
        )
        .await
    }
}

/// Copies a driver's progress into the cluster's, which outlives drivers.
fn forward(driver: &Driver, to: &broadcast::Sender<Progress>) -> JoinHandle<()> {
    let mut from = driver.subscribe();
    let to = to.clone();
    tokio::spawn(async move {
        loop {
            match from.recv().await {
                Ok(p) => {
                    let _ = to.send(p);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "progress of the driver fell behind; events lost"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

/// A driver and its local executors.
pub struct LocalCluster {
    driver: Driver,
    setup: DriverSetup,
    epoch: u64,
    executors: Executors,
    progress: broadcast::Sender<Progress>,
    forwarding: JoinHandle<()>,
    addresses: Addresses,
    /// Chaos asking for the driver to be killed.
    driver_kills: mpsc::UnboundedReceiver<()>,
    /// Tells the supervisor of a replacement driver.
    new_drivers: Option<mpsc::UnboundedSender<NewDriver>>,
}

impl LocalCluster {
    /// Starts the driver and the executors.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn start<'a>(spec: &'a JobSpec, opts: &'a LocalOptions) -> BoxFuture<'a, Result<Self>> {
        Box::pin(Self::start_inner(spec, opts))
    }

    async fn start_inner(spec: &JobSpec, opts: &LocalOptions) -> Result<Self> {
        if opts.in_process && !opts.chaos.is_empty() {
            return Err(Error::Chaos {
                spec: opts
                    .chaos
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                reason: "chaos needs executor processes; drop --in-process".into(),
            });
        }
        let token = uuid::Uuid::new_v4().to_string();
        let job_uid = uuid::Uuid::new_v4().to_string();
        let credentials = if opts.tls {
            Some(JobCredentials::issue(&job_uid)?)
        } else {
            None
        };
        let identity = |role| credentials.as_ref().and_then(|c| c.identity(role));
        let executor_tls = identity(Role::Executor);
        let setup = DriverSetup {
            token: token.clone(),
            job_uid,
            heartbeat_timeout: opts.heartbeat_timeout,
            tls: identity(Role::Driver),
        };
        let driver = setup.start(spec, 1, Vec::new()).await?;
        let progress = broadcast::channel(8192).0;
        let forwarding = forward(&driver, &progress);
        let addresses = Addresses::default();
        let (kill_tx, driver_kills) = mpsc::unbounded_channel();
        let url = format!("http://{}", driver.address());
        let mut new_drivers = None;
        let executors = if opts.in_process {
            let mut tasks = Vec::new();
            for i in 0..opts.executors {
                let id = format!("exec-{i}");
                let eo = ExecutorOptions {
                    driver: url.clone(),
                    executor_id: id.clone(),
                    bind_host: "127.0.0.1".into(),
                    port: 0,
                    advertise_host: None,
                    slots: None,
                    memory: None,
                    work_dir: fleet::executor_dir(&opts.work_dir, &id)?,
                    token: token.clone(),
                    faults: String::new(),
                    tls: executor_tls.clone(),
                    locations: LocationPolicy::local(),
                };
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = run_executor(eo).await {
                        tracing::error!(executor = %id, error = %e, "executor stopped");
                    }
                }));
            }
            Executors::Tasks(tasks)
        } else {
            let launcher = Launcher {
                program: opts.program.clone(),
                driver_url: url,
                token,
                work_dir: opts.work_dir.clone(),
                tls: executor_tls,
            };
            let fleet = Fleet::new(
                launcher,
                driver.handle(),
                spec.failure_policy.max_executor_losses,
                Chaos::new(opts.chaos.clone(), opts.chaos_seed),
                addresses.clone(),
                kill_tx,
            );
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let (drivers_tx, drivers_rx) = mpsc::unbounded_channel();
            new_drivers = Some(drivers_tx);
            let supervisor =
                fleet.start(opts.executors, stop_rx, progress.subscribe(), drivers_rx)?;
            Executors::Processes(supervisor, stop_tx)
        };
        Ok(Self {
            driver,
            setup,
            epoch: 1,
            executors,
            progress,
            forwarding,
            addresses,
            driver_kills,
            new_drivers,
        })
    }

    /// Progress of the job, whichever driver runs it.
    pub fn subscribe(&self) -> broadcast::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Runs the job to its end. A driver killed on the way (chaos) is replaced by one of the
    /// next epoch, which takes the live executors and what they hold over.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn run<'a>(&'a mut self, spec: &'a JobSpec) -> BoxFuture<'a, Result<JobOutcome>> {
        Box::pin(self.run_inner(spec))
    }

    async fn run_inner(&mut self, spec: &JobSpec) -> Result<JobOutcome> {
        let started = std::time::Instant::now();
        loop {
            tokio::select! {
                outcome = self.driver.run(spec) => {
                    // The job's time, not the last driver's.
                    return outcome.map(|mut o| {
                        o.summary.elapsed_ms = started.elapsed().as_millis() as u64;
                        o
                    });
                }
                Some(()) = self.driver_kills.recv() => {}
            }
            self.replace_driver(spec).await?;
        }
    }

    /// Kills the driver and starts the next, handing it the live executors' addresses.
    async fn replace_driver(&mut self, spec: &JobSpec) -> Result<()> {
        self.epoch += 1;
        let attach: Vec<String> = self
            .addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let next = self.setup.start(spec, self.epoch, attach).await?;
        let old = std::mem::replace(&mut self.driver, next);
        old.kill();
        self.forwarding.abort();
        self.forwarding = forward(&self.driver, &self.progress);
        tracing::warn!(epoch = self.epoch, address = %self.driver.address(), "driver killed; a replacement takes over");
        if let Some(tx) = &self.new_drivers {
            let _ = tx.send((
                self.driver.handle(),
                format!("http://{}", self.driver.address()),
            ));
        }
        Ok(())
    }

    /// The summary of what the current driver ran so far.
    pub fn summary(&self, spec: &JobSpec) -> crate::JobSummary {
        self.driver.summary(spec)
    }

    /// Tells executors the job is over, waits for them briefly, then stops everything.
    ///
    /// Boxed here, so callers in other crates do not compile the whole future again.
    pub fn stop(self) -> BoxFuture<'static, ()> {
        Box::pin(self.stop_inner())
    }

    async fn stop_inner(self) {
        let LocalCluster {
            driver,
            executors,
            forwarding,
            ..
        } = self;
        let handles = match executors {
            Executors::Processes(supervisor, stop) => {
                // No more replacements: executors leaving now are the job ending.
                let _ = stop.send(());
                vec![supervisor]
            }
            Executors::Tasks(tasks) => tasks,
        };
        driver.shutdown(Duration::from_secs(3)).await;
        forwarding.abort();
        for s in &handles {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !s.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.abort();
        }
    }
}
