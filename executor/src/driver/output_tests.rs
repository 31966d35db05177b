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

async fn values(ctx: &SessionContext, dir: &Path) -> Vec<i64> {
    let df = ctx
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

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn ready(ctx: &SessionContext, out: &OutputSpec, run: &str, uid: &str) -> OutputCommit {
    match OutputCommit::prepare(ctx, out, run, uid).await.unwrap() {
        Prepared::Ready(commit) => commit,
        Prepared::Committed(_) => panic!("expected a location to write"),
    }
}

#[tokio::test]
async fn only_committed_attempts_reach_the_output_and_a_zombie_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let ctx = SessionContext::new();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    let commit = ready(&ctx, &out, "run-1", "job-a").await;
    // Partition 0: attempt 0 wins. Partition 1: attempt 0 loses (a duplicate that wrote
    // other values), attempt 1 wins.
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 100).await;
    write_attempt(&ctx, &dir, "run-1", 1, 1, 0).await;
    let summary = commit.commit(STAGE, &[(0, 0), (1, 1)], 6).await.unwrap();
    assert_eq!((summary.rows, summary.files), (6, 2));
    assert_eq!(
        listing(&dir),
        ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    );
    let committed = values(&ctx, &dir).await;
    assert_eq!(committed, [0, 1, 2, 10, 11, 12]);

    // A zombie attempt of the same run finishes after the commit: it writes into staging,
    // which no reader lists, and never into the output.
    write_attempt(&ctx, &dir, "run-1", 0, 7, 500).await;
    assert_eq!(values(&ctx, &dir).await, committed);
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
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let ctx = SessionContext::new();
    let out = spec(&dir, WriteMode::ErrorIfExists);
    let commit = ready(&ctx, &out, "run-1", "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 0).await;
    commit.commit(STAGE, &[(0, 0), (1, 0)], 6).await.unwrap();

    // The same job's next driver run finds its own output committed: nothing to do.
    match OutputCommit::prepare(&ctx, &out, "run-2", "job-a")
        .await
        .unwrap()
    {
        Prepared::Committed(summary) => assert_eq!((summary.rows, summary.files), (6, 2)),
        Prepared::Ready(_) => panic!("a committed output must not be written again"),
    }
    // Another job may not write there.
    match OutputCommit::prepare(&ctx, &out, "run-3", "job-b").await {
        Err(Error::OutputExists { .. }) => {}
        Err(e) => panic!("expected OutputExists, got {e}"),
        Ok(_) => panic!("expected OutputExists"),
    }
}

#[tokio::test]
async fn overwrite_keeps_the_old_output_until_the_new_one_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let ctx = SessionContext::new();
    let first = ready(&ctx, &spec(&dir, WriteMode::Overwrite), "run-1", "job-a").await;
    write_attempt(&ctx, &dir, "run-1", 0, 0, 0).await;
    write_attempt(&ctx, &dir, "run-1", 1, 0, 0).await;
    first.commit(STAGE, &[(0, 0), (1, 0)], 6).await.unwrap();
    let old = values(&ctx, &dir).await;

    // A new job overwrites: while it runs, readers still see the old output whole.
    let second = ready(&ctx, &spec(&dir, WriteMode::Overwrite), "run-9", "job-b").await;
    write_attempt(&ctx, &dir, "run-9", 0, 0, 1000).await;
    assert_eq!(values(&ctx, &dir).await, old);
    // Its partition 1 turned out empty (no file): the old part-00001 must not survive.
    second.commit(STAGE, &[(0, 0), (1, 0)], 3).await.unwrap();
    assert_eq!(values(&ctx, &dir).await, [1000, 1001, 1002]);
    assert_eq!(listing(&dir), ["_SUCCESS", "part-00000.parquet"]);
}
