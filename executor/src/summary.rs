//! The job summary: what the driver reports when a job ends (printed by `kiln run`, written
//! as the driver pod's termination message, copied into the ComputeJob's status).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of one stage, summed over its successful task attempts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageCounters {
    /// Bytes of shuffle or cached blocks written.
    pub shuffle_bytes_written: u64,
    /// Bytes fetched from other executors over Flight.
    pub remote_bytes_fetched: u64,
    /// Bytes read from the task's own executor's block store.
    pub local_bytes_fetched: u64,
    /// Times operators spilled to disk.
    pub spill_count: u64,
    /// Bytes operators spilled.
    pub spilled_bytes: u64,
    /// Rows the stage produced.
    pub output_rows: u64,
    /// Output files written (sink stages).
    pub files_written: u64,
}

impl StageCounters {
    /// Adds another set of counters.
    pub fn add(&mut self, o: &StageCounters) {
        self.shuffle_bytes_written += o.shuffle_bytes_written;
        self.remote_bytes_fetched += o.remote_bytes_fetched;
        self.local_bytes_fetched += o.local_bytes_fetched;
        self.spill_count += o.spill_count;
        self.spilled_bytes += o.spilled_bytes;
        self.output_rows += o.output_rows;
        self.files_written += o.files_written;
    }
}

/// One stage of the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageSummary {
    /// Stage id.
    pub id: u32,
    /// The step it belongs to.
    pub step: String,
    /// Operators it runs.
    pub description: String,
    /// Whether it hash-partitions its output for a shuffle.
    pub shuffle: bool,
    /// Partitions (one task each).
    pub tasks: u64,
    /// Task attempts launched (more than `tasks` after retries or recomputation).
    pub attempts: u64,
    /// Attempts that re-ran a partition whose output had been lost.
    pub recomputed: u64,
    /// Counters.
    #[serde(flatten)]
    pub counters: StageCounters,
}

/// Totals over all stages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Partitions over all stages.
    pub tasks: u64,
    /// Task attempts launched.
    pub attempts: u64,
    /// Attempts that recomputed lost partitions.
    pub recomputed: u64,
    /// Counters.
    #[serde(flatten)]
    pub counters: StageCounters,
}

/// One step of the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepSummary {
    /// Step name.
    pub name: String,
    /// Whether its result was cached.
    pub cached: bool,
    /// Stages run for it.
    pub stages: Vec<u32>,
    /// Partitions of those stages.
    pub tasks: u64,
    /// Attempts launched for those stages.
    pub attempts: u64,
    /// Iterations run, for an iterative step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
}

/// What the job wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputSummary {
    /// Output location.
    pub uri: String,
    /// Rows written.
    pub rows: u64,
    /// Files written.
    pub files: u64,
}

/// One executor loss and its recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LossSummary {
    /// The executor.
    pub executor: String,
    /// Why (a `LossReason` name: `Preempted`, `Drained`, `NodeLost`, `Failed`, `OOMKilled`,
    /// `HeartbeatTimeout`).
    pub reason: String,
    /// When the driver declared it lost, in milliseconds since the driver started.
    pub at_ms: u64,
    /// Outputs (shuffle and cached partitions) it held that were still needed.
    pub outputs_lost: u64,
    /// From the loss to the driver declaring it (when the loss time is known: a kill by
    /// the runner, a pod event, the last heartbeat).
    pub detection_ms: Option<u64>,
    /// From the loss until as many executors were live again as before it.
    pub full_width_ms: Option<u64>,
}

/// Executors lost and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySummary {
    /// Executors lost, by reason.
    pub executors_lost: BTreeMap<String, u64>,
    /// Each loss, in order.
    pub losses: Vec<LossSummary>,
    /// Needed outputs lost over the job (by losses and failed fetches); each is recomputed
    /// once, so `totals.recomputed` equals this for a job that succeeded.
    pub outputs_lost: u64,
    /// Outputs moved off executors given notice (drained) instead of recomputed.
    #[serde(default)]
    pub partitions_migrated: u64,
    /// Driver losses the job survived (replacement drivers that took over).
    pub driver_losses: u32,
    /// Stages replacement drivers took over complete, without rerunning them.
    pub stages_resumed: u64,
}

/// The summary of one job run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSummary {
    /// Whether the job succeeded.
    pub succeeded: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Wall time of the job, planning included.
    pub elapsed_ms: u64,
    /// Executors that registered.
    pub executors: u64,
    /// Every stage run.
    pub stages: Vec<StageSummary>,
    /// Totals.
    pub totals: Totals,
    /// Per step.
    pub steps: Vec<StepSummary>,
    /// The output, when the job has one.
    pub output: Option<OutputSummary>,
    /// Rows returned to the driver, when the job has no output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_rows: Option<u64>,
    /// Losses and recomputation.
    pub recovery: RecoverySummary,
}

impl JobSummary {
    /// The short report a driver pod leaves as its termination message; `reason` is why the
    /// job failed.
    pub fn report(&self, reason: Option<kiln_api::FailureReason>) -> kiln_api::DriverReport {
        kiln_api::DriverReport {
            succeeded: self.succeeded,
            reason,
            message: self.error.clone(),
            elapsed_ms: self.elapsed_ms,
            stages: self.stages.len() as u64,
            tasks: self.totals.tasks,
            attempts: self.totals.attempts,
            partitions_recomputed: self.totals.recomputed,
            partitions_migrated: self.recovery.partitions_migrated,
            partitions_lost: self.recovery.outputs_lost,
            executors_lost: self.recovery.executors_lost.clone(),
            rows: self
                .output
                .as_ref()
                .map_or(self.result_rows.unwrap_or_default(), |o| o.rows),
            files: self.output.as_ref().map_or(0, |o| o.files),
            output_uri: self.output.as_ref().map(|o| o.uri.clone()),
            driver_losses: self.recovery.driver_losses,
            stages_resumed: self.recovery.stages_resumed,
        }
    }
}
