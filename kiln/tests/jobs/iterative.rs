//! Iterative steps: the PageRank and k-means examples through `kiln run`, checked against a
//! direct computation and against the clusters the points were drawn from, and PageRank
//! with an executor killed between iterations.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(300);
const ITERATIONS: usize = 20;

/// PageRank of `examples/pagerank/edges.csv` computed directly, the way the job defines it.
fn reference_ranks() -> BTreeMap<i64, f64> {
    let text = std::fs::read_to_string(workspace_root().join("examples/pagerank/edges.csv"))
        .expect("read edges.csv");
    let edges: Vec<(i64, i64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let (s, d) = l.split_once(',').expect("src,dst");
            (s.parse().expect("src"), d.parse().expect("dst"))
        })
        .collect();
    let mut degree: BTreeMap<i64, f64> = BTreeMap::new();
    for (s, _) in &edges {
        *degree.entry(*s).or_default() += 1.0;
    }
    let mut ranks: BTreeMap<i64, f64> = edges
        .iter()
        .flat_map(|(s, d)| [(*s, 1.0), (*d, 1.0)])
        .collect();
    for _ in 0..ITERATIONS {
        let mut sums: BTreeMap<i64, f64> = BTreeMap::new();
        for (s, d) in &edges {
            *sums.entry(*d).or_default() += ranks[s] / degree[s];
        }
        ranks = ranks
            .keys()
            .map(|p| (*p, 0.15 + 0.85 * sums.get(p).copied().unwrap_or(0.0)))
            .collect();
    }
    ranks
}

/// The PageRank example writing every page's rank to Parquet.
fn pagerank_job(out: &Path) -> serde_yaml::Value {
    let root = workspace_root().join("examples/pagerank");
    let text = std::fs::read_to_string(root.join("job.yaml")).expect("read the job");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&text).expect("job yaml");
    job["inputs"][0]["uri"] = root.join("edges.csv").display().to_string().into();
    job["output"] = serde_yaml::to_value(serde_json::json!({
        "from": "ranks",
        "uri": out.display().to_string(),
        "format": "parquet",
    }))
    .expect("yaml");
    job
}

fn ranks_of(batches: &[RecordBatch]) -> BTreeMap<i64, f64> {
    let mut out = BTreeMap::new();
    for b in batches {
        let pages = b.column(0).as_primitive::<Int64Type>();
        let ranks = b.column(1).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            assert!(
                out.insert(pages.value(i), ranks.value(i)).is_none(),
                "page twice"
            );
        }
    }
    out
}

fn compare_ranks(what: &str, expected: &BTreeMap<i64, f64>, actual: &BTreeMap<i64, f64>) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: {} pages ranked, expected {}",
        actual.len(),
        expected.len()
    );
    for (page, want) in expected {
        let got = actual
            .get(page)
            .unwrap_or_else(|| panic!("{what}: page {page} missing"));
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{what}: page {page} has rank {got}, expected {want}"
        );
    }
}

fn run_pagerank(dir: &Path, extra: &[&str], what: &str) -> (Value, BTreeMap<i64, f64>) {
    let out = dir.join(what.replace(' ', "-"));
    let run = run_job_with(dir, &pagerank_job(&out), 4, extra, TIMEOUT);
    let summary = run.expect_success(what).clone();
    let batches = runtime()
        .block_on(read_parquet_dir(&out))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    (summary, ranks_of(&batches))
}

#[test]
fn pagerank_matches_a_direct_computation() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let (summary, ranks) = run_pagerank(dir.path(), &[], "pagerank");
    compare_ranks("pagerank", &reference_ranks(), &ranks);
    assert_eq!(
        summary_step(&summary, "ranks")["iterations"],
        Value::from(ITERATIONS),
        "{summary}"
    );
}

#[test]
fn pagerank_recomputes_only_the_lost_cached_partitions() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let (summary, ranks) = run_pagerank(
        dir.path(),
        &["--chaos", "iteration=6", "--chaos-seed", "9"],
        "pagerank with chaos",
    );
    compare_ranks("pagerank after a loss", &reference_ranks(), &ranks);
    let losses = summary["recovery"]["losses"].as_array().expect("losses");
    assert_eq!(losses.len(), 1, "{summary}");
    let outputs_lost = summary_int(&summary, "/recovery/outputsLost");
    assert_eq!(
        summary_int(&summary, "/totals/recomputed"),
        outputs_lost,
        "recomputed partitions must be exactly the lost ones: {summary}"
    );
    // The cached edge table: the partitions the executor held, not all of them.
    let stages = summary["stages"].as_array().expect("stages");
    let links = stages
        .iter()
        .rfind(|s| s["step"] == "links")
        .expect("the links step's stages");
    let (tasks, again) = (
        links["tasks"].as_i64().unwrap(),
        links["recomputed"].as_i64().unwrap(),
    );
    assert!(
        again >= 1 && again < tasks,
        "links: {again} of {tasks} cached partitions recomputed: {summary}"
    );
}

#[test]
fn pagerank_loses_nothing_when_every_executor_is_given_notice() {
    let _machine = shared();
    // Two executors: after the first drain, the second notice strikes both that remain at
    // once, so their blocks wait for the replacements to register before they move.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("drains");
    let mut job = pagerank_job(&out);
    job["failurePolicy"] =
        serde_yaml::to_value(serde_json::json!({"maxExecutorLosses": 0})).expect("yaml");
    let chaos = [
        "--chaos",
        "iteration=5,drain",
        "--chaos",
        "iteration=8,drain",
        "--chaos",
        "iteration=8,drain",
    ];
    let run = run_job_with(dir.path(), &job, 2, &chaos, TIMEOUT);
    let summary = run.expect_success("pagerank with drains").clone();
    let batches = runtime()
        .block_on(read_parquet_dir(&out))
        .unwrap_or_else(|e| panic!("pagerank with drains: {e}"));
    compare_ranks(
        "pagerank with drains",
        &reference_ranks(),
        &ranks_of(&batches),
    );
    let reasons: Vec<&str> = summary["recovery"]["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .filter_map(|l| l["reason"].as_str())
        .collect();
    assert!(
        reasons.len() >= 2 && reasons.iter().all(|r| *r == "Drained"),
        "{reasons:?}"
    );
    assert!(
        summary_int(&summary, "/recovery/partitionsMigrated") > 0,
        "{summary}"
    );
    assert_eq!(summary_int(&summary, "/totals/recomputed"), 0, "{summary}");
}

#[test]
fn kmeans_finds_the_clusters_the_points_came_from() {
    let _machine = shared();
    let root = workspace_root().join("examples/kmeans");
    let text = std::fs::read_to_string(root.join("job.yaml")).expect("read the job");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&text).expect("job yaml");
    job["inputs"][0]["uri"] = root.join("points.csv").display().to_string().into();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    job["output"] = serde_yaml::to_value(serde_json::json!({
        "from": "centroids",
        "uri": out.display().to_string(),
        "format": "parquet",
    }))
    .expect("yaml");
    let run = run_job(dir.path(), &job, 3, TIMEOUT);
    let summary = run.expect_success("kmeans").clone();
    let iterations = summary_step(&summary, "centroids")["iterations"]
        .as_i64()
        .expect("iterations");
    assert!(
        (2..50).contains(&iterations),
        "until should stop the loop before its bound: {iterations}"
    );
    let batches = runtime().block_on(read_parquet_dir(&out)).expect("read");
    let mut centroids = Vec::new();
    for b in &batches {
        let (x, y) = (
            b.column(1).as_primitive::<Float64Type>(),
            b.column(2).as_primitive::<Float64Type>(),
        );
        for i in 0..b.num_rows() {
            centroids.push((x.value(i), y.value(i)));
        }
    }
    assert_eq!(centroids.len(), 4, "{centroids:?}");
    for (cx, cy) in [(2.0, 2.0), (8.0, 3.0), (5.0, 8.0), (1.0, 9.0)] {
        let nearest = centroids
            .iter()
            .map(|(x, y)| ((x - cx).powi(2) + (y - cy).powi(2)).sqrt())
            .fold(f64::MAX, f64::min);
        assert!(
            nearest < 0.1,
            "no centroid near ({cx}, {cy}): {centroids:?}"
        );
    }
}

#[test]
fn a_bad_until_is_refused_before_any_work() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let job: serde_yaml::Value = serde_yaml::from_str(
        "steps:\n  - name: n\n    initial: SELECT 1 AS v\n    sql: SELECT v + 1 AS v FROM n\n    until: SELECT max(v) FROM n\n",
    )
    .expect("yaml");
    let run = run_job(dir.path(), &job, 1, TIMEOUT);
    assert!(!run.output.status.success());
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    assert!(
        stderr.contains("step `n`") && stderr.contains("until must return one boolean column"),
        "{stderr}"
    );
    let bad_columns: serde_yaml::Value = serde_yaml::from_str(
        "steps:\n  - name: n\n    initial: SELECT 1 AS v\n    sql: SELECT 'x' AS w FROM n\n    repeat: 3\n",
    )
    .expect("yaml");
    let run = run_job(dir.path(), &bad_columns, 1, TIMEOUT);
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    assert!(
        !run.output.status.success() && stderr.contains("must return the columns of initial"),
        "{stderr}"
    );
}
