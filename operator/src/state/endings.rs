//! The ends of a job's life (success, failure), suspension, the TTL of a finished job, and the
//! conditions every reconcile leaves behind.
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kiln_api::crd::{
    CONDITION_DEGRADED, CONDITION_FAILED, CONDITION_PROGRESSING, CONDITION_READY,
    CONDITION_SPOT_FALLBACK, CONDITION_SUCCEEDED, ComputeJobStatus, JobResult, ROLE_DRIVER,
    ROLE_EXECUTOR,
};
use kiln_api::{DriverReport, FailureReason, JobPhase};

use super::{Action, Outlook, Plan, Run, elapsed};
use crate::podstate;

impl Run<'_, '_> {
    pub(super) fn suspend(&mut self) {
        let pods: Vec<Pod> = self.obs.pods.to_vec();
        for p in &pods {
            let force = self.node_lost(p) && podstate::is_deleting(p);
            self.delete(p, force);
        }
        if self.old.phase != JobPhase::Suspended {
            self.event(
                false,
                "Suspended",
                "spec.suspend is set: the job's pods are deleted".into(),
            );
        }
        self.status.phase = JobPhase::Suspended;
        self.status.executors.pods.clear();
        self.status.executors.running = 0;
        self.state = Some(Outlook::Suspended);
    }

    fn end(&mut self) {
        self.delete_executors();
        self.status.completion_time = Some(self.now());
        self.state = Some(Outlook::Done);
        self.ttl();
    }

    pub(super) fn succeed(&mut self, report: Option<DriverReport>) {
        let result = report.map(JobResult::from).unwrap_or(JobResult {
            succeeded: true,
            ..Default::default()
        });
        let message = format!(
            "{} rows{} in {:.1}s",
            result.rows,
            result
                .output_uri
                .as_deref()
                .map(|u| format!(" written to {u}"))
                .unwrap_or_default(),
            result.elapsed_ms as f64 / 1000.0
        );
        let p = &mut self.status.progress;
        p.stages = result.stages as u32;
        p.stages_done = result.stages as u32;
        p.tasks = result.tasks;
        p.tasks_done = result.tasks;
        p.summary = format!("{}/{}", result.tasks, result.tasks);
        let recovery = &mut self.status.recovery;
        recovery.partitions_recomputed = result.partitions_recomputed;
        recovery.partitions_migrated = result.partitions_migrated;
        recovery.partitions_lost = result.partitions_lost;
        self.status.result = Some(result);
        self.status.phase = JobPhase::Succeeded;
        let (generation, now) = (self.obs.job.metadata.generation, self.now());
        let s = &mut self.status;
        s.set_condition(
            CONDITION_SUCCEEDED,
            true,
            "Completed",
            &message,
            generation,
            &now,
        );
        s.set_condition(CONDITION_FAILED, false, "Completed", "", generation, &now);
        self.event(false, "Succeeded", message);
        self.end();
    }

    pub(super) fn fail(&mut self, reason: FailureReason, message: String) {
        let driver = self.pods_of(ROLE_DRIVER).next().cloned();
        if let Some(driver) = driver
            && !podstate::is_terminal(&driver)
        {
            let force = self.node_lost(&driver) && podstate::is_deleting(&driver);
            self.delete(&driver, force);
        }
        self.status.phase = JobPhase::Failed;
        self.plan.failure = Some(reason);
        let (generation, now) = (self.obs.job.metadata.generation, self.now());
        let s = &mut self.status;
        let name = reason.as_str();
        s.set_condition(CONDITION_FAILED, true, name, &message, generation, &now);
        s.set_condition(CONDITION_SUCCEEDED, false, name, "", generation, &now);
        self.event(true, name, message);
        self.end();
    }

    /// An already finished job: clean up stragglers, honour its TTL, never rerun it.
    pub(super) fn finished(&mut self) {
        let pods: Vec<Pod> = self.pods_of(ROLE_EXECUTOR).cloned().collect();
        for p in &pods {
            self.delete(p, false);
        }
        self.state = Some(Outlook::Done);
        self.ttl();
    }

    fn ttl(&mut self) {
        let (Some(ttl), Some(done)) = (
            self.obs.job.spec.ttl_seconds_after_finished,
            self.status.completion_time.clone(),
        ) else {
            return;
        };
        let ttl = Duration::from_secs(ttl.into());
        let since = elapsed(self.obs.now, &done);
        if since >= ttl {
            self.plan.actions.push(Action::DeleteJob);
        } else {
            self.requeue(ttl - since);
        }
    }

    pub(super) fn finish(mut self) -> Plan {
        let spec = &self.obs.job.spec;
        let generation = self.obs.job.metadata.generation;
        let now = self.now();
        // Every condition this pass sets carries the same generation and time.
        let set = |s: &mut ComputeJobStatus, type_: &str, on: bool, reason: &str, message: &str| {
            s.set_condition(type_, on, reason, message, generation, &now);
        };
        let s = &mut self.status;
        s.observed_generation = generation;
        s.executors.desired = spec.executors.count;
        s.executors.summary = format!("{}/{}", s.executors.running, s.executors.desired);
        let desired = s.executors.desired;
        if spec.executors.spot_fallback.is_some() && !s.phase.is_finished() {
            let on = &s.executors.on_demand;
            let (reason, message) = if on.is_empty() {
                ("OnSpot", String::new())
            } else {
                (
                    "SpotCapacityUnavailable",
                    format!(
                        "spot capacity ran out: {} on on-demand nodes",
                        on.join(", ")
                    ),
                )
            };
            let fallen = !on.is_empty();
            set(s, CONDITION_SPOT_FALLBACK, fallen, reason, &message);
        }
        match self.state.take() {
            Some(Outlook::Done) | None => {
                let phase = s.phase;
                if phase.is_finished() {
                    let reason = if phase == JobPhase::Succeeded {
                        "Completed"
                    } else {
                        "Failed"
                    };
                    set(s, CONDITION_READY, false, reason, "");
                    set(s, CONDITION_PROGRESSING, false, reason, "");
                    set(s, CONDITION_DEGRADED, false, reason, "");
                }
            }
            Some(Outlook::Suspended) => {
                for c in [CONDITION_READY, CONDITION_PROGRESSING, CONDITION_DEGRADED] {
                    set(s, c, false, "Suspended", "spec.suspend is set");
                }
                set(s, CONDITION_SUCCEEDED, false, "Suspended", "");
                set(s, CONDITION_FAILED, false, "Suspended", "");
            }
            Some(Outlook::Pending { reason, message }) => {
                set(s, CONDITION_READY, false, reason, &message);
                set(s, CONDITION_PROGRESSING, true, reason, &message);
                let degraded = reason == "DriverLost";
                set(
                    s,
                    CONDITION_DEGRADED,
                    degraded,
                    if degraded { reason } else { "AsExpected" },
                    if degraded { &message } else { "" },
                );
                set(s, CONDITION_SUCCEEDED, false, "Pending", "");
                set(s, CONDITION_FAILED, false, "Pending", "");
            }
            Some(Outlook::Running) => {
                let running = s.executors.running;
                let ready = running >= desired;
                let ready_msg = format!("{running} of {desired} executors running");
                set(
                    s,
                    CONDITION_READY,
                    ready,
                    if ready {
                        "Running"
                    } else {
                        "ExecutorsStarting"
                    },
                    &ready_msg,
                );
                let degraded = !ready && s.executors.lost > 0;
                let (reason, message) = if degraded {
                    let last = format!(
                        "{ready_msg}; last lost: {} ({})",
                        s.recovery.last_loss.as_deref().unwrap_or("?"),
                        s.recovery.last_loss_reason.as_deref().unwrap_or("?")
                    );
                    ("Recovering", last)
                } else {
                    ("Running", s.progress.summary.clone())
                };
                set(s, CONDITION_PROGRESSING, true, reason, &message);
                set(
                    s,
                    CONDITION_DEGRADED,
                    degraded,
                    if degraded {
                        "ExecutorLost"
                    } else {
                        "AsExpected"
                    },
                    if degraded { &message } else { "" },
                );
                set(s, CONDITION_SUCCEEDED, false, "Running", "");
                set(s, CONDITION_FAILED, false, "Running", "");
            }
        }
        if self.old.phase != JobPhase::Running && self.status.phase == JobPhase::Running {
            let node = self
                .pods_of(ROLE_DRIVER)
                .next()
                .and_then(podstate::node)
                .unwrap_or("?")
                .to_string();
            self.event(false, "Running", format!("driver runs on node {node}"));
        }
        self.plan.status = self.status;
        self.plan
    }
}
