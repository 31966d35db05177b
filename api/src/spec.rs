//! The job spec: named inputs, SQL steps, an output, and the resources to run them with.
//! The same structure is the `spec` of a ComputeJob and the file `kiln run` reads; the fields
//! only the operator uses (`suspend`, `ttlSecondsAfterFinished`, `activeDeadlineSeconds`, the
//! pod `template`s) are ignored in local mode.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, Toleration, Volume, VolumeMount};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Kiln job: SQL steps over named inputs, run by one driver and a set of executors.
// `printcolumn` is repeated by design: one attribute per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "ComputeJob",
    namespaced,
    shortname = "kjob",
    status = "crate::crd::ComputeJobStatus",
    derive = "PartialEq",
    doc = "A batch of SQL steps over named inputs, run by one driver pod on on-demand nodes and executor pods (by default on spot nodes)",
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Pending, Running, Succeeded, Failed or Suspended",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        description = "Tasks done of tasks planned so far",
        json_path = ".status.progress.summary"
    ),
    printcolumn(
        name = "Executors",
        type_ = "string",
        description = "Executors running of desired",
        json_path = ".status.executors.summary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.output) || !has(self.output.from) || self.steps.exists(s, s.name == self.output.from)",
        "message": "output.from must name one of the steps",
        "fieldPath": ".output",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.steps.all(s, !self.inputs.exists(i, i.name == s.name))",
        "message": "a step may not have the name of an input",
        "fieldPath": ".steps",
        "reason": "FieldValueDuplicate"
    },
    {
        "rule": "self.steps.all(s, self.steps.exists_one(t, t.name == s.name)) && self.inputs.all(s, self.inputs.exists_one(t, t.name == s.name))",
        "message": "input and step names must be unique",
        "fieldPath": ".steps",
        "reason": "FieldValueDuplicate"
    }
]))]
pub struct JobSpec {
    /// Container image for the driver and executor pods. Ignored in local mode; defaults to
    /// the operator's configured image, and may name another only where the operator's
    /// `admission.images` allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the driver.
    #[serde(default)]
    pub driver: DriverSpec,
    /// How many executors to run and with what resources.
    #[serde(default)]
    pub executors: ExecutorsSpec,
    /// Number of partitions a shuffle (GROUP BY, JOIN, window) hashes rows into, and the
    /// number of tasks input scans are split into. Like Spark's `spark.sql.shuffle.partitions`.
    #[serde(default = "default_shuffle_partitions")]
    #[schemars(range(min = 1, max = 100000))]
    pub shuffle_partitions: u32,
    /// A join side estimated smaller than this (bytes, or a quantity such as `10Mi`) is
    /// broadcast to every task of the join instead of shuffling both sides.
    #[serde(default = "default_broadcast_threshold")]
    #[schemars(regex(pattern = MEMORY_PATTERN))]
    pub broadcast_join_threshold: String,
    /// Named input datasets; steps refer to them as tables.
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub inputs: Vec<InputSpec>,
    /// SQL steps, in order. A step may refer to inputs and to earlier steps by name.
    #[schemars(length(min = 1, max = 100))]
    pub steps: Vec<StepSpec>,
    /// Where the result goes. Without it, the last step's rows are returned to the caller
    /// (printed by `kiln run`, summarised in the driver's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// Without `output`: the most the result brought back to the driver may hold (bytes, or
    /// a quantity such as `64Mi`). A larger result fails the job with `ResultTooLarge`
    /// instead of exhausting the driver's memory; write it to an `output` instead.
    #[serde(default = "default_max_result_bytes")]
    #[schemars(regex(pattern = MEMORY_PATTERN))]
    pub max_result_bytes: String,
    /// Retry and loss budgets.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Operator only: `true` deletes the job's pods and keeps its status; setting it back to
    /// `false` runs the job again from the start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Operator only: seconds after the job finished (Succeeded or Failed) when the ComputeJob
    /// and everything it owns are deleted. Unset: kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 31536000))]
    pub ttl_seconds_after_finished: Option<u32>,
    /// Operator only: the longest the job may run, in seconds from its start (or its last
    /// resume); past it the pods are deleted and the job fails with `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u64>,
}

/// Operator only: additions to the pods of one role (driver or executors), e.g. storage
/// credentials, data volumes, a service account for cloud identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplate {
    /// Labels added to the pods (the `kiln.dev/` labels the operator sets win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node labels the pods additionally require (on top of the placement's affinity).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to the pods (spot tolerations come from the placement).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Environment variables of the container, e.g. `AWS_*` from a Secret for S3 inputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Whole ConfigMaps or Secrets as environment variables (storage credentials).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Volumes added to the pods, e.g. a PersistentVolumeClaim holding input data: of the
    /// types the operator's `admission.volumeTypes` allows (by default, no `hostPath`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::volumes_schema")]
    pub volumes: Vec<Volume>,
    /// Where the container mounts those volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Service account of the pods, for cloud identity (IRSA, Workload Identity), where the
    /// operator's `admission.allowServiceAccount` allows it. Set, the pods get its token;
    /// unset, they run with no service-account token at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

impl PodTemplate {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self == &PodTemplate::default()
    }
}

/// Resources of the driver process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriverSpec {
    /// CPU request and limit of the driver pod (a Kubernetes quantity, e.g. `1` or `500m`).
    #[serde(default = "default_cpu")]
    #[schemars(regex(pattern = CPU_PATTERN))]
    pub cpu: String,
    /// Memory request and limit of the driver pod (a Kubernetes quantity, e.g. `2Gi`).
    #[serde(default = "default_driver_memory")]
    #[schemars(regex(pattern = MEMORY_PATTERN))]
    pub memory: String,
    /// Operator only: additions to the driver pod.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub template: PodTemplate,
}

impl Default for DriverSpec {
    fn default() -> Self {
        Self {
            cpu: default_cpu(),
            memory: default_driver_memory(),
            template: PodTemplate::default(),
        }
    }
}

/// Where executor pods may be scheduled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Placement {
    /// Spot / preemptible nodes only (the default: about a third of the price).
    #[default]
    Spot,
    /// On-demand nodes only.
    OnDemand,
    /// Any node.
    Any,
}

/// The executors of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutorsSpec {
    /// Number of executors (at most 512).
    #[serde(default = "default_executor_count")]
    #[schemars(range(min = 1, max = 512))]
    pub count: u32,
    /// CPU of each executor (a Kubernetes quantity). It also sets the number of tasks an
    /// executor runs at once (rounded up, at least 1) unless `slots` is given.
    #[serde(default = "default_cpu")]
    #[schemars(regex(pattern = CPU_PATTERN))]
    pub cpu: String,
    /// Memory budget of each executor (a Kubernetes quantity, e.g. `4Gi`): operators
    /// (aggregations, sorts, joins) spill to disk beyond their share of it, and shuffle and
    /// cached blocks move to local disk when it is full.
    #[serde(default = "default_executor_memory")]
    #[schemars(regex(pattern = MEMORY_PATTERN))]
    pub memory: String,
    /// Local disk of each executor (a Kubernetes quantity, e.g. `10Gi`): the size limit of
    /// its scratch volume, where spilled blocks and operator spill files go, and its pod's
    /// ephemeral-storage request. Spilling past it fails the task with an error that names
    /// this field, instead of filling the node's disk.
    #[serde(default = "default_executor_disk")]
    #[schemars(regex(pattern = MEMORY_PATTERN))]
    pub disk: String,
    /// Where executor pods run: `Spot`, `OnDemand` or `Any`.
    #[serde(default)]
    pub placement: Placement,
    /// Concurrent tasks per executor; defaults to the CPU count rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub slots: Option<u32>,
    /// Operator only: additions to the executor pods.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub template: PodTemplate,
    /// Operator only, with `placement: Spot`: when spot capacity is gone, run executors on
    /// on-demand nodes instead of waiting. Without it, executors wait for spot capacity (up
    /// to `failurePolicy.unschedulableSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_fallback: Option<SpotFallback>,
}

/// Falling back from spot to on-demand nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpotFallback {
    /// Seconds an executor pod may wait unscheduled on spot before it is recreated on an
    /// on-demand node. Later replacements try spot again first.
    #[schemars(range(min = 0, max = 86400))]
    pub after_seconds: u32,
}

impl Default for ExecutorsSpec {
    fn default() -> Self {
        Self {
            count: default_executor_count(),
            cpu: default_cpu(),
            memory: default_executor_memory(),
            disk: default_executor_disk(),
            placement: Placement::default(),
            slots: None,
            template: PodTemplate::default(),
            spot_fallback: None,
        }
    }
}

/// File formats Kiln reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Comma-separated values.
    Csv,
    /// Tab-separated values.
    Tsv,
    /// Apache Parquet.
    Parquet,
    /// Newline-delimited JSON, one object per line.
    Json,
    /// Plain text: one row per line, in a single string column `line`.
    Text,
}

/// Options of an input's reader.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputOptions {
    /// Whether the first line of each CSV/TSV file names the columns (default `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<bool>,
    /// Field delimiter of CSV/TSV files: one ASCII character (default `,` for csv, tab for tsv).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// Quote character of CSV/TSV files: one ASCII character (default `"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
    /// When `uri` is a directory, only files with this ending are read (default: `.parquet`
    /// for parquet, `.csv`, `.tsv`, `.json`; every file for text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_extension: Option<String>,
}

/// A named input dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputSpec {
    /// Table name the steps use for this input (a SQL identifier).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// File format: `csv`, `tsv`, `parquet`, `json` (newline-delimited) or `text`.
    pub format: InputFormat,
    /// A file, a directory (ending in `/`) or a glob: a local path, `file://`, `http(s)://`
    /// or `s3://bucket/key` (endpoint and credentials from the usual `AWS_*` variables).
    pub uri: String,
    /// Reader options.
    #[serde(default)]
    pub options: InputOptions,
}

/// How a step's result is kept once computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CacheLevel {
    /// Not kept: every later use recomputes it from its inputs.
    #[default]
    None,
    /// Computed once and kept in the executors' memory; later steps read those partitions.
    Memory,
    /// Like `Memory`, and partitions that do not fit are kept on the executors' local disk.
    MemoryAndDisk,
}

/// One SQL step of the job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSpec {
    /// Table name later steps and the output use for this step's result (a SQL identifier).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// One SQL query (DataFusion dialect) over inputs and earlier steps. In an iterative step
    /// (one with `repeat` or `until`) it is the body of an iteration, and the step's own name
    /// means the previous iteration's result.
    pub sql: String,
    /// Whether the result is computed once and kept: `None`, `Memory` or `MemoryAndDisk`.
    /// Iterative steps always keep each iteration's result until the next one replaces it.
    #[serde(default)]
    pub cache: CacheLevel,
    /// Iterative steps: the SQL of the starting value (iteration 0), before `sql` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<String>,
    /// Iterative steps: how many times `sql` runs, each run replacing the step's table; with
    /// `until`, the most it may run (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub repeat: Option<u32>,
    /// Iterative steps: a SQL query returning one boolean, checked after each iteration; the
    /// loop stops once it is true. The step's name is the new result, and `<name>_previous`
    /// the one before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// Iterations an `until` loop may run when `repeat` does not bound it.
pub const DEFAULT_MAX_ITERATIONS: u32 = 100;
/// The most iterations any step may ask for.
pub const MAX_ITERATIONS: u32 = 10_000;

impl StepSpec {
    /// Whether the step iterates (`repeat` or `until`).
    pub fn is_iterative(&self) -> bool {
        self.repeat.is_some() || self.until.is_some()
    }

    /// The most iterations the step runs (0 for a plain step).
    pub fn max_iterations(&self) -> u32 {
        match (self.repeat, &self.until) {
            (Some(n), _) => n,
            (None, Some(_)) => DEFAULT_MAX_ITERATIONS,
            (None, None) => 0,
        }
    }
}

/// File formats Kiln writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Apache Parquet.
    #[serde(alias = "Parquet")]
    Parquet,
    /// Comma-separated values with a header line.
    #[serde(alias = "Csv", alias = "CSV")]
    Csv,
    /// Newline-delimited JSON.
    #[serde(alias = "Json", alias = "JSON")]
    Json,
}

impl OutputFormat {
    /// The file ending of this format.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Parquet => "parquet",
            OutputFormat::Csv => "csv",
            OutputFormat::Json => "json",
        }
    }
}

/// What happens when the output location already holds files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WriteMode {
    /// Earlier `part-*` files and `_SUCCESS` under the location are removed first, so a rerun
    /// never leaves stale or duplicated rows.
    #[default]
    Overwrite,
    /// The job fails if the location already holds files.
    ErrorIfExists,
}

/// Where and how the result is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputSpec {
    /// The step whose rows are written (default: the last step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub from: Option<String>,
    /// A directory: local path, `file://`, or `s3://bucket/prefix/`. Each result partition
    /// becomes one `part-NNNNN.<format>` file, and `_SUCCESS` marks a complete write (the
    /// files appear only at the job's commit; attempts stage theirs under `_temporary/`).
    pub uri: String,
    /// File format: `parquet`, `csv` or `json`.
    pub format: OutputFormat,
    /// `Overwrite` (default: the previous output is replaced at the job's commit, never
    /// before) or `ErrorIfExists` (another job's output there fails the job before any work;
    /// a restarted driver of the same job keeps the output it committed).
    #[serde(default)]
    pub mode: WriteMode,
}

/// Retry and loss budgets of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePolicy {
    /// Attempts of one task before the job fails (failures on the task's own data fail the
    /// job at once; preemptions do not count).
    #[serde(default = "default_task_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_task_attempts: u32,
    /// Attempts of one stage (resubmissions after lost outputs) before the job fails.
    #[serde(default = "default_stage_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_stage_attempts: u32,
    /// Executors the job may lose to its own faults (crashes, non-zero exits, OOM kills,
    /// hung processes) before it fails. Reclaims, evictions, drains and lost nodes never
    /// count.
    #[serde(default = "default_executor_losses")]
    #[schemars(range(max = 10000))]
    pub max_executor_losses: u32,
    /// Seconds without a heartbeat after which the driver declares an executor lost (and the
    /// operator replaces its pod). An executor only paused for less is not lost. A node
    /// that dies without a word costs at least this long.
    #[serde(default = "default_heartbeat_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub heartbeat_timeout_seconds: u32,
    /// Seconds executors wait, holding their blocks, for a replacement driver after theirs
    /// went silent, before they exit. A replacement driver pod must start within this for
    /// the job to resume instead of recomputing what the executors held. Never less than
    /// `heartbeatTimeoutSeconds`.
    #[serde(default = "default_driver_grace")]
    #[schemars(range(max = 3600))]
    pub driver_grace_seconds: u32,
    /// Operator only: seconds a pod of the job may stay unschedulable (the scheduler finds
    /// no node for it) before the job fails with reason `Unschedulable` and the scheduler's
    /// message. A request no node could ever hold fails the job at once.
    #[serde(default = "default_unschedulable")]
    #[schemars(range(min = 1, max = 86400))]
    pub unschedulable_seconds: u32,
}

impl FailurePolicy {
    /// How long an executor waits for a driver (its own or a replacement) before it exits.
    pub fn driver_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.driver_grace_seconds
                .max(self.heartbeat_timeout_seconds)
                .into(),
        )
    }
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            max_task_attempts: default_task_attempts(),
            max_stage_attempts: default_stage_attempts(),
            max_executor_losses: default_executor_losses(),
            heartbeat_timeout_seconds: default_heartbeat_timeout(),
            driver_grace_seconds: default_driver_grace(),
            unschedulable_seconds: default_unschedulable(),
        }
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            image: None,
            driver: DriverSpec::default(),
            executors: ExecutorsSpec::default(),
            shuffle_partitions: default_shuffle_partitions(),
            broadcast_join_threshold: default_broadcast_threshold(),
            inputs: Vec::new(),
            steps: Vec::new(),
            output: None,
            max_result_bytes: default_max_result_bytes(),
            failure_policy: FailurePolicy::default(),
            suspend: false,
            ttl_seconds_after_finished: None,
            active_deadline_seconds: None,
        }
    }
}

/// What a memory quantity looks like (`512Mi`, `4Gi`, `1e9`, `1.5G`): the CRD's pattern for
/// memory fields, matching what [`crate::parse_memory`] accepts.
pub const MEMORY_PATTERN: &str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][0-9]+|k|M|G|T|Ki|Mi|Gi|Ti)?$";
/// What a CPU quantity looks like (`2`, `0.5`, `500m`): the CRD's pattern for CPU fields,
/// matching what [`crate::parse_cpu`] accepts.
pub const CPU_PATTERN: &str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)m?$";

impl JobSpec {
    /// The spec as the engine needs it: the operator-only fields cleared.
    pub fn for_engine(&self) -> JobSpec {
        let mut spec = self.clone();
        spec.suspend = false;
        spec.ttl_seconds_after_finished = None;
        spec.active_deadline_seconds = None;
        spec.driver.template = PodTemplate::default();
        spec.executors.template = PodTemplate::default();
        spec
    }

    /// The step the job's result comes from: `output.from`, else the last step.
    pub fn target_step(&self) -> Option<&StepSpec> {
        match self.output.as_ref().and_then(|o| o.from.as_deref()) {
            Some(name) => self.steps.iter().find(|s| s.name == name),
            None => self.steps.last(),
        }
    }

    /// Tasks each executor runs at once: `executors.slots`, else the CPU count rounded up.
    pub fn executor_slots(&self) -> u32 {
        self.executors.slots.unwrap_or_else(|| {
            crate::parse_cpu(&self.executors.cpu)
                .map(|m| m.div_ceil(1000).max(1) as u32)
                .unwrap_or(1)
        })
    }
}

fn default_shuffle_partitions() -> u32 {
    16
}
fn default_broadcast_threshold() -> String {
    "10Mi".into()
}
fn default_max_result_bytes() -> String {
    "64Mi".into()
}
fn default_cpu() -> String {
    "1".into()
}
fn default_driver_memory() -> String {
    "1Gi".into()
}
fn default_executor_memory() -> String {
    "2Gi".into()
}
fn default_executor_disk() -> String {
    "10Gi".into()
}
fn default_executor_count() -> u32 {
    2
}
fn default_task_attempts() -> u32 {
    4
}
fn default_stage_attempts() -> u32 {
    4
}
fn default_executor_losses() -> u32 {
    20
}
fn default_heartbeat_timeout() -> u32 {
    10
}

fn default_driver_grace() -> u32 {
    60
}

fn default_unschedulable() -> u32 {
    300
}
