//! The reconciler's pure core: from a ComputeJob, its pods and what the driver reports, it
//! decides what to create, delete and tell the driver, and the job's next status. No I/O:
//! the reconciler gathers [`Observed`] and carries out the [`Plan`].
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kiln_api::crd::{LABEL_ATTEMPT, LABEL_ROLE, ROLE_DRIVER, ROLE_EXECUTOR};
use kiln_api::rpc::JobStatusResponse;
use kiln_api::{ComputeJob, ComputeJobStatus, DriverReport, FailureReason, JobPhase};
use kube::ResourceExt;

use crate::children::{JobSecret, driver_service, spec_config_map, token_secret};
use crate::config::OperatorConfig;
use crate::netpol::network_policy;
use crate::pods::{PodContext, Takeover, driver_pod};

mod capacity;
mod driver_loss;
mod endings;
mod executors;
use crate::podstate::{self, LossReason};

/// The most a job spec may take in its ConfigMap (1 MiB, the API server's object limit,
/// less room for the object's metadata).
const MAX_SPEC_BYTES: usize = 1_000_000;

/// A child object to create or update with server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub enum Child {
    /// The job spec.
    ConfigMap(Box<ConfigMap>),
    /// The job's token.
    Secret(Box<Secret>),
    /// The driver's headless Service.
    Service(Box<Service>),
    /// The NetworkPolicy around the job's pods.
    NetworkPolicy(Box<NetworkPolicy>),
    /// A driver or executor pod.
    Pod(Box<Pod>),
}

/// One step of a plan, carried out in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply of a child.
    Apply(Child),
    /// Delete a pod; `force` (grace period 0) when its node is lost and no kubelet will
    /// confirm the deletion.
    DeletePod { name: String, force: bool },
    /// Tell the driver an executor is gone.
    ExecutorLost {
        executor: String,
        reason: LossReason,
        driver_ip: String,
        /// When the executor went, as far as its pod tells (Unix milliseconds).
        occurred_unix_ms: u64,
    },
    /// Give the driver notice that an executor is going: it takes no more tasks and the
    /// blocks only it holds move to other executors.
    Decommission {
        executor: String,
        /// What gave notice (`DisruptionTarget`, `deleted`, a taint's key).
        cause: String,
        driver_ip: String,
        /// When the notice was given, if the pod says (Unix milliseconds, 0: unknown).
        occurred_unix_ms: u64,
    },
    /// Set the annotations that tell the cluster autoscaler and Karpenter what an executor
    /// pod holds (server-side apply under their own field manager: keys left out go).
    Annotate {
        pod: String,
        annotations: BTreeMap<String, String>,
    },
    /// Delete the ComputeJob itself (its `ttlSecondsAfterFinished` ran out).
    DeleteJob,
}

/// What a node can hold (its allocatable resources).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCapacity {
    /// The node's name.
    pub name: String,
    /// Allocatable CPU, millicores.
    pub cpu_millis: u64,
    /// Allocatable memory, bytes.
    pub memory_bytes: u64,
}

/// An Event to record on the ComputeJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// What happened, for people.
    pub note: String,
}

/// What one reconcile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Steps to carry out, in order.
    pub actions: Vec<Action>,
    /// The job's next status.
    pub status: ComputeJobStatus,
    /// Events on transitions.
    pub events: Vec<JobEvent>,
    /// When to look again even if nothing changes (None: only on a change).
    pub requeue: Option<Duration>,
    /// Executors found lost, with why.
    pub losses: Vec<(String, LossReason)>,
    /// Executor pods created to replace lost ones.
    pub replacements: usize,
    /// Executors that stopped counting towards the job's width in this pass (lost, given
    /// notice, gone silent), each to be replaced.
    pub departures: usize,
    /// Why the job failed, when this plan fails it.
    pub failure: Option<FailureReason>,
}

/// What the reconciler saw.
#[derive(Clone, Copy)]
pub struct Observed<'a> {
    /// The ComputeJob, freshly read.
    pub job: &'a ComputeJob,
    /// Its pods (label `kiln.dev/job=<name>`).
    pub pods: &'a [Pod],
    /// Nodes of its pods that are gone or not Ready.
    pub lost_nodes: &'a BTreeSet<String>,
    /// Nodes of its executors carrying a disruption taint (a reclaim or scale-down notice),
    /// with the taint's key.
    pub noticed_nodes: &'a BTreeMap<String, String>,
    /// Every node's allocatable resources, read only when a pod of the job is
    /// unschedulable (None otherwise).
    pub node_capacity: Option<&'a [NodeCapacity]>,
    /// The driver's progress, when it answered.
    pub progress: Option<&'a JobStatusResponse>,
    /// The job's token and credentials (from its Secret, or new ones).
    pub secret: &'a JobSecret,
    /// The time of this reconcile.
    pub now: Timestamp,
    /// What the API server said when it refused one of the job's objects as invalid (a
    /// refusal no retry can change): the job fails, naming it.
    pub refused: Option<&'a str>,
}

/// Makes plans: the operator's configuration and default image.
#[derive(Clone, Copy)]
pub struct Planner<'a> {
    /// The operator's configuration.
    pub config: &'a OperatorConfig,
    /// Image for jobs that name none.
    pub default_image: &'a str,
}

impl Planner<'_> {
    /// Decides the next step of a job.
    pub fn plan(&self, obs: &Observed<'_>) -> Plan {
        let old = obs.job.status.clone().unwrap_or_default();
        let mut run = Run {
            planner: *self,
            obs,
            old: old.clone(),
            status: old,
            plan: Plan {
                actions: Vec::new(),
                status: ComputeJobStatus::default(),
                events: Vec::new(),
                requeue: None,
                losses: Vec::new(),
                replacements: 0,
                departures: 0,
                failure: None,
            },
            state: None,
        };
        run.decide();
        run.finish()
    }
}

/// How the non-terminal conditions read after a reconcile.
pub(crate) enum Outlook {
    Pending {
        reason: &'static str,
        message: String,
    },
    Running,
    Suspended,
    Done,
}

pub(crate) struct Run<'a, 'o> {
    planner: Planner<'a>,
    obs: &'a Observed<'o>,
    old: ComputeJobStatus,
    status: ComputeJobStatus,
    plan: Plan,
    state: Option<Outlook>,
}

/// The driver pod's state.
enum DriverState {
    Succeeded(Option<DriverReport>),
    Failed {
        reason: FailureReason,
        message: String,
    },
    Lost {
        detail: String,
        node_lost: bool,
    },
    Stuck {
        reason: String,
        message: String,
    },
    Starting,
    Running(String),
}

fn report_of(pod: &Pod) -> Option<DriverReport> {
    let message = podstate::terminated(pod)?.message.as_deref()?;
    serde_json::from_str(message.trim()).ok()
}

pub(crate) fn elapsed(now: Timestamp, since: &Time) -> Duration {
    let d = now.duration_since(since.0);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

impl Run<'_, '_> {
    pub(crate) fn now(&self) -> Time {
        Time(self.obs.now)
    }

    pub(crate) fn name(&self) -> String {
        self.obs.job.name_any()
    }

    pub(crate) fn config(&self) -> &OperatorConfig {
        self.planner.config
    }

    pub(crate) fn pod_ctx(&self) -> PodContext<'_> {
        PodContext {
            job: self.obs.job,
            config: self.planner.config,
            image: self
                .obs
                .job
                .spec
                .image
                .as_deref()
                .unwrap_or(self.planner.default_image),
        }
    }

    pub(crate) fn pods_of(&self, role: &str) -> impl Iterator<Item = &Pod> {
        self.obs.pods.iter().filter(move |p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .map(String::as_str)
                == Some(role)
        })
    }

    pub(crate) fn requeue(&mut self, after: Duration) {
        let after = after.max(Duration::from_millis(200));
        self.plan.requeue = Some(self.plan.requeue.map_or(after, |r| r.min(after)));
    }

    pub(crate) fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.plan.events.push(JobEvent {
            warning,
            reason: reason.into(),
            note,
        });
    }

    /// Whether the driver lists the executor `name` as lost for `reason` (`HeartbeatTimeout`:
    /// it gave up on it; `Drained`: it left after its blocks moved).
    pub(crate) fn driver_lost_as(&self, name: &str, reason: LossReason) -> bool {
        self.obs.progress.is_some_and(|p| {
            p.lost_executors
                .iter()
                .any(|l| l.executor_id == name && LossReason::parse(&l.reason) == Some(reason))
        })
    }

    pub(crate) fn node_lost(&self, pod: &Pod) -> bool {
        podstate::node(pod).is_some_and(|n| self.obs.lost_nodes.contains(n))
    }

    pub(crate) fn delete(&mut self, pod: &Pod, force: bool) {
        if !podstate::is_deleting(pod) || force {
            self.plan.actions.push(Action::DeletePod {
                name: podstate::name(pod).to_string(),
                force,
            });
        }
    }

    /// Deletes every executor pod (of any attempt).
    pub(crate) fn delete_executors(&mut self) {
        let pods: Vec<Pod> = self.pods_of(ROLE_EXECUTOR).cloned().collect();
        for p in &pods {
            let force = self.node_lost(p) && podstate::is_deleting(p);
            self.delete(p, force);
        }
        self.status.executors.pods.clear();
        self.status.executors.running = 0;
    }

    fn decide(&mut self) {
        let job = self.obs.job;
        if job.metadata.deletion_timestamp.is_some() {
            self.state = Some(Outlook::Done);
            return;
        }
        if self.old.phase.is_finished() {
            self.finished();
            return;
        }
        if let Some(why) = self.obs.refused {
            self.fail(
                FailureReason::InvalidSpec,
                format!("the API server refuses the job's objects as invalid: {why}"),
            );
            return;
        }
        let mut problems: Vec<String> = kiln_api::validate(&job.spec)
            .into_iter()
            .map(|e| format!("spec.{e}"))
            .collect();
        if let Some(e) = kiln_api::validate_name(&self.name()) {
            problems.push(e.to_string());
        }
        problems.extend(
            self.config()
                .locations
                .validate(&job.spec)
                .into_iter()
                .map(|e| format!("spec.{e}")),
        );
        problems.extend(
            self.config()
                .admission
                .validate(&job.spec, self.planner.default_image),
        );
        let spec_bytes = spec_config_map(job)
            .data
            .map_or(0, |d| d.values().map(String::len).sum::<usize>());
        if spec_bytes > MAX_SPEC_BYTES {
            problems.push(format!(
                "spec: takes {spec_bytes} bytes; the ConfigMap the driver reads it from holds at most {MAX_SPEC_BYTES}"
            ));
        }
        if !problems.is_empty() {
            self.fail(FailureReason::InvalidSpec, problems.join("; "));
            return;
        }
        if job.spec.suspend {
            self.suspend();
            return;
        }
        if let (Some(limit), Some(start)) = (
            job.spec.active_deadline_seconds,
            self.old.start_time.clone(),
        ) {
            let limit = Duration::from_secs(limit);
            let ran = elapsed(self.obs.now, &start);
            if ran >= limit {
                self.fail(
                    FailureReason::DeadlineExceeded,
                    format!(
                        "the job ran for {}s, longer than activeDeadlineSeconds ({}s)",
                        ran.as_secs(),
                        limit.as_secs()
                    ),
                );
                return;
            }
            self.requeue(limit - ran);
        }
        self.driver();
    }

    fn driver_state(&self, pod: &Pod) -> DriverState {
        if let Some(t) = podstate::terminated(pod) {
            let report = report_of(pod);
            if t.exit_code == 0 {
                return DriverState::Succeeded(report);
            }
            if let Some(r) = report {
                return DriverState::Failed {
                    reason: r.reason.unwrap_or(FailureReason::DriverFailed),
                    message: r
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("the driver exited with code {}", t.exit_code)),
                };
            }
            // Killed by a signal (OOM, node shutdown) with no word from the driver: lost.
            if t.exit_code < 128 && t.reason.as_deref() != Some("OOMKilled") {
                return DriverState::Failed {
                    reason: FailureReason::DriverFailed,
                    message: format!(
                        "the driver exited with code {} without a report{}",
                        t.exit_code,
                        t.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                };
            }
            return DriverState::Lost {
                detail: format!(
                    "its container was killed (exit code {}{})",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(", {r}"))
                        .unwrap_or_default()
                ),
                node_lost: self.node_lost(pod),
            };
        }
        let node_lost = self.node_lost(pod);
        if node_lost {
            return DriverState::Lost {
                detail: format!("its node {} is lost", podstate::node(pod).unwrap_or("?")),
                node_lost,
            };
        }
        if podstate::is_disrupted(pod) || podstate::is_deleting(pod) {
            return DriverState::Lost {
                detail: if podstate::is_disrupted(pod) {
                    "it was disrupted (evicted or preempted)".into()
                } else {
                    "it was deleted".into()
                },
                node_lost,
            };
        }
        if podstate::phase(pod) == "Failed" {
            let reason = pod.status.as_ref().and_then(|s| s.reason.clone());
            return DriverState::Lost {
                detail: format!(
                    "its pod failed ({})",
                    reason.as_deref().unwrap_or("unknown")
                ),
                node_lost,
            };
        }
        if let Some((reason, message)) = podstate::stuck(pod) {
            return DriverState::Stuck { reason, message };
        }
        match podstate::ip(pod) {
            Some(ip) if podstate::phase(pod) == "Running" => DriverState::Running(ip.to_string()),
            _ => DriverState::Starting,
        }
    }

    fn driver(&mut self) {
        let driver = self.pods_of(ROLE_DRIVER).next().cloned();
        if let Some(p) = &driver {
            let label = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ATTEMPT))
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            self.status.driver.attempt = self.status.driver.attempt.max(label);
        }
        let Some(pod) = driver else {
            // The first driver, or the first after a resume; otherwise the driver vanished.
            if self.status.driver.attempt == 0 || self.old.phase == JobPhase::Suspended {
                self.start_driver(None);
            } else {
                self.driver_gone();
            }
            return;
        };
        // A driver that ended reports what it resumed one last time.
        if let Some(report) = report_of(&pod) {
            self.resumed(&pod, report.stages_resumed);
        }
        match self.driver_state(&pod) {
            DriverState::Succeeded(report) => self.succeed(report),
            DriverState::Failed { reason, message } => self.fail(reason, message),
            DriverState::Lost { detail, node_lost } => self.driver_lost(&pod, detail, node_lost),
            DriverState::Stuck { reason, message } => self.stuck(&pod, &reason, &message),
            DriverState::Starting => {
                if self.unplaceable(&pod, "driver") {
                    return;
                }
                // A replacement's executors wait for it to attach to them.
                self.hold_executors();
                self.status.phase = JobPhase::Pending;
                self.state = Some(Outlook::Pending {
                    reason: "DriverStarting",
                    message: format!("waiting for driver pod {} to run", podstate::name(&pod)),
                });
                self.requeue(self.config().progress_interval());
            }
            DriverState::Running(ip) => {
                self.status.phase = JobPhase::Running;
                if let Some(p) = self.obs.progress {
                    let progress = &mut self.status.progress;
                    progress.stages = p.stages_total;
                    progress.stages_done = p.stages_done;
                    progress.tasks = p.tasks_total;
                    progress.tasks_done = p.tasks_done;
                    progress.summary = format!("{}/{}", p.tasks_done, p.tasks_total);
                    let recovery = &mut self.status.recovery;
                    recovery.partitions_recomputed = p.partitions_recomputed;
                    recovery.partitions_migrated = p.partitions_migrated;
                    recovery.partitions_lost = p.partitions_lost;
                    // Zero: no loss yet (a replacement driver knows none), unknown (when a
                    // notice was given), or not recovered yet.
                    if p.last_detect_ms > 0 || p.last_recover_ms > 0 {
                        recovery.last_detect_ms =
                            (p.last_detect_ms > 0).then_some(p.last_detect_ms);
                        recovery.last_recover_ms =
                            (p.last_recover_ms > 0).then_some(p.last_recover_ms);
                    }
                    self.resumed(&pod, p.stages_resumed);
                }
                self.state = Some(Outlook::Running);
                self.requeue(self.config().progress_interval());
                self.executors(&ip);
            }
        }
    }

    /// Creates the next driver pod and what it needs: the first (or the first after a
    /// resume), or the replacement of a lost driver, which takes over `takeover`.
    fn start_driver(&mut self, takeover: Option<Takeover>) {
        let attempt = self.status.driver.attempt + 1;
        let name = self.name();
        if takeover.is_none() {
            self.status.start_time = Some(self.now());
            let resumed = self.old.phase == JobPhase::Suspended;
            self.event(
                false,
                if resumed { "Resumed" } else { "Started" },
                format!("created driver pod {name}-driver (attempt {attempt})"),
            );
            self.status.executors.pods.clear();
            self.status.executors.running = 0;
        }
        let ctx = self.pod_ctx();
        let netpol = &self.config().network_policy;
        let children = [
            Some(Child::Secret(Box::new(token_secret(
                self.obs.job,
                self.obs.secret,
            )))),
            Some(Child::ConfigMap(Box::new(spec_config_map(self.obs.job)))),
            Some(Child::Service(Box::new(driver_service(self.obs.job)))),
            netpol
                .enabled
                .then(|| Child::NetworkPolicy(Box::new(network_policy(self.obs.job, netpol)))),
            Some(Child::Pod(Box::new(driver_pod(
                ctx,
                attempt,
                takeover.as_ref(),
            )))),
        ];
        self.plan
            .actions
            .extend(children.into_iter().flatten().map(Action::Apply));
        self.status.driver.attempt = attempt;
        self.status.phase = JobPhase::Pending;
        self.state = Some(Outlook::Pending {
            reason: "DriverStarting",
            message: format!("created driver pod {name}-driver (attempt {attempt})"),
        });
        self.requeue(self.config().progress_interval());
    }

    /// A pod whose container cannot start: wait out the grace period, then fail.
    pub(crate) fn stuck(&mut self, pod: &Pod, reason: &str, message: &str) {
        let grace = Duration::from_secs(self.config().image_pull_grace_seconds);
        let age = podstate::age(pod, self.obs.now);
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        if age >= grace {
            let why = if reason.contains("Image") {
                FailureReason::ImagePullFailed
            } else {
                FailureReason::ContainerConfigError
            };
            self.fail(
                why,
                format!(
                    "pod {} cannot start for {}s: {reason} (image `{image}`){}",
                    podstate::name(pod),
                    age.as_secs(),
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    }
                ),
            );
        } else {
            if self.status.phase != JobPhase::Running {
                self.status.phase = JobPhase::Pending;
                self.state = Some(Outlook::Pending {
                    reason: "ContainerNotStarting",
                    message: format!("pod {} waits: {reason}", podstate::name(pod)),
                });
            }
            self.requeue(grace - age);
        }
    }
}
