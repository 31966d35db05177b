//! The agent: registers its nodes, keeps their Leases and status fresh,
//! watches pods bound to them and runs one worker per pod; fault injection.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use rustix::process::Signal;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{Config, NodeConfig};
use crate::error::{Error, Result};
use crate::limits::Cgroups;
use crate::net::{self, IpPool, Registry};
use crate::node::{self, NodeNet};
use crate::pod::{PodMsg, Worker};

/// What every pod worker shares.
pub struct Shared {
    pub client: Client,
    pub config: Arc<Config>,
    pub repo: PathBuf,
    pub state_dir: PathBuf,
    pub registry: Registry,
    pub gateway: Ipv4Addr,
    /// The port the API server listens on (its service IP is found at start).
    pub api_port: u16,
    /// Where pods reach the API server, once known.
    pub api: std::sync::OnceLock<SocketAddrV4>,
    /// Where containers' memory cgroups go; None when limits cannot be enforced here.
    pub cgroups: Option<Cgroups>,
}

impl Shared {
    /// Where pods reach the API server: the `kubernetes` Service's IP, at the port the
    /// API server listens on.
    pub fn api(&self) -> Option<SocketAddrV4> {
        self.api.get().copied()
    }
}

/// One node the agent plays.
pub struct NodeRuntime {
    pub cfg: NodeConfig,
    pub net: NodeNet,
    pub ips: Mutex<IpPool>,
    alive: AtomicBool,
    /// Set when the node comes back from a kill: re-register before the next heartbeat.
    reregister: AtomicBool,
}

struct PodEntry {
    node: String,
    key: String,
    tx: mpsc::UnboundedSender<PodMsg>,
}

/// A node's state, as the control endpoint reports it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub name: String,
    pub capacity_type: &'static str,
    pub alive: bool,
    pub pods: usize,
}

pub struct Agent {
    shared: Arc<Shared>,
    nodes: BTreeMap<String, Arc<NodeRuntime>>,
    /// Workers by pod UID.
    workers: Mutex<HashMap<String, PodEntry>>,
    /// Last seen version of every pod bound to one of our nodes, by UID.
    seen: Mutex<HashMap<String, Pod>>,
}

impl Agent {
    pub fn new(
        client: Client,
        config: Config,
        repo: PathBuf,
        state_dir: PathBuf,
        api_port: u16,
    ) -> Result<Arc<Self>> {
        let prefix = config.network_prefix()?;
        let gateway = config.gateway()?;
        let nodes = config
            .nodes
            .iter()
            .enumerate()
            .map(|(i, cfg)| {
                let rt = NodeRuntime {
                    cfg: cfg.clone(),
                    net: NodeNet::new(prefix, i),
                    ips: Mutex::new(IpPool::default()),
                    alive: AtomicBool::new(true),
                    reregister: AtomicBool::new(false),
                };
                (cfg.name.clone(), Arc::new(rt))
            })
            .collect();
        let registry = Registry::new(&state_dir)?;
        Ok(Arc::new(Self {
            shared: Arc::new(Shared {
                client,
                config: Arc::new(config),
                repo,
                state_dir,
                registry,
                gateway,
                api_port,
                api: std::sync::OnceLock::new(),
                cgroups: Cgroups::detect(Path::new("/sys/fs/cgroup")),
            }),
            nodes,
            workers: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        }))
    }

    /// Sets up the bridge and registers every node.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        let node_ips: Vec<Ipv4Addr> = self.nodes.values().map(|n| n.net.ip).collect();
        let cfg = &self.shared.config;
        net::ensure_bridge(
            &self.shared.registry,
            &cfg.bridge,
            self.shared.gateway,
            &node_ips,
        )
        .await?;
        // No kube-proxy here: the `kubernetes` Service's IP goes on the bridge, so pods reach
        // the API server (listening on every address) at that IP, and the variables a kubelet
        // sets point in-cluster clients there, with the API server's own port.
        let services: Api<Service> = Api::namespaced(self.shared.client.clone(), "default");
        let cluster_ip = services
            .get("kubernetes")
            .await
            .map_err(|source| Error::ApiService {
                source: Box::new(source),
            })?
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        if let Some(ip) = cluster_ip {
            net::add_address(&cfg.bridge, ip).await?;
            let _ = self
                .shared
                .api
                .set(SocketAddrV4::new(ip, self.shared.api_port));
            info!(address = %SocketAddrV4::new(ip, self.shared.api_port), "pods reach the API server");
        } else {
            warn!(
                "the `kubernetes` Service has no IPv4 cluster IP: pods get no API server address"
            );
        }
        for n in self.nodes.values() {
            let uid = node::register(&self.shared.client, &n.cfg, &n.net).await?;
            info!(node = %n.cfg.name, capacity_type = n.cfg.capacity_type.label_value(), "node registered");
            let (agent, n) = (self.clone(), n.clone());
            tokio::spawn(async move { agent.heartbeat(n, uid).await });
        }
        Ok(())
    }

    /// Renews the node's Lease and posts its status while the node is alive.
    async fn heartbeat(self: Arc<Self>, n: Arc<NodeRuntime>, mut uid: Option<String>) {
        let cfg = &self.shared.config;
        let client = &self.shared.client;
        let mut since = Timestamp::now();
        let status_every = Duration::from_secs(cfg.status_seconds.max(1));
        let mut last_status: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(cfg.lease_renew_seconds.max(1)));
        loop {
            tick.tick().await;
            if !n.alive.load(Ordering::SeqCst) {
                continue;
            }
            if n.reregister.swap(false, Ordering::SeqCst) {
                since = Timestamp::now();
                last_status = None;
                match node::register(client, &n.cfg, &n.net).await {
                    Ok(u) => uid = u,
                    Err(e) => {
                        warn!(error = %e, "re-registering node failed");
                        n.reregister.store(true, Ordering::SeqCst);
                    }
                }
            }
            if let Err(e) = node::renew_lease(client, &n.cfg.name, uid.as_deref()).await {
                warn!(error = %e, "lease renewal failed");
            }
            if last_status.is_none_or(|t| t.elapsed() >= status_every) {
                match node::post_status(client, &n.cfg, &n.net, since).await {
                    Ok(()) => last_status = Some(tokio::time::Instant::now()),
                    Err(e) => warn!(error = %e, "node status failed"),
                }
            }
        }
    }

    /// Watches all pods and dispatches those bound to our nodes. Runs forever.
    pub async fn watch_pods(self: &Arc<Self>) -> Result<(), watcher::Error> {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let stream = watcher(api, watcher::Config::default());
        futures::pin_mut!(stream);
        let mut init: Option<Vec<String>> = None;
        loop {
            let event = match stream.try_next().await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(()),
                Err(e) => {
                    warn!(error = %e, "pod watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match event {
                watcher::Event::Init => init = Some(Vec::new()),
                watcher::Event::InitApply(pod) => {
                    if let Some(seen) = init.as_mut() {
                        seen.push(pod.uid().unwrap_or_default());
                    }
                    self.on_pod(pod);
                }
                watcher::Event::InitDone => {
                    let present = init.take().unwrap_or_default();
                    let stale: Vec<String> = self
                        .lock_workers()
                        .keys()
                        .filter(|uid| !present.contains(uid))
                        .cloned()
                        .collect();
                    stale.iter().for_each(|uid| self.on_gone(uid));
                }
                watcher::Event::Apply(pod) => self.on_pod(pod),
                watcher::Event::Delete(pod) => self.on_gone(&pod.uid().unwrap_or_default()),
            }
        }
    }

    fn lock_workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodEntry>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_pod(&self, pod: Pod) {
        let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return;
        };
        let Some(n) = self.nodes.get(&node_name) else {
            return;
        };
        let uid = pod.uid().unwrap_or_default();
        self.lock_seen().insert(uid.clone(), pod.clone());
        if !n.alive.load(Ordering::SeqCst) {
            return;
        }
        let mut workers = self.lock_workers();
        // A worker that already finished is only replaced for a pod that is
        // not being deleted (a node that came back restarts its pods).
        if let Some(entry) = workers.get(&uid)
            && (entry.tx.send(PodMsg::Update(Box::new(pod.clone()))).is_ok()
                || pod.metadata.deletion_timestamp.is_some())
        {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        workers.insert(
            uid,
            PodEntry {
                node: node_name,
                key,
                tx,
            },
        );
        let worker = Worker::new(self.shared.clone(), n.clone(), pod, rx);
        tokio::spawn(worker.run());
    }

    fn on_gone(&self, uid: &str) {
        self.lock_seen().remove(uid);
        if let Some(entry) = self.lock_workers().remove(uid) {
            let _ = entry.tx.send(PodMsg::Gone);
        }
    }

    /// Fault injection: the node dies at once. Its heartbeats stop and every
    /// process of its pods gets SIGKILL; nothing more is reported for it.
    pub fn kill_node(&self, name: &str) -> bool {
        let Some(n) = self.nodes.get(name) else {
            return false;
        };
        n.alive.store(false, Ordering::SeqCst);
        self.lock_workers().retain(|_, e| {
            if e.node == name {
                let _ = e.tx.send(PodMsg::NodeKilled);
                false
            } else {
                true
            }
        });
        warn!(node = name, "node killed");
        true
    }

    /// Fault injection: a killed node comes back (re-registers, heartbeats,
    /// finalises or restarts the pods still bound to it).
    pub fn restore_node(&self, name: &str) -> bool {
        let Some(n) = self.nodes.get(name) else {
            return false;
        };
        if n.alive.swap(true, Ordering::SeqCst) {
            return true;
        }
        n.reregister.store(true, Ordering::SeqCst);
        let pods: Vec<Pod> = self
            .lock_seen()
            .values()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
            .cloned()
            .collect();
        pods.into_iter().for_each(|p| self.on_pod(p));
        info!(node = name, "node restored");
        true
    }

    /// Fault injection: signals a pod's container processes.
    pub fn signal_pod(&self, key: &str, container: Option<String>, signal: Signal) -> bool {
        self.lock_workers()
            .values()
            .find(|e| e.key == key)
            .map(|e| e.tx.send(PodMsg::Signal { container, signal }).is_ok())
            .unwrap_or(false)
    }

    /// The nodes and how many pods each runs.
    pub fn report(&self) -> Vec<NodeReport> {
        let workers = self.lock_workers();
        self.nodes
            .values()
            .map(|n| NodeReport {
                name: n.cfg.name.clone(),
                capacity_type: n.cfg.capacity_type.label_value(),
                alive: n.alive.load(Ordering::SeqCst),
                pods: workers.values().filter(|e| e.node == n.cfg.name).count(),
            })
            .collect()
    }

    /// Stops every pod's processes (on agent shutdown).
    pub fn kill_all(&self) {
        for name in self.nodes.keys() {
            self.kill_node(name);
        }
    }
}
