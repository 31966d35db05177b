//! What a driver reports when its job ends, small enough for a pod's termination message
//! (Kubernetes keeps at most 4096 bytes of it). The operator copies it into the ComputeJob's
//! status; `kiln run` and the driver's `--summary` file carry the full summary instead.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::FailureReason;

/// Kubernetes truncates termination messages beyond this many bytes.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The end of a job, as the driver reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverReport {
    /// Whether the job succeeded.
    pub succeeded: bool,
    /// Why it failed, as its PascalCase name ([`FailureReason::as_str`]). A name this version
    /// does not know (a driver of another Kiln version) reads as
    /// [`FailureReason::Internal`], so the rest of the report still counts.
    #[serde(
        default,
        deserialize_with = "reason_or_internal",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<FailureReason>,
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
    /// Task outputs moved off decommissioned executors instead of being recomputed.
    #[serde(default)]
    pub partitions_migrated: u64,
    /// Task outputs still needed that were lost with executors, so recomputed.
    #[serde(default)]
    pub partitions_lost: u64,
    /// Executors lost, by reason (a [`crate::LossReason`] name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub executors_lost: BTreeMap<String, u64>,
    /// Rows the job wrote (or returned, without an output).
    pub rows: u64,
    /// Files written.
    pub files: u64,
    /// Where the output went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uri: Option<String>,
    /// Driver losses the job survived (replacement drivers that took over).
    #[serde(default)]
    pub driver_losses: u32,
    /// Stages replacement drivers took over complete, without rerunning them.
    #[serde(default)]
    pub stages_resumed: u64,
}

/// Reads a failure reason, taking a name this version does not know for `Internal`.
fn reason_or_internal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<FailureReason>, D::Error> {
    let name = Option::<String>::deserialize(d)?;
    Ok(name.map(|n| FailureReason::parse(&n).unwrap_or(FailureReason::Internal)))
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
            reason: Some(FailureReason::TaskDataError),
            message: Some("é".repeat(5000)),
            ..Default::default()
        };
        let json = report.to_termination_message();
        assert!(json.len() <= TERMINATION_MESSAGE_LIMIT, "{}", json.len());
        assert!(json.contains(r#""reason":"TaskDataError""#), "{json}");
        let back: DriverReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reason, Some(FailureReason::TaskDataError));
        assert!(back.message.unwrap().ends_with('…'));
    }

    #[test]
    fn reasons_travel_by_name_and_unknown_names_read_as_internal() {
        for r in FailureReason::ALL {
            let report = DriverReport {
                reason: Some(r),
                ..Default::default()
            };
            let json = report.to_termination_message();
            assert!(
                json.contains(&format!(r#""reason":"{}""#, r.as_str())),
                "{json}"
            );
            assert_eq!(serde_json::from_str::<DriverReport>(&json).unwrap(), report);
        }
        let ok = DriverReport {
            succeeded: true,
            ..Default::default()
        };
        let json = ok.to_termination_message();
        assert!(!json.contains("reason"), "{json}");
        assert_eq!(serde_json::from_str::<DriverReport>(&json).unwrap(), ok);
        let old = r#"{"succeeded":false,"reason":"Planning","message":"no table","elapsedMs":1,"stages":0,"tasks":0,"attempts":0,"partitionsRecomputed":0,"rows":0,"files":0}"#;
        let back: DriverReport = serde_json::from_str(old).unwrap();
        assert_eq!(
            (back.reason, back.message.as_deref()),
            (Some(FailureReason::Internal), Some("no table"))
        );
        let null = r#"{"succeeded":false,"reason":null,"elapsedMs":1,"stages":0,"tasks":0,"attempts":0,"partitionsRecomputed":0,"rows":0,"files":0}"#;
        assert_eq!(
            serde_json::from_str::<DriverReport>(null).unwrap().reason,
            None
        );
    }
}
