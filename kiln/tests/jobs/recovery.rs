//! Losing executors mid-job: `kiln run --chaos` kills (SIGKILL) or pauses (SIGSTOP) real
//! executor processes, and every job must still give the output of its no-failure run while
//! recomputing only what the lost executor held.
//!
//! Each test here has the machine to itself (`alone()`): they measure recovery on a 2-core
//! machine, and several jobs of four executors at once would make heartbeats late for no reason.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const EXECUTORS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(300);

fn losses(summary: &Value) -> &Vec<Value> {
    summary["recovery"]["losses"]
        .as_array()
        .unwrap_or_else(|| panic!("summary has no recovery.losses: {summary}"))
}

/// Runs `job` (writing Parquet to `<dir>/<name>`) with `extra` arguments; returns the
/// summary and the output rows.
fn run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    job: &serde_yaml::Value,
    extra: &[&str],
    what: &str,
) -> (Value, Vec<datafusion::arrow::array::RecordBatch>) {
    let run = run_job_with(dir, job, EXECUTORS, extra, TIMEOUT);
    let summary = run.expect_success(what).clone();
    let out = job["output"]["uri"].as_str().expect("an output uri");
    let batches = rt
        .block_on(read_parquet_dir(Path::new(out)))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    (summary, batches)
}

/// Checks a run with one executor killed against its no-failure run: same rows, one loss,
/// and exactly the lost outputs recomputed, never a whole stage.
fn check_one_kill(
    what: &str,
    baseline: &[datafusion::arrow::array::RecordBatch],
    summary: &Value,
    batches: &[datafusion::arrow::array::RecordBatch],
) -> Result<String, String> {
    let mut problems = Vec::new();
    if let Some(diff) = diff_row_sets(baseline, batches) {
        problems.push(format!("output differs from the no-failure run:\n{diff}"));
    }
    let lost = losses(summary);
    if lost.len() != 1 {
        problems.push(format!("expected one executor loss, got {lost:?}"));
    }
    let outputs_lost = summary_int(summary, "/recovery/outputsLost");
    let recomputed = summary_int(summary, "/totals/recomputed");
    if outputs_lost == 0 {
        problems.push("the killed executor held no needed outputs: nothing was tested".into());
    }
    if recomputed != outputs_lost {
        problems.push(format!(
            "{recomputed} partitions recomputed, but the killed executor held {outputs_lost} needed outputs"
        ));
    }
    for stage in summary["stages"].as_array().expect("stages") {
        let tasks = stage["tasks"].as_i64().unwrap_or(0);
        let again = stage["recomputed"].as_i64().unwrap_or(0);
        if tasks >= 2 && again >= tasks {
            problems.push(format!(
                "stage {} recomputed all {tasks} of its partitions",
                stage["id"]
            ));
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{what}: lost {}, {outputs_lost} outputs lost and recomputed, detected after {} ms, full width after {} ms",
            lost[0]["executor"], lost[0]["detectionMs"], lost[0]["fullWidthMs"]
        ))
    } else {
        Err(format!("{what}:\n{}", problems.join("\n")))
    }
}

#[test]
fn tpch_queries_survive_a_killed_executor() {
    let _serial = alone();
    let data = tpch_data(0.1);
    let rt = runtime();
    let mut failures = Vec::new();
    for (n, seed) in [(3, "1"), (5, "2"), (9, "3"), (18, "4")] {
        let sql = read_query(&workspace_root().join(format!("bench/queries/q{n}.sql")));
        let dir = tempfile::tempdir().expect("temp dir");
        let base_job = tpch_job(&data, &sql, &format!("q{n}"), &dir.path().join("base"), 4);
        let (_, baseline) = run(&rt, dir.path(), &base_job, &[], &format!("q{n}"));
        let job = tpch_job(&data, &sql, &format!("q{n}"), &dir.path().join("chaos"), 4);
        let (summary, batches) = run(
            &rt,
            dir.path(),
            &job,
            &["--chaos", "at=50%,executor=busiest", "--chaos-seed", seed],
            &format!("q{n} with chaos"),
        );
        match check_one_kill(&format!("q{n}"), &baseline, &summary, &batches) {
            Ok(note) => eprintln!("{note}"),
            Err(problem) => failures.push(problem),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// An executor given notice (SIGTERM, as an eviction or a node drain sends) hands what only
/// it holds to the others: same rows as the no-failure run, its outputs migrated, nothing
/// recomputed, and no budget spent (the jobs allow no executor loss at all).
#[test]
fn tpch_queries_lose_nothing_to_a_drained_executor() {
    let _serial = alone();
    let data = tpch_data(0.1);
    let rt = runtime();
    let mut failures = Vec::new();
    for (n, seed) in [(9, "3"), (18, "4")] {
        let sql = read_query(&workspace_root().join(format!("bench/queries/q{n}.sql")));
        let dir = tempfile::tempdir().expect("temp dir");
        let base_job = tpch_job(&data, &sql, &format!("q{n}"), &dir.path().join("base"), 4);
        let (_, baseline) = run(&rt, dir.path(), &base_job, &[], &format!("q{n}"));
        let mut job = tpch_job(&data, &sql, &format!("q{n}"), &dir.path().join("drain"), 4);
        job["failurePolicy"] =
            serde_yaml::to_value(serde_json::json!({"maxExecutorLosses": 0})).expect("yaml");
        let (summary, batches) = run(
            &rt,
            dir.path(),
            &job,
            &[
                "--chaos",
                "at=50%,executor=busiest,drain",
                "--chaos-seed",
                seed,
            ],
            &format!("q{n} with a drain"),
        );
        let mut problems = Vec::new();
        if let Some(diff) = diff_row_sets(&baseline, &batches) {
            problems.push(format!("output differs from the no-failure run:\n{diff}"));
        }
        let lost = losses(&summary);
        let reasons: Vec<&str> = lost.iter().filter_map(|l| l["reason"].as_str()).collect();
        if reasons != ["Drained"] {
            problems.push(format!("expected one loss, Drained; got {reasons:?}"));
        }
        let migrated = summary_int(&summary, "/recovery/partitionsMigrated");
        let recomputed = summary_int(&summary, "/totals/recomputed");
        if migrated == 0 {
            problems.push("nothing migrated: the drained executor held nothing needed".into());
        }
        if recomputed != 0 {
            problems.push(format!("{recomputed} partitions recomputed after a drain"));
        }
        if problems.is_empty() {
            eprintln!("q{n}: drained, {migrated} outputs migrated, none recomputed");
        } else {
            failures.push(format!("q{n}:\n{}", problems.join("\n")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn wordcount_survives_a_killed_executor() {
    let _serial = alone();
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, baseline) = run(
        &rt,
        dir.path(),
        &wordcount_job(&dir.path().join("base")),
        &[],
        "wordcount",
    );
    let (summary, batches) = run(
        &rt,
        dir.path(),
        &wordcount_job(&dir.path().join("chaos")),
        &["--chaos", "at=50%,executor=busiest", "--chaos-seed", "5"],
        "wordcount with chaos",
    );
    let note = check_one_kill("wordcount", &baseline, &summary, &batches)
        .unwrap_or_else(|problem| panic!("{problem}"));
    eprintln!("{note}");
}

/// The first `n` stages of the job that have several tasks, in stage order.
fn multi_task_stages(summary: &Value, n: usize) -> Vec<i64> {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["tasks"].as_i64().unwrap_or(0) >= 2)
        .map(|s| s["id"].as_i64().expect("stage id"))
        .take(n)
        .collect()
}

#[test]
fn kills_within_the_loss_budget_keep_the_job_correct_and_one_more_fails_it() {
    let _serial = alone();
    let data = tpch_data(0.1);
    let rt = runtime();
    let sql = read_query(&workspace_root().join("bench/queries/q9.sql"));
    let dir = tempfile::tempdir().expect("temp dir");
    let job_with_budget = |out: &str| {
        let mut job = tpch_job(&data, &sql, "q9", &dir.path().join(out), EXECUTORS);
        job["failurePolicy"] =
            serde_yaml::to_value(serde_json::json!({"maxExecutorLosses": 2})).expect("yaml");
        job
    };
    let (base_summary, baseline) = run(&rt, dir.path(), &job_with_budget("base"), &[], "q9");
    let stages = multi_task_stages(&base_summary, 3);
    assert_eq!(
        stages.len(),
        3,
        "q9 has three stages of several tasks: {base_summary}"
    );
    // Crashes (the executor's own fault) count against the budget; reclaims would not.
    let events: Vec<String> = stages
        .iter()
        .map(|s| format!("stage={s},at=50%,crash"))
        .collect();

    // Two kills, the budget: correct output, two losses, each replaced.
    let args = [
        "--chaos",
        events[0].as_str(),
        "--chaos",
        events[1].as_str(),
        "--chaos-seed",
        "11",
    ];
    let (summary, batches) = run(
        &rt,
        dir.path(),
        &job_with_budget("two"),
        &args,
        "q9, two kills",
    );
    if let Some(diff) = diff_row_sets(&baseline, &batches) {
        panic!("q9 with two kills differs from the no-failure run:\n{diff}");
    }
    assert_eq!(losses(&summary).len(), 2, "{summary}");
    assert_eq!(
        summary_int(&summary, "/totals/recomputed"),
        summary_int(&summary, "/recovery/outputsLost"),
        "{summary}"
    );

    // Three kills, one more than the budget: the job fails and says which budget.
    let args = [
        "--chaos",
        events[0].as_str(),
        "--chaos",
        events[1].as_str(),
        "--chaos",
        events[2].as_str(),
        "--chaos-seed",
        "11",
    ];
    let run3 = run_job_with(
        dir.path(),
        &job_with_budget("three"),
        EXECUTORS,
        &args,
        TIMEOUT,
    );
    assert!(!run3.output.status.success(), "a third kill must fail q9");
    let stderr = String::from_utf8_lossy(&run3.output.stderr);
    assert!(
        stderr.contains("failurePolicy.maxExecutorLosses = 2"),
        "the error must name the budget; stderr:\n{}",
        tail(&stderr, 20)
    );
    let summary = run3.summary.expect("a failed run still writes its summary");
    assert_eq!(summary["succeeded"], Value::Bool(false));
    assert_eq!(losses(&summary).len(), 3, "{summary}");
}

/// SIGSTOP shorter than the heartbeat timeout is only slowness; longer is a loss, and what
/// the stopped executor reports after SIGCONT is ignored.
#[test]
fn a_paused_executor_is_lost_only_past_the_heartbeat_timeout() {
    let _serial = alone();
    let data = tpch_data(0.1);
    let rt = runtime();
    let sql = read_query(&workspace_root().join("bench/queries/q18.sql"));
    let dir = tempfile::tempdir().expect("temp dir");
    let job = |out: &str| tpch_job(&data, &sql, "q18", &dir.path().join(out), EXECUTORS);
    let (base_summary, baseline) = run(&rt, dir.path(), &job("base"), &[], "q18");

    let (summary, batches) = run(
        &rt,
        dir.path(),
        &job("short"),
        &[
            "--heartbeat-timeout",
            "4",
            "--chaos",
            "at=50%,pause=1500ms",
            "--chaos-seed",
            "3",
        ],
        "q18, paused 1.5 s",
    );
    assert!(
        losses(&summary).is_empty(),
        "a short pause lost an executor: {summary}"
    );
    assert!(diff_row_sets(&baseline, &batches).is_none());

    // This time the timeout comes from the job spec rather than the command line.
    let mut long = job("long");
    long["failurePolicy"] =
        serde_yaml::to_value(serde_json::json!({"heartbeatTimeoutSeconds": 2})).expect("yaml");
    let (summary, batches) = run(
        &rt,
        dir.path(),
        &long,
        &["--chaos", "at=50%,pause=6s", "--chaos-seed", "3"],
        "q18, paused 6 s",
    );
    let lost = losses(&summary);
    assert_eq!(lost.len(), 1, "{summary}");
    assert_eq!(lost[0]["reason"], "HeartbeatTimeout", "{summary}");
    if let Some(diff) = diff_row_sets(&baseline, &batches) {
        panic!("q18 after a heartbeat loss differs from the no-failure run:\n{diff}");
    }
    // Late reports are not counted: the rows and files the summary reports match the
    // no-failure run's, though the paused executor finished its tasks after SIGCONT.
    for pointer in ["/output/rows", "/output/files"] {
        assert_eq!(
            summary_int(&summary, pointer),
            summary_int(&base_summary, pointer),
            "{pointer}: {summary}"
        );
    }
    assert_eq!(
        summary_int(&summary, "/totals/recomputed"),
        summary_int(&summary, "/recovery/outputsLost"),
        "{summary}"
    );
}
