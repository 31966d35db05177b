//! Local mode: one driver and N executor processes on loopback, the same code paths as on a
//! cluster (real gRPC control, real Flight shuffle). An in-process variant runs the executors
//! as tasks of this process instead.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_api::JobSpec;
use tokio::task::JoinHandle;

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
}

/// A driver and its local executors.
pub struct LocalCluster {
    driver: Driver,
    supervisors: Vec<JoinHandle<()>>,
}

impl LocalCluster {
    /// Starts the driver and the executors.
    pub async fn start(spec: &JobSpec, opts: &LocalOptions) -> Result<Self> {
        let token = uuid::Uuid::new_v4().to_string();
        let driver = Driver::start(
            spec,
            DriverOptions {
                bind: "127.0.0.1:0".parse().expect("a socket address"),
                token: Some(token.clone()),
                heartbeat_timeout: opts.heartbeat_timeout,
            },
        )
        .await?;
        let url = format!("http://{}", driver.address());
        let mut supervisors = Vec::new();
        for i in 0..opts.executors {
            let id = format!("exec-{i}");
            let dir = opts.work_dir.join(&id);
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                action: "create",
                path: dir.clone(),
                source,
            })?;
            let handle = if opts.in_process {
                let eo = ExecutorOptions {
                    driver: url.clone(),
                    executor_id: id.clone(),
                    bind_host: "127.0.0.1".into(),
                    advertise_host: None,
                    slots: None,
                    memory: None,
                    work_dir: dir,
                    token: token.clone(),
                };
                tokio::spawn(async move {
                    if let Err(e) = run_executor(eo).await {
                        tracing::error!(executor = %id, error = %e, "executor stopped");
                    }
                })
            } else {
                let log_path = opts.work_dir.join(format!("{id}.log"));
                let log = std::fs::File::create(&log_path).map_err(|source| Error::Io {
                    action: "create",
                    path: log_path.clone(),
                    source,
                })?;
                let mut child = tokio::process::Command::new(&opts.program)
                    .args([
                        "executor",
                        "--driver",
                        &url,
                        "--id",
                        &id,
                        "--host",
                        "127.0.0.1",
                    ])
                    .arg("--work-dir")
                    .arg(&dir)
                    .env("KILN_TOKEN", &token)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|source| Error::ExecutorProcess {
                        executor: id.clone(),
                        source,
                    })?;
                // The supervisor owns the child: aborting it kills the process.
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(status) if status.success() => {}
                        Ok(status) => {
                            tracing::warn!(executor = %id, %status, "executor process exited")
                        }
                        Err(e) => tracing::warn!(executor = %id, error = %e, "executor wait"),
                    }
                })
            };
            supervisors.push(handle);
        }
        Ok(Self {
            driver,
            supervisors,
        })
    }

    /// The driver.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// Tells executors the job is over, waits for them briefly, then stops everything.
    pub async fn stop(self) {
        self.driver.shutdown(Duration::from_secs(3)).await;
        for s in &self.supervisors {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !s.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.abort();
        }
    }
}
