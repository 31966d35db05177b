//! The operator process: checks the CRD, serves health and metrics, elects a leader, runs one
//! Controller per watched namespace (or one for all), and shuts down gracefully.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kiln_api::ComputeJob;
use kiln_api::crd::LABEL_JOB;
use kube::api::ListParams;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};

use crate::config::OperatorConfig;
use crate::driver::GrpcDriver;
use crate::leader::LeaseLock;
use crate::metrics::Metrics;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::server::{Health, serve};
use crate::{Error, Result};

/// How the operator runs (the `kiln operator` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub metrics_bind: SocketAddr,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Image for jobs that name none.
    pub default_image: String,
    /// Node labels, tolerations and recovery limits.
    pub config: OperatorConfig,
    /// Whether to elect a leader (on by default; off for a single replica in development).
    pub leader_elect: bool,
    /// Namespace of the leadership Lease.
    pub lease_namespace: String,
    /// Name of the leadership Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
}

/// How long a leader's lease lasts without renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// How long the operator waits at start for the ComputeJob CRD to be served.
const CRD_PATIENCE: Duration = Duration::from_secs(120);

/// How often it looks meanwhile.
const CRD_POLL: Duration = Duration::from_secs(2);

/// A future that completes on SIGTERM or Ctrl-C, shareable between the parts that stop.
pub fn shutdown_signal() -> Shared<BoxFuture<'static, ()>> {
    async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    match term.as_mut() {
                        Some(t) => { t.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    }
    .boxed()
    .shared()
}

/// Fails with a clear message when the ComputeJob CRD is not installed.
pub async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<()> {
    let api: Api<ComputeJob> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(Error::CrdNotInstalled),
        Err(e) => Err(Error::CheckCrd(e)),
    }
}

/// Waits for `probe` (a [`check_crd`]) to find the CRD served: a Helm install or a GitOps
/// sync applies it moments before the operator starts, and the API server serves the
/// resource only once it is Established. Polls every `poll`; after `patience` without it,
/// fails as the probe does. Any other error ends the wait at once.
async fn wait_for_crd<F, Fut>(mut probe: F, patience: Duration, poll: Duration) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut waiting = false;
    loop {
        match probe().await {
            Err(Error::CrdNotInstalled) if tokio::time::Instant::now() < deadline => {
                if !waiting {
                    tracing::info!(
                        patience_seconds = patience.as_secs(),
                        "the ComputeJob CRD is not served yet; waiting for it to be established"
                    );
                    waiting = true;
                }
                tokio::time::sleep(poll).await;
            }
            Ok(()) if waiting => {
                tracing::info!("the ComputeJob CRD is established");
                return Ok(());
            }
            other => return other,
        }
    }
}

/// Runs the operator until `shutdown` completes (or leadership is lost, an error).
///
/// Boxed here, so callers in other crates do not compile the whole future again.
pub fn run(
    client: Client,
    settings: Settings,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> BoxFuture<'static, Result<()>> {
    Box::pin(run_inner(client, settings, shutdown))
}

async fn run_inner(
    client: Client,
    settings: Settings,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let server = serve(
        settings.metrics_bind,
        Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown.clone(),
    )
    .await?;
    let server = tokio::spawn(server);
    let namespace = settings.namespaces.first().map(String::as_str);
    let probe = || check_crd(&client, namespace);
    tokio::select! {
        installed = wait_for_crd(probe, CRD_PATIENCE, CRD_POLL) => installed?,
        _ = shutdown.clone() => {
            let _ = server.await;
            return Ok(());
        }
    }
    ready.store(true, Ordering::Relaxed);

    let lock = settings.leader_elect.then(|| {
        LeaseLock::new(
            client.clone(),
            &settings.lease_namespace,
            &settings.lease_name,
            &settings.identity,
            LEASE_DURATION,
        )
    });
    if let Some(lock) = &lock {
        tokio::select! {
            acquired = lock.acquire() => acquired?,
            _ = shutdown.clone() => {
                let _ = server.await;
                return Ok(());
            }
        }
    }

    let mut ctx = Context::new(
        client.clone(),
        settings.config.clone(),
        settings.default_image.clone(),
        Arc::new(GrpcDriver::default()),
        metrics,
    );
    // The nodes' taints (reclaim notices) and allocatable resources, kept by a watch: read
    // by every reconcile without a request.
    let (nodes, writer) = reflector::store::<Node>();
    ctx.nodes = Some(nodes);
    let ctx = Arc::new(ctx);
    let node_watch = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|node: &mut Node| {
            node.managed_fields_mut().clear();
            if let Some(status) = node.status.as_mut() {
                status.images = None;
            }
        })
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::debug!(error = %e, "node watch");
            }
        });
    let node_watch = tokio::spawn(node_watch);
    let namespaces: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let controllers = futures::future::join_all(
        namespaces
            .into_iter()
            .map(|ns| controller(client.clone(), ns, ctx.clone(), shutdown.clone())),
    );
    let outcome = match &lock {
        Some(lock) => tokio::select! {
            _ = controllers => Ok(()),
            lost = lock.hold() => Err(lost),
        },
        None => {
            controllers.await;
            Ok(())
        }
    };
    node_watch.abort();
    if let Some(lock) = &lock
        && outcome.is_ok()
    {
        lock.release().await;
    }
    let _ = server.await;
    outcome
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn controller(
    client: Client,
    ns: Option<String>,
    ctx: Arc<Context>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) {
    tracing::info!(
        namespace = ns.as_deref().unwrap_or("(all)"),
        "controller starting"
    );
    let children = watcher::Config::default().labels(LABEL_JOB);
    // Secrets are not watched: the operator reads only the token Secrets it made, by name,
    // and needs no right to list or watch any.
    Controller::new(api::<ComputeJob>(&client, &ns), watcher::Config::default())
        .owns(api::<Pod>(&client, &ns), children.clone())
        .owns(api::<ConfigMap>(&client, &ns), children.clone())
        .owns(api::<Service>(&client, &ns), children)
        .with_config(ControllerConfig::default().concurrency(8))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const PATIENCE: Duration = Duration::from_millis(200);
    const POLL: Duration = Duration::from_millis(5);

    /// A probe answering from `answers` in turn (the last one ever after), counting calls.
    fn probe<'a>(
        calls: &'a Cell<usize>,
        answers: &'a [fn() -> Result<()>],
    ) -> impl FnMut() -> std::future::Ready<Result<()>> + 'a {
        move || {
            let n = calls.get();
            calls.set(n + 1);
            std::future::ready(answers[n.min(answers.len() - 1)]())
        }
    }

    #[tokio::test]
    async fn a_crd_applied_moments_later_is_waited_for() {
        let calls = Cell::new(0);
        let answers: [fn() -> Result<()>; 3] = [
            || Err(Error::CrdNotInstalled),
            || Err(Error::CrdNotInstalled),
            || Ok(()),
        ];
        wait_for_crd(probe(&calls, &answers), PATIENCE, POLL)
            .await
            .expect("installed on the third look");
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn a_crd_never_applied_fails_after_the_patience_naming_it() {
        let calls = Cell::new(0);
        let answers: [fn() -> Result<()>; 1] = [|| Err(Error::CrdNotInstalled)];
        let started = tokio::time::Instant::now();
        let e = wait_for_crd(probe(&calls, &answers), PATIENCE, POLL)
            .await
            .expect_err("never installed");
        assert!(matches!(e, Error::CrdNotInstalled), "{e}");
        assert!(started.elapsed() >= PATIENCE);
        assert!(calls.get() > 1, "it looked more than once");
    }

    #[tokio::test]
    async fn other_errors_end_the_wait_at_once() {
        let calls = Cell::new(0);
        let answers: [fn() -> Result<()>; 1] = [|| Err(Error::MissingMetadata("name"))];
        let e = wait_for_crd(probe(&calls, &answers), PATIENCE, POLL)
            .await
            .expect_err("another error");
        assert!(matches!(e, Error::MissingMetadata(_)), "{e}");
        assert_eq!(calls.get(), 1);
    }
}
