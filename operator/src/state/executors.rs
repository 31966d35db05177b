//! Executors of a running job: adopting pods created before a lost status write, finding
//! the lost ones (and why), draining those given notice, telling the driver, replacing them
//! with back-off, enforcing the budgets, marking those that hold data nobody else has.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kiln_api::crd::ROLE_EXECUTOR;
use kiln_api::{FailureReason, JobPhase};

use super::{Action, Child, Run, elapsed};
use crate::children::{executor_index, executor_name};
use crate::pods::{
    ANNOTATION_DELETION_COST, ANNOTATION_DO_NOT_DISRUPT, ANNOTATION_SAFE_TO_EVICT, avoiding_nodes,
    executor_pod,
};
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
        let mut draining = Vec::new();
        let mut unresponsive = BTreeMap::new();
        for name in active {
            let pod = self
                .obs
                .pods
                .iter()
                .find(|p| podstate::name(p) == name)
                .cloned();
            let was_draining = self.old.executors.draining.contains(&name);
            let Some(pod) = pod else {
                // Gone: drained (the driver says so), or deleted by someone else, which is
                // never the job's fault.
                let (reason, detail) = if self.driver_lost_as(&name, LossReason::Drained) {
                    (LossReason::Drained, "it left after its blocks moved")
                } else if was_draining {
                    (LossReason::Preempted, "it went before its blocks moved")
                } else {
                    (LossReason::Preempted, "its pod was deleted")
                };
                self.lose(&name, None, reason, false, detail.into(), driver_ip);
                continue;
            };
            let node_lost = self.node_lost(&pod);
            let notice = self.notice(&pod);
            if podstate::phase(&pod) == "Succeeded" {
                if was_draining
                    || notice.is_some()
                    || self.driver_lost_as(&name, LossReason::Drained)
                {
                    // Decommissioned: it exits 0 once its blocks have moved.
                    self.lose(
                        &name,
                        Some(&pod),
                        LossReason::Drained,
                        false,
                        "it left after its blocks moved".into(),
                        driver_ip,
                    );
                } else {
                    // Executors exit 0 when the driver tells them the job is over. Still
                    // tracked: a later look before the driver's own end must not take the
                    // job for one short of executors.
                    finishing = true;
                    live.push(name);
                }
            } else if node_lost {
                suspect.extend(podstate::node(&pod).map(str::to_string));
                let detail = format!("its node {} is lost", podstate::node(&pod).unwrap_or("?"));
                self.lose(
                    &name,
                    Some(&pod),
                    LossReason::NodeLost,
                    false,
                    detail,
                    driver_ip,
                );
            } else if podstate::phase(&pod) == "Failed" {
                let min = Duration::from_secs(cfg.min_executor_uptime_seconds);
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
                let reason = if podstate::oom_killed(&pod) {
                    LossReason::OomKilled
                } else if was_draining || notice.is_some() {
                    // Killed by its reclaim before its blocks moved.
                    LossReason::Preempted
                } else {
                    LossReason::Failed
                };
                let crash = reason.counts_against_budget()
                    && podstate::run_time(&pod).is_none_or(|t| t < min);
                self.lose(&name, Some(&pod), reason, crash, detail, driver_ip);
            } else if let Some(cause) = notice {
                // Given notice: the driver moves the blocks only it holds while it still
                // runs (its pod's SIGTERM says the same to the executor itself), and its
                // replacement starts now, away from a node that is going.
                if podstate::is_disrupted(&pod) || !podstate::is_deleting(&pod) {
                    suspect.extend(podstate::node(&pod).map(str::to_string));
                }
                if !was_draining {
                    self.plan.departures += 1;
                    self.event(
                        false,
                        "ExecutorDraining",
                        format!(
                            "executor pod {name} was given notice ({cause}): its blocks move to other executors and a replacement starts"
                        ),
                    );
                }
                // Said until the driver lists it draining (a call can fail).
                if !self
                    .obs
                    .progress
                    .is_some_and(|p| p.draining.contains(&name))
                {
                    let occurred = podstate::notice_at(&pod)
                        .filter(|t| *t <= self.obs.now)
                        .map_or(0, |t| u64::try_from(t.as_millisecond()).unwrap_or_default());
                    self.plan.actions.push(Action::Decommission {
                        executor: name.clone(),
                        cause,
                        driver_ip: driver_ip.to_string(),
                        occurred_unix_ms: occurred,
                    });
                }
                draining.push(name);
            } else if self.driver_lost_as(&name, LossReason::HeartbeatTimeout) {
                suspect.extend(podstate::node(&pod).map(str::to_string));
                // The driver already gave up on it: replace it now rather than run short
                // until the control plane notices. Its node may be gone without a word yet
                // (a free NodeLost, above, once the control plane says so); only a silence
                // that outlasts the settle window is the executor's own (a hung process).
                let since = self
                    .old
                    .executors
                    .unresponsive
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| self.now());
                let settle = Duration::from_secs(cfg.silence_settle_seconds);
                let waited = elapsed(self.obs.now, &since);
                if waited >= settle {
                    self.lose(
                        &name,
                        Some(&pod),
                        LossReason::HeartbeatTimeout,
                        false,
                        format!(
                            "the driver stopped hearing from it and its node stayed healthy for {}s",
                            waited.as_secs()
                        ),
                        driver_ip,
                    );
                } else {
                    if !self.old.executors.unresponsive.contains_key(&name) {
                        self.plan.departures += 1;
                        self.event(
                            true,
                            "ExecutorUnresponsive",
                            format!(
                                "the driver stopped hearing from executor pod {name}: a replacement starts; the loss is settled once its node is found lost, or after {}s",
                                settle.as_secs()
                            ),
                        );
                    }
                    self.requeue(settle - waited);
                    unresponsive.insert(name, since);
                }
            } else if let Some((reason, message)) = podstate::stuck(&pod) {
                self.stuck(&pod, &reason, &message);
                if self.status.phase == JobPhase::Failed {
                    return;
                }
                live.push(name);
            } else if let Some((since, message)) = podstate::unschedulable(&pod) {
                if let Some(replacement) =
                    self.spot_fallback(&pod, since, &message, driver_ip, &mut next)
                {
                    live.push(replacement);
                    continue;
                }
                if self.unplaceable(&pod, "executors") {
                    return;
                }
                live.push(name);
            } else {
                running += u32::from(podstate::is_running(&pod));
                self.annotate_holding(&pod);
                live.push(name);
            }
        }
        let spec = &self.obs.job.spec;
        let own: Vec<(&String, &u32)> = self
            .status
            .executors
            .lost_by_reason
            .iter()
            .filter(|(r, _)| LossReason::parse(r).is_none_or(LossReason::counts_against_budget))
            .collect();
        let counted: u32 = own.iter().map(|(_, n)| **n).sum();
        if counted > spec.failure_policy.max_executor_losses {
            let by_reason: Vec<String> = own.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            let message = format!(
                "{counted} executors lost to their own faults ({}), more than failurePolicy.maxExecutorLosses ({}); reclaims, drains and lost nodes do not count",
                by_reason.join(", "),
                spec.failure_policy.max_executor_losses
            );
            self.fail(FailureReason::ExecutorLossesExceeded, message);
            return;
        }
        let executors = &self.status.executors;
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
        let e = &mut self.status.executors;
        e.on_demand.retain(|n| live.contains(n));
        // Draining pods stay tracked (a replacement driver takes them over, a later look
        // settles how they went) but no longer count towards the desired width.
        // So do the silent ones, until their loss is settled.
        live.extend(draining.iter().chain(unresponsive.keys()).cloned());
        e.draining = draining;
        e.unresponsive = unresponsive;
        e.pods = live;
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
        let old = &self.old.executors;
        if !old.draining.iter().any(|d| d == name) && !old.unresponsive.contains_key(name) {
            self.plan.departures += 1;
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

impl Run<'_, '_> {
    /// What gave notice that the executor pod is going, if anything did: a
    /// `DisruptionTarget` condition, its deletion, or a disruption taint on its node.
    fn notice(&self, pod: &Pod) -> Option<String> {
        if podstate::is_disrupted(pod) {
            return Some("DisruptionTarget".into());
        }
        if podstate::is_deleting(pod) {
            return Some("deleted".into());
        }
        let node = podstate::node(pod)?;
        self.obs
            .noticed_nodes
            .get(node)
            .map(|taint| format!("taint {taint} on node {node}"))
    }

    /// Keeps voluntary disruptions (consolidation, scale-down) off executors that hold
    /// outputs no other executor has, and only those: their pods get a deletion cost (the
    /// outputs held), `karpenter.sh/do-not-disrupt` and the cluster autoscaler's
    /// `safe-to-evict: "false"`; the annotations go once the outputs are replicated or no
    /// longer needed. Keys the job's pod template sets are left to it.
    fn annotate_holding(&mut self, pod: &Pod) {
        let Some(progress) = self.obs.progress else {
            return;
        };
        let name = podstate::name(pod);
        let outputs = progress
            .holding
            .iter()
            .find(|h| h.executor_id == name)
            .map_or(0, |h| h.outputs);
        let template = &self.obs.job.spec.executors.template.annotations;
        let keys = [
            ANNOTATION_DELETION_COST,
            ANNOTATION_DO_NOT_DISRUPT,
            ANNOTATION_SAFE_TO_EVICT,
        ];
        let mut want = BTreeMap::new();
        if outputs > 0 {
            let cost = outputs.min(i32::MAX as u64).to_string();
            want.insert(ANNOTATION_DELETION_COST.to_string(), cost);
            want.insert(ANNOTATION_DO_NOT_DISRUPT.to_string(), "true".to_string());
            want.insert(ANNOTATION_SAFE_TO_EVICT.to_string(), "false".to_string());
        }
        want.retain(|k, _| !template.contains_key(k));
        let have: BTreeMap<String, String> = pod
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| keys.contains(&k.as_str()) && !template.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if have != want {
            self.plan.actions.push(Action::Annotate {
                pod: name.to_string(),
                annotations: want,
            });
        }
    }
}
