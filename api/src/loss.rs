//! Why an executor went, in one vocabulary for the driver, the operator, metrics and
//! summaries; and which of those reasons are the job's fault.
use serde::{Deserialize, Serialize};

/// Why an executor was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LossReason {
    /// Spot reclaim, preemption or eviction (a `DisruptionTarget` condition, a drain that
    /// killed it before its blocks moved): not the job's fault.
    Preempted,
    /// The executor crashed, exited non-zero, or its pod was deleted.
    Failed,
    /// It stopped sending heartbeats while its node stayed healthy (a process that hangs).
    /// The driver takes a silence for this until the operator, which sees the node, says
    /// otherwise.
    HeartbeatTimeout,
    /// It was decommissioned on notice (SIGTERM, eviction, a disruption taint on its node)
    /// and left after its blocks moved to other executors: not the job's fault.
    Drained,
    /// Its node died or stopped reporting: not the job's fault.
    NodeLost,
    /// The kernel killed it for exceeding its memory limit: raise `executors.memory`.
    #[serde(rename = "OOMKilled")]
    OomKilled,
}

impl LossReason {
    /// Every reason.
    pub const ALL: [LossReason; 6] = [
        LossReason::Preempted,
        LossReason::Failed,
        LossReason::HeartbeatTimeout,
        LossReason::Drained,
        LossReason::NodeLost,
        LossReason::OomKilled,
    ];

    /// Its name in summaries, status, metrics and RPCs.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Preempted => "Preempted",
            LossReason::Failed => "Failed",
            LossReason::HeartbeatTimeout => "HeartbeatTimeout",
            LossReason::Drained => "Drained",
            LossReason::NodeLost => "NodeLost",
            LossReason::OomKilled => "OOMKilled",
        }
    }

    /// The reason named `name` in an RPC, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether a loss for this reason counts against the job's failure budgets
    /// (`maxExecutorLosses`, task and stage attempts). Reclaims, evictions, drains and lost
    /// nodes never do: they are the price of spot capacity, not the job's fault.
    pub fn counts_against_budget(self) -> bool {
        matches!(
            self,
            LossReason::Failed | LossReason::HeartbeatTimeout | LossReason::OomKilled
        )
    }
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for r in LossReason::ALL {
            assert_eq!(LossReason::parse(r.as_str()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(LossReason::parse("preempted"), None);
    }

    #[test]
    fn only_the_jobs_own_failures_count() {
        let counted: Vec<_> = LossReason::ALL
            .into_iter()
            .filter(|r| r.counts_against_budget())
            .collect();
        assert_eq!(
            counted,
            [
                LossReason::Failed,
                LossReason::HeartbeatTimeout,
                LossReason::OomKilled
            ]
        );
    }
}
