//! The commit protocol on a real directory, with real sink tasks writing Parquet: only the
//! committed attempt of each partition reaches the output, a zombie writing after the commit
//! changes nothing a reader sees, and a restart of the same job keeps its committed output.
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use kiln_api::{OutputFormat, OutputSpec, WriteMode};

use super::*;
use crate::plan::{SinkExec, StagedAttempt};

const STAGE: u32 = 3;

/// A sink over two partitions: partition `p` holds the values `p*10 .. p*10 + 3`, plus
/// `extra` so that attempts can be told apart.
fn sink(dir: &Path, extra: i64) -> SinkExec {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let part = |p: i64| {
        vec![
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![
                    p * 10 + extra,
                    p * 10 + 1 + extra,
                    p * 10 + 2 + extra,
                ]))],
            )
            .unwrap(),
        ]
    };
    let input = MemorySourceConfig::try_new_exec(&[part(0), part(1)], schema, None).unwrap();
    SinkExec::new(input, format!("{}/", dir.display()), OutputFormat::Parquet)
}

/// Runs one task attempt of the sink into its staging directory.
async fn write_attempt(
    ctx: &SessionContext,
    dir: &Path,
    run: &str,
    partition: u32,
    attempt: u32,
    extra: i64,
) {
    let staged = sink(dir, extra).staged(StagedAttempt {
        run_id: run.into(),
        stage: STAGE,
        attempt,
    });
    let stream = staged.execute(partition as usize, ctx.task_ctx()).unwrap();
    let _: Vec<RecordBatch> = stream.try_collect().await.unwrap();
}

fn spec(dir: &Path, mode: WriteMode) -> OutputSpec {
    OutputSpec {
        uri: dir.display().to_string(),
        format: OutputFormat::Parquet,
        mode,
        from: None,
    }
}

/// A scratch output location `<tmp>/out`, and a session to write into it with.
fn scratch() -> (tempfile::TempDir, std::path::PathBuf, SessionContext) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    (tmp, dir, SessionContext::new())
}

/// The values a reader sees (a fresh session each time: a session caches file listings).
async fn values(dir: &Path) -> Vec<i64> {
    let df = SessionContext::new()
        .read_parquet(format!("{}/", dir.display()), ParquetReadOptions::default())
        .await
        .unwrap();
    let mut out: Vec<i64> = df
        .collect()
        .await
        .unwrap()
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    out.sort();
    out
}

/// The record of `run`'s attempt `attempt` of partition `partition` committing.
fn rec(run: &str, partition: u32, attempt: u32) -> CommitRecord {
    CommitRecord {
        stage: STAGE,
        fingerprint: 0,
        partition,
        run_id: run.into(),
        attempt,
        rows: 3,
        files: 1,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn ready(ctx: &SessionContext, out: &OutputSpec, uid: &str) -> OutputCommit {
    match OutputCommit::prepare(ctx, out, uid, 1).await.unwrap() {
        Prepared::Ready(commit) => commit,
        Prepared::Committed(_) => panic!("expected a location to write"),
    }
}

#[tokio::test]
async fn only_committed_attempts_reach_the_output_and_a_zombie_changes_nothing() {
    let (_tmp, dir, ctx) = scratch();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    let commit = ready(&ctx, &out, "job-a").await;
    // Partition 0: attempt 0 wins. Partition 1: attempt 0 loses (a duplicate that wrote
    // other values), attempt 1 wins.
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 100).await;
    write_attempt(&ctx, &dir, "run-1", 1, 1, 0).await;
    let summary = commit
        .commit(&[rec("run-1", 0, 0), rec("run-1", 1, 1)], 6)
        .await
        .unwrap();
    assert_eq!((summary.rows, summary.files), (6, 2));
    assert_eq!(
        listing(&dir),
        ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    );
    let committed = values(&dir).await;
    assert_eq!(committed, [0, 1, 2, 10, 11, 12]);

    // A zombie attempt of the same run finishes after the commit: it writes into staging,
    // which no reader lists, and never into the output.
    write_attempt(&ctx, &dir, "run-1", 0, 7, 500).await;
    assert_eq!(values(&dir).await, committed);
    assert!(
        listing(&dir)
            .iter()
            .all(|n| n == "_SUCCESS" || n == "_temporary" || n.starts_with("part-")),
        "{:?}",
        listing(&dir)
    );
}

#[tokio::test]
async fn a_restart_of_the_same_job_keeps_its_output_and_another_job_is_refused() {
    let (_tmp, dir, ctx) = scratch();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    let commit = ready(&ctx, &out, "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 0).await;
    commit
        .commit(&[rec("run-1", 0, 0), rec("run-1", 1, 0)], 6)
        .await
        .unwrap();

    // The same job's next driver run finds its own output committed: nothing to do.
    match OutputCommit::prepare(&ctx, &out, "job-a", 2).await.unwrap() {
        Prepared::Committed(summary) => assert_eq!((summary.rows, summary.files), (6, 2)),
        Prepared::Ready(_) => panic!("a committed output must not be written again"),
    }
    // Another job may not write there.
    match OutputCommit::prepare(&ctx, &out, "job-b", 1).await {
        Err(Error::OutputExists { .. }) => {}
        Err(e) => panic!("expected OutputExists, got {e}"),
        Ok(_) => panic!("expected OutputExists"),
    }
}

#[tokio::test]
async fn overwrite_keeps_the_old_output_until_the_new_one_commits() {
    let (_tmp, dir, ctx) = scratch();
    let first = ready(&ctx, &spec(&dir, WriteMode::Overwrite), "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 0).await;
    first
        .commit(&[rec("run-1", 0, 0), rec("run-1", 1, 0)], 6)
        .await
        .unwrap();
    let old = values(&dir).await;

    // A new job overwrites: while it runs, readers still see the old output whole.
    let second = ready(&ctx, &spec(&dir, WriteMode::Overwrite), "job-b").await;
    write_attempt(&ctx, &dir, "run-9", 0, 0, 1000).await;
    assert_eq!(values(&dir).await, old);
    // Its partition 1 turned out empty (no file): the old part-00001 must not survive.
    second
        .commit(
            &[
                rec("run-9", 0, 0),
                CommitRecord {
                    files: 0,
                    ..rec("run-9", 1, 0)
                },
            ],
            3,
        )
        .await
        .unwrap();
    assert_eq!(values(&dir).await, [1000, 1001, 1002]);
    assert_eq!(listing(&dir), ["_SUCCESS", "part-00000.parquet"]);
}

#[tokio::test]
async fn a_replacement_driver_commits_what_its_predecessor_committed_with_its_own() {
    let (_tmp, dir, ctx) = scratch();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    // The first driver committed partition 0, and had a losing attempt of partition 1
    // going, when it was lost.
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 100).await;
    // Its replacement prepares (nothing committed yet: no _SUCCESS), reruns partition 1
    // only, and commits both.
    let commit = ready(&ctx, &out, "job-a").await;
    write_attempt(&ctx, &dir, "run-2", 1, 0, 0).await;
    commit
        .commit(&[rec("run-1", 0, 0), rec("run-2", 1, 0)], 6)
        .await
        .unwrap();
    assert_eq!(values(&dir).await, [0, 1, 2, 10, 11, 12]);
    assert_eq!(
        listing(&dir),
        ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"],
        "no staging of either run is left"
    );
}

#[tokio::test]
async fn a_driver_taken_over_cannot_commit() {
    let (_tmp, dir, ctx) = scratch();
    let out = spec(&dir, WriteMode::Overwrite);
    let old = ready(&ctx, &out, "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    // A replacement of epoch 2 prepares the same output; the old driver, still running
    // somewhere, tries to commit: refused, nothing moved.
    let new = match OutputCommit::prepare(&ctx, &out, "job-a", 2).await.unwrap() {
        Prepared::Ready(c) => c,
        Prepared::Committed(_) => panic!("nothing was committed yet"),
    };
    match old.commit(&[rec("run-1", 0, 0)], 3).await {
        Err(Error::Fenced {
            epoch: 1, newer: 2, ..
        }) => {}
        other => panic!("expected the old driver fenced off, got {other:?}"),
    }
    assert_eq!(listing(&dir), ["_temporary"]);
    new.commit(&[rec("run-1", 0, 0)], 3).await.unwrap();
    assert_eq!(listing(&dir), ["_SUCCESS", "part-00000.parquet"]);
}

#[tokio::test]
async fn a_commit_cut_short_by_a_lost_driver_is_finished_by_its_replacement() {
    let (_tmp, dir, ctx) = scratch();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    let _first = ready(&ctx, &out, "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 0).await;
    // The first driver moved partition 0 into place, then was lost.
    let name = "part-00000.parquet";
    let staged = dir
        .join(STAGING_DIR)
        .join("run-1")
        .join(format!("s{STAGE}-p0-a0"))
        .join(name);
    std::fs::rename(staged, dir.join(name)).unwrap();
    // Its replacement is not refused by the files its own job moved, and loses none.
    let second = match OutputCommit::prepare(&ctx, &out, "job-a", 2).await.unwrap() {
        Prepared::Ready(c) => c,
        Prepared::Committed(_) => panic!("no _SUCCESS yet"),
    };
    second
        .commit(&[rec("run-1", 0, 0), rec("run-1", 1, 0)], 6)
        .await
        .unwrap();
    assert_eq!(values(&dir).await, [0, 1, 2, 10, 11, 12]);
    assert_eq!(
        listing(&dir),
        ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    );
}
