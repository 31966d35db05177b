//! A lost driver: its replacement takes over the executors still running, the executor
//! bookkeeping goes on with it, what it resumed is counted and told once, and the restart
//! budget still holds.
use super::*;
use crate::pods::Takeover;

/// The driver pod `plan` applies, and its arguments.
fn applied_driver(plan: &Plan) -> (Pod, Vec<String>) {
    let pod = plan
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Apply(Child::Pod(p)) if labels(p)["kiln.dev/role"] == "driver" => {
                Some(p.as_ref().clone())
            }
            _ => None,
        })
        .expect("a driver pod is applied");
    let args = pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    (pod, args)
}

fn deleted(plan: &Plan) -> Vec<&str> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePod { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

fn note<'p>(plan: &'p Plan, reason: &str) -> &'p str {
    &plan
        .events
        .iter()
        .find(|e| e.reason == reason)
        .unwrap_or_else(|| panic!("no {reason} event: {:?}", plan.events))
        .note
}

fn has(args: &[String], arg: &str) -> bool {
    args.iter().any(|a| a == arg)
}

#[test]
fn a_killed_driver_is_replaced_by_one_that_takes_over_its_executors() {
    let mut w = World::running();
    w.set("wc-driver", |p| exited(p, 137, None, 1, 20));
    let plan = w.step(20);
    assert_eq!(plan.status.phase, JobPhase::Pending);
    assert!(applied_pods(&plan).is_empty(), "never two drivers at once");
    assert_eq!(deleted(&plan), ["wc-driver"], "the executors stay");
    assert_eq!(reasons(&plan), ["DriverLost"]);
    assert_eq!(plan.status.executors.pods, ["wc-exec-0", "wc-exec-1"]);
    assert_eq!(plan.status.executors.running, 2);
    w.apply(&plan, 20);
    assert_eq!(w.pods.len(), 2, "old driver deleted, executors kept");

    let plan = w.step(21);
    assert_eq!(applied_pods(&plan), ["wc-driver"]);
    assert!(deleted(&plan).is_empty(), "{:?}", plan.actions);
    let s = &plan.status;
    assert_eq!((s.driver.attempt, s.driver.restarts), (2, 1));
    assert_eq!(s.recovery.driver_losses, 1);
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-1"]);
    assert_eq!((s.executors.next_index, s.executors.running), (2, 2));
    assert_eq!(reasons(&plan), ["DriverRestarted"]);
    let restarted = note(&plan, "DriverRestarted");
    assert!(
        restarted.contains("attempt 2") && restarted.contains("takes over 2 running executors"),
        "{restarted}"
    );
    let (driver, args) = applied_driver(&plan);
    assert_eq!(labels(&driver)["kiln.dev/attempt"], "2");
    assert!(has(&args, "--epoch=2"), "{args:?}");
    assert!(
        has(&args, "--attach=10.244.1.2:7078,10.244.1.3:7078"),
        "{args:?}"
    );
    w.apply(&plan, 21);

    // The replacement starts: the executors wait for it, untouched.
    let plan = w.step(22);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, JobPhase::Pending);
    assert_eq!(plan.status.executors.running, 2);

    // It runs at a new address: no executor is lost or created for the handover ...
    w.set("wc-driver", |p| running(p, "10.244.3.9"));
    let plan = w.step(23);
    assert_eq!(plan.status.phase, JobPhase::Running);
    assert!(plan.losses.is_empty() && plan.actions.is_empty());
    assert_eq!(plan.status.executors.lost, 0);
    assert_eq!(reasons(&plan), ["Running"]);
    // ... and the bookkeeping goes on with the new driver: notice is given to it, and the
    // replacement executor dials it.
    w.set("wc-exec-1", |p| evicted(p, 30));
    let plan = w.step(30);
    assert!(plan.actions.contains(&Action::Decommission {
        executor: "wc-exec-1".into(),
        cause: "DisruptionTarget".into(),
        driver_ip: "10.244.3.9".into(),
        occurred_unix_ms: 1_700_000_030_000,
    }));
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    let replacement = first_applied_pod(&plan);
    let args = replacement.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(has(&args, "--driver=http://10.244.3.9:7077"), "{args:?}");
    let s = &plan.status;
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-2", "wc-exec-1"]);
    assert_eq!((s.executors.lost, s.recovery.driver_losses), (0, 1));
}

#[test]
fn a_vanished_driver_hands_over_only_the_executors_that_run() {
    let mut w = World::running();
    // A third executor, created just before the loss, has not started.
    w.job.spec.executors.count = 3;
    let plan = w.step(10);
    assert_eq!(applied_pods(&plan), ["wc-exec-2"]);
    w.apply(&plan, 10);
    // The driver pod is deleted outright, and an executor is being evicted.
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-driver"));
    w.set("wc-exec-1", |p| evicted(p, 11));
    let plan = w.step(11);
    assert_eq!(reasons(&plan), ["DriverLost", "DriverRestarted"]);
    assert!(note(&plan, "DriverLost").contains("wc-driver"));
    // Not started (it would dial the lost driver): deleted, without counting as a loss.
    assert_eq!(deleted(&plan), ["wc-exec-2"]);
    let (_, args) = applied_driver(&plan);
    assert!(has(&args, "--attach=10.244.1.2:7078"), "{args:?}");
    assert!(
        note(&plan, "DriverRestarted").contains("takes over 1 running executor and"),
        "{}",
        note(&plan, "DriverRestarted")
    );
    let s = &plan.status;
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-1"]);
    assert_eq!((s.executors.lost, s.recovery.driver_losses), (0, 1));
    w.apply(&plan, 11);

    // Once the new driver runs, the evicted executor is given notice like any other, and
    // both missing executors are created to dial the new driver.
    w.set("wc-driver", |p| running(p, "10.244.3.9"));
    let plan = w.step(12);
    assert!(plan.losses.is_empty());
    assert_eq!(applied_pods(&plan), ["wc-exec-3", "wc-exec-4"]);
    let s = &plan.status;
    assert_eq!(
        s.executors.pods,
        ["wc-exec-0", "wc-exec-3", "wc-exec-4", "wc-exec-1"]
    );
    assert_eq!(s.executors.draining, ["wc-exec-1"]);
    // The new driver never knew it: once its pod is gone it is a loss that costs nothing.
    w.apply(&plan, 12);
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-exec-1"));
    let plan = w.step(20);
    assert_eq!(
        plan.losses,
        [("wc-exec-1".to_string(), LossReason::Preempted)]
    );
    assert!(applied_pods(&plan).is_empty());
    let s = &plan.status;
    assert_eq!(s.executors.pods, ["wc-exec-0", "wc-exec-3", "wc-exec-4"]);
    assert_eq!(s.executors.lost, 1);
}

#[test]
fn with_no_executor_left_the_replacement_starts_over() {
    let mut w = World::running();
    w.pods.clear();
    let plan = w.step(11);
    let (driver, args) = applied_driver(&plan);
    assert!(!args.iter().any(|a| a.starts_with("--attach")), "{args:?}");
    assert!(has(&args, "--epoch=2"), "{args:?}");
    assert_eq!(Takeover::recorded(&driver), Some((0, 0)), "a replacement");
    assert!(
        note(&plan, "DriverRestarted").contains("starts the job over"),
        "{}",
        note(&plan, "DriverRestarted")
    );
    // The executors' pods went too: once the driver runs they are lost and replaced.
    w.apply(&plan, 11);
    w.set("wc-driver", |p| running(p, "10.244.3.9"));
    let plan = w.step(12);
    assert_eq!(plan.losses.len(), 2);
    assert_eq!(applied_pods(&plan), ["wc-exec-2", "wc-exec-3"]);
}

/// A job whose driver vanished once and whose replacement (attempt 2, at 10.244.3.9) runs
/// with both executors handed over.
fn taken_over() -> World {
    let mut w = World::running();
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-driver"));
    let plan = w.step(20);
    w.apply(&plan, 20);
    w.set("wc-driver", |p| running(p, "10.244.3.9"));
    w
}

#[test]
fn a_replacement_that_resumes_stages_is_an_event_once() {
    let mut w = taken_over();
    w.progress = Some(JobStatusResponse {
        stages_total: 5,
        stages_done: 3,
        driver_losses: 1,
        stages_resumed: 3,
        ..Default::default()
    });
    let plan = w.step(21);
    assert_eq!(reasons(&plan), ["DriverResumed", "Running"]);
    assert_eq!(
        note(&plan, "DriverResumed"),
        "driver attempt 2 took over 2 executors and resumed 3 stages without rerunning them"
    );
    assert_eq!(plan.status.recovery.stages_resumed, 3);
    // More resumed by the same driver (a later step's stages): counted, not told again.
    w.progress.as_mut().unwrap().stages_resumed = 4;
    let plan = w.step(22);
    assert!(plan.events.is_empty(), "{:?}", plan.events);
    assert_eq!(plan.status.recovery.stages_resumed, 4);
    // The count never goes backwards.
    w.progress.as_mut().unwrap().stages_resumed = 1;
    assert_eq!(w.step(23).status.recovery.stages_resumed, 4);
    // The final report agrees: nothing more to tell.
    let report = DriverReport {
        succeeded: true,
        stages: 5,
        driver_losses: 1,
        stages_resumed: 4,
        ..Default::default()
    }
    .to_termination_message();
    w.set("wc-driver", |p| exited(p, 0, Some(&report), 20, 30));
    let plan = w.step(30);
    assert_eq!(reasons(&plan), ["Succeeded"]);
    let s = &plan.status;
    assert_eq!(s.phase, JobPhase::Succeeded);
    assert_eq!(
        (s.recovery.stages_resumed, s.recovery.driver_losses),
        (4, 1)
    );
}

#[test]
fn each_replacement_that_resumes_is_an_event_even_if_only_its_report_says_so() {
    let mut w = taken_over();
    w.progress = Some(JobStatusResponse {
        driver_losses: 1,
        stages_resumed: 2,
        ..Default::default()
    });
    assert_eq!(reasons(&w.step(21)), ["DriverResumed", "Running"]);
    // A second loss: attempt 3 starts from the 2 stages resumed before it.
    w.progress = None;
    w.set("wc-driver", |p| exited(p, 137, None, 20, 25));
    let plan = w.step(25);
    w.apply(&plan, 25);
    let plan = w.step(26);
    let (driver, args) = applied_driver(&plan);
    assert!(has(&args, "--epoch=3"), "{args:?}");
    assert_eq!(Takeover::recorded(&driver), Some((2, 2)));
    assert_eq!(plan.status.recovery.driver_losses, 2);
    w.apply(&plan, 26);
    w.set("wc-driver", |p| running(p, "10.244.3.10"));
    w.step(27);
    // It finishes before the operator hears from it: its report tells what it resumed.
    let report = DriverReport {
        succeeded: true,
        driver_losses: 2,
        stages_resumed: 5,
        ..Default::default()
    }
    .to_termination_message();
    w.set("wc-driver", |p| exited(p, 0, Some(&report), 26, 30));
    let plan = w.step(30);
    assert_eq!(reasons(&plan), ["DriverResumed", "Succeeded"]);
    assert_eq!(
        note(&plan, "DriverResumed"),
        "driver attempt 3 took over 2 executors and resumed 3 stages without rerunning them"
    );
    assert_eq!(plan.status.recovery.stages_resumed, 5);
    // A first driver never resumes, whatever it says.
    let mut w = World::running();
    w.progress = Some(JobStatusResponse {
        stages_resumed: 1,
        ..Default::default()
    });
    assert!(w.step(3).events.is_empty());
}

#[test]
fn drivers_lost_too_often_fail_the_job() {
    // Vanished, with no restart allowed.
    let mut w = World::running();
    w.config.max_driver_restarts = 0;
    w.pods
        .retain(|p| p.metadata.name.as_deref() != Some("wc-driver"));
    let plan = w.step(20);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    assert_eq!(plan.failure, Some(FailureReason::DriverLost));
    assert_eq!(
        plan.status.condition(CONDITION_FAILED).unwrap().reason,
        FailureReason::DriverLost.as_str()
    );
    assert_eq!(plan.status.recovery.driver_losses, 1);
    assert_eq!(deleted(&plan), ["wc-exec-0", "wc-exec-1"]);
    // Lost a second time, with one restart allowed: the executors go with the job.
    let mut w = World::running();
    w.config.max_driver_restarts = 1;
    w.set("wc-driver", |p| exited(p, 137, None, 1, 20));
    let plan = w.step(20);
    w.apply(&plan, 20);
    let plan = w.step(21);
    assert_eq!(applied_pods(&plan), ["wc-driver"]);
    w.apply(&plan, 21);
    w.set("wc-driver", |p| running(p, "10.244.3.9"));
    w.step(22);
    w.set("wc-driver", |p| evicted(p, 30));
    let plan = w.step(30);
    assert_eq!(plan.status.phase, JobPhase::Failed);
    assert_eq!(plan.failure, Some(FailureReason::DriverLost));
    let c = plan.status.condition(CONDITION_FAILED).unwrap();
    assert!(c.message.contains("after 1 restarts"), "{}", c.message);
    let s = &plan.status;
    assert_eq!((s.driver.restarts, s.recovery.driver_losses), (1, 2));
    let deleted = deleted(&plan);
    assert!(
        deleted.contains(&"wc-exec-0") && deleted.contains(&"wc-exec-1"),
        "{deleted:?}"
    );
}
