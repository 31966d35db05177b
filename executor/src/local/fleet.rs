//! The local runner's executor processes: starts them, notices when one dies or is declared
//! lost, tells the driver and starts a replacement under a new id (as the operator does with
//! pods), and carries out chaos orders. It follows the driver of the moment: when chaos
//! kills the driver, the local runner starts a replacement and hands the fleet its handle.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_api::launch::ExecutorLaunch;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::chaos::{Chaos, ChaosAction, ChaosOrder, Victim};
use crate::driver::scheduler::LossReason;
use crate::driver::{DriverHandle, Progress};
use crate::{Error, Result};

/// How executor processes are started.
#[derive(Clone, Debug)]
pub(crate) struct Launcher {
    pub program: PathBuf,
    pub driver_url: String,
    pub token: String,
    pub work_dir: PathBuf,
    /// The executors' identity, passed by environment (None: plain connections).
    pub tls: Option<kiln_api::tls::TlsIdentity>,
}

/// The executor's own folder under the run's work dir.
pub(crate) fn executor_dir(work_dir: &Path, id: &str) -> Result<PathBuf> {
    let dir = work_dir.join(id);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        action: "create",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

impl Launcher {
    fn spawn(&self, id: &str) -> Result<tokio::process::Child> {
        let dir = executor_dir(&self.work_dir, id)?;
        let log_path = self.work_dir.join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Io {
            action: "create",
            path: log_path.clone(),
            source,
        })?;
        let launch = ExecutorLaunch {
            driver: self.driver_url.clone(),
            id: id.to_string(),
            host: "127.0.0.1".into(),
            port: 0,
            advertise_host: None,
            slots: None,
            memory: None,
            work_dir: dir,
            token: self.token.clone(),
            // None here: `kiln run`'s own KILN_FAULTS, if any, is inherited.
            faults: String::new(),
            // The machine is the user's own, its loopback services too.
            allow_loopback: true,
        };
        tokio::process::Command::new(&self.program)
            .args(launch.command_line())
            .envs(launch.env())
            .envs(self.tls.iter().flat_map(|t| t.env()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::ExecutorProcess {
                executor: id.to_string(),
                source,
            })
    }
}

struct Exit {
    id: String,
    status: std::io::Result<ExitStatus>,
    at: Instant,
}

struct Running {
    pid: Option<u32>,
    kill: Option<oneshot::Sender<()>>,
}

/// Sends a job-control signal through the system's `kill`, so no unsafe code is needed.
async fn signal(pid: u32, name: &str) {
    let result = tokio::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await;
    if !matches!(result, Ok(s) if s.success()) {
        tracing::warn!(pid, signal = name, "could not signal an executor process");
    }
}

/// Block-service addresses of the live executors, by id: what a replacement driver takes
/// over (the operator knows its executors' pod IPs the same way).
pub(crate) type Addresses = Arc<Mutex<BTreeMap<String, String>>>;

/// A replacement driver: its handle and its control service's URL.
pub(crate) type NewDriver = (DriverHandle, String);

/// The supervisor's state.
pub(crate) struct Fleet {
    launcher: Launcher,
    driver: DriverHandle,
    addresses: Addresses,
    /// Asks the local runner to kill the driver (chaos).
    kill_driver: mpsc::UnboundedSender<()>,
    budget: u32,
    chaos: Chaos,
    running: HashMap<String, Running>,
    /// Executors already made good (replaced or over budget): never twice.
    settled: HashSet<String>,
    /// Executors chaos killed, and when: their loss is a preemption.
    killed: HashMap<String, Instant>,
    /// Executors chaos crashed (SIGKILL counted as their own failure), and when.
    crashed: HashMap<String, Instant>,
    /// Executors chaos gave notice (SIGTERM), and when: they drain and leave.
    drained: HashMap<String, Instant>,
    losses: u32,
    next_id: u32,
}

impl Fleet {
    pub fn new(
        launcher: Launcher,
        driver: DriverHandle,
        budget: u32,
        chaos: Chaos,
        addresses: Addresses,
        kill_driver: mpsc::UnboundedSender<()>,
    ) -> Self {
        Self {
            launcher,
            driver,
            addresses,
            kill_driver,
            budget,
            chaos,
            running: HashMap::new(),
            settled: HashSet::new(),
            killed: HashMap::new(),
            drained: HashMap::new(),
            crashed: HashMap::new(),
            losses: 0,
            next_id: 0,
        }
    }

    fn launch(&mut self, waiters: &mut JoinSet<()>, exits: &mpsc::Sender<Exit>) -> Result<()> {
        let id = format!("exec-{}", self.next_id);
        self.next_id += 1;
        let mut child = self.launcher.spawn(&id)?;
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        self.running.insert(
            id.clone(),
            Running {
                pid: child.id(),
                kill: Some(kill_tx),
            },
        );
        let exits = exits.clone();
        waiters.spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exits
                .send(Exit {
                    id,
                    status,
                    at: Instant::now(),
                })
                .await;
        });
        Ok(())
    }

    /// Starts `count` executors and supervises them until `stop` fires (the job is over),
    /// following the job's `progress` and the replacement drivers `drivers` announces.
    /// Aborting the returned task kills every process still running.
    pub fn start(
        mut self,
        count: u32,
        mut stop: oneshot::Receiver<()>,
        mut progress: broadcast::Receiver<Progress>,
        mut drivers: mpsc::UnboundedReceiver<NewDriver>,
    ) -> Result<JoinHandle<()>> {
        let (exit_tx, mut exit_rx) = mpsc::channel::<Exit>(64);
        let mut waiters = JoinSet::new();
        for _ in 0..count {
            self.launch(&mut waiters, &exit_tx)?;
        }
        Ok(tokio::spawn(async move {
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = &mut stop, if !stopping => stopping = true,
                    Some((driver, url)) = drivers.recv() => {
                        // Replacements started from now on dial the new driver.
                        self.driver = driver;
                        self.launcher.driver_url = url;
                    }
                    Some(exit) = exit_rx.recv() => self.exited(exit, stopping, &mut waiters, &exit_tx),
                    event = progress.recv(), if !stopping => match event {
                        Ok(event) => self.observe(&event, &mut waiters, &exit_tx),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "supervisor fell behind the driver's progress");
                        }
                        Err(broadcast::error::RecvError::Closed) => stopping = true,
                    },
                    // Keeps the waiters polled; they finish as processes exit.
                    Some(_) = waiters.join_next(), if !waiters.is_empty() => {}
                }
                if stopping && self.running.is_empty() {
                    break;
                }
            }
        }))
    }

    fn exited(
        &mut self,
        exit: Exit,
        stopping: bool,
        waiters: &mut JoinSet<()>,
        exits: &mpsc::Sender<Exit>,
    ) {
        self.running.remove(&exit.id);
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&exit.id);
        match &exit.status {
            Ok(s) if s.success() => tracing::info!(executor = %exit.id, "executor process exited"),
            Ok(s) => tracing::warn!(executor = %exit.id, status = %s, "executor process died"),
            Err(e) => tracing::warn!(executor = %exit.id, error = %e, "executor process lost"),
        }
        if stopping {
            return;
        }
        let clean = matches!(&exit.status, Ok(s) if s.success());
        let (reason, occurred) = match (self.killed.get(&exit.id), self.drained.get(&exit.id)) {
            _ if self.crashed.contains_key(&exit.id) => {
                (LossReason::Failed, self.crashed[&exit.id])
            }
            (Some(at), _) => (LossReason::Preempted, *at),
            (None, Some(at)) if clean => (LossReason::Drained, *at),
            (None, Some(at)) => (LossReason::Preempted, *at),
            // The driver gave up on it while its process still ran: silent but alive, a
            // hung process (here no node can be to blame).
            (None, None) if self.settled.contains(&exit.id) => {
                (LossReason::HeartbeatTimeout, exit.at)
            }
            (None, None) => (LossReason::Failed, exit.at),
        };
        // Idempotent: an executor the driver already gave up on is not lost twice.
        self.driver.executor_lost(&exit.id, reason, Some(occurred));
        self.replace(&exit.id, reason, waiters, exits);
    }

    /// Starts a replacement for `id` once, while the loss budget lasts (reclaims, drains
    /// and lost nodes never spend it).
    fn replace(
        &mut self,
        id: &str,
        reason: LossReason,
        waiters: &mut JoinSet<()>,
        exits: &mpsc::Sender<Exit>,
    ) {
        if !self.settled.insert(id.to_string()) {
            return;
        }
        self.losses += u32::from(reason.counts_against_budget());
        if self.losses > self.budget {
            tracing::warn!(executor = %id, budget = self.budget, "loss budget spent; not replacing");
            return;
        }
        if let Err(e) = self.launch(waiters, exits) {
            tracing::error!(error = %e, "could not start a replacement executor");
        }
    }

    fn observe(&mut self, event: &Progress, waiters: &mut JoinSet<()>, exits: &mpsc::Sender<Exit>) {
        if let Progress::ExecutorRegistered { executor, address } = event
            && self.running.contains_key(executor)
        {
            self.addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(executor.clone(), address.clone());
        }
        if let Progress::ExecutorLost { executor, reason } = event
            && self.running.contains_key(executor)
        {
            // Declared lost while its process still runs (a heartbeat timeout, the end of
            // a drain): the driver ignores it from now on and it exits when it hears so.
            // Replace it now. A silence is the process's own fault here: there is no node.
            let reason = LossReason::parse(reason).unwrap_or(LossReason::Failed);
            self.replace(&executor.clone(), reason, waiters, exits);
        }
        if let Progress::ExecutorDraining { executor, .. } = event
            && self.running.contains_key(executor)
        {
            // Going: its replacement starts now, while its outputs move (as the operator
            // does for a pod given notice).
            self.replace(&executor.clone(), LossReason::Drained, waiters, exits);
        }
        if self.chaos.done() {
            return;
        }
        let (driver, running) = (&self.driver, &self.running);
        let struck = |e: &String| {
            self.killed.contains_key(e)
                || self.crashed.contains_key(e)
                || self.drained.contains_key(e)
        };
        // Not one chaos already struck: two events at once must hit two executors.
        let live = || {
            let mut held = driver.outputs_held();
            held.retain(|e, _| running.contains_key(e) && !struck(e));
            held
        };
        for order in self.chaos.observe(event, live) {
            self.carry_out(order);
        }
    }

    fn carry_out(&mut self, order: ChaosOrder) {
        let executor = match order.victim {
            Victim::Driver => {
                tracing::warn!(event = %order.event, "chaos: killing the driver");
                let _ = self.kill_driver.send(());
                return;
            }
            Victim::Executor(e) => e,
        };
        let Some(running) = self.running.get_mut(&executor) else {
            tracing::warn!(%executor, event = %order.event, "chaos: no such executor process");
            return;
        };
        match order.action {
            ChaosAction::Kill | ChaosAction::Crash => {
                tracing::warn!(%executor, event = %order.event, "chaos: killing executor");
                let record = if order.action == ChaosAction::Crash {
                    &mut self.crashed
                } else {
                    &mut self.killed
                };
                record.insert(executor.clone(), Instant::now());
                if let Some(kill) = running.kill.take() {
                    let _ = kill.send(());
                }
            }
            ChaosAction::Drain => {
                let Some(pid) = running.pid else { return };
                tracing::warn!(%executor, event = %order.event, "chaos: giving executor notice (SIGTERM)");
                self.drained.insert(executor.clone(), Instant::now());
                tokio::spawn(async move { signal(pid, "TERM").await });
            }
            ChaosAction::Pause(d) => {
                let Some(pid) = running.pid else { return };
                tracing::warn!(%executor, event = %order.event, "chaos: pausing executor");
                // Detached on purpose: resuming must happen even if nobody waits for it.
                tokio::spawn(async move {
                    signal(pid, "STOP").await;
                    tokio::time::sleep(d).await;
                    signal(pid, "CONT").await;
                });
            }
        }
    }
}
