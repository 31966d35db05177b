//! Pods the scheduler cannot place: a request no node can hold fails the job at once, spot
//! executors move to on-demand nodes after `executors.spotFallback.afterSeconds`, and a pod
//! still unschedulable after `failurePolicy.unschedulableSeconds` fails the job with the
//! scheduler's message.
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kiln_api::{FailureReason, Placement};

use super::{Action, Child, Run, elapsed};
use crate::children::executor_name;
use crate::pods::{PodContext, executor_pod};
use crate::podstate;

/// A byte count as people read it.
fn gib(bytes: u64) -> String {
    format!("{:.1}Gi", bytes as f64 / f64::from(1u32 << 30))
}

impl Run<'_, '_> {
    /// Whether `pod` (of `role`: `driver` or `executors`, as in the spec) cannot be placed:
    /// its request is larger than any node, or it has been unschedulable for longer than
    /// `failurePolicy.unschedulableSeconds`. Either fails the job; otherwise a look is due
    /// when the deadline passes.
    pub(super) fn unplaceable(&mut self, pod: &Pod, role: &str) -> bool {
        let Some((since, message)) = podstate::unschedulable(pod) else {
            return false;
        };
        if let Some(why) = self.too_large(pod, role) {
            self.fail(FailureReason::Unschedulable, why);
            return true;
        }
        let seconds = self.obs.job.spec.failure_policy.unschedulable_seconds;
        let limit = Duration::from_secs(seconds.into());
        let waited = elapsed(self.obs.now, &Time(since));
        if waited >= limit {
            self.fail(
                FailureReason::Unschedulable,
                format!(
                    "pod {} found no node for {}s (failurePolicy.unschedulableSeconds: {seconds}): {}",
                    podstate::name(pod),
                    waited.as_secs(),
                    if message.is_empty() {
                        "the scheduler gave no reason"
                    } else {
                        &message
                    }
                ),
            );
            return true;
        }
        self.requeue(limit - waited);
        false
    }

    /// Why no node of the cluster could ever hold `pod`'s request, naming the spec field to
    /// change; None when some node could, or the nodes were not read.
    pub(super) fn too_large(&self, pod: &Pod, role: &str) -> Option<String> {
        let nodes = self.obs.node_capacity.filter(|n| !n.is_empty())?;
        let (cpu, memory) = podstate::requests(pod);
        if nodes
            .iter()
            .any(|n| n.cpu_millis >= cpu && n.memory_bytes >= memory)
        {
            return None;
        }
        let spec = &self.obs.job.spec;
        let (cpu_field, memory_field) = if role == "driver" {
            (&spec.driver.cpu, &spec.driver.memory)
        } else {
            (&spec.executors.cpu, &spec.executors.memory)
        };
        let most_memory = nodes.iter().max_by_key(|n| n.memory_bytes)?;
        let most_cpu = nodes.iter().max_by_key(|n| n.cpu_millis)?;
        Some(if memory > most_memory.memory_bytes {
            format!(
                "{role}.memory `{memory_field}` asks more than any node can hold: a pod needs {} with its overhead, the largest node ({}) has {} allocatable",
                gib(memory),
                most_memory.name,
                gib(most_memory.memory_bytes)
            )
        } else if cpu > most_cpu.cpu_millis {
            format!(
                "{role}.cpu `{cpu_field}` asks more than any node can hold: the largest node ({}) has {}m allocatable",
                most_cpu.name, most_cpu.cpu_millis
            )
        } else {
            format!(
                "{role}.cpu `{cpu_field}` and {role}.memory `{memory_field}` together fit no node ({} nodes)",
                nodes.len()
            )
        })
    }

    /// A spot executor pod unschedulable for `executors.spotFallback.afterSeconds` is
    /// deleted and recreated (under the next name) on on-demand nodes. Returns the new
    /// pod's name, or None when it stays as it is (a look is then due at the deadline).
    pub(super) fn spot_fallback(
        &mut self,
        pod: &Pod,
        since: Timestamp,
        message: &str,
        driver_ip: &str,
        next: &mut u32,
    ) -> Option<String> {
        let spec = &self.obs.job.spec;
        let after = spec.executors.spot_fallback.as_ref()?.after_seconds;
        let name = podstate::name(pod).to_string();
        if spec.executors.placement != Placement::Spot
            || self.status.executors.on_demand.contains(&name)
            || self.too_large(pod, "executors").is_some()
        {
            return None;
        }
        let after = Duration::from_secs(after.into());
        let waited = elapsed(self.obs.now, &Time(since));
        if waited < after {
            self.requeue(after - waited);
            return None;
        }
        let mut job = self.obs.job.clone();
        job.spec.executors.placement = Placement::OnDemand;
        let ctx = PodContext {
            job: &job,
            ..self.pod_ctx()
        };
        let replacement = executor_pod(ctx, *next, driver_ip);
        let new_name = executor_name(&self.name(), *next);
        *next += 1;
        self.delete(pod, false);
        self.plan
            .actions
            .push(Action::Apply(Child::Pod(Box::new(replacement))));
        let e = &mut self.status.executors;
        e.on_demand.push(new_name.clone());
        e.spot_fallbacks += 1;
        self.event(
            true,
            "SpotFallback",
            format!(
                "executor pod {name} waited {}s for spot capacity ({}); {new_name} replaces it on an on-demand node",
                waited.as_secs(),
                if message.is_empty() {
                    "unschedulable"
                } else {
                    message
                }
            ),
        );
        Some(new_name)
    }
}
