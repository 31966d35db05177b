//! Faults an executor injects on purpose, for tests of the paths that recover from lost
//! messages (`KILN_FAULTS=drop-report=N,lose-report=N`), and of those that need a job to
//! still be running when they strike (`task-delay=MS`).
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{Error, Result};

/// Faults to inject, for tests of the paths that recover from lost messages.
#[derive(Debug, Default)]
pub struct Faults {
    /// Report sends to drop on the wire (each is sent again).
    pub(super) drop_reports: AtomicU32,
    /// Reports to lose outright: the executor forgets the attempt as if its report had been
    /// acknowledged, and only the driver's reconciliation can notice.
    pub(super) lose_reports: AtomicU32,
    /// A pause before every task: a small job lasts long enough for a test to act on it
    /// mid-run.
    pub(super) task_delay: Duration,
}

impl Faults {
    /// Reads `drop-report=N,lose-report=N,task-delay=MS` (any of them, or empty for none).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut faults = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |reason: &str| Error::Driver(format!("--faults `{item}`: {reason}"));
            let (name, n) = item
                .split_once('=')
                .ok_or_else(|| bad("expected NAME=COUNT"))?;
            let n: u32 = n.parse().map_err(|_| bad("the count is not a number"))?;
            match name {
                "drop-report" => faults.drop_reports.store(n, Ordering::Relaxed),
                "lose-report" => faults.lose_reports.store(n, Ordering::Relaxed),
                "task-delay" => faults.task_delay = Duration::from_millis(n.into()),
                _ => {
                    return Err(bad(
                        "known faults are drop-report, lose-report and task-delay",
                    ));
                }
            }
        }
        Ok(faults)
    }

    pub(super) fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_name_themselves() {
        let f = Faults::parse("drop-report=2, task-delay=30").unwrap();
        assert_eq!(f.drop_reports.load(Ordering::Relaxed), 2);
        assert_eq!(f.task_delay, Duration::from_millis(30));
        assert!(Faults::take(&f.drop_reports) && Faults::take(&f.drop_reports));
        assert!(!Faults::take(&f.drop_reports));
        for bad in ["slow=1", "drop-report", "lose-report=x"] {
            let e = Faults::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
