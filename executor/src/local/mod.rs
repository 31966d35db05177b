//! Local mode: one driver and N executor processes on loopback, the same code paths as on a
//! cluster (real gRPC control, real Flight shuffle). A supervisor plays the operator's part:
//! when an executor process dies it tells the driver at once and starts a replacement under
//! a new id, within the job's loss budget. Chaos events kill or pause executors on purpose.
//! An in-process variant runs the executors as tasks of this process instead.
pub mod chaos;
mod fleet;

use std::path::PathBuf;
use std::time::Duration;

use kiln_api::JobSpec;
use tokio::task::JoinHandle;

pub use chaos::{Chaos, ChaosAction, ChaosEvent, ChaosPoint, ChaosTarget};
use fleet::{Fleet, Launcher};

use crate::driver::{Driver, DriverOptions};
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
        }
    }
}

enum Executors {
    Processes(JoinHandle<()>, tokio::sync::oneshot::Sender<()>),
    Tasks(Vec<JoinHandle<()>>),
}

/// A driver and its local executors.
pub struct LocalCluster {
    driver: Driver,
    executors: Executors,
}

impl LocalCluster {
    /// Starts the driver and the executors.
    pub async fn start(spec: &JobSpec, opts: &LocalOptions) -> Result<Self> {
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
        let driver = Driver::start(
            spec,
            DriverOptions {
                bind: "127.0.0.1:0".parse().expect("a socket address"),
                token: Some(token.clone()),
                heartbeat_timeout: opts.heartbeat_timeout,
                job_uid: None,
            },
        )
        .await?;
        let url = format!("http://{}", driver.address());
        let executors = if opts.in_process {
            let mut tasks = Vec::new();
            for i in 0..opts.executors {
                let id = format!("exec-{i}");
                let eo = ExecutorOptions {
                    driver: url.clone(),
                    executor_id: id.clone(),
                    bind_host: "127.0.0.1".into(),
                    advertise_host: None,
                    slots: None,
                    memory: None,
                    work_dir: fleet::executor_dir(&opts.work_dir, &id)?,
                    token: token.clone(),
                    faults: String::new(),
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
            };
            let fleet = Fleet::new(
                launcher,
                driver.handle(),
                spec.failure_policy.max_executor_losses,
                Chaos::new(opts.chaos.clone(), opts.chaos_seed),
            );
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let supervisor = fleet.start(opts.executors, stop_rx)?;
            Executors::Processes(supervisor, stop_tx)
        };
        Ok(Self { driver, executors })
    }

    /// The driver.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// Tells executors the job is over, waits for them briefly, then stops everything.
    pub async fn stop(self) {
        let LocalCluster { driver, executors } = self;
        let handles = match executors {
            Executors::Processes(supervisor, stop) => {
                // No more replacements: executors leaving now are the job ending.
                let _ = stop.send(());
                vec![supervisor]
            }
            Executors::Tasks(tasks) => tasks,
        };
        driver.shutdown(Duration::from_secs(3)).await;
        for s in &handles {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !s.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.abort();
        }
    }
}
