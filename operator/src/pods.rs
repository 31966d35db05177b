//! Pure builders of a job's driver and executor pods: placement (affinity and tolerations
//! from the operator's configuration), resources, security context and the command line.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PreferredSchedulingTerm,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kiln_api::crd::{LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE, ROLE_DRIVER, ROLE_EXECUTOR};
use kiln_api::launch::{
    DEFAULT_EXECUTOR_HOST, DRIVER_PORT, DriverLaunch, ENV_ADVERTISE_HOST, ENV_JOB_UID, ENV_TOKEN,
    EXECUTOR_PORT, ExecutorLaunch, default_driver_bind,
};
use kiln_api::tls::{ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY, Role as TlsRole};
use kiln_api::{ComputeJob, Placement, PodTemplate};
use kube::ResourceExt;

use crate::children::{
    CA_KEY, SPEC_KEY, TOKEN_KEY, cert_key, child_meta, driver_name, executor_name, private_key_key,
    spec_config_map_name, token_secret_name,
};
use crate::config::OperatorConfig;

/// The container command of every job pod: the `kiln` binary, which the image must have on
/// its `PATH` (and which is its ENTRYPOINT). The subcommand (`driver`, `executor`) and flags
/// follow as `args`, written by [`DriverLaunch`] and [`ExecutorLaunch`].
pub const ENTRYPOINT: &[&str] = &["kiln"];
/// Where the driver finds the job spec (the spec ConfigMap is mounted there).
pub const SPEC_DIR: &str = "/etc/kiln";
/// The scratch emptyDir: the root filesystem is read-only, so temporary files, spills and
/// shuffle blocks that leave memory go here.
pub const SCRATCH_DIR: &str = "/tmp";
/// The executors' work directory, inside the scratch volume.
pub const WORK_DIR: &str = "/tmp/kiln-work";
/// The executor's spill directory under [`WORK_DIR`], which must exist when it starts: the
/// scratch volume is mounted there a second time with a `subPath`, which has the kubelet
/// create the directory (the image may have no shell to `mkdir` it).
pub const SPILL_SUB_PATH: &str = "kiln-work/spill";
/// Where the driver writes its JSON report for the operator.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The unprivileged user and group job containers run as.
pub const RUN_AS_USER: i64 = 65532;
/// Annotation on a replacement driver pod: how many executors it was handed to take over.
pub const ANNOTATION_ATTACHED: &str = "kiln.dev/attached-executors";
/// Annotation on a replacement driver pod: the job's resumed-stage count (over its earlier
/// driver losses) when the pod was created, so that a larger count this driver reports is
/// known to be its own.
pub const ANNOTATION_RESUMED_BEFORE: &str = "kiln.dev/stages-resumed-before";

/// What a replacement driver pod takes over from the driver it replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    /// Block-service addresses (`<pod IP>:<EXECUTOR_PORT>`) of the executors an earlier
    /// driver left running: the new driver attaches to them and adopts their blocks.
    pub attach: Vec<String>,
    /// Stages resumed over the job's earlier driver losses when this driver was created.
    pub stages_resumed_before: u64,
}

impl Takeover {
    /// What the replacement driver pod `pod` records of its takeover: how many executors it
    /// was handed and the resumed-stage count before it (None for a first driver, or the
    /// first after a resume).
    pub fn recorded(pod: &Pod) -> Option<(u64, u64)> {
        let annotations = pod.metadata.annotations.as_ref()?;
        let before = annotations.get(ANNOTATION_RESUMED_BEFORE)?.parse().ok()?;
        let attached = annotations
            .get(ANNOTATION_ATTACHED)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Some((attached, before))
    }
}

/// The block-service address of an executor pod at `ip`, as a replacement driver reaches it.
pub fn executor_address(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{EXECUTOR_PORT}")
    } else {
        format!("{ip}:{EXECUTOR_PORT}")
    }
}

/// What the builders need besides the job: the operator's configuration and the image.
#[derive(Clone, Copy)]
pub struct PodContext<'a> {
    /// The job.
    pub job: &'a ComputeJob,
    /// The operator's configuration (node labels, tolerations).
    pub config: &'a OperatorConfig,
    /// The image of the job's pods (`spec.image`, else the operator's default).
    pub image: &'a str,
}

/// Memory of a pod: the budget the engine uses, plus room for the process itself (10%, at
/// least 384Mi), in MiB rounded up.
pub fn memory_with_overhead(bytes: u64) -> Quantity {
    let mib = 1u64 << 20;
    let total = bytes + (bytes / 10).max(384 * mib);
    Quantity(format!("{}Mi", total.div_ceil(mib)))
}

fn requirement(key: &str, operator: &str, values: &[String]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: Some(values.to_vec()),
    }
}

/// Node affinity that keeps a pod off spot nodes: no spot label with a spot value (ANDed in
/// one term); with on-demand labels configured, each term also requires one of them.
fn on_demand_affinity(config: &OperatorConfig) -> NodeAffinity {
    let not_spot: Vec<NodeSelectorRequirement> = config
        .spot_node_labels
        .iter()
        .map(|l| requirement(&l.key, "NotIn", &l.values))
        .collect();
    let terms = if config.on_demand_node_labels.is_empty() {
        vec![NodeSelectorTerm {
            match_expressions: Some(not_spot),
            ..Default::default()
        }]
    } else {
        config
            .on_demand_node_labels
            .iter()
            .map(|l| {
                let mut exprs = not_spot.clone();
                exprs.push(requirement(&l.key, "In", &l.values));
                NodeSelectorTerm {
                    match_expressions: Some(exprs),
                    ..Default::default()
                }
            })
            .collect()
    };
    NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: terms,
        }),
        ..Default::default()
    }
}

/// One term per spot label: a node with any of them matches.
fn spot_terms(config: &OperatorConfig) -> Vec<NodeSelectorTerm> {
    config
        .spot_node_labels
        .iter()
        .map(|l| NodeSelectorTerm {
            match_expressions: Some(vec![requirement(&l.key, "In", &l.values)]),
            ..Default::default()
        })
        .collect()
}

/// Affinity and tolerations of executor pods for a placement.
pub fn executor_placement(
    placement: Placement,
    config: &OperatorConfig,
) -> (NodeAffinity, Vec<Toleration>) {
    match placement {
        Placement::Spot => (
            NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: spot_terms(config),
                }),
                ..Default::default()
            },
            config.spot_tolerations.clone(),
        ),
        Placement::OnDemand => (on_demand_affinity(config), Vec::new()),
        // Either kind of node; spot preferred, as it is the cheaper.
        Placement::Any => (
            NodeAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(
                    spot_terms(config)
                        .into_iter()
                        .map(|preference| PreferredSchedulingTerm {
                            preference,
                            weight: 50,
                        })
                        .collect(),
                ),
                ..Default::default()
            },
            config.spot_tolerations.clone(),
        ),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn token_env(job: &str) -> EnvVar {
    EnvVar {
        name: ENV_TOKEN.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(job),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

/// The job's CA and `role`'s certificate and key, from the job's Secret. Optional: a job
/// whose Secret predates TLS has none, and its processes keep plain connections.
fn tls_env(job: &str, role: TlsRole) -> Vec<EnvVar> {
    [
        (ENV_TLS_CA, CA_KEY.to_string()),
        (ENV_TLS_CERT, cert_key(role)),
        (ENV_TLS_KEY, private_key_key(role)),
    ]
    .into_iter()
    .map(|(name, key)| EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(job),
                key,
                optional: Some(true),
            }),
            ..Default::default()
        }),
    })
    .collect()
}

struct Role<'a> {
    name: &'static str,
    pod_name: String,
    extra_labels: Vec<(&'static str, String)>,
    extra_annotations: Vec<(&'static str, String)>,
    template: &'a PodTemplate,
    affinity: NodeAffinity,
    tolerations: Vec<Toleration>,
    args: Vec<String>,
    env: Vec<EnvVar>,
    cpu: &'a str,
    memory_bytes: u64,
    /// The scratch volume's size limit and the pod's ephemeral-storage request.
    disk: Quantity,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    ports: Vec<ContainerPort>,
    grace_seconds: i64,
}

/// The cost of deleting the pod, which scale-down tools that honour it weigh: on an
/// executor, the outputs only it holds.
pub const ANNOTATION_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Karpenter leaves a node with such a pod alone (no consolidation or drift replacement).
pub const ANNOTATION_DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// The cluster autoscaler does not scale down a node with such a pod.
pub const ANNOTATION_SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";

/// An executor's grace period: time, after its notice (SIGTERM), to move the blocks only it
/// holds to other executors; a reclaim's own notice (two minutes on AWS, 30 s on GCP)
/// bounds what it really gets.
pub const EXECUTOR_GRACE_SECONDS: i64 = 60;

/// The driver's scratch volume: it holds no blocks, only what its own engine spills while
/// it collects a result.
pub const DRIVER_DISK: &str = "1Gi";

fn pod(ctx: PodContext<'_>, role: Role<'_>) -> Pod {
    let t = role.template;
    let job = ctx.job.name_any();
    let mut meta = child_meta(ctx.job, role.pod_name, &[]);
    let mut labels: BTreeMap<String, String> = t.labels.clone();
    labels.insert(LABEL_JOB.into(), job.clone());
    labels.insert(LABEL_ROLE.into(), role.name.into());
    labels.extend(
        role.extra_labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    meta.labels = Some(labels);
    let mut annotations = t.annotations.clone();
    annotations.extend(
        role.extra_annotations
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    meta.annotations = (!annotations.is_empty()).then_some(annotations);

    let mut volumes = vec![Volume {
        name: "scratch".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(role.disk.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }];
    volumes.extend(role.volumes);
    volumes.extend(t.volumes.iter().cloned());
    let mut mounts = vec![VolumeMount {
        name: "scratch".into(),
        mount_path: SCRATCH_DIR.into(),
        ..Default::default()
    }];
    mounts.extend(role.mounts);
    mounts.extend(t.volume_mounts.iter().cloned());
    let mut env_vars = role.env;
    env_vars.extend(t.env.iter().cloned());
    let mut tolerations = role.tolerations;
    tolerations.extend(t.tolerations.iter().cloned());

    let memory = memory_with_overhead(role.memory_bytes);
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(role.cpu.to_string())),
            ("memory".to_string(), memory.clone()),
            ("ephemeral-storage".to_string(), role.disk.clone()),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
        ..Default::default()
    };
    let container = Container {
        name: role.name.into(),
        image: Some(ctx.image.into()),
        command: Some(ENTRYPOINT.iter().map(|s| s.to_string()).collect()),
        args: Some(role.args),
        env: Some(env_vars),
        env_from: (!t.env_from.is_empty()).then(|| t.env_from.clone()),
        resources: Some(resources),
        volume_mounts: Some(mounts),
        ports: (!role.ports.is_empty()).then_some(role.ports),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("File".into()),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            // Job pods never talk to the API server, unless a service account is named for
            // cloud identity (whose token the cloud's webhook or SDK needs).
            automount_service_account_token: Some(t.service_account_name.is_some()),
            service_account_name: t.service_account_name.clone(),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(role.grace_seconds),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            affinity: Some(Affinity {
                node_affinity: Some(role.affinity),
                ..Default::default()
            }),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            volumes: Some(volumes),
            containers: vec![container],
            ..Default::default()
        }),
        status: None,
    }
}

/// The driver pod of attempt `attempt` (its epoch: executors follow the highest they have
/// seen): on on-demand nodes, the spec mounted from its ConfigMap, its report written as the
/// termination message. A replacement for a lost driver (`takeover`) attaches to the
/// executors that driver left running, and records what it took over in annotations.
pub fn driver_pod(ctx: PodContext<'_>, attempt: u32, takeover: Option<&Takeover>) -> Pod {
    let job = ctx.job.name_any();
    let spec = &ctx.job.spec;
    let launch = DriverLaunch {
        spec: format!("{SPEC_DIR}/{SPEC_KEY}").into(),
        bind: default_driver_bind(),
        // From the job's Secret: see `token_env`.
        token: None,
        heartbeat_timeout: None,
        summary: None,
        termination_message: Some(TERMINATION_MESSAGE_PATH.into()),
        // By environment, below.
        job_uid: None,
        epoch: attempt.max(1).into(),
        attach: takeover.map(|t| t.attach.clone()).unwrap_or_default(),
        allow_loopback: ctx.config.locations.allow_loopback,
    };
    let mut extra_annotations = takeover
        .map(|t| {
            vec![
                (ANNOTATION_ATTACHED, t.attach.len().to_string()),
                (
                    ANNOTATION_RESUMED_BEFORE,
                    t.stages_resumed_before.to_string(),
                ),
            ]
        })
        .unwrap_or_default();
    // The driver holds the job's state: no voluntary disruption (consolidation, scale-down)
    // takes its node, unless the pod template says otherwise.
    extra_annotations.extend(
        [
            (ANNOTATION_DO_NOT_DISRUPT, "true"),
            (ANNOTATION_SAFE_TO_EVICT, "false"),
        ]
        .into_iter()
        .filter(|(k, _)| !spec.driver.template.annotations.contains_key(*k))
        .map(|(k, v)| (k, v.to_string())),
    );
    let mut env_vars = vec![token_env(&job)];
    env_vars.extend(tls_env(&job, TlsRole::Driver));
    env_vars.extend(ctx.job.uid().map(|uid| env(ENV_JOB_UID, uid)));
    pod(
        ctx,
        Role {
            name: ROLE_DRIVER,
            pod_name: driver_name(&job),
            extra_labels: vec![(LABEL_ATTEMPT, attempt.to_string())],
            extra_annotations,
            template: &spec.driver.template,
            affinity: on_demand_affinity(ctx.config),
            tolerations: Vec::new(),
            args: launch.command_line(),
            env: env_vars,
            cpu: &spec.driver.cpu,
            memory_bytes: kiln_api::parse_memory(&spec.driver.memory).unwrap_or(1 << 30),
            disk: Quantity(DRIVER_DISK.into()),
            volumes: vec![Volume {
                name: "spec".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: spec_config_map_name(&job),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            mounts: vec![VolumeMount {
                name: "spec".into(),
                mount_path: SPEC_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }],
            ports: vec![ContainerPort {
                name: Some("control".into()),
                container_port: DRIVER_PORT.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            }],
            grace_seconds: 10,
        },
    )
}

/// Executor pod number `index`, dialling the driver at `driver_ip`. Its executor id is its
/// pod name, so the operator's `ExecutorLost(pod name)` names it to the driver.
pub fn executor_pod(ctx: PodContext<'_>, index: u32, driver_ip: &str) -> Pod {
    let job = ctx.job.name_any();
    let spec = &ctx.job.spec;
    let name = executor_name(&job, index);
    let (affinity, tolerations) = executor_placement(spec.executors.placement, ctx.config);
    let launch = ExecutorLaunch {
        driver: format!("http://{driver_ip}:{DRIVER_PORT}"),
        id: name.clone(),
        host: DEFAULT_EXECUTOR_HOST.into(),
        // Fixed, so that a replacement driver reaches it at `<pod IP>:EXECUTOR_PORT`.
        port: EXECUTOR_PORT,
        // The pod's IP, known once it runs: by environment, below.
        advertise_host: None,
        // From the job spec.
        slots: None,
        memory: None,
        work_dir: WORK_DIR.into(),
        // From the job's Secret: see `token_env`.
        token: String::new(),
        faults: String::new(),
        allow_loopback: ctx.config.locations.allow_loopback,
    };
    pod(
        ctx,
        Role {
            name: ROLE_EXECUTOR,
            pod_name: name,
            extra_labels: Vec::new(),
            extra_annotations: Vec::new(),
            template: &spec.executors.template,
            affinity,
            tolerations,
            args: launch.command_line(),
            env: [
                env_from_field(ENV_ADVERTISE_HOST, "status.podIP"),
                token_env(&job),
            ]
            .into_iter()
            .chain(tls_env(&job, TlsRole::Executor))
            .collect(),
            cpu: &spec.executors.cpu,
            memory_bytes: kiln_api::parse_memory(&spec.executors.memory).unwrap_or(2 << 30),
            disk: Quantity(spec.executors.disk.clone()),
            volumes: Vec::new(),
            mounts: vec![VolumeMount {
                name: "scratch".into(),
                mount_path: format!("{SCRATCH_DIR}/{SPILL_SUB_PATH}"),
                sub_path: Some(SPILL_SUB_PATH.into()),
                ..Default::default()
            }],
            ports: vec![ContainerPort {
                name: Some("blocks".into()),
                container_port: EXECUTOR_PORT.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            }],
            grace_seconds: EXECUTOR_GRACE_SECONDS,
        },
    )
}

/// Keeps `pod` off `nodes` (by node name, whatever their labels): added to every required
/// node-selector term, as the terms are alternatives.
pub fn avoiding_nodes(mut pod: Pod, nodes: &BTreeSet<String>) -> Pod {
    if nodes.is_empty() {
        return pod;
    }
    let not_these = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(nodes.iter().cloned().collect()),
    };
    let affinity = pod
        .spec
        .get_or_insert_with(Default::default)
        .affinity
        .get_or_insert_with(Default::default)
        .node_affinity
        .get_or_insert_with(Default::default);
    let required = affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Default::default);
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(not_these.clone());
    }
    pod
}

#[cfg(test)]
#[path = "pods_tests.rs"]
mod tests;
