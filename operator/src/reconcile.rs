//! The reconcile loop's I/O edges: read the job, its pods and nodes; ask the driver for its
//! progress; let [`Planner`] decide; apply, delete and tell the driver; write the status;
//! record events and metrics.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kiln_api::ComputeJob;
use kiln_api::crd::{LABEL_JOB, ROLE_DRIVER};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::children::{FIELD_MANAGER, JobSecret, token_secret_name};
use crate::config::OperatorConfig;
use crate::driver::DriverApi;
use crate::metrics::Metrics;
use crate::podstate;
use crate::state::{Action, Child, NodeCapacity, Observed, Plan, Planner};
use crate::{Error, Result};

/// The field manager of the annotations that mark executors holding data nobody else has
/// (apart from the pods' own, so that dropping one removes it).
const HOLDING_FIELD_MANAGER: &str = "kiln-operator-holding";

/// Everything a reconcile needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's configuration.
    pub config: OperatorConfig,
    /// Image for jobs that name none.
    pub default_image: String,
    /// How the operator reaches drivers.
    pub driver: Arc<dyn DriverApi>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Records events on ComputeJobs.
    pub recorder: Recorder,
    /// The current time (a parameter so tests control it).
    pub clock: fn() -> Timestamp,
    /// The cluster's nodes as a watch keeps them (None in tests without one): their
    /// disruption taints and allocatable resources.
    pub nodes: Option<Store<Node>>,
    secrets: Mutex<HashMap<String, JobSecret>>,
    failures: Mutex<HashMap<String, u32>>,
}

/// Now, in whole seconds (as the API server keeps times).
pub fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

impl Context {
    /// A context with the real clock.
    pub fn new(
        client: Client,
        config: OperatorConfig,
        default_image: String,
        driver: Arc<dyn DriverApi>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER));
        Context {
            client,
            config,
            default_image,
            driver,
            metrics,
            recorder,
            clock: now_seconds,
            nodes: None,
            secrets: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The job's token and TLS credentials: cached, else from its Secret, else new ones
    /// (the plan applies the Secret before any pod uses it).
    async fn secret(&self, job: &ComputeJob, ns: &str) -> Result<JobSecret> {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        if let Some(s) = self
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(s.clone());
        }
        let name = token_secret_name(&job.name_any());
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let existing = secrets
            .get_opt(&name)
            .await
            .map_err(|source| Error::GetSecret {
                namespace: ns.into(),
                name: name.clone(),
                source,
            })?
            .and_then(|s| JobSecret::from_data(&s.data?));
        let secret = match existing {
            Some(s) => s,
            None => JobSecret::new(&key).map_err(|source| Error::Credentials {
                namespace: ns.into(),
                name: job.name_any(),
                source,
            })?,
        };
        let mut cache = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, secret.clone());
        Ok(secret)
    }

    /// The retry delay after a failed reconcile of `key`: doubling from 1 s to 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_default();
        *n = (*n + 1).min(16);
        Duration::from_secs((1u64 << (*n - 1)).min(300))
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// `namespace/name` of a job, for metrics and logs.
pub fn job_key(job: &ComputeJob) -> String {
    format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: <K as k8s_openapi::Resource>::KIND,
        namespace: ns.into(),
        name,
        source,
    })?;
    Ok(())
}

async fn lost_nodes(client: &Client, pods: &[Pod]) -> Result<BTreeSet<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut lost = BTreeSet::new();
    for name in podstate::nodes_to_check(pods) {
        let node = nodes
            .get_opt(&name)
            .await
            .map_err(|source| Error::GetNode {
                node: name.clone(),
                source,
            })?;
        let ready = node
            .and_then(|n| n.status?.conditions)
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if !ready {
            lost.insert(name);
        }
    }
    Ok(lost)
}

/// Nodes of the job's live executor pods that carry one of the configured disruption
/// taints, with the taint's key.
fn noticed_nodes(ctx: &Context, pods: &[Pod]) -> BTreeMap<String, String> {
    let Some(store) = &ctx.nodes else {
        return BTreeMap::new();
    };
    pods.iter()
        .filter(|p| !podstate::is_terminal(p))
        .filter_map(podstate::node)
        .filter_map(|name| {
            let node = store.get(&ObjectRef::new(name))?;
            let taint = node
                .spec
                .as_ref()?
                .taints
                .as_ref()?
                .iter()
                .find(|t| ctx.config.disruption_taints.contains(&t.key))?
                .key
                .clone();
            Some((name.to_string(), taint))
        })
        .collect()
}

/// Every node's allocatable resources, when a pod of the job is unschedulable and the nodes
/// are known.
fn node_capacity(ctx: &Context, pods: &[Pod]) -> Option<Vec<NodeCapacity>> {
    let store = ctx.nodes.as_ref()?;
    if !pods.iter().any(|p| podstate::unschedulable(p).is_some()) {
        return None;
    }
    let nodes: Vec<NodeCapacity> = store
        .state()
        .iter()
        .filter_map(|n| {
            let allocatable = n.status.as_ref()?.allocatable.as_ref()?;
            let read = |key: &str, parse: fn(&str) -> kiln_api::Result<u64>| {
                allocatable.get(key).and_then(|q| parse(&q.0).ok())
            };
            Some(NodeCapacity {
                name: n.name_any(),
                cpu_millis: read("cpu", kiln_api::parse_cpu)?,
                memory_bytes: read("memory", kiln_api::parse_memory)?,
            })
        })
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Reconciles one ComputeJob.
pub async fn reconcile(job: Arc<ComputeJob>, ctx: Arc<Context>) -> Result<Requeue> {
    let started = Instant::now();
    let key = job_key(&job);
    let result = reconcile_inner(&job, &ctx, started).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

async fn reconcile_inner(job: &ComputeJob, ctx: &Context, started: Instant) -> Result<Requeue> {
    let ns = job.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = job.name_any();
    let key = job_key(job);
    let client = &ctx.client;
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let Some(job) = jobs.get_opt(&name).await.map_err(|source| Error::GetJob {
        namespace: ns.clone(),
        name: name.clone(),
        source,
    })?
    else {
        ctx.metrics.set_phase(&key, None);
        return Ok(Requeue::await_change());
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let listed = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
        .await
        .map_err(|source| Error::ListPods {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?
        .items;
    let finished = job.status.as_ref().is_some_and(|s| s.phase.is_finished());
    let lost_nodes = if finished {
        BTreeSet::new()
    } else {
        lost_nodes(client, &listed).await?
    };
    // The token and credentials are needed to start a driver or talk to one: not for a
    // finished, suspended or invalid job.
    let active = !finished && !job.spec.suspend && kiln_api::validate(&job.spec).is_empty();
    let secret = if active {
        ctx.secret(&job, &ns).await?
    } else {
        JobSecret {
            token: String::new(),
            credentials: None,
        }
    };
    let driver_ip = listed
        .iter()
        .find(|p| {
            p.labels()
                .get(kiln_api::crd::LABEL_ROLE)
                .map(String::as_str)
                == Some(ROLE_DRIVER)
        })
        .filter(|p| podstate::phase(p) == "Running" && !podstate::is_deleting(p))
        .and_then(podstate::ip)
        .map(str::to_string);
    let progress = match (&driver_ip, active) {
        (Some(ip), true) => match ctx.driver.job_status(ip, &secret).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!(job = %key, error = %e, "driver progress unavailable");
                None
            }
        },
        _ => None,
    };
    let noticed = noticed_nodes(ctx, &listed);
    let capacity = if finished {
        None
    } else {
        node_capacity(ctx, &listed)
    };
    let planner = Planner {
        config: &ctx.config,
        default_image: &ctx.default_image,
    };
    let observed = Observed {
        job: &job,
        pods: &listed,
        lost_nodes: &lost_nodes,
        noticed_nodes: &noticed,
        node_capacity: capacity.as_deref(),
        progress: progress.as_ref(),
        secret: &secret,
        now: (ctx.clock)(),
        refused: None,
    };
    let mut plan = planner.plan(&observed);
    for (executor, reason) in &plan.losses {
        tracing::warn!(job = %key, executor, reason = reason.as_str(), "executor lost");
        ctx.metrics.executor_lost(reason.as_str());
    }
    for _ in 0..plan.departures {
        ctx.metrics.departed(&key, started);
    }
    if let Err(e) = carry_out(&job, &ns, ctx, &plan, &secret).await {
        // An object the API server refuses as invalid is refused again on every retry: the
        // job fails, naming it, instead of retrying forever.
        let Some(why) = invalid_object(&e) else {
            return Err(e);
        };
        tracing::warn!(job = %key, error = %e, "the API server refuses the job's objects; failing it");
        plan = planner.plan(&Observed {
            refused: Some(&why),
            ..observed
        });
        carry_out(&job, &ns, ctx, &plan, &secret).await?;
    }

    if job.status.as_ref() != Some(&plan.status) {
        let patch = serde_json::json!({
            "apiVersion": format!("{}/{}", kiln_api::GROUP, kiln_api::VERSION),
            "kind": kiln_api::KIND,
            "status": plan.status,
        });
        jobs.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::PatchStatus {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?;
    }
    // Counted once the Failed status is written: a retried reconcile fails the job again,
    // a finished one never does.
    if let Some(reason) = plan.failure {
        ctx.metrics.job_failed(reason);
    }
    let reference = job.object_ref(&());
    for e in &plan.events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(e.note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            ctx.metrics.error("Event");
            tracing::warn!(job = %key, error = %err, reason = %e.reason, "cannot record event");
        }
    }
    let old_phase = job.status.as_ref().map(|s| s.phase);
    if old_phase != Some(plan.status.phase) {
        tracing::info!(job = %key, phase = plan.status.phase.as_str(), "phase");
    }
    ctx.metrics.set_phase(
        &key,
        Some(plan.status.phase).filter(|_| !plan.actions.contains(&Action::DeleteJob)),
    );
    Ok(plan
        .requeue
        .map(Requeue::requeue)
        .unwrap_or_else(Requeue::await_change))
}

/// What the API server said, when `e` is its refusal of an object as invalid (400, 422):
/// the same object is refused again however often it is applied.
fn invalid_object(e: &Error) -> Option<String> {
    match e {
        Error::Apply {
            kind,
            name,
            source: kube::Error::Api(status),
            ..
        } if matches!(status.code, 400 | 422) => Some(format!("{kind} {name}: {}", status.message)),
        _ => None,
    }
}

async fn carry_out(
    job: &ComputeJob,
    ns: &str,
    ctx: &Context,
    plan: &Plan,
    secret: &JobSecret,
) -> Result<()> {
    let client = &ctx.client;
    let key = job_key(job);
    for action in &plan.actions {
        match action {
            Action::Apply(Child::ConfigMap(cm)) => apply(client, ns, cm.as_ref()).await?,
            Action::Apply(Child::Secret(s)) => apply(client, ns, s.as_ref()).await?,
            Action::Apply(Child::Service(s)) => apply(client, ns, s.as_ref()).await?,
            Action::Apply(Child::NetworkPolicy(p)) => apply(client, ns, p.as_ref()).await?,
            Action::Apply(Child::Pod(p)) => {
                apply(client, ns, p.as_ref()).await?;
                let executor = p
                    .labels()
                    .get(kiln_api::crd::LABEL_ROLE)
                    .map(String::as_str)
                    == Some(kiln_api::crd::ROLE_EXECUTOR);
                if executor && plan.replacements > 0 {
                    ctx.metrics.replaced(&key);
                }
            }
            Action::DeletePod { name, force } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
                let params = if *force {
                    DeleteParams::default().grace_period(0)
                } else {
                    DeleteParams::default()
                };
                match pods.delete(name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        return Err(Error::DeletePod {
                            namespace: ns.into(),
                            name: name.clone(),
                            source,
                        });
                    }
                }
            }
            Action::ExecutorLost {
                executor,
                reason,
                driver_ip,
                occurred_unix_ms,
            } => {
                // The driver's heartbeat timeout is the fallback if it cannot be told.
                if let Err(e) = ctx
                    .driver
                    .executor_lost(driver_ip, executor, *reason, *occurred_unix_ms, secret)
                    .await
                {
                    ctx.metrics.error("DriverRpc");
                    tracing::warn!(job = %key, executor, error = %e, "cannot tell the driver");
                }
            }
            Action::Decommission {
                executor,
                cause,
                driver_ip,
                occurred_unix_ms,
            } => {
                // The executor's own SIGTERM, or the loss once it goes, covers a failed call.
                if let Err(e) = ctx
                    .driver
                    .decommission(driver_ip, executor, cause, *occurred_unix_ms, secret)
                    .await
                {
                    ctx.metrics.error("DriverRpc");
                    tracing::warn!(job = %key, executor, error = %e, "cannot give the driver notice");
                }
            }
            Action::Annotate { pod, annotations } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
                let patch = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": pod, "annotations": annotations},
                });
                match pods
                    .patch(
                        pod,
                        &PatchParams::apply(HOLDING_FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        return Err(Error::Apply {
                            kind: "Pod",
                            namespace: ns.into(),
                            name: pod.clone(),
                            source,
                        });
                    }
                }
            }
            Action::DeleteJob => {
                let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), ns);
                let name = job.name_any();
                match jobs.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => tracing::info!(job = %key, "deleted after ttlSecondsAfterFinished"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        return Err(Error::DeleteJob {
                            namespace: ns.into(),
                            name,
                            source,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// What to do after a failed reconcile: count it, and retry with a growing delay so a
/// persistent error never turns into a tight loop.
pub fn error_policy(job: Arc<ComputeJob>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let key = job_key(&job);
    ctx.metrics.error(error.category());
    let delay = ctx.backoff(&key);
    tracing::warn!(job = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}
