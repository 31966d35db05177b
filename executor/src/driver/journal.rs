//! The driver's journal: the facts a replacement driver needs that no executor's block
//! store can tell it. Which output partitions are committed (their files live in the
//! output's staging area, not on any executor), how many stages earlier replacements took
//! over, and the epoch of the driver that wrote it.
//!
//! Where it lives: on the executors. The driver sends it to every executor with its next
//! poll answer whenever it changes; an executor keeps the newest it got and hands it to a
//! replacement driver when it registers. The executors outlive the driver (spot nodes
//! reclaimed at the same moment as the driver's on-demand node are the exception, and cost
//! only the recompute of what they held), job pods need no Kubernetes API access for it,
//! and the operator stays out of the data path. Where the blocks live is not journaled at
//! all: each executor lists what it holds when it registers, which is the truth by
//! construction.
use serde::{Deserialize, Serialize};

/// One committed output partition: the attempt whose files the job commit moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CommitRecord {
    /// The output stage.
    pub stage: u32,
    /// Its plan's fingerprint: a replacement adopts the record only for the same plan.
    pub fingerprint: u64,
    pub partition: u32,
    /// The driver run that handed the attempt out (its files stage under it).
    pub run_id: String,
    pub attempt: u32,
    /// What the attempt wrote.
    pub rows: u64,
    pub files: u64,
}

/// The journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Journal {
    /// The epoch of the driver that wrote it.
    pub epoch: u64,
    /// Stages replacement drivers took over complete, the writer included.
    pub stages_resumed: u64,
    /// Output partitions committed so far.
    pub commits: Vec<CommitRecord>,
}

impl Journal {
    /// The journal as an executor keeps it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a journal always serializes")
    }

    /// Reads a journal an executor kept; `None` for none or one this version cannot read.
    pub fn decode(bytes: &[u8]) -> Option<Journal> {
        if bytes.is_empty() {
            return None;
        }
        serde_json::from_slice(bytes)
            .inspect_err(
                |e| tracing::warn!(error = %e, "an executor's journal is unreadable; ignored"),
            )
            .ok()
    }
}

/// A stage plan's fingerprint: FNV-1a over its description, the same in every process of
/// every run of the same Kiln (unlike the standard library's hasher, whose output is not
/// promised to stay put).
pub(crate) fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_round_trip_and_garbage_reads_as_none() {
        let j = Journal {
            epoch: 2,
            stages_resumed: 3,
            commits: vec![CommitRecord {
                stage: 4,
                fingerprint: fingerprint("plan"),
                partition: 1,
                run_id: "r".into(),
                attempt: 0,
                rows: 10,
                files: 1,
            }],
        };
        assert_eq!(Journal::decode(&j.encode()), Some(j));
        assert_eq!(Journal::decode(b""), None);
        assert_eq!(Journal::decode(b"{not json"), None);
    }

    #[test]
    fn fingerprints_are_fixed_and_tell_plans_apart() {
        // FNV-1a's published value for "a": a change of hasher would break resumes across
        // executors and drivers built separately.
        assert_eq!(fingerprint("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fingerprint("stage 1"), fingerprint("stage 2"));
    }
}
