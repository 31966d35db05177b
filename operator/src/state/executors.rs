//! Executors of a running job: adopting pods created before a lost status write, finding
//! the lost ones, telling the driver, replacing them with back-off, enforcing the budgets.
use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kiln_api::crd::ROLE_EXECUTOR;
use kiln_api::{FailureReason, JobPhase};

use super::{Action, Child, Run, elapsed};
use crate::children::{executor_index, executor_name};
use crate::pods::{avoiding_nodes, executor_pod};
use crate::podstate::{self, LossReason};

impl Run<'_, '_> {
    pub(super) fn executors(&mut self, driver_ip: &str) {
        let job = self.name();
        let cfg = self.config().clone();
        let mut active = self.old.executors.pods.clone();
        let mut next = self.old.executors.next_index;
        for p in self.pods_of(ROLE_EXECUTOR) {
            let name = podstate::name(p);
            if let Some(i) = executor_index(&job, name)
                && i >= self.old.executors.next_index
                && !active.iter().any(|a| a == name)
                && !podstate::is_terminal(p)
                && !podstate::is_deleting(p)
            {
                active.push(name.to_string());
                next = next.max(i + 1);
            }
        }
        let mut live = Vec::new();
        let mut running = 0;
        let mut finishing = false;
        // Nodes a replacement must not go to: those of executors lost to a dead or silent
        // node, which the scheduler may still think Ready.
        let mut suspect = BTreeSet::new();
        for name in active {
            let pod = self
                .obs
                .pods
                .iter()
                .find(|p| podstate::name(p) == name)
                .cloned();
            let Some(pod) = pod else {
                self.lose(
                    &name,
                    None,
                    LossReason::Failed,
                    false,
                    "its pod was deleted".into(),
                    driver_ip,
                );
                continue;
            };
            let node_lost = self.node_lost(&pod);
            if podstate::phase(&pod) == "Succeeded" {
                // Executors exit 0 when the driver tells them the job is over. Still tracked:
                // a later look before the driver's own end must not take the job for one
                // short of executors.
                finishing = true;
                live.push(name);
            } else if node_lost || podstate::is_disrupted(&pod) {
                if node_lost {
                    suspect.extend(podstate::node(&pod).map(str::to_string));
                }
                let detail = if node_lost {
                    format!("its node {} is lost", podstate::node(&pod).unwrap_or("?"))
                } else {
                    "it was disrupted (evicted or preempted)".into()
                };
                self.lose(
                    &name,
                    Some(&pod),
                    LossReason::Preempted,
                    false,
                    detail,
                    driver_ip,
                );
            } else if self.driver_gave_up_on(&name) {
                suspect.extend(podstate::node(&pod).map(str::to_string));
                // The driver already gave up on it: replace it now rather than run short
                // until the control plane notices (its node may be gone without a word).
                self.lose(
                    &name,
                    Some(&pod),
                    LossReason::HeartbeatTimeout,
                    false,
                    "the driver stopped hearing from it".into(),
                    driver_ip,
                );
            } else if podstate::is_deleting(&pod) {
                self.lose(
                    &name,
                    Some(&pod),
                    LossReason::Failed,
                    false,
                    "it was deleted".into(),
                    driver_ip,
                );
            } else if podstate::phase(&pod) == "Failed" {
                let min = Duration::from_secs(cfg.min_executor_uptime_seconds);
                let crash = podstate::run_time(&pod).is_none_or(|t| t < min);
                let detail = match podstate::terminated(&pod) {
                    Some(t) => format!(
                        "it exited with code {}{}",
                        t.exit_code,
                        t.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                    None => format!(
                        "its pod failed ({})",
                        pod.status
                            .as_ref()
                            .and_then(|s| s.reason.as_deref())
                            .unwrap_or("unknown")
                    ),
                };
                self.lose(
                    &name,
                    Some(&pod),
                    LossReason::Failed,
                    crash,
                    detail,
                    driver_ip,
                );
            } else if let Some((reason, message)) = podstate::stuck(&pod) {
                self.stuck(&pod, &reason, &message);
                if self.status.phase == JobPhase::Failed {
                    return;
                }
                live.push(name);
            } else {
                running += u32::from(podstate::is_running(&pod));
                live.push(name);
            }
        }
        let spec = &self.obs.job.spec;
        let executors = &self.status.executors;
        if executors.lost > spec.failure_policy.max_executor_losses {
            let message = format!(
                "{} executors lost, more than failurePolicy.maxExecutorLosses ({})",
                executors.lost, spec.failure_policy.max_executor_losses
            );
            self.fail(FailureReason::ExecutorLossesExceeded, message);
            return;
        }
        if executors.consecutive_crashes >= cfg.crash_loop_limit {
            let message = format!(
                "{} executor pods in a row failed within {}s of starting; last: {}",
                executors.consecutive_crashes,
                cfg.min_executor_uptime_seconds,
                self.status.recovery.last_loss.clone().unwrap_or_default()
            );
            self.fail(FailureReason::ExecutorsCrashLooping, message);
            return;
        }
        let desired = spec.executors.count as usize;
        let need = if finishing {
            0
        } else {
            desired.saturating_sub(live.len())
        };
        if need > 0 {
            let crashes = self.status.executors.consecutive_crashes;
            let backoff = if crashes <= 1 {
                Duration::ZERO
            } else {
                Duration::from_secs(
                    (1u64 << (crashes - 1).min(20)).min(cfg.max_replacement_backoff_seconds),
                )
            };
            let waited = self
                .status
                .recovery
                .last_loss_time
                .as_ref()
                .map(|t| elapsed(self.obs.now, t))
                .unwrap_or(Duration::MAX);
            if waited < backoff {
                self.requeue(backoff - waited);
            } else {
                let replacing =
                    !self.old.executors.pods.is_empty() || self.status.executors.lost > 0;
                for _ in 0..need {
                    let pod =
                        avoiding_nodes(executor_pod(self.pod_ctx(), next, driver_ip), &suspect);
                    self.plan
                        .actions
                        .push(Action::Apply(Child::Pod(Box::new(pod))));
                    live.push(executor_name(&job, next));
                    next += 1;
                    if replacing {
                        self.plan.replacements += 1;
                    }
                }
            }
        }
        self.status.executors.pods = live;
        self.status.executors.next_index = next;
        self.status.executors.running = running;
    }

    fn lose(
        &mut self,
        name: &str,
        pod: Option<&Pod>,
        reason: LossReason,
        crash: bool,
        detail: String,
        driver_ip: &str,
    ) {
        let occurred = pod
            .and_then(podstate::ended_at)
            .filter(|t| *t <= self.obs.now)
            .unwrap_or(self.obs.now);
        self.plan.actions.push(Action::ExecutorLost {
            executor: name.to_string(),
            reason,
            driver_ip: driver_ip.to_string(),
            occurred_unix_ms: u64::try_from(occurred.as_millisecond()).unwrap_or_default(),
        });
        if let Some(p) = pod {
            let node_lost = self.node_lost(p);
            self.delete(p, node_lost);
        }
        let e = &mut self.status.executors;
        e.lost += 1;
        *e.lost_by_reason
            .entry(reason.as_str().to_string())
            .or_default() += 1;
        e.consecutive_crashes = if crash { e.consecutive_crashes + 1 } else { 0 };
        let r = &mut self.status.recovery;
        r.last_loss = Some(name.to_string());
        r.last_loss_reason = Some(reason.as_str().to_string());
        r.last_loss_time = Some(Time(self.obs.now));
        self.plan.losses.push((name.to_string(), reason));
        self.event(
            true,
            "ExecutorLost",
            format!("executor pod {name} lost ({}): {detail}", reason.as_str()),
        );
    }
}
