//! The ComputeJob custom resource: its status, the condition and label vocabulary the operator
//! and tools share, and the generated CustomResourceDefinition. The resource's `spec` is the
//! [`JobSpec`](crate::JobSpec) itself.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::DriverReport;
pub use crate::spec::ComputeJob;

/// Label on every pod (and other child) of a job: the ComputeJob's name.
pub const LABEL_JOB: &str = "kiln.dev/job";
/// Label on every pod of a job: `driver` or `executor`.
pub const LABEL_ROLE: &str = "kiln.dev/role";
/// Label on driver pods: which attempt of the driver (1, 2, ...) the pod runs.
pub const LABEL_ATTEMPT: &str = "kiln.dev/attempt";
/// Value of [`LABEL_ROLE`] on the driver pod.
pub const ROLE_DRIVER: &str = "driver";
/// Value of [`LABEL_ROLE`] on executor pods.
pub const ROLE_EXECUTOR: &str = "executor";

/// Condition: the driver and every desired executor run.
pub const CONDITION_READY: &str = "Ready";
/// Condition: the job is moving towards its end (starting, running, recovering).
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition: the job runs with fewer executors than desired or recovers from a loss.
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition: the job finished successfully.
pub const CONDITION_SUCCEEDED: &str = "Succeeded";
/// Condition: the job failed; its reason names the problem.
pub const CONDITION_FAILED: &str = "Failed";
/// Condition: executors run on on-demand nodes because spot capacity was gone
/// (`executors.spotFallback`); false again once every executor runs on spot.
pub const CONDITION_SPOT_FALLBACK: &str = "SpotFallback";

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobPhase {
    /// Accepted; the driver or its executors are not running yet.
    #[default]
    Pending,
    /// The driver runs the job.
    Running,
    /// The driver finished the job successfully.
    Succeeded,
    /// The job failed; the `Failed` condition says why.
    Failed,
    /// `spec.suspend` is set: no pods run.
    Suspended,
}

impl JobPhase {
    /// Whether the job is over for good (it never runs again).
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }

    /// The phase's name, as in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Suspended => "Suspended",
        }
    }

    /// Every phase, for metrics.
    pub const ALL: [JobPhase; 5] = [
        JobPhase::Pending,
        JobPhase::Running,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Suspended,
    ];
}

/// The observed state of a ComputeJob, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeJobStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Suspended`.
    #[serde(default)]
    pub phase: JobPhase,
    /// `Ready`, `Progressing`, `Degraded`, `Succeeded` and `Failed`, one each; a condition's
    /// `lastTransitionTime` changes only when its status does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Stages and tasks done, as the driver reports them.
    #[serde(default)]
    pub progress: ProgressStatus,
    /// The executor pods: how many are wanted, running and were lost.
    #[serde(default)]
    pub executors: ExecutorsStatus,
    /// What recovering from lost executors and drivers cost.
    #[serde(default)]
    pub recovery: RecoveryStatus,
    /// The driver pod's attempts.
    #[serde(default)]
    pub driver: DriverStatus,
    /// When the current run started (the first driver pod was created, or the job resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job finished (Succeeded or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The driver's report at the end of the job (from its termination message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
}

/// Progress of the job as its driver reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    /// Stages complete.
    #[serde(default)]
    pub stages_done: u32,
    /// Stages planned so far (later steps add stages as they start).
    #[serde(default)]
    pub stages: u32,
    /// Tasks (partitions of those stages) whose output is complete.
    #[serde(default)]
    pub tasks_done: u64,
    /// Tasks of the stages planned so far.
    #[serde(default)]
    pub tasks: u64,
    /// `tasksDone/tasks`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

/// The executor pods of a job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorsStatus {
    /// Executors the spec asks for.
    #[serde(default)]
    pub desired: u32,
    /// Executor pods running now.
    #[serde(default)]
    pub running: u32,
    /// Executor pods lost so far (failed, evicted, deleted, or on a lost node).
    #[serde(default)]
    pub lost: u32,
    /// Losses by reason. `Preempted` (eviction, preemption, spot reclaim), `Drained`
    /// (decommissioned on notice, its blocks moved) and `NodeLost` are free: they never count
    /// against `failurePolicy.maxExecutorLosses`. `Failed` (a crash or non-zero exit),
    /// `OOMKilled` (raise `executors.memory`) and `HeartbeatTimeout` (a hung process on a
    /// healthy node) do.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lost_by_reason: BTreeMap<String, u32>,
    /// Executor failures in a row that ended before the executor had run for long; the job
    /// fails as crash-looping when it reaches the operator's limit.
    #[serde(default)]
    pub consecutive_crashes: u32,
    /// Executor pods given notice (evicted, deleted, on a node with a disruption taint) that
    /// are moving the blocks only they hold to other executors before they go. Each already
    /// has its replacement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Executor pods the driver stopped hearing from while their node still looked healthy,
    /// and since when. Each already has its replacement; the loss is settled as `NodeLost`
    /// if the node turns out dead, else as `HeartbeatTimeout` (a hung process, which counts)
    /// once the operator's `silenceSettleSeconds` pass.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unresponsive: BTreeMap<String, Time>,
    /// Executor pods that waited on spot capacity longer than
    /// `executors.spotFallback.afterSeconds` and were recreated on on-demand nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_demand: Vec<String>,
    /// Spot fallbacks so far.
    #[serde(default)]
    pub spot_fallbacks: u32,
    /// The executor pods the operator tracks for the job; a replacement driver takes over those
    /// still running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    /// The number the next executor pod gets (`<job>-exec-<n>`): replacements never reuse a
    /// name.
    #[serde(default)]
    pub next_index: u32,
    /// `running/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

/// What recovering from lost executors and drivers cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryStatus {
    /// Task outputs still needed that were lost with executors (not moved off in time), so
    /// recomputed from their lineage.
    #[serde(default)]
    pub partitions_lost: u64,
    /// Task attempts that recomputed a partition lost with an executor.
    #[serde(default)]
    pub partitions_recomputed: u64,
    /// The executor pod lost last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<String>,
    /// Why it was lost: `Drained`, `Preempted`, `NodeLost`, `Failed`, `OOMKilled` or
    /// `HeartbeatTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss_reason: Option<String>,
    /// When the operator handled that loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss_time: Option<Time>,
    /// Driver pods lost so far; each replacement driver took over the executors and the
    /// blocks they held.
    #[serde(default)]
    pub driver_losses: u32,
    /// Stages replacement drivers took over complete, without rerunning them.
    #[serde(default)]
    pub stages_resumed: u64,
    /// Task outputs moved off executors that were given notice (drained) to other
    /// executors, instead of being recomputed.
    #[serde(default)]
    pub partitions_migrated: u64,
    /// For the last executor loss (or notice, for a drained executor): milliseconds from when
    /// it happened to when the driver knew of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_detect_ms: Option<u64>,
    /// For the last executor loss (or notice): milliseconds from when it happened until as
    /// many executors took tasks as before (unset until they did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recover_ms: Option<u64>,
}

/// The driver pod's attempts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverStatus {
    /// The attempt the current driver pod runs (0: no driver created yet). Every new driver
    /// pod, after a loss or a resume, gets the next number.
    #[serde(default)]
    pub attempt: u32,
    /// Driver pods lost and recreated; each replacement takes the executors over, with the
    /// outputs they hold, and resumes the job.
    #[serde(default)]
    pub restarts: u32,
}

/// The driver's report at the end of the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// Whether the job succeeded.
    pub succeeded: bool,
    /// Why it failed, a PascalCase reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The error, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Wall time of the job in milliseconds.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Stages run.
    #[serde(default)]
    pub stages: u64,
    /// Partitions over all stages.
    #[serde(default)]
    pub tasks: u64,
    /// Task attempts launched.
    #[serde(default)]
    pub attempts: u64,
    /// Attempts that recomputed a lost partition.
    #[serde(default)]
    pub partitions_recomputed: u64,
    /// Task outputs moved off decommissioned executors instead of being recomputed.
    #[serde(default)]
    pub partitions_migrated: u64,
    /// Task outputs still needed that were lost with executors, so recomputed.
    #[serde(default)]
    pub partitions_lost: u64,
    /// Executors the driver saw lost, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub executors_lost: BTreeMap<String, u64>,
    /// Rows written (or returned, without an output).
    #[serde(default)]
    pub rows: u64,
    /// Files written.
    #[serde(default)]
    pub files: u64,
    /// Where the output went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uri: Option<String>,
}

impl From<DriverReport> for JobResult {
    fn from(r: DriverReport) -> Self {
        JobResult {
            succeeded: r.succeeded,
            reason: r.reason.map(|r| r.as_str().to_string()),
            message: r.message,
            elapsed_ms: r.elapsed_ms,
            stages: r.stages,
            tasks: r.tasks,
            attempts: r.attempts,
            partitions_recomputed: r.partitions_recomputed,
            partitions_migrated: r.partitions_migrated,
            partitions_lost: r.partitions_lost,
            executors_lost: r.executors_lost,
            rows: r.rows,
            files: r.files,
            output_uri: r.output_uri,
        }
    }
}

impl ComputeJobStatus {
    /// The condition of type `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether condition `type_` is `True`.
    pub fn is_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }

    /// Sets condition `type_`; `lastTransitionTime` becomes `now` only when its status
    /// changes (or it is new). Returns whether the status changed.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: &Time,
    ) -> bool {
        let status = if status { "True" } else { "False" };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                let changed = c.status != status;
                if changed {
                    c.last_transition_time = now.clone();
                }
                c.status = status.into();
                c.reason = reason.into();
                c.message = message.into();
                c.observed_generation = generation;
                changed
            }
            None => {
                self.conditions.push(Condition {
                    type_: type_.into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: message.into(),
                    observed_generation: generation,
                    last_transition_time: now.clone(),
                });
                true
            }
        }
    }
}

/// The schema of a pod template's `volumes`: each item a core/v1 Volume. Only `name` is
/// checked here (the full Volume schema would make the CRD too large for a client-side
/// `kubectl apply`); the API server validates the rest when the pod is created.
pub fn volumes_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Volumes added to the pods (core/v1 Volume), e.g. a PersistentVolumeClaim holding input data.",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "description": "The volume's name, referred to by volumeMounts."}
            },
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// The ComputeJob CustomResourceDefinition: the derived one, with the rule on the object's
/// name that only the schema's root may state (the API server then refuses a name the
/// operator could not derive its children's names from).
pub fn definition()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = ComputeJob::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let rule =
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule {
                rule: format!(
                    "size(self.metadata.name) <= {} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                    crate::MAX_JOB_NAME_LENGTH
                ),
                message: Some(format!(
                    "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with a letter or digit) of at most {} characters",
                    crate::MAX_JOB_NAME_LENGTH
                )),
                reason: Some("FieldValueInvalid".into()),
                field_path: None,
                message_expression: None,
                optional_old_self: None,
            };
        schema
            .x_kubernetes_validations
            .get_or_insert_with(Vec::new)
            .push(rule);
    }
    crd
}

/// The ComputeJob CustomResourceDefinition as YAML, as `crds/computejob.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = definition();
    format!(
        "# Generated by `kiln crd` from the types in api/src; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD always serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let t0 = Time(Timestamp::from_second(1_000).unwrap());
        let t1 = Time(Timestamp::from_second(2_000).unwrap());
        let mut s = ComputeJobStatus::default();
        assert!(s.set_condition("Ready", false, "Starting", "", Some(1), &t0));
        assert!(!s.set_condition("Ready", false, "Waiting", "x", Some(2), &t1));
        let c = s.condition("Ready").unwrap();
        assert_eq!(
            (c.reason.as_str(), c.last_transition_time.clone()),
            ("Waiting", t0)
        );
        assert!(s.set_condition("Ready", true, "Running", "", Some(2), &t1));
        assert_eq!(s.condition("Ready").unwrap().last_transition_time, t1);
        assert!(s.is_true("Ready"));
        assert_eq!(s.conditions.len(), 1);
    }

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../../crds/computejob.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/computejob.yaml is out of date: run `kiln crd` and commit the result"
        );
    }

    #[test]
    fn crd_has_the_resource_shape_the_operator_relies_on() {
        let crd = serde_json::to_value(definition()).unwrap();
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(
            root["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("self.metadata.name.matches"),
            "the name rule sits at the schema's root"
        );
        let v = &crd["spec"]["versions"][0];
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "kjob");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert!(v["subresources"]["status"].is_object());
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Phase", "Progress", "Executors", "Age"]);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["executors"]["properties"]["count"]["maximum"],
            512.0
        );
        assert_eq!(
            spec["properties"]["executors"]["properties"]["placement"]["enum"],
            serde_json::json!(["Spot", "OnDemand", "Any"])
        );
        assert!(spec["x-kubernetes-validations"].as_array().unwrap().len() >= 3);
        let conditions =
            &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        // Every field is documented: its doc comment becomes the description.
        fn undocumented(path: &str, schema: &serde_json::Value, out: &mut Vec<String>) {
            if let Some(props) = schema["properties"].as_object() {
                for (name, s) in props {
                    let p = format!("{path}.{name}");
                    if s["description"].as_str().is_none_or(str::is_empty) {
                        out.push(p.clone());
                    }
                    undocumented(&p, s, out);
                    undocumented(&format!("{p}[]"), &s["items"], out);
                }
            }
        }
        let mut missing = Vec::new();
        undocumented("spec", spec, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    #[test]
    fn quantity_patterns_agree_with_the_parsers() {
        let memory = regex::Regex::new(crate::MEMORY_PATTERN).unwrap();
        let cpu = regex::Regex::new(crate::CPU_PATTERN).unwrap();
        for q in [
            "512Mi", "4Gi", "1e9", "1.5G", "100", ".5Gi", "4GB", "lots", "-1Gi", "1 Gi", "",
        ] {
            assert_eq!(
                memory.is_match(q),
                crate::parse_memory(q).is_ok(),
                "memory `{q}`"
            );
        }
        for q in ["2", "500m", "0.5", "2 cores", "1k", "", "-1"] {
            assert_eq!(cpu.is_match(q), crate::parse_cpu(q).is_ok(), "cpu `{q}`");
        }
    }
}
