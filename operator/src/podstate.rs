//! Reading what a pod's status says: terminated, lost, stuck pulling its image, ready.
use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::jiff::Timestamp;

pub use kiln_api::LossReason;

/// Waiting reasons that mean the container cannot start: its image cannot be pulled or its
/// configuration (a missing Secret or ConfigMap) is broken.
const STUCK_REASONS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// The pod's name.
pub fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// The pod's phase (`Pending` when unset).
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// The node the pod was scheduled to.
pub fn node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// The pod's IP, once it has one.
pub fn ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

/// Whether the pod is being deleted.
pub fn is_deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether condition `type_` is `True`.
pub fn condition(pod: &Pod, type_: &str) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status == "True")
}

/// Whether the control plane marked the pod for disruption (eviction, preemption, taint).
pub fn is_disrupted(pod: &Pod) -> bool {
    condition(pod, "DisruptionTarget") == Some(true)
}

/// Whether the pod runs with its containers ready.
pub fn is_running(pod: &Pod) -> bool {
    phase(pod) == "Running" && !is_deleting(pod) && condition(pod, "Ready") != Some(false)
}

/// Whether the pod has finished (Succeeded or Failed).
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// The first container's terminated state, once it ended.
pub fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

/// When the pod's trouble began: its container's end, else when it was marked for
/// disruption.
pub fn ended_at(pod: &Pod) -> Option<Timestamp> {
    if let Some(t) = terminated(pod).and_then(|t| t.finished_at.as_ref()) {
        return Some(t.0);
    }
    disrupted_at(pod)
}

/// When the control plane marked the pod for disruption, if it did and says when.
fn disrupted_at(pod: &Pod) -> Option<Timestamp> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

/// When the pod was given notice, if it says: its `DisruptionTarget` condition, else its
/// deletion (the deletion timestamp less the grace period it was given).
pub fn notice_at(pod: &Pod) -> Option<Timestamp> {
    if let Some(t) = disrupted_at(pod) {
        return Some(t);
    }
    let deleted = pod.metadata.deletion_timestamp.as_ref()?;
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
    deleted
        .0
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace))
        .ok()
}

/// How long the first container ran before it ended (None when unknown).
pub fn run_time(pod: &Pod) -> Option<Duration> {
    let t = terminated(pod)?;
    let (start, end) = (t.started_at.as_ref()?, t.finished_at.as_ref()?);
    let d = end.0.duration_since(start.0);
    Some(if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    })
}

/// A container that cannot start: its waiting reason and message.
pub fn stuck(pod: &Pod) -> Option<(String, String)> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| {
            w.reason
                .as_deref()
                .is_some_and(|r| STUCK_REASONS.contains(&r))
        })
        .map(|w| {
            (
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default(),
            )
        })
}

/// How long ago the pod was created.
pub fn age(pod: &Pod, now: Timestamp) -> Duration {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| now.duration_since(t.0))
        .filter(|d| !d.is_negative())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default()
}

/// Nodes worth checking for loss: those of running pods the control plane marked not ready
/// (which it does when their node stops reporting).
pub fn nodes_to_check(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter(|p| phase(p) == "Running" && condition(p, "Ready") == Some(false))
        .filter_map(|p| node(p).map(str::to_string))
        .collect()
}

/// The scheduler found no node for the pod: since when, and its message.
pub fn unschedulable(pod: &Pod) -> Option<(Timestamp, String)> {
    if node(pod).is_some() {
        return None;
    }
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    if c.reason.as_deref() != Some("Unschedulable") {
        return None;
    }
    let since = c
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| pod.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    Some((since, c.message.clone().unwrap_or_default()))
}

/// Whether the kernel killed the pod's container for exceeding its memory limit.
pub fn oom_killed(pod: &Pod) -> bool {
    terminated(pod).is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
}

/// The first container's requests: CPU in millicores and memory in bytes (0 when unset or
/// unreadable).
pub fn requests(pod: &Pod) -> (u64, u64) {
    let Some(r) = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
    else {
        return (0, 0);
    };
    let cpu = r
        .get("cpu")
        .and_then(|q| kiln_api::parse_cpu(&q.0).ok())
        .unwrap_or(0);
    let memory = r
        .get("memory")
        .and_then(|q| kiln_api::parse_memory(&q.0).ok())
        .unwrap_or(0);
    (cpu, memory)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::testing::{at, evicted};

    #[test]
    fn notice_is_the_disruption_condition_else_the_deletion_less_its_grace() {
        let mut pod = Pod::default();
        assert_eq!(notice_at(&pod), None);
        // Deleted with 30 s of grace: the deletion timestamp is when the grace ends.
        pod.metadata.deletion_timestamp = Some(Time(at(130)));
        pod.metadata.deletion_grace_period_seconds = Some(30);
        assert_eq!(notice_at(&pod), Some(at(100)));
        // An eviction's condition says when the control plane decided.
        let mut pod = evicted(pod, 130);
        for c in pod.status.as_mut().unwrap().conditions.as_mut().unwrap() {
            c.last_transition_time = Some(Time(at(95)));
        }
        assert_eq!(notice_at(&pod), Some(at(95)));
    }
}
