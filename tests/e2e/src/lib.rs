//! End-to-end test support for the test cluster (tests/cluster): a client
//! from `KUBECONFIG`, namespaces, waiting helpers, the node agent's
//! fault-injection endpoint and the cluster's own kubectl.
//!
//! Run the tests through `tests/cluster/e2e`, which starts the cluster,
//! exports `KUBECONFIG` and `KILN_NODE_AGENT_CONTROL`, and tears it down.
#![forbid(unsafe_code)]

pub mod operator;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, MutexGuard};

/// Label on nodes: spot or on-demand.
pub const CAPACITY_TYPE: &str = "karpenter.sh/capacity-type";
/// Taint key on spot nodes (effect NoSchedule).
pub const SPOT_TAINT: &str = "kiln.dev/spot";

static SERIAL: Mutex<()> = Mutex::const_new(());

/// Tests share one cluster and some inject node faults: they run one at a time.
pub async fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A client for the test cluster, from `KUBECONFIG` only.
pub async fn client() -> Result<Client> {
    let Ok(path) = std::env::var("KUBECONFIG") else {
        bail!(
            "KUBECONFIG is not set: these tests need the test cluster. Run them with \
             tests/cluster/e2e, or export the KUBECONFIG=... line that tests/cluster/up prints"
        );
    };
    let kubeconfig =
        Kubeconfig::read_from(&path).with_context(|| format!("reading KUBECONFIG {path}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The repository root: from the package directory `cargo test` runs the tests in, so a test
/// binary built in a target directory that several checkouts share uses its own checkout.
pub fn repo() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    package.join("../..")
}

/// The last `lines` lines of a container's log (of every pod of that name, replacements
/// too), from the node agent's pod directories.
pub fn container_log_tail(namespace: &str, pod: &str, container: &str, lines: usize) -> String {
    let cluster_dir = std::env::var("KILN_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join(".cache/cluster"));
    let prefix = format!("{namespace}_{pod}_");
    let Ok(dirs) = std::fs::read_dir(cluster_dir.join("agent/pods")) else {
        return String::new();
    };
    let mut out = String::new();
    for dir in dirs.flatten() {
        if dir.file_name().to_string_lossy().starts_with(&prefix)
            && let Ok(text) = std::fs::read_to_string(dir.path().join(format!("{container}.log")))
        {
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", dir.file_name().to_string_lossy()));
            out.push_str(&all[all.len().saturating_sub(lines)..].join("\n"));
            out.push('\n');
        }
    }
    out
}

/// Runs the cluster's kubectl (tests/cluster/kubectl) and returns its stdout.
pub async fn kubectl(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(repo().join("tests/cluster/kubectl"))
        .args(args)
        .output()
        .await
        .context("running tests/cluster/kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 250 ms until it yields `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => {
                // Shown with the output of a failing test: where its time went.
                eprintln!("{what}: after {:.1?}", start.elapsed());
                return Ok(v);
            }
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every version of the pods that a label selector matches in a namespace, as the API
/// server's watch delivers them: a pod that lives only between two polls is still seen.
/// The watch ends when this is dropped.
pub struct PodWatch {
    seen: Arc<std::sync::Mutex<Vec<Pod>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    /// Starts the watch and returns once its initial list is in, so that every pod created
    /// afterwards is seen.
    pub async fn start(client: &Client, namespace: &str, selector: &str) -> Result<Self> {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let events = watcher(api, watcher::Config::default().labels(selector)).default_backoff();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready, started) = tokio::sync::oneshot::channel();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready);
            let mut events = std::pin::pin!(events);
            while let Some(event) = futures::StreamExt::next(&mut events).await {
                match event {
                    Ok(
                        watcher::Event::Apply(pod)
                        | watcher::Event::InitApply(pod)
                        | watcher::Event::Delete(pod),
                    ) => sink.lock().unwrap().push(pod),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(watcher::Event::Init) => {}
                    Err(e) => eprintln!("pod watch: {e} (retrying)"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), started)
            .await
            .with_context(|| format!("the watch of pods {selector} did not start in 30 s"))?
            .with_context(|| format!("the watch of pods {selector} ended"))?;
        Ok(Self { seen, task })
    }

    /// Every version seen so far, oldest first.
    pub fn seen(&self) -> Vec<Pod> {
        self.seen.lock().unwrap().clone()
    }

    /// Pod name → node, for every pod seen bound to a node.
    pub fn placements(&self) -> BTreeMap<String, String> {
        self.seen()
            .into_iter()
            .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name?)))
            .collect()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A namespace deleted when the guard is dropped (best effort).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!("{prefix}-{:x}", nanos & 0xfffff);
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        // Pods need the namespace's default ServiceAccount.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        wait_for(
            "default service account",
            Duration::from_secs(30),
            || async { Ok(sa.get_opt("default").await?) },
        )
        .await?;
        Ok(Self { name })
    }
}

impl Drop for TestNamespace {
    /// Deletes the namespace without waiting, also when the test failed. Runs
    /// kubectl synchronously: a task spawned here would die with the test's runtime.
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo().join("tests/cluster/kubectl"))
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Node name → labels, for the nodes the node agent plays.
pub async fn node_labels(client: &Client) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("kiln.dev/node-agent=true"))
        .await?;
    Ok(nodes
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.unwrap_or_default(),
                n.metadata.labels.unwrap_or_default(),
            )
        })
        .collect())
}

/// Node name → its capacity type (`spot` or `on-demand`), for the nodes the node agent
/// plays; nodes without the label map to an empty string.
pub async fn node_capacity_types(client: &Client) -> Result<BTreeMap<String, String>> {
    Ok(node_labels(client)
        .await?
        .into_iter()
        .map(|(node, labels)| {
            let capacity = labels.get(CAPACITY_TYPE).cloned().unwrap_or_default();
            (node, capacity)
        })
        .collect())
}

/// The status of a node's Ready condition ("True", "False", "Unknown").
pub fn node_ready(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// Whether a pod is Running with all containers ready.
pub fn pod_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && pod.metadata.deletion_timestamp.is_none()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Whether a pod has the condition `type_` with status True.
pub fn has_condition(pod: &Pod, type_: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Sends a request to the node agent's fault-injection endpoint
/// (`KILN_NODE_AGENT_CONTROL`, default http://127.0.0.1:10350); returns the body.
pub async fn agent_control(method: &str, path: &str) -> Result<String> {
    let base = std::env::var("KILN_NODE_AGENT_CONTROL")
        .unwrap_or_else(|_| "http://127.0.0.1:10350".into());
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (status, body) = http(&addr, method, path).await?;
    if status != 200 {
        bail!("{method} {path} on the node agent: {status} {body}");
    }
    Ok(body)
}

/// A minimal HTTP/1.1 request over TCP; returns (status, body).
pub async fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}"))??;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP response from {addr}: {text:.200}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
