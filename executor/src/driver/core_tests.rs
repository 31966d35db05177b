use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_api::FailurePolicy;

use super::*;
use crate::driver::journal::Journal;
use crate::rpc;

fn policy() -> FailurePolicy {
    FailurePolicy {
        max_task_attempts: 3,
        max_stage_attempts: 4,
        max_executor_losses: 4,
        ..Default::default()
    }
}

fn stage(id: u32, partitions: usize, inputs: Vec<u32>, sink: bool) -> StageSubmission {
    StageSubmission {
        id,
        description: format!("stage {id}"),
        partitions,
        inputs,
        preferred: None,
        shuffle: !sink,
        sink,
        fingerprint: 1000 + u64::from(id),
        blocks_per_task: if sink { 1 } else { 4 },
    }
}

fn ok() -> TaskOutcome {
    TaskOutcome::Succeeded(StageCounters {
        output_rows: 10,
        ..Default::default()
    })
}

/// The committing attempt of each partition of output stage `stage`.
fn attempts(core: &DriverCore, stage: u32) -> Vec<(u32, u32)> {
    core.commits(stage)
        .iter()
        .map(|c| (c.partition, c.attempt))
        .collect()
}

fn none() -> BTreeSet<(TaskId, u32)> {
    BTreeSet::new()
}

/// A map stage (1, two partitions) feeding an output stage (2, two partitions), executors a
/// and b registered.
fn job(now: Instant) -> DriverCore {
    let mut core = DriverCore::new(policy(), "run-1", 1, now);
    assert_eq!(
        core.register("a", "a:1", &[], None, now),
        Registration::Accepted
    );
    assert_eq!(
        core.register("b", "b:1", &[], None, now),
        Registration::Accepted
    );
    let last = core.submit(
        "out",
        vec![stage(1, 2, vec![], false), stage(2, 2, vec![1], true)],
        false,
    );
    assert_eq!(last, 2);
    core
}

fn tasks(answer: PollAnswer) -> Vec<(TaskId, u32)> {
    match answer {
        PollAnswer::Work { tasks, .. } => tasks,
        other => panic!("expected work, got {other:?}"),
    }
}

/// Polls `executor` with everything it was given as held, and reports each success.
fn run_round(core: &mut DriverCore, executor: &str, now: Instant) -> usize {
    let got = tasks(core.poll(executor, 8, &none(), true, now));
    for (t, attempt) in &got {
        core.report(executor, *t, *attempt, ok());
    }
    got.len()
}

#[test]
fn a_job_runs_to_its_end_and_says_so() {
    let now = Instant::now();
    let mut core = job(now);
    let submitted = core.take_progress();
    assert!(matches!(
        submitted.as_slice(),
        [
            Progress::ExecutorRegistered { .. },
            Progress::ExecutorRegistered { .. },
            Progress::StageSubmitted { stage: 1, .. },
            Progress::StageSubmitted { stage: 2, .. },
        ]
    ));
    assert_eq!(run_round(&mut core, "a", now), 2, "the map stage first");
    assert_eq!(core.outcome(2), StageOutcome::Waiting);
    assert_eq!(run_round(&mut core, "b", now), 2, "then the output stage");
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    assert_eq!(attempts(&core, 2), vec![(0, 0), (1, 0)]);
    let progress = core.take_progress();
    assert!(progress.contains(&Progress::StageDone { stage: 1 }));
    assert!(progress.contains(&Progress::StageDone { stage: 2 }));
    let summary = core.summary(&kiln_api::JobSpec::default());
    assert_eq!(summary.totals.tasks, 4);
    assert_eq!(summary.totals.attempts, 4);
    assert_eq!(summary.totals.counters.output_rows, 40);
}

#[test]
fn an_idle_poll_waits_and_the_last_round_answers() {
    let now = Instant::now();
    let mut core = DriverCore::new(policy(), "run-1", 1, now);
    core.register("a", "a:1", &[], None, now);
    assert_eq!(core.poll("a", 2, &none(), false, now), PollAnswer::Wait);
    assert_eq!(
        core.poll("a", 2, &none(), true, now),
        PollAnswer::Work {
            tasks: vec![],
            drops: vec![],
            journal: None,
            migrations: vec![],
            cancels: vec![],
        }
    );
    core.take_changed();
    assert_eq!(core.poll("a", 2, &none(), false, now), PollAnswer::Wait);
    assert!(
        !core.take_changed(),
        "a poll that took nothing wakes nobody"
    );
}

#[test]
fn a_task_whose_assignment_was_lost_is_rescheduled_without_counting_a_failure() {
    let now = Instant::now();
    let mut core = job(now);
    let given = tasks(core.poll("a", 1, &none(), true, now));
    let (lost_task, attempt) = given[0];
    // The answer never reached the executor: its next poll does not list the attempt.
    let again = tasks(core.poll("a", 1, &none(), true, now));
    assert_eq!(again.len(), 1);
    assert!(core.take_changed(), "reconciling wakes the other polls");
    // The lost task comes back as a new attempt, to whoever asks next.
    let b = tasks(core.poll("b", 1, &none(), true, now));
    let retried: Vec<_> = again
        .iter()
        .chain(&b)
        .filter(|(t, _)| *t == lost_task)
        .collect();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].1, attempt + 1);
    // The stage still succeeds within a budget of three attempts per task.
    for (t, a) in again {
        core.report("a", t, a, ok());
    }
    for (t, a) in b {
        core.report("b", t, a, ok());
    }
    assert_eq!(core.summary(&Default::default()).recovery.outputs_lost, 0);
    assert_eq!(core.outcome(1), StageOutcome::Succeeded);
    assert_eq!(
        core.outcome(2),
        StageOutcome::Waiting,
        "stage 2 still to run"
    );
    assert!(core.locations(1).is_some());
}

#[test]
fn an_attempt_the_executor_still_holds_is_left_running() {
    let now = Instant::now();
    let mut core = job(now);
    let given = tasks(core.poll("a", 2, &none(), true, now));
    let held: BTreeSet<(TaskId, u32)> = given.iter().copied().collect();
    assert_eq!(
        core.poll("a", 0, &held, true, now),
        PollAnswer::Work {
            tasks: vec![],
            drops: vec![],
            journal: None,
            migrations: vec![],
            cancels: vec![],
        }
    );
    assert!(
        tasks(core.poll("b", 2, &none(), true, now)).is_empty(),
        "nothing was put back"
    );
    for (t, a) in given {
        assert!(core.report("a", t, a, ok()));
    }
    assert!(core.locations(1).is_some());
}

#[test]
fn a_lost_report_is_recovered_and_the_late_one_ignored() {
    let now = Instant::now();
    let mut core = job(now);
    let given = tasks(core.poll("a", 2, &none(), true, now));
    // The executor finished the first task but its report was lost, and it forgot it.
    let (t0, a0) = given[0];
    let held: BTreeSet<(TaskId, u32)> = given[1..].iter().copied().collect();
    core.poll("a", 0, &held, true, now);
    let rerun = tasks(core.poll("b", 1, &none(), true, now));
    assert_eq!(rerun, vec![(t0, a0 + 1)]);
    // Should the old report turn up after all, it does not count.
    assert!(!core.report("a", t0, a0, ok()));
    assert!(core.report("b", t0, a0 + 1, ok()));
    assert!(core.report("a", given[1].0, given[1].1, ok()));
    assert_eq!(core.locations(1).unwrap()[t0.partition as usize].0, "b");
}

#[test]
fn exactly_one_attempt_per_output_partition_commits() {
    let now = Instant::now();
    let mut core = job(now);
    run_round(&mut core, "a", now);
    let out = tasks(core.poll("b", 1, &none(), true, now));
    let (t, first) = out[0];
    // b's attempt is lost from view (a network partition): the task is handed to a.
    core.poll("b", 0, &none(), true, now);
    let second = tasks(core.poll("a", 8, &none(), true, now));
    let retry = second.iter().find(|(x, _)| *x == t).copied().unwrap();
    assert!(core.report("a", t, retry.1, ok()));
    // The zombie attempt finishes later: it neither counts nor commits.
    assert!(!core.report("b", t, first, ok()));
    for (x, a) in second.iter().filter(|(x, _)| *x != t) {
        core.report("a", *x, *a, ok());
    }
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    let commits = attempts(&core, 2);
    assert_eq!(commits.len(), 2);
    assert!(commits.contains(&(t.partition, retry.1)));
}

#[test]
fn losing_the_executor_that_wrote_an_output_file_loses_nothing() {
    let now = Instant::now();
    let mut core = job(now);
    run_round(&mut core, "a", now);
    let out = tasks(core.poll("b", 1, &none(), true, now));
    core.report("b", out[0].0, out[0].1, ok());
    core.register("c", "c:1", &[], None, now);
    assert!(core.lose("b", LossReason::Preempted, None, now));
    // Only the remaining output partition runs; the committed one stays committed.
    let rest = tasks(core.poll("c", 8, &none(), true, now));
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].0, out[0].0);
    core.report("c", rest[0].0, rest[0].1, ok());
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    assert_eq!(core.commits(2).len(), 2);
    // Its files outlive b: the stage is complete though not all of it has a live holder.
    assert!(core.locations(2).is_none());
}

#[test]
fn all_executors_lost_at_once_then_replacements_finish_the_job() {
    let now = Instant::now();
    let mut core = job(now);
    run_round(&mut core, "a", now);
    tasks(core.poll("b", 8, &none(), true, now));
    core.lose("a", LossReason::Preempted, Some(now), now);
    core.lose("b", LossReason::Preempted, Some(now), now);
    assert_eq!(core.live_width(), 0);
    assert_eq!(core.outcome(2), StageOutcome::Waiting);
    let later = now + Duration::from_secs(1);
    core.register("c", "c:1", &[], None, later);
    core.register("d", "d:1", &[], None, later);
    let mut rounds = 0;
    while core.outcome(2) == StageOutcome::Waiting && rounds < 5 {
        run_round(&mut core, "c", later);
        run_round(&mut core, "d", later);
        rounds += 1;
    }
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    let summary = core.summary(&Default::default());
    assert_eq!(summary.recovery.executors_lost["Preempted"], 2);
    assert_eq!(summary.recovery.outputs_lost, 2, "a's two map outputs");
    assert!(
        summary
            .recovery
            .losses
            .iter()
            .all(|l| l.full_width_ms == Some(1000))
    );
}

#[test]
fn a_result_partition_that_cannot_be_fetched_is_recomputed() {
    let now = Instant::now();
    let mut core = DriverCore::new(policy(), "run-1", 1, now);
    core.register("a", "a:1", &[], None, now);
    core.submit("r", vec![stage(1, 2, vec![], false)], true);
    run_round(&mut core, "a", now);
    assert_eq!(core.outcome(1), StageOutcome::Succeeded);
    core.result_lost(1, 1, "a");
    assert_eq!(core.outcome(1), StageOutcome::Waiting);
    let rerun = tasks(core.poll("a", 8, &none(), true, now));
    assert_eq!(
        rerun,
        vec![(
            TaskId {
                stage: 1,
                partition: 1
            },
            1
        )]
    );
    core.report("a", rerun[0].0, rerun[0].1, ok());
    assert_eq!(core.outcome(1), StageOutcome::Succeeded);
    // A report of a fetch from an executor that no longer holds it changes nothing.
    core.result_lost(1, 0, "z");
    assert_eq!(core.outcome(1), StageOutcome::Succeeded);
}

#[test]
fn silent_executors_expire_and_shutdown_sends_the_rest_home() {
    let now = Instant::now();
    let mut core = job(now);
    let later = now + Duration::from_secs(5);
    core.poll("a", 0, &none(), true, later);
    assert_eq!(
        core.expire(later, Duration::from_secs(2)),
        vec!["b".to_string()]
    );
    assert_eq!(
        core.poll("b", 1, &none(), true, later),
        PollAnswer::UnknownExecutor
    );
    assert!(matches!(
        core.register("b", "b:1", &[], None, later),
        Registration::Refused(_)
    ));
    // A live id is not taken over from another address; the same process may register
    // again (its answer was lost).
    assert!(matches!(
        core.register("a", "mallory:1", &[], None, later),
        Registration::Refused(why) if why.contains("live at a:1")
    ));
    assert_eq!(
        core.register("a", "a:1", &[], None, later),
        Registration::Accepted
    );
    core.begin_shutdown();
    assert_eq!(
        core.poll("a", 1, &none(), true, later),
        PollAnswer::Shutdown
    );
    assert_eq!(core.live_width(), 0, "a has been told to leave");
    let status = core.job_status();
    assert_eq!(status.executors_lost, 1);
    assert_eq!(status.lost_executors[0].reason, "HeartbeatTimeout");
}

#[test]
fn a_spent_budget_fails_the_stage_the_runner_waits_for() {
    let now = Instant::now();
    let mut core = job(now);
    for attempt in 0..3 {
        let got = tasks(core.poll("a", 1, &none(), true, now));
        assert_eq!(got[0].1, attempt);
        core.report(
            "a",
            got[0].0,
            got[0].1,
            TaskOutcome::Failed(TaskFailure::Executor("disk full".into())),
        );
    }
    match core.outcome(2) {
        StageOutcome::Failed(f) => {
            assert_eq!(f.reason(), kiln_api::FailureReason::TaskAttemptsExceeded)
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Runs the job's map stage on `a` and one output partition on `a`; returns the journal
/// the driver hands executors, read from a poll answer as an executor gets it.
fn first_driver_half_done(now: Instant) -> (Journal, TaskId) {
    let mut core = job(now);
    assert_eq!(run_round(&mut core, "a", now), 2);
    let out = tasks(core.poll("a", 1, &none(), true, now));
    assert!(core.report("a", out[0].0, out[0].1, ok()));
    let journal = match core.poll("b", 0, &none(), true, now) {
        PollAnswer::Work {
            journal: Some(bytes),
            ..
        } => Journal::decode(&bytes).expect("a readable journal"),
        other => panic!("expected the journal with the answer, got {other:?}"),
    };
    assert_eq!(journal, core.journal());
    assert!(
        matches!(
            core.poll("b", 0, &none(), true, now),
            PollAnswer::Work { journal: None, .. }
        ),
        "sent once per change"
    );
    (journal, out[0].0)
}

#[test]
fn a_replacement_driver_adopts_held_blocks_and_committed_output_and_runs_the_rest() {
    let now = Instant::now();
    let (journal, committed) = first_driver_half_done(now);
    assert_eq!(journal.epoch, 1);
    assert_eq!(journal.commits.len(), 1);

    let mut core = DriverCore::new(policy(), "run-2", 2, now);
    let held = [(1, 1001, vec![0, 1])];
    core.register("a", "a:1", &held, Some(journal), now);
    core.register("b", "b:1", &[], None, now);
    core.submit(
        "out",
        vec![stage(1, 2, vec![], false), stage(2, 2, vec![1], true)],
        false,
    );
    assert_eq!(
        core.outcome(1),
        StageOutcome::Succeeded,
        "map stage adopted"
    );
    assert!(
        core.take_progress()
            .contains(&Progress::StageResumed { stage: 1 })
    );
    assert_eq!((core.driver_losses(), core.stages_resumed()), (1, 1));
    // Only the output partition not committed runs.
    let rest = tasks(core.poll("b", 8, &none(), true, now));
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].0, committed);
    assert!(core.report("b", rest[0].0, rest[0].1, ok()));
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    let runs: Vec<(u32, String)> = core
        .commits(2)
        .into_iter()
        .map(|c| (c.partition, c.run_id))
        .collect();
    assert!(runs.contains(&(committed.partition, "run-1".to_string())));
    assert!(runs.contains(&(rest[0].0.partition, "run-2".to_string())));
    let summary = core.summary(&Default::default());
    assert_eq!(summary.recovery.driver_losses, 1);
    assert_eq!(summary.recovery.stages_resumed, 1);
    assert_eq!(
        core.stage(2).map(|s| s.counters.output_rows),
        Some(20),
        "the adopted partition's rows count"
    );
}

#[test]
fn only_same_plans_on_live_executors_are_adopted_and_older_journals_only() {
    let now = Instant::now();
    let (journal, _) = first_driver_half_done(now);
    let mut core = DriverCore::new(policy(), "run-2", 2, now);
    // a holds partition 0 of a stage planned differently, c held partition 1 but is lost
    // before the stages are submitted; a journal of this driver's own epoch is no one's.
    let own_epoch = Journal {
        epoch: 2,
        ..journal.clone()
    };
    core.register("a", "a:1", &[(1, 999, vec![0])], Some(own_epoch), now);
    core.register("c", "c:1", &[(1, 1001, vec![1])], None, now);
    core.lose("c", LossReason::Preempted, None, now);
    core.submit(
        "out",
        vec![stage(1, 2, vec![], false), stage(2, 2, vec![1], true)],
        false,
    );
    assert_eq!(core.stages_resumed(), 0);
    assert_eq!(tasks(core.poll("a", 8, &none(), true, now)).len(), 2);
    assert!(core.commits(2).is_empty());
    // A late executor with the real journal still brings the committed partition.
    core.register("b", "b:1", &[], Some(journal), now);
    assert_eq!(core.commits(2).len(), 1);
}

#[test]
fn a_drained_executor_hands_its_outputs_over_and_leaves_counting_nothing() {
    let now = Instant::now();
    let mut core = job(now);
    assert_eq!(
        run_round(&mut core, "a", now),
        2,
        "the map outputs live on a"
    );
    core.take_progress();
    assert!(core.decommission("a", "test", None, now));
    assert!(
        !core.decommission("z", "test", None, now),
        "no such executor"
    );
    assert_eq!(
        core.poll("a", 0, &none(), false, now),
        PollAnswer::Wait,
        "a waits while its outputs move"
    );
    let migrations = match core.poll("b", 0, &none(), true, now) {
        PollAnswer::Work { migrations, .. } => migrations,
        other => panic!("expected work, got {other:?}"),
    };
    let moving: Vec<TaskId> = migrations.iter().map(|m| m.task).collect();
    let t = |partition| TaskId {
        stage: 1,
        partition,
    };
    assert_eq!(moving, vec![t(0), t(1)]);
    assert!(
        migrations
            .iter()
            .all(|m| m.source == "a" && m.source_address == "a:1" && m.blocks == 4)
    );
    assert!(core.migrated("b", t(0), "a", true));
    assert!(!core.migrated("b", t(0), "a", true), "a copy counts once");
    assert!(
        !core.migrated("b", t(1), "a", false),
        "a failed copy moves nothing"
    );
    assert_eq!(
        core.job_status().draining,
        vec!["a".to_string()],
        "a drains until it polls again"
    );
    assert_eq!(
        core.poll("a", 0, &none(), true, now),
        PollAnswer::Decommissioned
    );
    let status = core.job_status();
    assert_eq!(status.partitions_migrated, 1);
    assert!(status.draining.is_empty());
    assert_eq!(status.lost_executors[0].reason, "Drained");
    assert_eq!(
        status.holding,
        vec![rpc::ExecutorHolding {
            executor_id: "b".into(),
            outputs: 1
        }]
    );
    // What did not move is recomputed; the job ends.
    assert_eq!(run_round(&mut core, "b", now), 1);
    assert_eq!(run_round(&mut core, "b", now), 2);
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    let summary = core.summary(&kiln_api::JobSpec::default());
    assert_eq!(summary.recovery.partitions_migrated, 1);
    assert_eq!(summary.totals.recomputed, 1);
    assert_eq!(summary.recovery.executors_lost["Drained"], 1);
}

#[test]
fn copies_to_a_lost_executor_go_to_the_next_one_to_register() {
    let now = Instant::now();
    let mut core = job(now);
    core.register("c", "c:1", &[], None, now);
    assert_eq!(run_round(&mut core, "a", now), 2);
    assert!(core.decommission("a", "test", None, now));
    core.lose("b", LossReason::Preempted, None, now);
    core.lose("c", LossReason::Preempted, None, now);
    assert_ne!(
        core.poll("a", 0, &none(), true, now),
        PollAnswer::Decommissioned,
        "its targets are gone: its outputs wait for the next executor"
    );
    core.register("d", "d:1", &[], None, now);
    match core.poll("d", 0, &none(), true, now) {
        PollAnswer::Work { migrations, .. } => {
            assert_eq!(migrations.len(), 2);
            assert!(migrations.iter().all(|m| m.source == "a"));
        }
        other => panic!("expected the copies, got {other:?}"),
    }
}

#[test]
fn a_drain_is_timed_from_its_notice_to_its_replacement() {
    let now = Instant::now();
    let mut core = job(now);
    assert_eq!(run_round(&mut core, "a", now), 2);
    // Notice given 2 s before the driver heard of it.
    let heard = now + Duration::from_secs(2);
    assert!(core.decommission("a", "test", Some(now), heard));
    let status = core.job_status();
    assert_eq!(status.last_detect_ms, 2000);
    assert_eq!(
        status.last_recover_ms, 0,
        "a takes no tasks, none took its place"
    );
    // The replacement registers while a still drains: the job is back at full width.
    let replaced = now + Duration::from_secs(5);
    core.register("c", "c:1", &[], None, replaced);
    assert_eq!(core.job_status().last_recover_ms, 5000);
    // a leaves; its loss keeps the timing of its notice.
    core.lose("a", LossReason::Drained, None, now + Duration::from_secs(9));
    let summary = core.summary(&kiln_api::JobSpec::default());
    let loss = &summary.recovery.losses[0];
    assert_eq!(
        (
            loss.executor.as_str(),
            loss.detection_ms,
            loss.full_width_ms
        ),
        ("a", Some(2000), Some(5000))
    );
    assert_eq!(summary.recovery.losses.len(), 1);
    assert_eq!(core.job_status().last_recover_ms, 5000);
}

/// a runs map partition 0 and b has done partition 1 when a is given notice.
fn notice_during_a_task(now: Instant) -> (DriverCore, TaskId) {
    let mut core = job(now);
    let t0 = TaskId {
        stage: 1,
        partition: 0,
    };
    assert_eq!(tasks(core.poll("a", 1, &none(), true, now)), vec![(t0, 0)]);
    assert_eq!(run_round(&mut core, "b", now), 1);
    assert!(core.decommission("a", "test", None, now));
    assert_eq!(
        tasks(core.poll("b", 1, &none(), true, now)),
        vec![],
        "a's task carries on there: it runs nowhere else"
    );
    (core, t0)
}

#[test]
fn a_draining_executors_running_task_finishes_there_and_its_output_moves() {
    let now = Instant::now();
    let (mut core, t0) = notice_during_a_task(now);
    assert_eq!(
        core.poll("a", 0, &BTreeSet::from([(t0, 0)]), false, now),
        PollAnswer::Wait,
        "a stays while its task runs"
    );
    assert!(core.report("a", t0, 0, ok()), "it counts");
    let migrations = match core.poll("b", 0, &none(), true, now) {
        PollAnswer::Work { migrations, .. } => migrations,
        other => panic!("expected the copy, got {other:?}"),
    };
    assert_eq!(migrations.len(), 1);
    assert_eq!(
        (migrations[0].task, migrations[0].source.as_str()),
        (t0, "a")
    );
    assert_eq!(core.poll("a", 0, &none(), false, now), PollAnswer::Wait);
    assert!(core.migrated("b", t0, "a", true));
    assert_eq!(
        core.poll("a", 0, &none(), true, now),
        PollAnswer::Decommissioned
    );
    assert_eq!(run_round(&mut core, "b", now), 2, "the output stage");
    assert_eq!(core.outcome(2), StageOutcome::Succeeded);
    let summary = core.summary(&kiln_api::JobSpec::default());
    assert_eq!(summary.totals.attempts, 4, "no task ran twice");
    assert_eq!(summary.totals.recomputed, 0);
    assert_eq!(summary.recovery.partitions_migrated, 1);
}

#[test]
fn a_task_still_running_when_the_window_closes_is_stopped_and_resubmitted() {
    let now = Instant::now();
    let (mut core, t0) = notice_during_a_task(now);
    core.register("c", "c:1", &[], None, now);
    let late = now + CONTINUE_WINDOW + Duration::from_secs(1);
    assert_eq!(
        core.poll("a", 0, &BTreeSet::from([(t0, 0)]), true, late),
        PollAnswer::Decommissioned,
        "nothing else keeps a"
    );
    assert!(!core.report("a", t0, 0, ok()), "its attempt was given up");
    assert_eq!(tasks(core.poll("c", 1, &none(), true, late)), vec![(t0, 1)]);
    assert!(core.report("c", t0, 1, ok()));
    assert_eq!(core.job_status().lost_executors[0].reason, "Drained");
}

#[test]
fn a_given_up_task_is_stopped_while_its_executor_still_hands_outputs_over() {
    let now = Instant::now();
    let mut core = job(now);
    let t = |partition| TaskId {
        stage: 1,
        partition,
    };
    // a made partition 0 and runs partition 1 when notice comes: its output must move.
    assert_eq!(
        tasks(core.poll("a", 1, &none(), true, now)),
        vec![(t(0), 0)]
    );
    core.report("a", t(0), 0, ok());
    assert_eq!(
        tasks(core.poll("a", 1, &none(), true, now)),
        vec![(t(1), 0)]
    );
    assert!(core.decommission("a", "test", None, now));
    let late = now + CONTINUE_WINDOW + Duration::from_secs(1);
    match core.poll("a", 0, &BTreeSet::from([(t(1), 0)]), true, late) {
        PollAnswer::Work { cancels, .. } => assert_eq!(cancels, vec![(t(1), 0)]),
        other => panic!("expected the cancel, got {other:?}"),
    }
}

#[test]
fn a_task_that_fails_on_a_draining_executor_counts_as_no_attempt() {
    let now = Instant::now();
    let (mut core, t0) = notice_during_a_task(now);
    let failed = || TaskOutcome::Failed(TaskFailure::Executor("killed".into()));
    assert!(!core.report("a", t0, 0, failed()));
    assert_eq!(tasks(core.poll("b", 1, &none(), true, now)), vec![(t0, 1)]);
    assert!(!core.report("b", t0, 1, failed()));
    assert_eq!(tasks(core.poll("b", 1, &none(), true, now)), vec![(t0, 2)]);
    assert!(!core.report("b", t0, 2, failed()));
    assert_eq!(
        tasks(core.poll("b", 1, &none(), true, now)),
        vec![(t0, 3)],
        "two failures of the three allowed: the draining executor's did not count"
    );
    assert!(core.report("b", t0, 3, ok()));
}

#[test]
fn a_task_whose_assignment_a_draining_executor_never_got_is_rescheduled_at_once() {
    let now = Instant::now();
    // Notice cut a's poll short: the answer giving it t0 was dropped unread.
    let (mut core, t0) = notice_during_a_task(now);
    assert_eq!(
        core.poll("a", 0, &none(), false, now),
        PollAnswer::Decommissioned,
        "a holds nothing the job needs"
    );
    assert_eq!(tasks(core.poll("b", 1, &none(), true, now)), vec![(t0, 1)]);
}
