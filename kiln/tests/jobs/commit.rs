//! Output written exactly once, and no lost message hangs a job: an executor killed while it
//! writes the output, the driver killed (twice) and replaced, every executor lost at once,
//! task reports dropped on the wire or lost outright (the executor's fault hook), all
//! through `kiln run` with real executor processes.
//!
//! Each test here has the machine to itself (`alone()`), like the recovery tests: several jobs
//! of executor processes at once on a 2-core machine would make heartbeats late for no reason.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use datafusion::arrow::array::RecordBatch;
use serde_json::Value;

const EXECUTORS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(300);

/// The wordcount example counting every word (not the top twenty: the output stage then
/// has a task per partition), with a short heartbeat timeout.
fn all_words_job(out: &Path) -> serde_yaml::Value {
    let mut job = wordcount_job(out);
    job["steps"][1]["sql"] = "SELECT word, count(*) AS n FROM words GROUP BY word".into();
    job["failurePolicy"] =
        serde_yaml::to_value(serde_json::json!({"heartbeatTimeoutSeconds": 3})).expect("yaml");
    job
}

/// The job run without failure into `<dir>/base`: its summary and rows, to compare with.
fn baseline(dir: &Path) -> (Value, Vec<RecordBatch>) {
    run_committed(
        dir,
        &all_words_job(&dir.join("base")),
        &[],
        &[],
        "wordcount",
    )
}

/// Fails with the difference when `rows` are not the baseline's.
fn assert_baseline_rows(baseline: &[RecordBatch], rows: &[RecordBatch]) {
    if let Some(diff) = diff_row_sets(baseline, rows) {
        panic!("the output differs from the no-failure run:\n{diff}");
    }
}

/// Runs `job` and checks it committed its output exactly once: `_SUCCESS` naming the job,
/// one part file per file the summary counted, nothing else; returns the summary and rows.
fn run_committed(
    dir: &Path,
    job: &serde_yaml::Value,
    extra: &[&str],
    envs: &[(&str, &str)],
    what: &str,
) -> (Value, Vec<RecordBatch>) {
    let run = run_job_with_env(dir, job, EXECUTORS, extra, envs, TIMEOUT);
    let summary = run.expect_success(what).clone();
    let out = Path::new(job["output"]["uri"].as_str().expect("an output uri"));
    let parts = check_output_layout(out).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        parts as i64,
        summary_int(&summary, "/output/files"),
        "{what}: part files on disk against the summary"
    );
    let marker: Value =
        serde_json::from_slice(&std::fs::read(out.join("_SUCCESS")).expect("read _SUCCESS"))
            .unwrap_or_else(|e| panic!("{what}: _SUCCESS is not the commit marker: {e}"));
    assert_eq!(
        marker["files"].as_array().map(Vec::len),
        Some(parts),
        "{what}: {marker}"
    );
    let batches = runtime()
        .block_on(read_parquet_dir(out))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        row_count(&batches) as i64,
        summary_int(&summary, "/output/rows"),
        "{what}: rows read back against the summary"
    );
    (summary, batches)
}

/// The id of the job's output stage (the last one).
fn output_stage(summary: &Value) -> i64 {
    summary["stages"]
        .as_array()
        .and_then(|s| s.last())
        .and_then(|s| s["id"].as_i64())
        .unwrap_or_else(|| panic!("summary has no stages: {summary}"))
}

#[test]
fn an_executor_killed_during_the_output_write_leaves_one_complete_output() {
    let _serial = alone();
    let dir = tempfile::tempdir().expect("temp dir");
    let (summary, baseline) = baseline(dir.path());
    let sink = output_stage(&summary).to_string();
    // Half of the output tasks done: the victim may be writing its next part file.
    let chaos = format!("stage={sink},at=50%");
    let job = all_words_job(&dir.path().join("killed"));
    let (summary, batches) = run_committed(
        dir.path(),
        &job,
        &["--chaos", &chaos, "--chaos-seed", "11"],
        &[],
        "wordcount with an executor killed in the output stage",
    );
    assert_eq!(
        summary["recovery"]["losses"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    assert_baseline_rows(&baseline, &batches);
    // Running it again over its own committed output (Overwrite) commits a fresh one.
    let (_, again) = run_committed(dir.path(), &job, &[], &[], "wordcount again, overwriting");
    assert_baseline_rows(&baseline, &again);
}

#[test]
fn a_driver_killed_twice_is_replaced_and_the_job_resumes_instead_of_rerunning() {
    let _serial = alone();
    let dir = tempfile::tempdir().expect("temp dir");
    let (base, baseline) = baseline(dir.path());
    let sink = output_stage(&base);
    // Once the map stage is done, and again with half of the output committed.
    let mid_output = format!("driver,stage={sink},at=50%");
    let (summary, batches) = run_committed(
        dir.path(),
        &all_words_job(&dir.path().join("driver-lost")),
        &[
            "--chaos",
            "driver,after-stage=1",
            "--chaos",
            &mid_output,
            "--chaos-seed",
            "3",
        ],
        &[],
        "wordcount losing its driver twice",
    );
    assert_baseline_rows(&baseline, &batches);
    assert_eq!(
        summary_int(&summary, "/recovery/driverLosses"),
        2,
        "{summary}"
    );
    assert!(
        summary_int(&summary, "/recovery/stagesResumed") >= 1,
        "the map stage is taken over, not rerun: {summary}"
    );
    // The last driver ran only what was not done: fewer attempts than the whole job.
    assert!(
        summary_int(&summary, "/totals/attempts") < summary_int(&base, "/totals/tasks"),
        "{summary}"
    );
    assert!(
        summary["recovery"]["losses"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}

#[test]
fn every_executor_lost_at_once_costs_the_job_nothing_but_time() {
    let _serial = alone();
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, baseline) = baseline(dir.path());
    let kills: Vec<String> = (0..EXECUTORS)
        .map(|i| format!("after-stage=1,executor=exec-{i}"))
        .collect();
    let mut extra = Vec::new();
    for k in &kills {
        extra.extend(["--chaos", k.as_str()]);
    }
    let (summary, batches) = run_committed(
        dir.path(),
        &all_words_job(&dir.path().join("all-lost")),
        &extra,
        &[],
        "wordcount losing every executor at once",
    );
    assert_eq!(
        summary["recovery"]["losses"].as_array().map(Vec::len),
        Some(EXECUTORS as usize),
        "{summary}"
    );
    assert_baseline_rows(&baseline, &batches);
}

#[test]
fn dropped_and_lost_task_reports_do_not_hang_the_job() {
    let _serial = alone();
    let dir = tempfile::tempdir().expect("temp dir");
    let (base, baseline) = baseline(dir.path());
    // Each executor drops its first three report sends (sent again until acknowledged) and
    // loses one report outright (only the driver's reconciliation of polls can notice).
    let (summary, batches) = run_committed(
        dir.path(),
        &all_words_job(&dir.path().join("faults")),
        &[],
        &[("KILN_FAULTS", "drop-report=3,lose-report=1")],
        "wordcount with reports dropped and lost",
    );
    assert_baseline_rows(&baseline, &batches);
    let tasks = summary_int(&summary, "/totals/tasks");
    let attempts = summary_int(&summary, "/totals/attempts");
    assert_eq!(tasks, summary_int(&base, "/totals/tasks"));
    assert!(
        attempts > tasks,
        "a lost report must have been rerun: {attempts} attempts for {tasks} tasks"
    );
    assert_eq!(
        summary["recovery"]["losses"].as_array().map(Vec::len),
        Some(0),
        "lost messages are not lost executors: {summary}"
    );
}

#[test]
fn a_result_bigger_than_max_result_bytes_fails_the_job_and_says_which_field() {
    let _serial = alone();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut job = all_words_job(&dir.path().join("unused"));
    job.as_mapping_mut().expect("a mapping").remove("output");
    job["maxResultBytes"] = "1Ki".into();
    let run = run_job_with_env(dir.path(), &job, EXECUTORS, &[], &[], TIMEOUT);
    assert!(!run.output.status.success(), "the job must fail");
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    assert!(
        stderr.contains("maxResultBytes"),
        "the error names the field: {}",
        tail(&stderr, 10)
    );
}
