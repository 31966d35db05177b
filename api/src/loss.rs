//! Why an executor is gone: shared by the driver, which counts and reports losses, and the
//! operator, which reports the losses it sees to the driver and replaces the pods.

/// Why an executor is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LossReason {
    /// Spot reclaim, eviction, node drain or node loss: not the job's fault, not counted
    /// against `maxTaskAttempts`.
    Preempted,
    /// The executor failed, was killed, or its pod was deleted.
    Failed,
    /// It stopped sending heartbeats and the driver declared it lost (a node that died
    /// without a word, a process that hangs).
    HeartbeatTimeout,
}

impl LossReason {
    /// Every reason.
    pub const ALL: [LossReason; 3] = [
        LossReason::Preempted,
        LossReason::Failed,
        LossReason::HeartbeatTimeout,
    ];

    /// Its name in summaries, status, metrics and RPCs.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Preempted => "Preempted",
            LossReason::Failed => "Failed",
            LossReason::HeartbeatTimeout => "HeartbeatTimeout",
        }
    }

    /// The reason named `name` in an RPC, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for r in LossReason::ALL {
            assert_eq!(LossReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(LossReason::parse("preempted"), None);
    }
}
