use std::collections::HashMap;

use super::*;

fn policy() -> FailurePolicy {
    FailurePolicy {
        max_task_attempts: 3,
        max_stage_attempts: 3,
        max_executor_losses: 2,
        ..Default::default()
    }
}

fn task(stage: u32, partition: u32) -> TaskId {
    TaskId { stage, partition }
}

/// Two map stages (1, 2) feeding a join stage (3), on executors a and b.
fn two_stage_job() -> (Scheduler, Instant) {
    let now = Instant::now();
    let mut s = Scheduler::new(policy());
    assert!(s.register_executor("a", "a:1", now));
    assert!(s.register_executor("b", "b:1", now));
    let ev = s.add_stage(1, 2, vec![], None);
    assert_eq!(ev, vec![SchedulerEvent::StageResolved(1)]);
    s.add_stage(2, 2, vec![], None);
    assert!(s.add_stage(3, 2, vec![1, 2], None).is_empty());
    (s, now)
}

fn run_all(s: &mut Scheduler, stage: u32) {
    for exec in ["a", "b"] {
        for (t, attempt) in s.assign(exec, 1) {
            assert_eq!(t.stage, stage);
            s.task_succeeded(t, attempt, exec);
        }
    }
}

#[test]
fn stages_run_in_dependency_order() {
    let (mut s, _) = two_stage_job();
    let first = s.assign("a", 8);
    assert_eq!(first.len(), 4, "both map stages are runnable at once");
    assert!(first.iter().all(|(t, _)| t.stage != 3));
    assert_eq!(s.status(3), Some(StageStatus::Unresolved));
    let mut events = Vec::new();
    for (t, a) in first {
        let (counted, ev) = s.task_succeeded(t, a, "a");
        assert!(counted);
        events.extend(ev);
    }
    assert!(events.contains(&SchedulerEvent::StageSucceeded(1)));
    assert!(events.contains(&SchedulerEvent::StageResolved(3)));
    assert_eq!(s.epoch(3), 1);
    assert_eq!(s.locations(1).unwrap(), vec![("a".into(), "a:1".into()); 2]);
    let join = s.assign("b", 8);
    assert_eq!(join.len(), 2);
    assert!(join.iter().all(|(t, _)| t.stage == 3));
}

#[test]
fn a_late_or_duplicate_report_is_ignored() {
    let (mut s, _) = two_stage_job();
    let (t, attempt) = s.assign("a", 1)[0];
    assert!(s.task_succeeded(t, attempt, "a").0);
    assert!(!s.task_succeeded(t, attempt, "a").0, "duplicate counted");
    assert!(!s.task_succeeded(task(1, 1), 0, "b").0, "never assigned");
}

#[test]
fn a_data_error_fails_the_job_at_once() {
    let (mut s, _) = two_stage_job();
    let (t, a) = s.assign("a", 1)[0];
    let ev = s.task_failed(t, a, "a", TaskFailure::Data("division by zero".into()));
    assert!(
        matches!(&ev[..], [SchedulerEvent::JobFailed(r)] if r.to_string().contains("division by zero"))
    );
    assert!(s.assign("b", 4).is_empty(), "nothing runs after a failure");
}

#[test]
fn executor_failures_retry_up_to_the_budget() {
    let now = Instant::now();
    let mut s = Scheduler::new(policy());
    s.register_executor("a", "a:1", now);
    s.add_stage(1, 1, vec![], None);
    for n in 1..=3u32 {
        assert_eq!(s.assign("a", 1), vec![(task(1, 0), n - 1)]);
        let ev = s.task_failed(task(1, 0), n - 1, "a", TaskFailure::Executor("oom".into()));
        if n < 3 {
            assert!(ev.is_empty(), "{ev:?}");
        } else {
            assert!(
                matches!(&ev[..], [SchedulerEvent::JobFailed(r)] if r.to_string().contains("maxTaskAttempts") && r.to_string().contains("oom")),
                "{ev:?}"
            );
        }
    }
}

#[test]
fn losing_an_executor_recomputes_only_its_outputs() {
    let (mut s, now) = two_stage_job();
    // map stages: a runs partition 0 of each, b partition 1 of each
    run_all(&mut s, 1);
    run_all(&mut s, 2);
    assert_eq!(s.status(1), Some(StageStatus::Succeeded));
    assert_eq!(s.status(2), Some(StageStatus::Succeeded));
    assert_eq!(
        s.outputs_on("b"),
        HashMap::from([(1, vec![1]), (2, vec![1])])
    );
    // the join starts on a, then b is lost
    let join = s.assign("a", 1);
    assert_eq!(join[0].0.stage, 3);
    let ev = s.executor_lost("b", LossReason::Preempted);
    assert!(s.failure().is_none(), "{ev:?}");
    assert_eq!(s.status(3), Some(StageStatus::Unresolved));
    // a new executor joins; only the two lost map partitions are offered
    s.register_executor("c", "c:1", now);
    let redo = s.assign("c", 8);
    assert_eq!(
        redo.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        vec![task(1, 1), task(2, 1)]
    );
    assert!(redo.iter().all(|(_, attempt)| *attempt == 1));
    for (t, a) in redo {
        s.task_succeeded(t, a, "c");
    }
    assert_eq!(
        s.launch_counts(1),
        (3, 1),
        "one recomputed map task in stage 1"
    );
    assert_eq!(s.status(3), Some(StageStatus::Running), "join resumes");
    assert_eq!(
        s.epoch(3),
        2,
        "join's plan must be re-resolved with new locations"
    );
    assert_eq!(
        s.locations(1).unwrap(),
        vec![("a".into(), "a:1".into()), ("c".into(), "c:1".into())]
    );
    // the join's running task on a is still valid; the other partition goes to anyone
    assert_eq!(s.assign("c", 8), vec![(task(3, 1), 0)]);
}

#[test]
fn reclaims_count_against_no_budget_but_failures_do() {
    let (mut s, now) = two_stage_job();
    for (e, reason) in [
        ("b", LossReason::Preempted),
        ("c", LossReason::NodeLost),
        ("d", LossReason::Drained),
    ] {
        s.register_executor(e, &format!("{e}:1"), now);
        assert!(!s.assign(e, 8).is_empty() || e == "b", "{e} got work");
        s.executor_lost(e, reason);
    }
    let _ = s.assign("a", 8);
    assert!(s.failure().is_none(), "{:?}", s.failure());
    assert!(
        s.stages
            .values()
            .all(|st| st.failures.iter().all(|f| *f == 0)),
        "no task attempt counted"
    );
    for e in ["e", "f"] {
        s.register_executor(e, &format!("{e}:1"), now);
        s.executor_lost(e, LossReason::Failed);
    }
    assert!(
        s.failure().is_none(),
        "two failures are within a budget of 2"
    );
    s.register_executor("g", "g:1", now);
    let ev = s.executor_lost("g", LossReason::OomKilled);
    assert!(
        matches!(&ev[..], [SchedulerEvent::JobFailed(r)] if r.to_string().contains("lost 3 executors")),
        "{ev:?}"
    );
    assert!(
        !s.register_executor("d", "d:1", now),
        "a lost id cannot come back"
    );
}

#[test]
fn a_running_task_lost_with_a_failed_executor_counts_as_an_attempt() {
    let (mut s, now) = two_stage_job();
    for e in ["b", "c", "d"] {
        s.register_executor(e, &format!("{e}:1"), now);
    }
    let mut policy = policy();
    policy.max_executor_losses = 10;
    s.policy = policy;
    let first = s.assign("b", 1)[0].0;
    s.executor_lost("b", LossReason::Failed);
    assert_eq!(s.assign("c", 1)[0].0, first);
    s.executor_lost("c", LossReason::Failed);
    assert_eq!(s.assign("d", 1)[0].0, first);
    let ev = s.executor_lost("d", LossReason::Failed);
    assert!(
        matches!(&ev[..], [SchedulerEvent::JobFailed(r)] if r.to_string().contains("maxTaskAttempts")),
        "{ev:?}"
    );
}

#[test]
fn a_silence_counts_only_once_settled_as_the_executors_own_fault() {
    let now = Instant::now();
    let mut s = Scheduler::new(FailurePolicy {
        max_executor_losses: 0,
        ..policy()
    });
    s.add_stage(1, 2, vec![], None);
    for e in ["a", "b", "c"] {
        s.register_executor(e, &format!("{e}:1"), now);
    }
    let _ = s.assign("a", 1);
    assert!(
        s.executor_silent("a").is_empty(),
        "a silence alone fails nothing"
    );
    assert!(s.executor_lost("a", LossReason::NodeLost).is_empty());
    assert_eq!(s.losses()[0].reason, LossReason::NodeLost);
    assert!(s.failure().is_none());
    s.executor_silent("b");
    let ev = s.executor_lost("b", LossReason::HeartbeatTimeout);
    assert!(
        matches!(&ev[..], [SchedulerEvent::JobFailed(r)] if r.to_string().contains("maxExecutorLosses")),
        "{ev:?}"
    );
    assert!(
        s.executor_lost("b", LossReason::NodeLost).is_empty(),
        "a settled loss is not settled again"
    );
}

#[test]
fn a_decommissioned_executor_takes_no_tasks_and_lists_what_only_it_holds() {
    let (mut s, _) = two_stage_job();
    run_all(&mut s, 1);
    let on_b = s.outputs_on("b");
    let running = s.assign("b", 1);
    assert_eq!(running.len(), 1, "b runs a task of stage 2");
    let outputs = s.decommission("b").expect("b is live");
    assert!(s.is_draining("b"));
    assert!(
        s.assign("b", 8).is_empty(),
        "no tasks for a draining executor"
    );
    assert_eq!(
        outputs,
        on_b[&1].iter().map(|p| task(1, *p)).collect::<Vec<_>>(),
        "stage 1's outputs on b are needed by the join"
    );
    // b's running task carries on there, until given up: then it goes back to pending,
    // counting nothing, and b is to stop it.
    let (t, attempt) = running[0];
    assert!(!s.assign("a", 8).iter().any(|(r, _)| *r == t));
    assert_eq!(s.continuing_on("b"), 1);
    s.abandon_continuing("b");
    assert_eq!(s.continuing_on("b"), 0);
    assert_eq!(s.take_cancels("b"), vec![(t, attempt)]);
    assert!(s.assign("a", 8).iter().any(|(r, _)| *r == t));
    assert!(s.stages[&2].failures.iter().all(|f| *f == 0));
    assert!(s.decommission("z").is_none());
}

#[test]
fn a_moved_output_lives_on_its_new_executor_and_its_readers_re_resolve() {
    let (mut s, now) = two_stage_job();
    run_all(&mut s, 1);
    run_all(&mut s, 2);
    assert_eq!(s.status(3), Some(StageStatus::Resolved));
    let epoch = s.epoch(3);
    let moving = s.decommission("b").expect("live");
    assert!(!moving.is_empty());
    s.register_executor("c", "c:1", now);
    assert!(!s.move_output(moving[0], "b", "z"), "no such target");
    assert!(!s.move_output(moving[0], "a", "c"), "not held by a");
    for t in &moving {
        assert!(s.move_output(*t, "b", "c"));
    }
    assert!(
        s.epoch(3) > epoch,
        "the join's plan names the new locations"
    );
    assert!(s.outputs_only_on("b").is_empty());
    let ev = s.executor_lost("b", LossReason::Drained);
    assert!(
        !ev.iter().any(|e| matches!(e, SchedulerEvent::JobFailed(_))),
        "{ev:?}"
    );
    assert_eq!(s.outputs_lost(), 0, "nothing to recompute after the drain");
    assert!(
        s.locations(1)
            .unwrap()
            .iter()
            .all(|(e, _)| e == "a" || e == "c")
    );
}

#[test]
fn fetch_failure_resubmits_the_map_task_and_then_the_reader() {
    let (mut s, _) = two_stage_job();
    run_all(&mut s, 1);
    run_all(&mut s, 2);
    let (t, a) = s.assign("a", 1)[0];
    assert_eq!(t.stage, 3);
    let ev = s.task_failed(
        t,
        a,
        "a",
        TaskFailure::Fetch {
            executor: "b".into(),
            stage: 2,
            map_partition: 1,
        },
    );
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(s.status(2), Some(StageStatus::Resolved));
    assert_eq!(s.status(3), Some(StageStatus::Unresolved));
    let redo = s.assign("a", 8);
    assert_eq!(redo, vec![(task(2, 1), 1)]);
    let (_, ev) = s.task_succeeded(task(2, 1), 1, "a");
    assert!(ev.contains(&SchedulerEvent::StageResolved(3)));
    let again: Vec<TaskId> = s.assign("a", 8).into_iter().map(|(t, _)| t).collect();
    assert_eq!(again, vec![task(3, 0), task(3, 1)]);
}

#[test]
fn outputs_no_longer_needed_are_not_recomputed() {
    let (mut s, _) = two_stage_job();
    run_all(&mut s, 1);
    run_all(&mut s, 2);
    for exec in ["a", "b"] {
        for (t, a) in s.assign(exec, 1) {
            s.task_succeeded(t, a, exec);
        }
    }
    assert_eq!(s.status(3), Some(StageStatus::Succeeded));
    s.pin(3, true);
    s.executor_lost("b", LossReason::Preempted);
    // stage 3 is pinned (a result not yet fetched): its lost partition reruns, which needs
    // the lost map outputs of 1 and 2 back first.
    let redo: Vec<TaskId> = s.assign("a", 8).into_iter().map(|(t, _)| t).collect();
    assert_eq!(redo, vec![task(1, 1), task(2, 1)]);
    // once released, a loss costs nothing
    for (t, a) in [(task(1, 1), 1), (task(2, 1), 1)] {
        s.task_succeeded(t, a, "a");
    }
    let last = s.assign("a", 8);
    assert_eq!(last, vec![(task(3, 1), 1)]);
    s.task_succeeded(task(3, 1), 1, "a");
    // while 3 is pinned its whole lineage is kept
    assert!(s.collect_garbage().is_empty());
    s.pin(3, false);
    assert_eq!(s.collect_garbage(), vec![1, 2, 3]);
    s.executor_lost("a", LossReason::Preempted);
    assert!(s.assign("a", 8).is_empty());
    assert_eq!(s.status(3), Some(StageStatus::Succeeded));
}

#[test]
fn cached_partitions_are_read_where_they_live() {
    let now = Instant::now();
    let mut s = Scheduler::new(policy());
    s.register_executor("a", "a:1", now);
    s.register_executor("b", "b:1", now);
    s.add_stage(1, 2, vec![], None);
    s.pin(1, true);
    let (t0, a0) = s.assign("a", 1)[0];
    let (t1, a1) = s.assign("b", 1)[0];
    s.task_succeeded(t0, a0, "a");
    s.task_succeeded(t1, a1, "b");
    s.add_stage(2, 2, vec![1], Some(1));
    // b asks first with room for both, but only gets the partition it holds
    assert_eq!(s.assign("b", 2), vec![(task(2, 1), 0)]);
    assert_eq!(s.assign("a", 2), vec![(task(2, 0), 0)]);
}

#[test]
fn a_lost_cached_partition_is_recomputed_alone_through_its_kept_lineage() {
    // 1 (scan, 2 partitions) -> 2 (cached, 2 partitions) -> 3 (a later step, 2 partitions)
    let now = Instant::now();
    let mut s = Scheduler::new(policy());
    for e in ["a", "b", "c"] {
        s.register_executor(e, &format!("{e}:1"), now);
    }
    s.add_stage(1, 2, vec![], None);
    s.add_stage(2, 2, vec![1], None);
    s.pin(2, true);
    // map outputs on a and b, the cached partitions on a and c
    for (e, stage) in [("a", 1), ("b", 1), ("a", 2), ("c", 2)] {
        let (t, at) = s.assign(e, 1)[0];
        assert_eq!(t.stage, stage);
        s.task_succeeded(t, at, e);
    }
    assert!(s.collect_garbage().is_empty(), "the lineage of 2 stays");
    s.add_stage(3, 2, vec![2], Some(2));
    s.executor_lost("c", LossReason::Preempted);
    // only the cached partition c held reruns, reading the kept map outputs
    let redo: Vec<TaskId> = s.assign("b", 8).into_iter().map(|(t, _)| t).collect();
    assert_eq!(redo, vec![task(2, 1)]);
    assert_eq!(s.outputs_lost(), 1);
    assert_eq!(s.losses()[0].outputs_lost, 1);
}

#[test]
fn heartbeats_expire() {
    let (mut s, now) = two_stage_job();
    let later = now + Duration::from_secs(11);
    s.heartbeat("a", later);
    assert_eq!(
        s.expired(later, Duration::from_secs(10)),
        vec![("b".to_string(), now)]
    );
}

#[test]
fn an_input_lost_while_nothing_read_it_is_recomputed_before_a_stage_that_needs_it_again() {
    let now = Instant::now();
    let mut s = Scheduler::new(policy());
    for e in ["a", "b", "c"] {
        assert!(s.register_executor(e, &format!("{e}:1"), now));
    }
    s.add_stage(1, 1, vec![], None);
    s.add_stage(2, 1, vec![1], None);
    s.add_stage(3, 1, vec![2], None);
    for (stage, exec) in [(1, "a"), (2, "b")] {
        let picked = s.assign(exec, 1);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].0.stage, stage);
        s.task_succeeded(picked[0].0, picked[0].1, exec);
    }
    // Stage 1's output goes while nothing reads it (stage 2 is done) ...
    s.executor_lost("a", LossReason::Preempted);
    // ... then stage 2's, which stage 3 still needs: stage 1 runs again first.
    s.executor_lost("b", LossReason::Preempted);
    let next = s.assign("c", 8);
    assert_eq!(next.iter().map(|(t, _)| t.stage).collect::<Vec<_>>(), [1]);
    assert!(s.locations(1).is_none());
    s.task_succeeded(next[0].0, next[0].1, "c");
    let next = s.assign("c", 8);
    assert_eq!(next.iter().map(|(t, _)| t.stage).collect::<Vec<_>>(), [2]);
    assert!(s.locations(1).is_some());
}
