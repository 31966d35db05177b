//! Support for the operator's end-to-end tests: the CRD, the operator as a local process
//! (with the test cluster's kubeconfig), ComputeJobs, their events, their outputs and the
//! driver's progress.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kiln_api::launch::{DRIVER_PORT, EXECUTOR_PORT};
use kiln_api::tls::{self, JobCredentials, KeyedCert, Role, TlsIdentity};
use kiln_api::{ComputeJob, JobPhase};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::{http, kubectl, repo, wait_for};

/// Installs the CRD the way a user would (`kubectl apply -f crds/`) and waits until the API
/// server serves it.
pub async fn apply_crds() -> Result<()> {
    let crds = repo().join("crds");
    kubectl(&["apply", "-f", &crds.to_string_lossy()]).await?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/computejobs.kiln.dev",
        "--timeout=30s",
    ])
    .await?;
    Ok(())
}

/// Scratch space of the end-to-end tests, on the host filesystem the node agent's pods see
/// (not under /tmp: job pods mount their own scratch volume there). It is one of the node
/// agent's shared paths, writable under a read-only root, and open to every user: job pods
/// run as a user of their own, as on a real node.
pub fn scratch(name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = repo().join(".cache/e2e").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("opening {} to job pods", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// The workspace's `kiln` binary (the cluster's `kiln:*` images run it too).
pub fn kiln_bin() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    target.join("release/kiln")
}

/// Runs `kiln ARGS` on this machine and returns its stdout.
pub async fn kiln(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(kiln_bin())
        .args(args)
        .current_dir(repo())
        .output()
        .await
        .context("running kiln")?;
    if !out.status.success() {
        bail!(
            "kiln {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// TPC-H tables at scale `scale`, generated once per checkout.
pub async fn tpch(scale: &str) -> Result<PathBuf> {
    let dir = scratch(&format!("tpch-{scale}"))?;
    if !dir.join("lineitem.parquet").exists() {
        kiln(&["tpch", "--scale", scale, "--out", &dir.to_string_lossy()]).await?;
    }
    Ok(dir)
}

/// The rows of a CSV output directory (every `part-*.csv`, headers dropped), sorted.
pub fn csv_rows(dir: &Path) -> Result<Vec<String>> {
    ensure!(
        dir.join("_SUCCESS").exists(),
        "{} has no _SUCCESS marker",
        dir.display()
    );
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".csv") {
            let text = std::fs::read_to_string(&path)?;
            rows.extend(text.lines().skip(1).map(str::to_string));
        }
    }
    rows.sort();
    Ok(rows)
}

/// What a committed output's `_SUCCESS` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The job that committed it (a ComputeJob's uid).
    pub job_uid: String,
    /// Rows written.
    pub rows: u64,
    /// The part files, by name.
    pub files: BTreeSet<String>,
}

/// Checks that `dir` holds one committed output and nothing else: a JSON `_SUCCESS`
/// (`{"jobUid", "rows", "files"}`) and exactly the part files it lists; no `_temporary`
/// staging left, no stray file or directory.
pub fn committed_once(dir: &Path) -> Result<Committed> {
    let marker = std::fs::read_to_string(dir.join("_SUCCESS"))
        .with_context(|| format!("{} has no _SUCCESS marker", dir.display()))?;
    let marker: serde_json::Value = serde_json::from_str(&marker)
        .with_context(|| format!("_SUCCESS of {} is not JSON: {marker}", dir.display()))?;
    let files = marker["files"]
        .as_array()
        .with_context(|| format!("_SUCCESS lists no files: {marker}"))?
        .iter()
        .map(|f| f.as_str().map(str::to_string))
        .collect::<Option<BTreeSet<String>>>()
        .with_context(|| format!("_SUCCESS files are not names: {marker}"))?;
    let committed = Committed {
        job_uid: marker["jobUid"].as_str().unwrap_or_default().to_string(),
        rows: marker["rows"]
            .as_u64()
            .with_context(|| format!("_SUCCESS has no row count: {marker}"))?,
        files,
    };
    ensure!(
        committed
            .files
            .iter()
            .all(|f| f.starts_with("part-") && !f.contains('/')),
        "_SUCCESS lists other than part files: {marker}"
    );
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        present.insert(entry?.file_name().to_string_lossy().into_owned());
    }
    let mut expected = committed.files.clone();
    expected.insert("_SUCCESS".into());
    ensure!(
        present == expected,
        "{} holds {:?} beyond what _SUCCESS lists, and lacks {:?}",
        dir.display(),
        present.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&present).collect::<Vec<_>>()
    );
    Ok(committed)
}

/// Runs job spec `spec` locally (`kiln run`) with its output in `out`; returns the rows.
pub async fn run_locally(spec: &str, out: &Path) -> Result<Vec<String>> {
    let file = out.with_extension("yaml");
    std::fs::write(&file, spec)?;
    kiln(&["run", &file.to_string_lossy()]).await?;
    csv_rows(out)
}

/// A ComputeJob manifest with spec `spec` (YAML).
pub fn job(name: &str, spec: &str) -> Result<ComputeJob> {
    let spec: kiln_api::JobSpec =
        serde_yaml::from_str(spec).with_context(|| format!("spec of {name}"))?;
    Ok(ComputeJob::new(name, spec))
}

/// Creates `job` in `ns`.
pub async fn create_job(client: &Client, ns: &str, job: &ComputeJob) -> Result<()> {
    Api::<ComputeJob>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), job)
        .await
        .with_context(|| {
            format!(
                "creating ComputeJob {ns}/{}",
                job.metadata.name.as_deref().unwrap_or("?")
            )
        })?;
    Ok(())
}

/// Waits until job `name` finishes; fails if it ends in another phase than `want`.
pub async fn wait_finished(
    client: &Client,
    ns: &str,
    name: &str,
    want: JobPhase,
    timeout: Duration,
) -> Result<ComputeJob> {
    let api = Api::<ComputeJob>::namespaced(client.clone(), ns);
    let job = wait_for(&format!("ComputeJob {name} to finish"), timeout, || async {
        let j = api.get(name).await?;
        let done = j.status.as_ref().is_some_and(|s| s.phase.is_finished());
        Ok(done.then_some(j))
    })
    .await?;
    let status = job.status.clone().unwrap_or_default();
    ensure!(
        status.phase == want,
        "ComputeJob {name} ended {:?}, expected {want:?}: {}",
        status.phase,
        serde_json::to_string_pretty(&status)?
    );
    Ok(job)
}

/// The events recorded on ComputeJob `name`: (reason, note), oldest first.
pub async fn job_events(client: &Client, ns: &str, name: &str) -> Result<Vec<(String, String)>> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut ours: Vec<Event> = events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("ComputeJob") && r.name.as_deref() == Some(name)
            })
        })
        .collect();
    ours.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(ours
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// A job's driver pod as it runs.
#[derive(Clone, Debug)]
pub struct RunningDriver {
    /// The pod's uid: each driver attempt has its own.
    pub uid: String,
    /// The pod's IP.
    pub ip: String,
    /// The node it runs on.
    pub node: String,
}

/// Waits until job `name`'s driver pod runs with an address, and is not the pod `not`
/// (a replacement's uid differs from the pod it replaces); fails early if the job finishes.
pub async fn running_driver(
    client: &Client,
    ns: &str,
    name: &str,
    not: Option<&str>,
    timeout: Duration,
) -> Result<RunningDriver> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), ns);
    let what = match not {
        None => format!("{name}'s driver to run"),
        Some(_) => format!("{name}'s replacement driver to run"),
    };
    wait_for(&what, timeout, || async {
        if let Some(s) = jobs.get(name).await?.status
            && s.phase.is_finished()
        {
            return Ok(Some(Err(anyhow::anyhow!(
                "{name} finished ({:?}) while waiting for {what}",
                s.phase
            ))));
        }
        let Some(pod) = pods.get_opt(&format!("{name}-driver")).await? else {
            return Ok(None);
        };
        let uid = pod.uid().unwrap_or_default();
        if Some(uid.as_str()) == not || pod.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let status = pod.status.unwrap_or_default();
        let ip = status.pod_ip.filter(|ip| !ip.is_empty());
        Ok(match (status.phase.as_deref(), ip, node) {
            (Some("Running"), Some(ip), Some(node)) => Some(Ok(RunningDriver { uid, ip, node })),
            _ => None,
        })
    })
    .await?
}

/// Deletes pod `name` at once (grace period 0), as a node that vanishes would leave it.
pub async fn force_delete_pod(client: &Client, ns: &str, name: &str) -> Result<()> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
        .with_context(|| format!("force-deleting pod {ns}/{name}"))?;
    Ok(())
}

/// What talking to a job's driver as the operator does takes: the job's token and its
/// operator certificate, from the job's Secret.
#[derive(Clone, Debug)]
pub struct DriverAccess {
    /// The job's token.
    pub token: String,
    /// The operator's identity in the job (None: a job without TLS).
    pub tls: Option<TlsIdentity>,
}

/// How to reach job `job`'s driver as the operator does.
pub async fn access(client: &Client, ns: &str, job: &str) -> Result<DriverAccess> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{job}-token"))
        .await?;
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .map(|b| String::from_utf8(b.0.clone()))
            .transpose()
    };
    let token = text("token")?.context("the token Secret has no token")?;
    let tls = match (
        text("ca.crt")?,
        text("operator.crt")?,
        text("operator.key")?,
    ) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsIdentity {
            role: Role::Operator,
            ca,
            own: KeyedCert { cert, key },
        }),
        _ => None,
    };
    Ok(DriverAccess { token, tls })
}

/// The driver's own progress report (its JobStatus RPC), by pod IP.
pub async fn driver_progress(
    ip: &str,
    access: &DriverAccess,
) -> Result<kiln_api::rpc::JobStatusResponse> {
    let endpoint = tls::endpoint(
        &format!("http://{ip}:{DRIVER_PORT}"),
        access.tls.as_ref(),
        Role::Driver,
    )?
    .connect_timeout(Duration::from_secs(2))
    .timeout(Duration::from_secs(5));
    let mut client = kiln_api::rpc::driver_client::DriverClient::new(endpoint.connect().await?);
    Ok(client
        .job_status(kiln_api::rpc::JobStatusRequest {
            token: access.token.clone(),
        })
        .await?
        .into_inner())
}

/// A block fetch (Flight `DoGet`) from the executor at `ip`, presenting `tls`: its error, or
/// what the executor answered.
async fn fetch_block(ip: &str, tls: Option<&TlsIdentity>) -> Result<tonic::Code> {
    let endpoint = tls::endpoint(&format!("http://{ip}:{EXECUTOR_PORT}"), tls, Role::Executor)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(_) => return Ok(tonic::Code::Unavailable),
    };
    let answer = FlightServiceClient::new(channel)
        .do_get(Ticket::new("no such block"))
        .await;
    Ok(match answer {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    })
}

/// A running job's driver (at `driver_ip`) and executor (at `executor_ip`) refuse whoever
/// lacks the job's credentials: a plain client, and one with another job's certificates;
/// and the executor refuses a certificate of its own job whose role may not fetch blocks
/// (the operator's). `access` is the job's own: with it, the driver answers.
pub async fn refuses_strangers(
    driver_ip: &str,
    executor_ip: &str,
    access: &DriverAccess,
) -> Result<()> {
    let own = access
        .tls
        .as_ref()
        .context("the job has no TLS credentials")?;
    // Both services are up: the driver answers the job's operator, the executor refuses it
    // (an operator may not fetch blocks) once the certificate got it that far.
    driver_progress(driver_ip, access)
        .await
        .context("the driver refused the job's own operator certificate")?;
    wait_for(
        "the executor to refuse the job's operator certificate",
        Duration::from_secs(30),
        || async {
            let code = fetch_block(executor_ip, Some(own)).await?;
            Ok((code == tonic::Code::PermissionDenied).then_some(()))
        },
    )
    .await?;
    let stranger = JobCredentials::issue("stranger")?;
    let strangers = [
        ("a plain client", None),
        ("another job's operator", stranger.identity(Role::Operator)),
    ];
    for (who, tls) in &strangers {
        let attempt = DriverAccess {
            token: access.token.clone(),
            tls: tls.clone(),
        };
        ensure!(
            driver_progress(driver_ip, &attempt).await.is_err(),
            "the driver answered {who}"
        );
    }
    for (who, tls) in [
        ("a plain client", None),
        ("another job's executor", stranger.identity(Role::Executor)),
    ] {
        let code = fetch_block(executor_ip, tls.as_ref()).await?;
        ensure!(
            matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            ),
            "the executor's block service answered {who} ({code:?})"
        );
    }
    Ok(())
}

/// The operator, run from this checkout's binary with the test cluster's kubeconfig.
pub struct Operator {
    child: tokio::process::Child,
    /// Where its /healthz, /readyz and /metrics are.
    pub address: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts an operator competing for Lease `lease`; waits until it is ready (not
    /// necessarily leading).
    pub async fn start(id: &str, lease: &str, port: u16, config: &str) -> Result<Operator> {
        let dir = scratch("operator")?;
        let config_file = dir.join(format!("{id}.yaml"));
        std::fs::write(&config_file, config)?;
        let log = dir.join(format!("{id}.log"));
        let address = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(kiln_bin())
            .args([
                "operator",
                "--metrics-bind",
                &address,
                "--lease-namespace",
                "default",
                "--lease-name",
                lease,
                "--identity",
                id,
                "--default-image",
                "kiln:e2e",
                "--config",
                &config_file.to_string_lossy(),
            ])
            .env("RUST_LOG", "info,kiln_operator=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting kiln operator")?;
        let op = Operator {
            child,
            address,
            log,
        };
        wait_for(
            "the operator to be ready",
            Duration::from_secs(30),
            || async {
                Ok(http(&op.address, "GET", "/readyz")
                    .await
                    .ok()
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ()))
            },
        )
        .await
        .with_context(|| op.logs())?;
        Ok(op)
    }

    /// The last lines of its log.
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Its metrics, as Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http(&self.address, "GET", "/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    /// The sum of every sample of metric `name` (any labels).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(self
            .metrics()
            .await?
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Stops it gracefully (SIGTERM: it releases its Lease) and waits for it to exit.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .context("the operator did not stop within 20 s of SIGTERM")??;
        Ok(())
    }
}
