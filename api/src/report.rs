//! What a driver reports when its job ends, small enough for a pod's termination message
//! (Kubernetes keeps at most 4096 bytes of it). The operator copies it into the ComputeJob's
//! status; `kiln run` and the driver's `--summary` file carry the full summary instead.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kubernetes truncates termination messages beyond this many bytes.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The end of a job, as the driver reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverReport {
    /// Whether the job succeeded.
    pub succeeded: bool,
    /// Why it failed: a PascalCase reason (`InvalidSpec`, `Planning`, `Data`,
    /// `ExecutorLossBudget`, `TaskAttempts`, `StageAttempts`, `Output`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The error, for people (truncated to fit the termination message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Wall time of the job in milliseconds.
    pub elapsed_ms: u64,
    /// Stages run.
    pub stages: u64,
    /// Partitions over all stages.
    pub tasks: u64,
    /// Task attempts launched.
    pub attempts: u64,
    /// Attempts that recomputed a lost partition.
    pub partitions_recomputed: u64,
    /// Executors lost, by reason (`Preempted`, `Failed`, `HeartbeatTimeout`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub executors_lost: BTreeMap<String, u64>,
    /// Rows the job wrote (or returned, without an output).
    pub rows: u64,
    /// Files written.
    pub files: u64,
    /// Where the output went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uri: Option<String>,
}

impl DriverReport {
    /// The report as JSON no longer than [`TERMINATION_MESSAGE_LIMIT`]: the message is cut
    /// (on a character boundary) until it fits.
    pub fn to_termination_message(&self) -> String {
        let mut report = self.clone();
        loop {
            let json = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
            if json.len() <= TERMINATION_MESSAGE_LIMIT {
                return json;
            }
            let message = report.message.take().unwrap_or_default();
            let over = json.len() - TERMINATION_MESSAGE_LIMIT + 4;
            let mut keep = message.len().saturating_sub(over);
            while keep > 0 && !message.is_char_boundary(keep) {
                keep -= 1;
            }
            if keep == 0 {
                report.output_uri = None;
            } else {
                report.message = Some(format!("{}…", &message[..keep]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_to_fit() {
        let report = DriverReport {
            reason: Some("Data".into()),
            message: Some("é".repeat(5000)),
            ..Default::default()
        };
        let json = report.to_termination_message();
        assert!(json.len() <= TERMINATION_MESSAGE_LIMIT, "{}", json.len());
        let back: DriverReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reason.as_deref(), Some("Data"));
        assert!(back.message.unwrap().ends_with('…'));
    }
}
