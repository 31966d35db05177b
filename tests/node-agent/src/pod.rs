//! One pod's life on a node: network namespace, container processes,
//! restarts, status, graceful deletion.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use rustix::process::Signal;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{info, warn};

use crate::agent::{NodeRuntime, Shared};
use crate::error::{Error, Result};
use crate::launch::{self, container_files};
use crate::limits::Group;
use crate::net::{self, PodNet};
use crate::process::{self, Exit, Launch};
use crate::status::{self, ContainerRuntime, Phase, PodView, State, Terminated};
use crate::volumes;

/// What the agent tells a pod worker.
#[derive(Debug)]
pub enum PodMsg {
    /// The pod changed in the API.
    Update(Box<Pod>),
    /// The pod is gone from the API.
    Gone,
    /// The node died: kill everything at once, report nothing.
    NodeKilled,
    /// Fault injection: signal one container (all when None).
    Signal {
        container: Option<String>,
        signal: Signal,
    },
}

struct Proc {
    pid: i32,
    generation: u64,
    started_at: Timestamp,
    /// The container's cgroup and its OOM-kill count when the process started.
    memory: Option<(Group, u64)>,
}

/// Why the main loop stopped.
enum End {
    Deleted,
    Gone,
    Terminal,
}

const MIN_BACKOFF: Duration = Duration::from_secs(1);

pub struct Worker {
    shared: Arc<Shared>,
    node: Arc<NodeRuntime>,
    pod: Pod,
    rx: mpsc::UnboundedReceiver<PodMsg>,
    dir: PathBuf,
    net: Option<PodNet>,
    ip_host: Option<u8>,
    launches: Vec<Launch>,
    containers: Vec<ContainerRuntime>,
    procs: Vec<Option<Proc>>,
    restart_at: Vec<Option<Instant>>,
    backoff: Vec<Duration>,
    generation: u64,
    exits_tx: mpsc::UnboundedSender<(usize, u64, Exit)>,
    exits_rx: mpsc::UnboundedReceiver<(usize, u64, Exit)>,
    started: bool,
    start_time: Timestamp,
    last_status: Option<PodStatus>,
    dirty: bool,
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        node: Arc<NodeRuntime>,
        pod: Pod,
        rx: mpsc::UnboundedReceiver<PodMsg>,
    ) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let dir = shared.state_dir.join("pods").join(format!(
            "{}_{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any(),
            uid.get(..8).unwrap_or(&uid)
        ));
        let containers: Vec<ContainerRuntime> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| ContainerRuntime::new(&c.name, c.image.as_deref().unwrap_or_default()))
            .collect();
        let n = containers.len();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            shared,
            node,
            pod,
            rx,
            dir,
            net: None,
            ip_host: None,
            launches: Vec::new(),
            containers,
            procs: (0..n).map(|_| None).collect(),
            restart_at: vec![None; n],
            backoff: vec![MIN_BACKOFF; n],
            generation: 0,
            exits_tx,
            exits_rx,
            started: false,
            start_time: Timestamp::now(),
            last_status: None,
            dirty: true,
        }
    }

    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any()
        )
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// Runs the pod until it is deleted, gone, or its node is killed.
    pub async fn run(mut self) {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.clone());
        if self.deleting() {
            self.finalize().await;
            return;
        }
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            self.wait_for_deletion().await;
            return;
        }
        let end = match self.setup_until_ready().await {
            Some(end) => end,
            None => self.supervise().await,
        };
        match end {
            End::Gone => self.kill_now().await,
            End::Deleted => {
                self.terminate().await;
                self.finalize().await;
            }
            End::Terminal => {
                self.teardown().await;
                self.wait_for_deletion().await;
            }
        }
    }

    /// Handles a message that ends the pod; returns None for the others.
    fn on_msg(&mut self, msg: Option<PodMsg>) -> Option<End> {
        match msg {
            None | Some(PodMsg::Gone) | Some(PodMsg::NodeKilled) => Some(End::Gone),
            Some(PodMsg::Update(p)) => {
                self.pod = *p;
                self.deleting().then_some(End::Deleted)
            }
            Some(PodMsg::Signal { container, signal }) => {
                for (i, p) in self.procs.iter().enumerate() {
                    let wanted = container
                        .as_deref()
                        .is_none_or(|c| c == self.containers[i].name);
                    if let (true, Some(p)) = (wanted, p)
                        && let Err(e) = process::signal_group(p.pid, signal)
                    {
                        warn!(pod = %self.key(), error = %e, "signal failed");
                    }
                }
                None
            }
        }
    }

    /// Sets up network, volumes and launches, retrying while that fails.
    async fn setup_until_ready(&mut self) -> Option<End> {
        loop {
            match self.setup().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(pod = %self.key(), category = e.category(), error = %e, "pod setup failed; retrying");
                    let reason = match e {
                        Error::UnmappedImage { .. } => "ErrImagePull",
                        _ => "CreateContainerConfigError",
                    };
                    for c in &mut self.containers {
                        c.state = State::Waiting {
                            reason: reason.into(),
                            message: Some(e.to_string()),
                        };
                    }
                    self.dirty = true;
                    self.report().await;
                    tokio::select! {
                        msg = self.rx.recv() => if let Some(end) = self.on_msg(msg) { return Some(end) },
                        _ = sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
        self.started = true;
        for i in 0..self.containers.len() {
            self.start(i);
        }
        self.report().await;
        None
    }

    async fn setup(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::WriteFile {
            path: self.dir.clone(),
            source,
        })?;
        if self.net.is_none() {
            let host = self
                .node
                .ips
                .lock()
                .map(|mut p| p.alloc())
                .ok()
                .flatten()
                .ok_or_else(|| Error::NoFreeIp {
                    node: self.node.cfg.name.clone(),
                })?;
            self.ip_host = Some(host);
            let pod_net = PodNet::new(
                &self.shared.config.netns_prefix,
                &self.pod.uid().unwrap_or_default(),
                self.node.net.pod_ip(host),
            );
            // Recorded first so that a half-made namespace is torn down
            // (and the address released) before the next attempt.
            self.net = Some(pod_net.clone());
            if let Err(e) = net::setup_pod(
                &self.shared.registry,
                &self.shared.config.bridge,
                self.shared.gateway,
                &pod_net,
            )
            .await
            {
                self.teardown().await;
                return Err(e);
            }
        }
        let Some(pod_net) = self.net.clone() else {
            return Ok(());
        };
        // Field refs see the IPs this agent is about to report.
        let mut pod = self.pod.clone();
        let st = pod.status.get_or_insert_with(Default::default);
        st.pod_ip = Some(pod_net.ip.to_string());
        st.host_ip = Some(self.node.net.ip.to_string());
        let vols = volumes::prepare(&self.shared.client, &pod, &self.dir).await?;
        let mut launches = Vec::new();
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            launches.push(
                launch::prepare(
                    &self.shared.client,
                    &self.shared.config,
                    &self.shared.repo,
                    &pod,
                    c,
                    &pod_net.netns,
                    &self.dir,
                    &vols,
                    self.shared.api(),
                    self.shared.cgroups.as_ref(),
                )
                .await?,
            );
        }
        self.launches = launches;
        Ok(())
    }

    fn start(&mut self, i: usize) {
        let name = self.containers[i].name.clone();
        let (_, termination, _) = container_files(&self.dir, &name);
        // Empty, and writable by any user, as the kubelet makes it.
        if let Err(e) = std::fs::write(&termination, b"")
            .and_then(|()| std::fs::set_permissions(&termination, Permissions::from_mode(0o666)))
        {
            warn!(pod = %self.key(), container = %name, error = %e, "termination-message file not ready");
        }
        self.generation += 1;
        let generation = self.generation;
        let memory = match &self.launches[i].memory {
            Some((group, limit)) => match group.prepare(*limit) {
                Ok(before) => Some((group.clone(), before)),
                Err(e) => return self.start_failed(i, &e),
            },
            None => None,
        };
        match process::spawn(&name, &self.launches[i]) {
            Ok(started) => {
                let now = Timestamp::now();
                info!(pod = %self.key(), container = %name, pid = started.pid, "container started");
                self.containers[i].state = State::Running {
                    started_at: now,
                    container_id: format!("kiln://{}/{}", self.node.cfg.name, started.pid),
                };
                self.procs[i] = Some(Proc {
                    pid: started.pid,
                    generation,
                    started_at: now,
                    memory,
                });
                let tx = self.exits_tx.clone();
                tokio::spawn(async move {
                    let exit = started.wait.await.unwrap_or(Exit {
                        code: None,
                        signal: None,
                    });
                    let _ = tx.send((i, generation, exit));
                });
            }
            Err(e) => return self.start_failed(i, &e),
        }
        self.dirty = true;
    }

    /// A container that could not start (its cgroup or its process): waiting, restarted
    /// after the back-off.
    fn start_failed(&mut self, i: usize, e: &Error) {
        warn!(pod = %self.key(), container = %self.containers[i].name, error = %e, "container start failed");
        self.containers[i].state = State::Waiting {
            reason: "RunContainerError".into(),
            message: Some(e.to_string()),
        };
        self.schedule_restart(i, false);
        self.dirty = true;
    }

    fn schedule_restart(&mut self, i: usize, ran_long: bool) {
        if ran_long {
            self.backoff[i] = MIN_BACKOFF;
        }
        self.restart_at[i] = Some(Instant::now() + self.backoff[i]);
        let cap = Duration::from_secs(self.shared.config.max_restart_backoff_seconds.max(1));
        self.backoff[i] = (self.backoff[i] * 2).min(cap);
    }

    /// Records a container's exit; schedules its restart when the policy says so.
    fn on_exit(&mut self, i: usize, generation: u64, exit: Exit, may_restart: bool) {
        let Some(p) = self.procs[i].take_if(|p| p.generation == generation) else {
            return;
        };
        let c = &self
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers[i].clone())
            .unwrap_or_default();
        let (log, termination, _) = container_files(&self.dir, &c.name);
        let failed = exit.code != Some(0);
        let message = launch::termination_message(
            &termination,
            &log,
            c.termination_message_policy.as_deref(),
            failed,
        );
        let mut t = Terminated::from_exit(
            exit.code,
            exit.signal,
            Some(p.started_at),
            Timestamp::now(),
            message,
            Some(format!("kiln://{}/{}", self.node.cfg.name, p.pid)),
        );
        if let Some((group, before)) = &p.memory {
            if group.oom_kills() > *before && t.exit_code != 0 {
                t.reason = "OOMKilled".into();
            }
            group.remove();
        }
        info!(pod = %self.key(), container = %c.name, exit_code = t.exit_code, "container exited");
        let ran_long = Timestamp::now().duration_since(p.started_at).as_secs() >= 10;
        if may_restart && status::should_restart(&self.restart_policy(), t.exit_code) {
            self.containers[i].state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!("back-off restarting container {}", c.name)),
            };
            self.containers[i].last_state = Some(t);
            self.schedule_restart(i, ran_long);
        } else {
            self.containers[i].state = State::Terminated(t);
        }
        self.dirty = true;
    }

    fn phase(&self) -> Phase {
        status::phase(
            &self.containers,
            self.started,
            self.restart_at.iter().any(Option::is_some),
        )
    }

    /// The main loop while containers run.
    async fn supervise(&mut self) -> End {
        loop {
            let next_restart = self.restart_at.iter().flatten().min().copied();
            tokio::select! {
                msg = self.rx.recv() => if let Some(end) = self.on_msg(msg) { return end },
                Some((i, g, exit)) = self.exits_rx.recv() => self.on_exit(i, g, exit, true),
                _ = sleep_until(next_restart.unwrap_or_else(Instant::now)), if next_restart.is_some() => {
                    let now = Instant::now();
                    for i in 0..self.restart_at.len() {
                        if self.restart_at[i].is_some_and(|t| t <= now) {
                            self.restart_at[i] = None;
                            self.containers[i].restart_count += 1;
                            self.start(i);
                        }
                    }
                }
                _ = sleep(Duration::from_secs(2)), if self.dirty => {}
            }
            self.report().await;
            if self.phase().is_terminal() {
                return End::Terminal;
            }
        }
    }

    fn running_pids(&self) -> Vec<i32> {
        self.procs.iter().flatten().map(|p| p.pid).collect()
    }

    fn signal_all(&self, signal: Signal) {
        for pid in self.running_pids() {
            if let Err(e) = process::signal_group(pid, signal) {
                warn!(pod = %self.key(), error = %e, "signal failed");
            }
        }
    }

    /// Graceful stop: SIGTERM, the grace period, SIGKILL; then the final status.
    async fn terminate(&mut self) {
        self.restart_at.iter_mut().for_each(|r| *r = None);
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        let grace = u64::try_from(grace).unwrap_or(0);
        info!(pod = %self.key(), grace, "stopping pod");
        self.signal_all(Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(grace);
        let mut killed = false;
        while !self.running_pids().is_empty() {
            tokio::select! {
                Some((i, g, exit)) = self.exits_rx.recv() => self.on_exit(i, g, exit, false),
                msg = self.rx.recv() => if let Some(End::Gone) = self.on_msg(msg) {
                    self.signal_all(Signal::KILL);
                },
                _ = sleep_until(deadline), if !killed => {
                    self.signal_all(Signal::KILL);
                    killed = true;
                }
                _ = sleep(Duration::from_secs(10)), if killed => break,
            }
        }
        self.dirty = true;
        self.report().await;
        self.teardown().await;
    }

    async fn kill_now(&mut self) {
        self.signal_all(Signal::KILL);
        self.teardown().await;
    }

    async fn teardown(&mut self) {
        let groups: Vec<Group> = self
            .launches
            .iter()
            .filter_map(|l| l.memory.as_ref().map(|(g, _)| g.clone()))
            .collect();
        for group in groups {
            group.remove_when_empty().await;
        }
        if let Some(n) = self.net.take() {
            net::teardown_pod(&self.shared.registry, &n).await;
        }
        if let Some(host) = self.ip_host.take()
            && let Ok(mut pool) = self.node.ips.lock()
        {
            pool.release(host);
        }
    }

    async fn wait_for_deletion(&mut self) {
        loop {
            let msg = self.rx.recv().await;
            match self.on_msg(msg) {
                Some(End::Deleted) => return self.finalize().await,
                Some(_) => return self.teardown().await,
                None => {}
            }
        }
    }

    /// The final delete (grace period 0) once the processes are gone.
    async fn finalize(&mut self) {
        self.teardown().await;
        let api: Api<Pod> = Api::namespaced(
            self.shared.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        );
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.pod.name_any(), &dp).await {
            Ok(_) => info!(pod = %self.key(), "pod deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(source) => {
                warn!(pod = %self.key(), error = %Error::DeletePod { pod: self.key(), source: Box::new(source) }, "final delete failed")
            }
        }
    }

    /// Whether the pod of this name is gone or is another pod now (its uid differs).
    async fn replaced(&self, api: &Api<Pod>) -> bool {
        match api.get_opt(&self.pod.name_any()).await {
            Ok(Some(now)) => now.uid() != self.pod.uid(),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Patches the pod's status when it changed.
    async fn report(&mut self) {
        if !self.dirty {
            return;
        }
        let host_ip = self.node.net.ip.to_string();
        let view = PodView {
            phase: self.phase(),
            host_ip: &host_ip,
            pod_ip: self
                .net
                .as_ref()
                .map(|n| n.ip.to_string())
                .or_else(|| self.last_status.as_ref().and_then(|s| s.pod_ip.clone())),
            start_time: self.start_time,
            network_ready: self.net.is_some(),
            containers: &self.containers,
        };
        let status = status::pod_status(&view, self.last_status.as_ref(), Timestamp::now());
        if self.last_status.as_ref() == Some(&status) {
            self.dirty = false;
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.shared.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        );
        // The uid makes the patch fail on a pod of the same name created since (a replacement
        // of a force-deleted pod), as the kubelet's does: the apiserver refuses to change it.
        let patch = serde_json::json!({
            "metadata": { "uid": self.pod.uid() },
            "status": status,
        });
        match api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => {
                self.last_status = Some(status);
                self.dirty = false;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => self.dirty = false,
            Err(source) => {
                // Refused: this pod may have been replaced by one of the same name.
                if matches!(source, kube::Error::Api(_)) && self.replaced(&api).await {
                    info!(pod = %self.key(), error = %source, "replaced by a pod of the same name; no more status");
                    self.dirty = false;
                    return;
                }
                let e = Error::PodStatus {
                    pod: self.key(),
                    source: Box::new(source),
                };
                warn!(error = %e, "status patch failed; will retry");
            }
        }
    }
}
