//! The operator's Prometheus metrics: reconciles and their duration, errors by category, jobs
//! by phase, failed jobs by reason, executor losses by reason and how long a lost executor
//! takes to be replaced.
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_api::{FailureReason, JobPhase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set with an error category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    /// [`crate::Error::category`] or a driver call's category.
    pub category: String,
}

/// Label set with a job phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// The phase.
    pub phase: String,
}

/// Label set with why a job failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// [`FailureReason::as_str`].
    pub reason: String,
}

/// Label set with a loss reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `Preempted` or `Failed`.
    pub reason: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: Counter,
    /// How long reconciles took.
    pub reconcile_duration: Histogram,
    /// Failed reconciles and driver calls, by category.
    pub errors: Family<CategoryLabel, Counter>,
    /// ComputeJobs by phase.
    pub jobs: Family<PhaseLabel, Gauge>,
    /// ComputeJobs failed, by reason.
    pub job_failures: Family<FailureLabel, Counter>,
    /// Executor pods lost, by reason.
    pub executor_losses: Family<ReasonLabel, Counter>,
    /// Seconds from seeing an executor lost to its replacement pod being created.
    pub loss_to_replacement: Histogram,
    phases: Mutex<HashMap<String, JobPhase>>,
    pending_losses: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln_operator");
        let reconciles = Counter::default();
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let errors = Family::<CategoryLabel, Counter>::default();
        let jobs = Family::<PhaseLabel, Gauge>::default();
        let job_failures = Family::<FailureLabel, Counter>::default();
        let executor_losses = Family::<ReasonLabel, Counter>::default();
        let loss_to_replacement =
            Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]);
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took",
            reconcile_duration.clone(),
        );
        registry.register(
            "errors",
            "Failed reconciles and driver calls, by category",
            errors.clone(),
        );
        registry.register("jobs", "ComputeJobs by phase", jobs.clone());
        registry.register(
            "job_failures",
            "ComputeJobs failed, by reason",
            job_failures.clone(),
        );
        registry.register(
            "executor_losses",
            "Executor pods lost, by reason",
            executor_losses.clone(),
        );
        registry.register(
            "loss_to_replacement_seconds",
            "Seconds from seeing an executor lost to its replacement pod being created",
            loss_to_replacement.clone(),
        );
        for phase in JobPhase::ALL {
            let _ = jobs.get_or_create(&PhaseLabel {
                phase: phase.as_str().into(),
            });
        }
        for reason in FailureReason::ALL {
            let _ = job_failures.get_or_create(&FailureLabel {
                reason: reason.as_str().into(),
            });
        }
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            jobs,
            job_failures,
            executor_losses,
            loss_to_replacement,
            phases: Mutex::new(HashMap::new()),
            pending_losses: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts an error of `category`.
    pub fn error(&self, category: &str) {
        self.errors
            .get_or_create(&CategoryLabel {
                category: category.into(),
            })
            .inc();
    }

    /// Records job `key`'s phase (None: the job is gone).
    pub fn set_phase(&self, key: &str, phase: Option<JobPhase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => {
                phases.insert(key.to_string(), p);
            }
            None => {
                phases.remove(key);
                self.pending_losses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
            }
        }
        for p in JobPhase::ALL {
            let n = phases.values().filter(|v| **v == p).count();
            self.jobs
                .get_or_create(&PhaseLabel {
                    phase: p.as_str().into(),
                })
                .set(n as i64);
        }
    }

    /// Counts a job that failed for `reason`.
    pub fn job_failed(&self, reason: FailureReason) {
        self.job_failures
            .get_or_create(&FailureLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Counts an executor loss by reason.
    pub fn executor_lost(&self, reason: &str) {
        self.executor_losses
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Records that an executor of job `key` stopped counting towards its width at `at`
    /// (lost, given notice, or gone silent): its replacement's latency runs from then.
    pub fn departed(&self, key: &str, at: Instant) {
        self.pending_losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .push_back(at);
    }

    /// Records that a replacement executor pod of job `key` was created now.
    pub fn replaced(&self, key: &str) {
        let mut pending = self
            .pending_losses
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(at) = pending.get_mut(key).and_then(VecDeque::pop_front) {
            self.loss_to_replacement.observe(at.elapsed().as_secs_f64());
        }
    }

    /// Records a reconcile's duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_every_family() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(3));
        m.error("Apply");
        m.set_phase("ns/a", Some(JobPhase::Running));
        m.set_phase("ns/b", Some(JobPhase::Running));
        m.set_phase("ns/b", None);
        m.executor_lost("Preempted");
        m.departed("ns/a", Instant::now());
        m.replaced("ns/a");
        m.job_failed(FailureReason::InvalidSql);
        let text = m.encode();
        for line in [
            "kiln_operator_reconciles_total 1",
            "kiln_operator_errors_total{category=\"Apply\"} 1",
            "kiln_operator_jobs{phase=\"Running\"} 1",
            "kiln_operator_jobs{phase=\"Failed\"} 0",
            "kiln_operator_job_failures_total{reason=\"InvalidSql\"} 1",
            "kiln_operator_job_failures_total{reason=\"DriverFailed\"} 0",
            "kiln_operator_executor_losses_total{reason=\"Preempted\"} 1",
            "kiln_operator_loss_to_replacement_seconds_count 1",
            "kiln_operator_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
