//! Spot capacity: notice from a node's taint, losses that cost no budget, OOM kills that
//! do, fallback to on-demand nodes, unschedulable pods, and the annotations that keep
//! voluntary disruptions off executors holding data nobody else has.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kiln_api::crd::CONDITION_SPOT_FALLBACK;
use kiln_api::rpc::{ExecutorHolding, JobStatusResponse};
use kiln_api::{FailureReason, JobPhase, SpotFallback};

use super::{World, applied_pods, first_applied_pod, reasons};
use crate::podstate::LossReason;
use crate::state::{Action, NodeCapacity};
use crate::testing::*;

/// `pod` as the scheduler leaves one it found no node for, since `since`.
fn unschedulable(mut pod: Pod, since: i64, message: &str) -> Pod {
    pod.spec.as_mut().unwrap().node_name = None;
    let s = pod.status.get_or_insert_with(Default::default);
    s.phase = Some("Pending".into());
    s.conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some(message.into()),
        last_transition_time: Some(Time(at(since))),
        ..Default::default()
    }]);
    pod
}

fn oom_killed(pod: Pod, start: i64, end: i64) -> Pod {
    let mut pod = exited(pod, 137, None, start, end);
    let s = pod.status.as_mut().unwrap();
    let t = s.container_statuses.as_mut().unwrap()[0]
        .state
        .as_mut()
        .unwrap()
        .terminated
        .as_mut()
        .unwrap();
    t.reason = Some("OOMKilled".into());
    pod
}

#[test]
fn a_disruption_taint_drains_the_executors_on_its_node() {
    let mut w = World::running();
    w.noticed_nodes
        .insert("kiln-spot-1".into(), "karpenter.sh/disrupted".into());
    let plan = w.step(10);
    // Both executors run on the tainted node: both drain, both are replaced elsewhere.
    let decommissioned: Vec<&str> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Decommission {
                executor,
                cause,
                occurred_unix_ms,
                ..
            } => {
                assert_eq!(cause, "taint karpenter.sh/disrupted on node kiln-spot-1");
                // The taint's time is not the pod's to say.
                assert_eq!(*occurred_unix_ms, 0);
                Some(executor.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(decommissioned, ["wc-exec-0", "wc-exec-1"]);
    assert_eq!(applied_pods(&plan), ["wc-exec-2", "wc-exec-3"]);
    let replacement = serde_json::to_string(&first_applied_pod(&plan)).unwrap();
    assert!(replacement.contains("kiln-spot-1"), "not kept off the node");
    assert!(plan.losses.is_empty());
    // Drained, an executor exits 0: a Drained loss, not the end of the job.
    w.apply(&plan, 10);
    for e in ["wc-exec-2", "wc-exec-3"] {
        w.set(e, |mut p| {
            p.spec.as_mut().unwrap().node_name = Some("kiln-spot-2".into());
            p
        });
    }
    w.set("wc-exec-0", |p| exited(p, 0, None, 1, 20));
    let plan = w.step(20);
    assert_eq!(
        plan.losses,
        [("wc-exec-0".to_string(), LossReason::Drained)]
    );
    assert!(applied_pods(&plan).is_empty());
    assert_eq!(plan.status.executors.draining, ["wc-exec-1"]);
    assert_eq!(plan.status.phase, JobPhase::Running);
}

#[test]
fn reclaims_cost_no_budget_but_oom_kills_do() {
    let mut w = World::running();
    w.job.spec.failure_policy.max_executor_losses = 0;
    w.lost_nodes.insert("kiln-spot-1".into());
    let plan = w.step(10);
    assert_eq!(plan.losses.len(), 2);
    assert_eq!(plan.status.phase, JobPhase::Running);
    assert_eq!(plan.status.executors.lost_by_reason["NodeLost"], 2);
    w.apply(&plan, 10);
    w.lost_nodes.clear();
    w.set("wc-exec-2", |p| running(p, "10.244.2.2"));
    w.set("wc-exec-3", |p| oom_killed(p, 10, 200));
    let plan = w.step(200);
    assert_eq!(
        plan.losses,
        [("wc-exec-3".to_string(), LossReason::OomKilled)]
    );
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition("Failed").unwrap();
    assert_eq!(c.reason, FailureReason::ExecutorLossesExceeded.as_str());
    assert!(c.message.contains("OOMKilled: 1"), "{}", c.message);
}

#[test]
fn spot_executors_fall_back_to_on_demand_and_later_ones_try_spot_again() {
    let mut w = World::new();
    w.job.spec.executors.spot_fallback = Some(SpotFallback { after_seconds: 30 });
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", |p| running(p, "10.244.3.2"));
    let p = w.step(1);
    w.apply(&p, 1);
    let full = "0/3 nodes are available: 2 Insufficient memory, 1 node(s) didn't match Pod's node affinity";
    w.set("wc-exec-0", |p| running(p, "10.244.1.2"));
    w.set("wc-exec-1", |p| unschedulable(p, 1, full));
    // Before afterSeconds: it waits, and a look is due when they pass.
    let plan = w.step(20);
    assert!(applied_pods(&plan).is_empty());
    assert!(plan.requeue.unwrap().as_secs() <= 11);
    assert!(!plan.status.is_true(CONDITION_SPOT_FALLBACK));
    // After: recreated on on-demand nodes under the next name.
    let plan = w.step(31);
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    assert!(plan.actions.contains(&Action::DeletePod {
        name: "wc-exec-1".into(),
        force: false
    }));
    let pod = serde_json::to_value(first_applied_pod(&plan)).unwrap();
    let affinity = pod["spec"]["affinity"]["nodeAffinity"].to_string();
    assert!(
        affinity.contains("NotIn"),
        "not on on-demand nodes: {affinity}"
    );
    assert!(plan.losses.is_empty());
    let s = &plan.status;
    assert_eq!(
        (s.executors.spot_fallbacks, &s.executors.on_demand[..]),
        (1, &["wc-exec-2".to_string()][..])
    );
    assert!(s.is_true(CONDITION_SPOT_FALLBACK));
    assert!(reasons(&plan).contains(&"SpotFallback"));
    // The on-demand executor is lost later: its replacement asks for spot again.
    w.apply(&plan, 31);
    w.set("wc-exec-2", |p| exited(p, 1, None, 31, 100));
    let plan = w.step(100);
    assert_eq!(applied_pods(&plan), ["wc-exec-3"]);
    let pod = serde_json::to_value(first_applied_pod(&plan)).unwrap();
    let affinity = pod["spec"]["affinity"]["nodeAffinity"].to_string();
    assert!(!affinity.contains("NotIn"), "not back on spot: {affinity}");
    assert!(!plan.status.is_true(CONDITION_SPOT_FALLBACK));
}

#[test]
fn an_unschedulable_pod_fails_the_job_after_the_deadline_with_the_schedulers_message() {
    let mut w = World::new();
    w.job.spec.failure_policy.unschedulable_seconds = 60;
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", |p| {
        unschedulable(p, 0, "0/3 nodes are available: 3 Insufficient cpu")
    });
    let plan = w.step(30);
    assert_eq!(plan.status.phase, JobPhase::Pending);
    assert!(plan.requeue.unwrap().as_secs() <= 30);
    let plan = w.step(61);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition("Failed").unwrap();
    assert_eq!(c.reason, FailureReason::Unschedulable.as_str());
    assert!(c.message.contains("wc-driver"), "{}", c.message);
    assert!(c.message.contains("3 Insufficient cpu"), "{}", c.message);
}

#[test]
fn a_request_no_node_can_hold_fails_at_once_naming_the_field() {
    let mut w = World::new();
    w.job.spec.executors.memory = "1Ti".into();
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", |p| running(p, "10.244.3.2"));
    let p = w.step(1);
    w.apply(&p, 1);
    for e in ["wc-exec-0", "wc-exec-1"] {
        w.set(e, |p| {
            unschedulable(p, 1, "0/3 nodes are available: 3 Insufficient memory")
        });
    }
    w.node_capacity = Some(
        ["kiln-spot-1", "kiln-ondemand-1"]
            .map(|n| NodeCapacity {
                name: n.into(),
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
            })
            .to_vec(),
    );
    let plan = w.step(2);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition("Failed").unwrap();
    assert_eq!(c.reason, FailureReason::Unschedulable.as_str());
    assert!(
        c.message.contains("executors.memory `1Ti`"),
        "{}",
        c.message
    );
    assert!(c.message.contains("8.0Gi"), "{}", c.message);
}

#[test]
fn only_executors_holding_data_nobody_else_has_are_protected() {
    let mut w = World::running();
    w.progress = Some(JobStatusResponse {
        holding: vec![ExecutorHolding {
            executor_id: "wc-exec-1".into(),
            outputs: 7,
        }],
        ..Default::default()
    });
    let plan = w.step(10);
    let annotate: Vec<(&str, &BTreeMap<String, String>)> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Annotate { pod, annotations } => Some((pod.as_str(), annotations)),
            _ => None,
        })
        .collect();
    assert_eq!(annotate.len(), 1);
    let (pod, annotations) = annotate[0];
    assert_eq!(pod, "wc-exec-1");
    assert_eq!(
        annotations["controller.kubernetes.io/pod-deletion-cost"],
        "7"
    );
    assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    assert_eq!(
        annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "false"
    );
    // Once applied, nothing more to do; once replicated, the annotations go.
    let annotations = annotations.clone();
    w.set("wc-exec-1", |mut p| {
        p.metadata.annotations = Some(annotations);
        p
    });
    assert!(
        !w.step(11)
            .actions
            .iter()
            .any(|a| matches!(a, Action::Annotate { .. }))
    );
    w.progress = Some(JobStatusResponse::default());
    assert!(w.step(12).actions.contains(&Action::Annotate {
        pod: "wc-exec-1".into(),
        annotations: BTreeMap::new()
    }));
}

#[test]
fn a_silence_settled_by_the_node_being_found_lost_costs_no_budget() {
    let mut w = World::running();
    w.job.spec.failure_policy.max_executor_losses = 0;
    // The driver's heartbeat timeout is shorter than the control plane's node monitor.
    w.progress = Some(JobStatusResponse {
        lost_executors: vec![kiln_api::rpc::LostExecutor {
            executor_id: "wc-exec-1".into(),
            reason: "HeartbeatTimeout".into(),
        }],
        ..Default::default()
    });
    let plan = w.step(10);
    assert!(plan.losses.is_empty());
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    w.apply(&plan, 10);
    w.set("wc-exec-2", |mut p| {
        p.spec.as_mut().unwrap().node_name = Some("kiln-spot-2".into());
        p
    });
    // Ten seconds on, the control plane marks the node lost.
    w.lost_nodes.insert("kiln-spot-1".into());
    w.set("wc-exec-0", |mut p| {
        p.spec.as_mut().unwrap().node_name = Some("kiln-spot-2".into());
        p
    });
    let plan = w.step(20);
    assert_eq!(
        plan.losses,
        [("wc-exec-1".to_string(), LossReason::NodeLost)]
    );
    assert!(applied_pods(&plan).is_empty(), "replaced already");
    assert_eq!(plan.status.phase, JobPhase::Running);
    assert!(plan.status.executors.unresponsive.is_empty());
}
