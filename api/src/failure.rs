//! Why a job failed: one vocabulary for the driver's report, the operator's `Failed`
//! condition and Events, metrics and `kiln run`. The driver and the operator share this enum,
//! so the reason a driver reports is the reason the ComputeJob's status shows.
use serde::{Deserialize, Serialize};

/// Why a job failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// The job spec breaks a rule (each problem names its field), or the job file cannot be
    /// read or parsed.
    InvalidSpec,
    /// An input cannot be registered: a bad URI, files that cannot be read, a schema that
    /// cannot be inferred.
    InvalidInput,
    /// A step's SQL does not parse or plan, or an iterative step's `until` is not one boolean.
    InvalidSql,
    /// A task failed on its own data (a cast, a corrupt file): retrying cannot help.
    TaskDataError,
    /// A task failed `failurePolicy.maxTaskAttempts` times.
    TaskAttemptsExceeded,
    /// A stage had to be resubmitted more than `failurePolicy.maxStageAttempts` times.
    StageAttemptsExceeded,
    /// More executors were lost than `failurePolicy.maxExecutorLosses` allows.
    ExecutorLossesExceeded,
    /// Executor pods keep crashing before they register.
    ExecutorsCrashLooping,
    /// `output.mode` is `ErrorIfExists` and the output location already holds another job's
    /// files.
    OutputExists,
    /// Writing or committing the output failed.
    OutputWriteFailed,
    /// A job without `output` returned more than `maxResultBytes`.
    ResultTooLarge,
    /// The driver ended without a report, or could not start.
    DriverFailed,
    /// The driver pod was lost (its node, an eviction, a kill) more often than the operator
    /// restarts it.
    DriverLost,
    /// A pod's image cannot be pulled (a wrong name or tag, missing pull credentials) within
    /// the operator's grace period.
    ImagePullFailed,
    /// A pod's container cannot be created (a missing Secret or ConfigMap it refers to, a bad
    /// setting) within the operator's grace period.
    ContainerConfigError,
    /// The job ran longer than `activeDeadlineSeconds`.
    DeadlineExceeded,
    /// Its pods cannot be placed: a request no node can hold, or the scheduler reported them
    /// unschedulable for longer than `failurePolicy.unschedulableSeconds`.
    Unschedulable,
    /// Anything else: a bug or an environment Kiln does not expect; the message says what.
    Internal,
}

impl FailureReason {
    /// Every reason.
    pub const ALL: [FailureReason; 18] = [
        FailureReason::InvalidSpec,
        FailureReason::InvalidInput,
        FailureReason::InvalidSql,
        FailureReason::TaskDataError,
        FailureReason::TaskAttemptsExceeded,
        FailureReason::StageAttemptsExceeded,
        FailureReason::ExecutorLossesExceeded,
        FailureReason::ExecutorsCrashLooping,
        FailureReason::OutputExists,
        FailureReason::OutputWriteFailed,
        FailureReason::ResultTooLarge,
        FailureReason::DriverFailed,
        FailureReason::DriverLost,
        FailureReason::ImagePullFailed,
        FailureReason::ContainerConfigError,
        FailureReason::DeadlineExceeded,
        FailureReason::Unschedulable,
        FailureReason::Internal,
    ];

    /// Its PascalCase name in conditions, Events, metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidSpec => "InvalidSpec",
            FailureReason::InvalidInput => "InvalidInput",
            FailureReason::InvalidSql => "InvalidSql",
            FailureReason::TaskDataError => "TaskDataError",
            FailureReason::TaskAttemptsExceeded => "TaskAttemptsExceeded",
            FailureReason::StageAttemptsExceeded => "StageAttemptsExceeded",
            FailureReason::ExecutorLossesExceeded => "ExecutorLossesExceeded",
            FailureReason::ExecutorsCrashLooping => "ExecutorsCrashLooping",
            FailureReason::OutputExists => "OutputExists",
            FailureReason::OutputWriteFailed => "OutputWriteFailed",
            FailureReason::ResultTooLarge => "ResultTooLarge",
            FailureReason::DriverFailed => "DriverFailed",
            FailureReason::DriverLost => "DriverLost",
            FailureReason::ImagePullFailed => "ImagePullFailed",
            FailureReason::ContainerConfigError => "ContainerConfigError",
            FailureReason::DeadlineExceeded => "DeadlineExceeded",
            FailureReason::Unschedulable => "Unschedulable",
            FailureReason::Internal => "Internal",
        }
    }

    /// The reason named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether running the same job again unchanged could succeed (the environment, not the
    /// job, was at fault).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureReason::TaskAttemptsExceeded
                | FailureReason::StageAttemptsExceeded
                | FailureReason::ExecutorLossesExceeded
                | FailureReason::ExecutorsCrashLooping
                | FailureReason::DriverFailed
                | FailureReason::DriverLost
                | FailureReason::Internal
        )
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.as_str()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<FailureReason>(&json).unwrap(), r);
        }
        assert_eq!(FailureReason::parse("ExecutorLossBudget"), None);
    }

    #[test]
    fn all_lists_every_reason_in_declaration_order() {
        for (i, r) in FailureReason::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r}");
        }
        assert_eq!(
            FailureReason::Internal as usize + 1,
            FailureReason::ALL.len(),
            "Internal stays last"
        );
    }
}
