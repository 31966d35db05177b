//! The 22 TPC-H queries at scale factor 0.1 through `kiln run --executors 4`, each compared
//! with single-process DataFusion on the same data.
//!
//! The data is generated once with `kiln tpch` into `target/tpch-sf0.1/` and reused. Set
//! `KILN_TPCH_QUERIES=3,5` to run only some queries.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

const SCALE: f64 = 0.1;
const EXECUTORS: u32 = 4;

/// Runs query `n` through kiln and DataFusion; describes every difference found.
async fn check_query(ctx: &SessionContext, data: &Path, n: u32) -> Result<String, String> {
    let sql = read_query(&workspace_root().join(format!("bench/queries/q{n}.sql")));
    let expected = ctx
        .sql(&sql)
        .await
        .map_err(|e| format!("DataFusion cannot plan q{n}: {e}"))?
        .collect()
        .await
        .map_err(|e| format!("DataFusion cannot run q{n}: {e}"))?;

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = dir.path().join("out");
    let job = tpch_job(data, &sql, &format!("q{n}"), &out, EXECUTORS);
    let run = run_job(dir.path(), &job, EXECUTORS, Duration::from_secs(600));
    let summary = run.check_success(&format!("q{n}"))?;

    let mut problems = Vec::new();
    match check_output_layout(&out) {
        Ok(0) => problems.push("no part files written".to_string()),
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
    let actual = read_parquet_dir(&out).await?;
    if let Some(diff) = diff_row_sets(&expected, &actual) {
        problems.push(diff);
    }
    let remote = summary
        .pointer("/totals/remoteBytesFetched")
        .and_then(serde_json::Value::as_i64);
    if !matches!(remote, Some(bytes) if bytes > 0) {
        problems.push(format!(
            "no shuffle bytes moved between executors: totals.remoteBytesFetched = {remote:?} \
             (every TPC-H query joins or aggregates)"
        ));
    }
    let summary_rows = summary
        .pointer("/output/rows")
        .and_then(serde_json::Value::as_i64);
    if summary_rows != Some(row_count(&expected) as i64) {
        problems.push(format!(
            "summary output.rows = {summary_rows:?}, expected {}",
            row_count(&expected)
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "{} rows, {} tasks, {} remote bytes, {:.1}s",
            row_count(&expected),
            summary_int(summary, "/totals/tasks"),
            remote.unwrap_or(0),
            run.elapsed.as_secs_f64()
        ))
    } else {
        Err(problems.join("\n"))
    }
}

fn selected_queries() -> Vec<u32> {
    match std::env::var("KILN_TPCH_QUERIES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|q| {
                q.trim()
                    .trim_start_matches('q')
                    .parse()
                    .unwrap_or_else(|_| panic!("bad query number {q:?} in KILN_TPCH_QUERIES"))
            })
            .collect(),
        _ => (1..=22).collect(),
    }
}

#[test]
fn tpch_sf01_matches_datafusion() {
    let _machine = shared();
    let data = tpch_data(SCALE);
    let rt = runtime();
    let ctx = SessionContext::new();
    rt.block_on(async {
        for table in TPCH_TABLES {
            let path = data.join(format!("{table}.parquet"));
            ctx.register_parquet(table, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap_or_else(|e| panic!("register {}: {e}", path.display()));
        }
    });

    let queries = selected_queries();
    let mut failures = Vec::new();
    for &n in &queries {
        match rt.block_on(check_query(&ctx, &data, n)) {
            Ok(note) => eprintln!("q{n}: ok ({note})"),
            Err(problem) => {
                eprintln!("q{n}: FAILED\n{problem}");
                failures.push(format!("q{n}:\n{problem}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} TPC-H queries differ from DataFusion at SF {SCALE}:\n\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n\n")
    );
}
