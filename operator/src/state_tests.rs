//! The planner fed synthetic jobs and pods: each test is one step of a job's life.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kiln_api::crd::{CONDITION_FAILED, CONDITION_SUCCEEDED};
use kiln_api::rpc::JobStatusResponse;
use kiln_api::{ComputeJob, DriverReport, FailureReason, JobPhase};

use crate::config::OperatorConfig;
use crate::podstate::LossReason;
use crate::state::{Action, Child, Plan, Planner};
use crate::testing::*;

mod driver_loss;
mod spot;

struct World {
    job: ComputeJob,
    pods: Vec<Pod>,
    lost_nodes: BTreeSet<String>,
    noticed_nodes: BTreeMap<String, String>,
    node_capacity: Option<Vec<crate::state::NodeCapacity>>,
    progress: Option<JobStatusResponse>,
    config: OperatorConfig,
    refused: Option<String>,
}

impl World {
    fn new() -> Self {
        World {
            job: job("wc"),
            pods: Vec::new(),
            lost_nodes: BTreeSet::new(),
            noticed_nodes: BTreeMap::new(),
            node_capacity: None,
            progress: None,
            config: OperatorConfig::default(),
            refused: None,
        }
    }

    /// Plans at time `now` and takes the planned status, as the API server would.
    fn step(&mut self, now: i64) -> Plan {
        let plan = Planner {
            config: &self.config,
            default_image: "kiln:test",
        }
        .plan(&crate::state::Observed {
            job: &self.job,
            pods: &self.pods,
            lost_nodes: &self.lost_nodes,
            noticed_nodes: &self.noticed_nodes,
            node_capacity: self.node_capacity.as_deref(),
            progress: self.progress.as_ref(),
            secret: &crate::children::JobSecret {
                token: "tok".into(),
                credentials: None,
            },
            now: at(now),
            refused: self.refused.as_deref(),
        });
        self.job.status = Some(plan.status.clone());
        plan
    }

    /// Carries out the plan's pod actions as the API server and scheduler would: created pods
    /// appear scheduled, deleted ones disappear.
    fn apply(&mut self, plan: &Plan, now: i64) {
        for a in &plan.actions {
            match a {
                Action::Apply(Child::Pod(p)) => {
                    let node = if labels(p)["kiln.dev/role"] == "driver" {
                        "kiln-ondemand-1"
                    } else {
                        "kiln-spot-1"
                    };
                    self.pods.push(scheduled(p.as_ref().clone(), node, now));
                }
                Action::DeletePod { name, .. } => self
                    .pods
                    .retain(|p| p.metadata.name.as_deref() != Some(name)),
                _ => {}
            }
        }
    }

    fn set(&mut self, name: &str, f: impl FnOnce(Pod) -> Pod) {
        let i = self
            .pods
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap();
        let p = self.pods.remove(i);
        self.pods.insert(i, f(p));
    }

    /// A job whose driver runs at 10.244.3.2 and whose two executors run.
    fn running() -> Self {
        let mut w = World::new();
        let p = w.step(0);
        w.apply(&p, 0);
        w.set("wc-driver", |p| running(p, "10.244.3.2"));
        let p = w.step(1);
        w.apply(&p, 1);
        w.set("wc-exec-0", |p| running(p, "10.244.1.2"));
        w.set("wc-exec-1", |p| running(p, "10.244.1.3"));
        w.step(2);
        w
    }
}

fn applied_pods(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply(Child::Pod(p)) => p.metadata.name.clone(),
            _ => None,
        })
        .collect()
}

fn reasons(plan: &Plan) -> Vec<&str> {
    plan.events.iter().map(|e| e.reason.as_str()).collect()
}

/// The first pod `plan` applies.
fn first_applied_pod(plan: &Plan) -> Pod {
    plan.actions
        .iter()
        .find_map(|a| match a {
            Action::Apply(Child::Pod(p)) => Some(p.as_ref().clone()),
            _ => None,
        })
        .expect("a pod is applied")
}

#[test]
fn a_new_job_gets_its_secret_spec_service_and_driver() {
    let mut w = World::new();
    let plan = w.step(0);
    let kinds: Vec<&str> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Apply(Child::Secret(_)) => "Secret",
            Action::Apply(Child::ConfigMap(_)) => "ConfigMap",
            Action::Apply(Child::Service(_)) => "Service",
            Action::Apply(Child::NetworkPolicy(_)) => "NetworkPolicy",
            Action::Apply(Child::Pod(_)) => "Pod",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["Secret", "ConfigMap", "Service", "NetworkPolicy", "Pod"]
    );
    assert_eq!(applied_pods(&plan), ["wc-driver"]);
    let s = &plan.status;
    assert_eq!(
        (s.phase, s.driver.attempt, s.driver.restarts),
        (JobPhase::Pending, 1, 0)
    );
    assert_eq!(s.start_time.as_ref().unwrap().0, at(0));
    assert_eq!(reasons(&plan), ["Started"]);
    assert!(plan.requeue.is_some());
    // Nothing changes while the driver pod starts: no second driver, same status.
    w.apply(&plan, 0);
    let again = w.step(1);
    assert!(applied_pods(&again).is_empty());
    assert_eq!(again.status.start_time, s.start_time);
}

#[test]
fn executors_start_once_the_driver_has_an_address() {
    let mut w = World::new();
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", |p| running(p, "10.244.3.2"));
    w.progress = Some(JobStatusResponse {
        stages_total: 2,
        tasks_total: 8,
        tasks_done: 3,
        ..Default::default()
    });
    let plan = w.step(1);
    assert_eq!(applied_pods(&plan), ["wc-exec-0", "wc-exec-1"]);
    let s = &plan.status;
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!((s.executors.next_index, s.executors.pods.len()), (2, 2));
    assert_eq!(s.progress.summary, "3/8");
    assert_eq!(reasons(&plan), ["Running"]);
    assert_eq!(plan.replacements, 0);
}

#[test]
fn an_evicted_executor_drains_while_its_replacement_starts() {
    let mut w = World::running();
    let before = w.job.status.clone().unwrap();
    let ready_since = before
        .condition("Ready")
        .unwrap()
        .last_transition_time
        .clone();
    w.set("wc-exec-1", |p| evicted(p, 30));
    let plan = w.step(30);
    // Notice, not a loss: the driver moves its blocks while it still runs.
    assert!(plan.losses.is_empty());
    assert!(plan.actions.contains(&Action::Decommission {
        executor: "wc-exec-1".into(),
        cause: "DisruptionTarget".into(),
        driver_ip: "10.244.3.2".into(),
        // Evicted at 30 s (no grace): the job runs short from then.
        occurred_unix_ms: 1_700_000_030_000,
    }));
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::DeletePod { .. } | Action::ExecutorLost { .. }))
    );
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    let s = &plan.status;
    assert_eq!(s.executors.lost, 0);
    assert_eq!(s.executors.draining, ["wc-exec-1"]);
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-2", "wc-exec-1"]);
    assert_ne!(
        s.condition("Ready").unwrap().last_transition_time,
        ready_since
    );
    assert_eq!(reasons(&plan), ["ExecutorDraining"]);
    // While it drains: no second replacement, no second event, and once the driver lists
    // it draining, no second notice.
    w.apply(&plan, 30);
    w.progress = Some(JobStatusResponse {
        draining: vec!["wc-exec-1".into()],
        ..Default::default()
    });
    let again = w.step(31);
    assert!(again.losses.is_empty());
    assert!(applied_pods(&again).is_empty());
    assert!(reasons(&again).is_empty());
    assert!(
        !again
            .actions
            .iter()
            .any(|a| matches!(a, Action::Decommission { .. }))
    );
    // Its blocks moved, it left: a Drained loss, which costs no budget.
    w.progress = Some(JobStatusResponse {
        lost_executors: vec![kiln_api::rpc::LostExecutor {
            executor_id: "wc-exec-1".into(),
            reason: "Drained".into(),
        }],
        ..Default::default()
    });
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-exec-1"));
    let gone = w.step(40);
    assert_eq!(
        gone.losses,
        [("wc-exec-1".to_string(), LossReason::Drained)]
    );
    assert!(applied_pods(&gone).is_empty());
    let s = &gone.status;
    assert_eq!(
        (s.executors.lost, s.executors.lost_by_reason["Drained"]),
        (1, 1)
    );
    assert!(s.executors.draining.is_empty());
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-2"]);
    assert_eq!(s.recovery.last_loss.as_deref(), Some("wc-exec-1"));
}

#[test]
fn an_executor_on_a_lost_node_is_node_lost_and_force_deleted() {
    let mut w = World::running();
    w.lost_nodes.insert("kiln-spot-1".into());
    let plan = w.step(40);
    assert_eq!(plan.losses.len(), 2);
    assert!(plan.losses.iter().all(|(_, r)| *r == LossReason::NodeLost));
    assert!(plan.actions.contains(&Action::DeletePod {
        name: "wc-exec-0".into(),
        force: true
    }));
    assert_eq!(applied_pods(&plan), ["wc-exec-2", "wc-exec-3"]);
}

#[test]
fn an_executor_the_driver_gave_up_on_is_replaced_before_the_control_plane_notices() {
    let mut w = World::running();
    // Its node died without a word: the pod still looks fine, the driver's heartbeats lapsed.
    w.progress = Some(JobStatusResponse {
        lost_executors: vec![kiln_api::rpc::LostExecutor {
            executor_id: "wc-exec-1".into(),
            reason: "HeartbeatTimeout".into(),
        }],
        ..Default::default()
    });
    let plan = w.step(50);
    // Replaced at once, but not yet a loss: its node may be found lost (a free NodeLost).
    assert!(plan.losses.is_empty());
    assert_eq!(reasons(&plan), ["ExecutorUnresponsive"]);
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    assert!(plan.status.executors.unresponsive.contains_key("wc-exec-1"));
    // The replacement keeps off the silent node, which the scheduler still thinks Ready.
    let replacement = first_applied_pod(&plan);
    let avoided = serde_json::to_string(&replacement.spec.unwrap().affinity).unwrap();
    assert!(
        avoided.contains(r#""key":"metadata.name","operator":"NotIn","values":["kiln-spot-1"]"#),
        "{avoided}"
    );
    w.apply(&plan, 50);
    // Its node stays healthy past the settle window: the silence was its own.
    let plan = w.step(50 + w.config.silence_settle_seconds as i64);
    assert_eq!(
        plan.losses,
        [("wc-exec-1".to_string(), LossReason::HeartbeatTimeout)]
    );
    assert!(plan.actions.contains(&Action::DeletePod {
        name: "wc-exec-1".into(),
        force: false
    }));
    assert!(applied_pods(&plan).is_empty());
    assert_eq!(plan.status.executors.lost_by_reason["HeartbeatTimeout"], 1);
    assert_eq!(plan.status.recovery.last_loss.as_deref(), Some("wc-exec-1"));
    assert!(plan.status.executors.unresponsive.is_empty());
    // The next look finds the loss handled: nothing is reported twice.
    w.apply(&plan, 111);
    let again = w.step(112);
    assert!(again.losses.is_empty());
    assert!(applied_pods(&again).is_empty());
    // A loss the driver learnt from the operator itself is not a heartbeat loss.
    let mut w = World::running();
    w.progress = Some(JobStatusResponse {
        lost_executors: vec![kiln_api::rpc::LostExecutor {
            executor_id: "wc-exec-1".into(),
            reason: "Preempted".into(),
        }],
        ..Default::default()
    });
    assert!(w.step(50).losses.is_empty());
}

#[test]
fn a_vanished_executor_pod_is_replaced_and_costs_no_budget() {
    let mut w = World::running();
    w.job.spec.failure_policy.max_executor_losses = 0;
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-exec-0"));
    let plan = w.step(20);
    assert_eq!(
        plan.losses,
        [("wc-exec-0".to_string(), LossReason::Preempted)]
    );
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    assert_eq!(plan.status.phase, JobPhase::Running);
}

#[test]
fn crash_looping_executors_back_off_then_fail_the_job() {
    let mut w = World::running();
    w.config.crash_loop_limit = 3;
    let mut now = 10;
    let mut waits = Vec::new();
    for round in 0..3 {
        // The newest executor crashes a second after it started.
        let newest = w
            .job
            .status
            .as_ref()
            .unwrap()
            .executors
            .pods
            .last()
            .unwrap()
            .clone();
        w.set(&newest, |p| exited(p, 1, None, now - 1, now));
        let plan = w.step(now);
        if round == 2 {
            assert_eq!(plan.status.phase, JobPhase::Failed);
            let c = plan.status.condition(CONDITION_FAILED).unwrap();
            assert_eq!(c.reason, FailureReason::ExecutorsCrashLooping.as_str());
            assert_eq!(plan.failure, Some(FailureReason::ExecutorsCrashLooping));
            assert!(
                c.message.contains("3 executor pods in a row"),
                "{}",
                c.message
            );
            break;
        }
        w.apply(&plan, now);
        if applied_pods(&plan).is_empty() {
            // Backing off: the replacement comes when the requeue says.
            let wait = plan.requeue.unwrap().as_secs();
            waits.push(wait);
            now += wait as i64;
            let plan = w.step(now);
            assert_eq!(applied_pods(&plan).len(), 1);
            w.apply(&plan, now);
        }
        now += 1;
    }
    assert_eq!(
        waits,
        [2],
        "first crash replaced at once, the second after 2 s"
    );
}

#[test]
fn driver_success_copies_its_report_and_is_never_rerun() {
    let mut w = World::running();
    let report = r#"{"succeeded":true,"elapsedMs":4200,"stages":3,"tasks":12,"attempts":14,"partitionsRecomputed":2,"executorsLost":{"Preempted":1},"rows":42,"files":4,"outputUri":"/data/out/"}"#;
    w.set("wc-driver", |p| exited(p, 0, Some(report), 1, 50));
    let plan = w.step(50);
    let s = &plan.status;
    assert_eq!(s.phase, JobPhase::Succeeded);
    let r = s.result.as_ref().unwrap();
    assert_eq!(
        (
            r.rows,
            r.partitions_recomputed,
            r.executors_lost["Preempted"]
        ),
        (42, 2, 1)
    );
    assert!(s.is_true(CONDITION_SUCCEEDED));
    assert_eq!(s.completion_time.as_ref().unwrap().0, at(50));
    let deleted: Vec<&str> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePod { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        deleted,
        ["wc-exec-0", "wc-exec-1"],
        "executors go, the driver pod stays"
    );
    assert_eq!(reasons(&plan), ["Succeeded"]);
    // An operator restart later, even with every pod gone: nothing runs again.
    w.pods.clear();
    let later = w.step(500);
    assert!(later.actions.is_empty());
    assert_eq!(later.status, plan.status);
    assert!(later.events.is_empty());
}

#[test]
fn driver_failure_fails_the_job_with_the_drivers_reason() {
    let mut w = World::running();
    let report = DriverReport {
        reason: Some(FailureReason::InvalidSql),
        message: Some("step counts: table 'nope' not found".into()),
        elapsed_ms: 10,
        ..Default::default()
    }
    .to_termination_message();
    w.set("wc-driver", |p| exited(p, 1, Some(&report), 1, 5));
    let plan = w.step(5);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    assert_eq!(plan.failure, Some(FailureReason::InvalidSql));
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", FailureReason::InvalidSql.as_str())
    );
    assert!(c.message.contains("table 'nope' not found"));
    assert_eq!(reasons(&plan), [FailureReason::InvalidSql.as_str()]);
}

#[test]
fn a_driver_that_fails_without_a_readable_report_is_driver_failed() {
    for message in [None, Some("panicked at src/main.rs: oops")] {
        let mut w = World::running();
        w.set("wc-driver", |p| exited(p, 101, message, 1, 5));
        let plan = w.step(5);
        assert_eq!(plan.status.phase, JobPhase::Failed);
        assert_eq!(plan.failure, Some(FailureReason::DriverFailed));
        let c = plan.status.condition(CONDITION_FAILED).unwrap();
        assert_eq!(c.reason, FailureReason::DriverFailed.as_str());
        assert!(c.message.contains("code 101"), "{}", c.message);
    }
    // A report without a reason, or with one this operator does not know, still counts.
    for (reason, want) in [
        ("", FailureReason::DriverFailed),
        (r#""reason":"Planning","#, FailureReason::Internal),
    ] {
        let mut w = World::running();
        let report = format!(
            r#"{{"succeeded":false,{reason}"message":"no table","elapsedMs":1,"stages":0,"tasks":0,"attempts":0,"partitionsRecomputed":0,"rows":0,"files":0}}"#
        );
        w.set("wc-driver", |p| exited(p, 1, Some(&report), 1, 5));
        let plan = w.step(5);
        let c = plan.status.condition(CONDITION_FAILED).unwrap();
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            (want.as_str(), "no table")
        );
    }
}

#[test]
fn a_suspended_job_keeps_its_status_and_resumes_with_a_new_driver() {
    let mut w = World::running();
    w.job.spec.suspend = true;
    let plan = w.step(30);
    assert_eq!(plan.status.phase, JobPhase::Suspended);
    assert_eq!(plan.actions.len(), 3, "driver and both executors deleted");
    assert_eq!(reasons(&plan), ["Suspended"]);
    w.apply(&plan, 30);
    let quiet = w.step(31);
    assert!(quiet.actions.is_empty() && quiet.events.is_empty());
    assert_eq!(quiet.requeue, None);

    w.job.spec.suspend = false;
    let plan = w.step(60);
    assert_eq!(applied_pods(&plan), ["wc-driver"]);
    let s = &plan.status;
    assert_eq!(
        (s.driver.attempt, s.driver.restarts),
        (2, 0),
        "a resume is no restart"
    );
    assert_eq!(s.start_time.as_ref().unwrap().0, at(60));
    assert_eq!(reasons(&plan), ["Resumed"]);
}

#[test]
fn a_bad_spec_fails_with_a_condition_naming_the_field() {
    let mut w = World::new();
    w.job.spec.executors.memory = "lots".into();
    let plan = w.step(0);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert_eq!(c.reason, FailureReason::InvalidSpec.as_str());
    assert!(c.message.contains("spec.executors.memory"), "{}", c.message);
    assert_eq!(plan.requeue, None, "nothing to retry");
}

#[test]
fn secrets_metadata_bad_names_and_oversized_specs_fail_naming_the_rule() {
    type Break = fn(&mut World);
    let cases: Vec<(Break, &str)> = vec![
        (
            |w| w.job.spec.inputs[0].uri = "/proc/self/environ".into(),
            "spec.inputs[0].uri: `/proc/self/environ` is refused: local paths under /proc",
        ),
        (
            |w| w.job.spec.inputs[0].uri = "http://169.254.169.254/latest/".into(),
            "link-local",
        ),
        (
            |w| w.job.spec.inputs[0].uri = "http://localhost:8080/x".into(),
            "loopback",
        ),
        (
            |w| w.job.spec.output.as_mut().unwrap().uri = "out/wordcount/".into(),
            "spec.output.uri: `out/wordcount/` is refused: a relative path names no place",
        ),
        (
            |w| w.job.metadata.name = Some("has.dot".into()),
            "metadata.name: `has.dot` is not a DNS-1035 label",
        ),
        (
            |w| w.job.spec.steps[0].sql = format!("SELECT '{}'", "x".repeat(1 << 20)),
            "the ConfigMap the driver reads it from holds at most",
        ),
        (
            |w| w.job.spec.image = Some("miner:1".into()),
            "spec.image: `miner:1` is not an allowed image",
        ),
        (
            |w| {
                w.job.spec.executors.template.volumes = vec![
                    serde_json::from_value(
                        serde_json::json!({"name": "root", "hostPath": {"path": "/"}}),
                    )
                    .unwrap(),
                ]
            },
            "spec.executors.template.volumes[0] (`root`): hostPath volumes are not allowed",
        ),
        (
            |w| w.job.spec.driver.template.service_account_name = Some("admin".into()),
            "spec.driver.template.serviceAccountName: `admin`: jobs may not name",
        ),
    ];
    for (break_it, says) in cases {
        let mut w = World::new();
        break_it(&mut w);
        let plan = w.step(0);
        assert!(plan.actions.is_empty(), "{says}: nothing is created");
        let c = plan.status.condition(CONDITION_FAILED).unwrap();
        assert_eq!(c.reason, FailureReason::InvalidSpec.as_str());
        assert!(c.message.contains(says), "{says}: {}", c.message);
        assert_eq!(plan.requeue, None, "nothing to retry");
    }
}

#[test]
fn an_object_the_api_server_refuses_as_invalid_fails_the_job_once() {
    let mut w = World::new();
    let p = w.step(0);
    w.apply(&p, 0);
    w.refused = Some("Pod wc-exec-0: spec.containers[0].env[0].name: Invalid value".into());
    let plan = w.step(1);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert_eq!(c.reason, FailureReason::InvalidSpec.as_str());
    assert!(
        c.message.contains(
            "refuses the job's objects as invalid: Pod wc-exec-0: spec.containers[0].env[0].name"
        ),
        "{}",
        c.message
    );
    assert_eq!(plan.requeue, None, "nothing to retry");
    assert!(
        plan.actions.iter().all(|a| !matches!(a, Action::Apply(_))),
        "nothing more is applied: {:?}",
        plan.actions
    );
    // Finished: the refusal is not seen again.
    w.refused = None;
    let again = w.step(2);
    assert_eq!(again.status.phase, JobPhase::Failed);
    assert!(again.actions.iter().all(|a| !matches!(a, Action::Apply(_))));
}

#[test]
fn an_image_that_cannot_be_pulled_fails_the_job_after_the_grace_period() {
    let mut w = World::new();
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", image_pull_failing);
    let plan = w.step(10);
    assert_eq!(plan.status.phase, JobPhase::Pending);
    assert_eq!(plan.requeue.unwrap().as_secs(), 50);
    let plan = w.step(61);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert_eq!(c.reason, FailureReason::ImagePullFailed.as_str());
    assert!(c.message.contains("kiln:test"), "{}", c.message);
    assert!(plan.actions.contains(&Action::DeletePod {
        name: "wc-driver".into(),
        force: false
    }));
}

#[test]
fn deadline_and_ttl() {
    let mut w = World::running();
    w.job.spec.active_deadline_seconds = Some(100);
    w.job.spec.ttl_seconds_after_finished = Some(60);
    let plan = w.step(50);
    assert_eq!(
        plan.requeue.unwrap().as_secs(),
        3,
        "progress polling comes first"
    );
    let plan = w.step(100);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    assert_eq!(
        plan.status.condition(CONDITION_FAILED).unwrap().reason,
        FailureReason::DeadlineExceeded.as_str()
    );
    assert_eq!(plan.requeue.unwrap().as_secs(), 60);
    w.apply(&plan, 100);
    assert!(!w.step(159).actions.contains(&Action::DeleteJob));
    assert!(w.step(160).actions.contains(&Action::DeleteJob));
}

#[test]
fn pods_created_before_a_lost_status_write_are_adopted_not_duplicated() {
    let mut w = World::new();
    let p = w.step(0);
    w.apply(&p, 0);
    w.set("wc-driver", |p| running(p, "10.244.3.2"));
    let saved = w.job.status.clone();
    let plan = w.step(1);
    w.apply(&plan, 1);
    // The status write of that reconcile never happened.
    w.job.status = saved;
    let plan = w.step(2);
    assert!(applied_pods(&plan).is_empty(), "{:?}", applied_pods(&plan));
    assert_eq!(plan.status.executors.pods, ["wc-exec-0", "wc-exec-1"]);
    assert_eq!(plan.status.executors.next_index, 2);
}

#[test]
fn too_many_losses_exhaust_the_budget() {
    let mut w = World::running();
    w.job.spec.failure_policy.max_executor_losses = 1;
    w.set("wc-exec-0", |p| exited(p, 1, None, 1, 100));
    w.set("wc-exec-1", |p| exited(p, 137, None, 1, 100));
    let plan = w.step(100);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert_eq!(c.reason, FailureReason::ExecutorLossesExceeded.as_str());
    assert_eq!(
        reasons(&plan).last(),
        Some(&FailureReason::ExecutorLossesExceeded.as_str())
    );
    assert!(c.message.contains("maxExecutorLosses (1)"), "{}", c.message);
}

#[test]
fn executors_that_finish_before_their_driver_are_not_replaced() {
    // The driver told its executors the job is over; they exited, it has not yet.
    let mut w = World::running();
    for e in ["wc-exec-0", "wc-exec-1"] {
        w.set(e, |p| exited(p, 0, None, 1, 20));
    }
    for t in [20, 21, 22] {
        let plan = w.step(t);
        assert!(applied_pods(&plan).is_empty(), "at {t}: {:?}", plan.actions);
        assert_eq!(plan.status.executors.pods, ["wc-exec-0", "wc-exec-1"]);
        w.apply(&plan, t);
    }
}
