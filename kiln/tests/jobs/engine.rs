//! Engine behaviour through `kiln run`: a group-by larger than the executors' memory budget
//! completes by spilling, and a `cache: Memory` step read by two later steps runs once.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Rows of the spill test's input, and distinct keys among them.
const SPILL_ROWS: i64 = 3_000_000;
const SPILL_KEYS: i64 = 1_500_000;

/// Writes `rows` rows of (key: string, v: int64) with `keys` distinct, scattered keys.
fn write_high_cardinality_parquet(path: &Path, rows: i64, keys: i64) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let file = fs::File::create(path).expect("create input parquet");
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), None).expect("writer");
    let batch_rows = 100_000;
    for start in (0..rows).step_by(batch_rows) {
        let ids: Vec<i64> = (start..(start + batch_rows as i64).min(rows)).collect();
        // A multiplicative hash spreads consecutive rows over the whole key space.
        let key = StringArray::from_iter_values(ids.iter().map(|i| {
            format!(
                "key-{:012}",
                (i.wrapping_mul(2_654_435_761)).rem_euclid(keys)
            )
        }));
        let v = Int64Array::from_iter_values(ids.iter().map(|i| i % 1000));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(key), Arc::new(v)])
            .expect("batch");
        writer.write(&batch).expect("write batch");
    }
    writer.close().expect("close input parquet");
}

/// Counts rows in `left` that are not in `right` (as multisets) with DataFusion.
async fn except_all_count(ctx: &SessionContext, left: &str, right: &str) -> usize {
    let sql = format!("SELECT * FROM {left} EXCEPT ALL SELECT * FROM {right}");
    let batches = ctx
        .sql(&sql)
        .await
        .expect("plan EXCEPT ALL")
        .collect()
        .await
        .expect("run EXCEPT ALL");
    row_count(&batches)
}

#[test]
fn group_by_beyond_the_memory_budget_spills() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.parquet");
    write_high_cardinality_parquet(&input, SPILL_ROWS, SPILL_KEYS);
    let out = dir.path().join("out");
    let sql = "SELECT key, count(*) AS n, sum(v) AS total, min(v) AS lo FROM events GROUP BY key";
    // Two reduce partitions of ~750k groups each: far more hash-table state than 32 MiB.
    let job = serde_yaml::to_value(serde_json::json!({
        "shufflePartitions": 2,
        "executors": {"count": 2, "memory": "32Mi", "slots": 1},
        "inputs": [{"name": "events", "format": "parquet", "uri": input.display().to_string()}],
        "steps": [{"name": "per_key", "sql": sql}],
        "output": {"uri": out.display().to_string(), "format": "parquet"},
    }))
    .expect("yaml value");
    let run = run_job(dir.path(), &job, 2, TIMEOUT);
    let summary = run.expect_success("spilling group-by");
    assert!(
        summary_int(summary, "/totals/spillCount") > 0,
        "a {SPILL_KEYS}-group aggregation under a 32Mi budget should spill: totals = {}",
        summary["totals"]
    );
    assert!(
        summary_int(summary, "/totals/spilledBytes") > 0,
        "spills should report bytes: totals = {}",
        summary["totals"]
    );

    let rt = runtime();
    rt.block_on(async {
        let ctx = SessionContext::new();
        ctx.register_parquet(
            "events",
            input.to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await
        .expect("register input");
        let expected = ctx
            .sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        assert_eq!(
            row_count(&expected),
            SPILL_KEYS as usize,
            "DataFusion's group count"
        );
        let actual = read_parquet_dir(&out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            row_count(&actual),
            SPILL_KEYS as usize,
            "kiln wrote {} groups, expected {SPILL_KEYS}",
            row_count(&actual)
        );
        let mem = |b: Vec<RecordBatch>| {
            let schema = b[0].schema();
            Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![b]).expect("table"))
        };
        ctx.register_table("expected", mem(expected))
            .expect("register expected");
        ctx.register_table("actual", mem(actual))
            .expect("register actual");
        let missing = except_all_count(&ctx, "expected", "actual").await;
        let extra = except_all_count(&ctx, "actual", "expected").await;
        assert_eq!(
            (missing, extra),
            (0, 0),
            "kiln's groups differ from DataFusion's: {missing} missing, {extra} unexpected"
        );
    });
}

/// Writes `files` CSV files of (k, v) into `dir`.
fn write_csv_inputs(dir: &Path, files: usize, rows_per_file: usize) {
    fs::create_dir_all(dir).expect("create input dir");
    for f in 0..files {
        let mut text = String::from("k,v\n");
        for r in 0..rows_per_file {
            let i = f * rows_per_file + r;
            text.push_str(&format!("{},{}\n", i % 97, i * 7 % 1000));
        }
        fs::write(dir.join(format!("part-{f}.csv")), text).expect("write csv");
    }
}

/// The cache job: `a` (cached or not) read by `b` and, when `two_readers`, also by `c`.
fn cache_job(input: &Path, out: &Path, cache: &str, two_readers: bool) -> serde_yaml::Value {
    let mut steps = vec![
        serde_json::json!({"name": "a", "cache": cache,
            "sql": "SELECT k % 10 AS g, v FROM events WHERE v % 3 <> 0"}),
        serde_json::json!({"name": "b", "sql": "SELECT g, sum(v) AS s FROM a GROUP BY g"}),
    ];
    if two_readers {
        steps.push(serde_json::json!({"name": "c",
            "sql": "SELECT g, count(*) AS c FROM a GROUP BY g"}));
        steps.push(serde_json::json!({"name": "d",
            "sql": "SELECT b.g, b.s, c.c FROM b JOIN c ON b.g = c.g"}));
    } else {
        steps.push(serde_json::json!({"name": "d", "sql": "SELECT g, s FROM b"}));
    }
    serde_yaml::to_value(serde_json::json!({
        "shufflePartitions": CACHE_PARTITIONS,
        "executors": {"count": 2},
        "inputs": [{"name": "events", "format": "csv", "uri": format!("{}/", input.display())}],
        "steps": steps,
        "output": {"uri": out.display().to_string(), "format": "parquet"},
    }))
    .expect("yaml value")
}

/// Input files of the cache test, equal to its shuffle partitions: step `a` (a scan and a
/// filter) has this many partitions whether the scan splits by file or by partition count.
const CACHE_PARTITIONS: usize = 4;

#[test]
fn cached_step_read_twice_runs_once() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events");
    write_csv_inputs(&input, CACHE_PARTITIONS, 5_000);

    // The job under test: a cached `a` read by both `b` and `c`.
    let twice_dir = dir.path().join("twice");
    fs::create_dir_all(&twice_dir).unwrap();
    let twice_out = twice_dir.join("out");
    let run = run_job(
        &twice_dir,
        &cache_job(&input, &twice_out, "Memory", true),
        2,
        TIMEOUT,
    );
    let summary = run.expect_success("cached step read twice");
    let a = summary_step(summary, "a");
    assert_eq!(a["cached"], true, "step a is cached: {a}");
    let a_tasks = a["tasks"]
        .as_i64()
        .unwrap_or_else(|| panic!("steps[a].tasks: {a}"));

    // The same `a`, cached, read by one step: the tasks it takes to compute `a` once.
    let once_dir = dir.path().join("once");
    fs::create_dir_all(&once_dir).unwrap();
    let once = run_job(
        &once_dir,
        &cache_job(&input, &once_dir.join("out"), "Memory", false),
        2,
        TIMEOUT,
    );
    let once_summary = once.expect_success("cached step read once");
    let once_tasks = summary_int(summary_step(once_summary, "a"), "/tasks");

    assert_eq!(
        a_tasks, CACHE_PARTITIONS as i64,
        "a cached step of {CACHE_PARTITIONS} partitions read by two steps should run \
         {CACHE_PARTITIONS} tasks, once; it ran {a_tasks}: steps = {}",
        summary["steps"]
    );
    assert_eq!(
        a_tasks, once_tasks,
        "a cached step read by two steps should run as many tasks as when read by one"
    );

    // And the answer is right.
    runtime().block_on(async {
        let ctx = SessionContext::new();
        let csv = CsvReadOptions::new().has_header(true);
        ctx.register_csv("events", &format!("{}/", input.display()), csv)
            .await
            .expect("register input");
        let expected = ctx
            .sql(
                "SELECT b.g, b.s, c.c FROM \
                 (SELECT k % 10 AS g, sum(v) AS s FROM events WHERE v % 3 <> 0 GROUP BY k % 10) b \
                 JOIN (SELECT k % 10 AS g, count(*) AS c FROM events WHERE v % 3 <> 0 \
                 GROUP BY k % 10) c ON b.g = c.g",
            )
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        assert_eq!(row_count(&expected), 10, "ten groups expected");
        let actual = read_parquet_dir(&twice_out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(diff) = diff_row_sets(&expected, &actual) {
            panic!("the cached job's result differs from DataFusion:\n{diff}");
        }
    });
}
