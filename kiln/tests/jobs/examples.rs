//! The examples under `examples/` through `kiln run --executors 2`, each checked against an
//! answer computed independently here in plain Rust.
//!
//! Jobs without an output section are run twice: once as shipped (the printed table must
//! show the answer) and once from a temporary copy with a Parquet output added, which is read
//! back and compared value by value.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(300);

fn example_dir(name: &str) -> PathBuf {
    workspace_root().join("examples").join(name)
}

fn load_job(name: &str) -> serde_yaml::Value {
    let path = example_dir(name).join("job.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A copy of example `name`'s job with input paths made absolute (so it can run from a
/// temporary directory) and a Parquet output into `out`.
fn job_with_output(name: &str, out: &Path) -> serde_yaml::Value {
    let mut job = load_job(name);
    let base = example_dir(name);
    for input in job["inputs"].as_sequence_mut().expect("inputs") {
        let uri = input["uri"].as_str().expect("input uri").to_string();
        let mut absolute = base.join(&uri).display().to_string();
        if uri.ends_with('/') && !absolute.ends_with('/') {
            absolute.push('/');
        }
        input["uri"] = absolute.into();
    }
    job["output"] = serde_yaml::to_value(serde_json::json!({
        "uri": out.display().to_string(),
        "format": "parquet",
    }))
    .expect("yaml value");
    job
}

/// Runs example `name` with a Parquet output and returns its rows.
fn run_example(name: &str) -> (Vec<Vec<Cell>>, serde_json::Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let run = run_job(dir.path(), &job_with_output(name, &out), 2, TIMEOUT);
    let summary = run.expect_success(name).clone();
    let parts = check_output_layout(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(parts > 0, "{name}: no part files under {}", out.display());
    let batches = runtime()
        .block_on(read_parquet_dir(&out))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (to_rows(&batches), summary)
}

fn text(cell: &Cell) -> String {
    match cell {
        Cell::Text(s) => s.clone(),
        other => panic!("expected a string, got {other}"),
    }
}

fn int(cell: &Cell) -> i64 {
    match cell {
        Cell::Int(v) => i64::try_from(*v).expect("fits i64"),
        other => panic!("expected an integer, got {other}"),
    }
}

fn float(cell: &Cell) -> f64 {
    match cell {
        Cell::Float(v) => *v,
        Cell::Int(v) => *v as f64,
        Cell::Decimal(v, s) => *v as f64 / 10f64.powi(i32::from(*s)),
        other => panic!("expected a number, got {other}"),
    }
}

/// The twenty most frequent words of the corpus, counted in plain Rust with the job's rule:
/// lowercase, then every run of a-z is a word. Ties are broken by the word.
fn expected_top_words() -> Vec<(String, i64)> {
    let mut counts: HashMap<String, i64> = HashMap::new();
    let corpus = example_dir("wordcount").join("corpus");
    let mut files = 0;
    for entry in fs::read_dir(&corpus).expect("list corpus") {
        let path = entry.expect("corpus entry").path();
        if path.extension().is_none_or(|e| e != "txt") {
            continue;
        }
        files += 1;
        let text = fs::read_to_string(&path)
            .expect("read corpus file")
            .to_lowercase();
        for word in text.split(|c: char| !c.is_ascii_lowercase()) {
            if !word.is_empty() {
                *counts.entry(word.to_string()).or_default() += 1;
            }
        }
    }
    assert!(
        files >= 3,
        "the corpus should hold several files, found {files}"
    );
    let mut counts: Vec<(String, i64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(20);
    counts
}

#[test]
fn wordcount_finds_the_top_words() {
    let _machine = shared();
    let expected = expected_top_words();
    let (rows, _) = run_example("wordcount");
    let actual: Vec<(String, i64)> = rows.iter().map(|r| (text(&r[0]), int(&r[1]))).collect();
    // The output files hold the rows in the job's order; compare as a set, then the counts'
    // order (ties may land in any file order).
    let as_set = |v: &[(String, i64)]| v.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        as_set(&actual),
        as_set(&expected),
        "top 20 (word, count): kiln gave {actual:?}, plain Rust counted {expected:?}"
    );
}

#[test]
fn wordcount_prints_the_top_words() {
    let _machine = shared();
    let expected = expected_top_words();
    let job = example_dir("wordcount").join("job.yaml");
    let dir = tempfile::tempdir().expect("temp dir");
    let summary = dir.path().join("summary.json");
    let out = run_kiln(
        &[
            "run",
            job.to_str().unwrap(),
            "--executors",
            "2",
            "--summary",
            summary.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln run {} failed ({}): {}",
        job.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for (word, count) in &expected {
        let shown = stdout.lines().any(|line| {
            let tokens: Vec<&str> = line.split(|c: char| !c.is_alphanumeric()).collect();
            tokens.contains(&word.as_str()) && tokens.contains(&count.to_string().as_str())
        });
        assert!(
            shown,
            "no printed row shows {word:?} with count {count}:\n{stdout}"
        );
    }
    // A job without an output counts the rows it returned (the status shows them).
    let summary: serde_json::Value =
        serde_json::from_slice(&fs::read(&summary).expect("summary")).expect("summary JSON");
    assert_eq!(summary["resultRows"], expected.len(), "{summary}");
}

/// Tab-separated rows of a file with a header line.
fn read_tsv(path: &Path) -> Vec<HashMap<String, String>> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header line").split('\t').collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            header
                .iter()
                .zip(l.split('\t'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn tsv_join_matches_plain_rust() {
    let _machine = shared();
    let dir = example_dir("tsv-join");
    let customers: HashMap<String, String> = read_tsv(&dir.join("customers.tsv"))
        .into_iter()
        .map(|r| (r["customer_id"].clone(), r["country"].clone()))
        .collect();
    // country -> (orders, distinct customers, revenue)
    let mut expected: BTreeMap<String, (i64, BTreeSet<String>, f64)> = BTreeMap::new();
    for order in read_tsv(&dir.join("orders.tsv")) {
        if order["status"] == "returned" {
            continue;
        }
        if let Some(country) = customers.get(&order["customer_id"]) {
            let entry = expected.entry(country.clone()).or_default();
            entry.0 += 1;
            entry.1.insert(order["customer_id"].clone());
            entry.2 += order["amount"].parse::<f64>().expect("amount");
        }
    }
    assert!(
        expected.len() > 1,
        "the example data should span several countries"
    );

    let (rows, summary) = run_example("tsv-join");
    let actual: BTreeMap<String, (i64, i64, f64)> = rows
        .iter()
        .map(|r| (text(&r[0]), (int(&r[1]), int(&r[2]), float(&r[3]))))
        .collect();
    assert_eq!(
        rows.len(),
        actual.len(),
        "a country appears twice in {rows:?}"
    );
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "countries"
    );
    for (country, (orders, customers, revenue)) in &expected {
        let (a_orders, a_customers, a_revenue) = actual[country];
        assert_eq!(a_orders, *orders, "{country}: orders");
        assert_eq!(
            a_customers,
            customers.len() as i64,
            "{country}: distinct customers"
        );
        assert!(
            (a_revenue - revenue).abs() <= 1e-6 * revenue.abs(),
            "{country}: revenue {a_revenue}, expected {revenue}"
        );
    }
    assert!(
        summary_int(&summary, "/totals/remoteBytesFetched") > 0,
        "the join and group-by should move shuffle bytes between the 2 executors: {summary}"
    );
}

#[test]
fn pi_is_estimated_from_every_slice() {
    let _machine = shared();
    // Slices and the sample count, read from the example's input files.
    let mut slices = 0i64;
    let mut samples = 0i64;
    for entry in fs::read_dir(example_dir("pi").join("slices")).expect("list slices") {
        let text = fs::read_to_string(entry.expect("slice file").path()).expect("read slice");
        for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
            let fields: Vec<i64> = line
                .split(',')
                .map(|f| f.parse().expect("integer"))
                .collect();
            slices += 1;
            samples += fields[2] - fields[1];
        }
    }
    let (rows, summary) = run_example("pi");
    assert_eq!(rows.len(), 1, "pi yields one row: {rows:?}");
    let (got_slices, got_samples, pi) = (int(&rows[0][0]), int(&rows[0][1]), float(&rows[0][2]));
    assert_eq!(got_slices, slices, "every slice must contribute");
    assert_eq!(got_samples, samples, "samples drawn");
    assert!(
        (pi - std::f64::consts::PI).abs() < 0.05,
        "pi estimate {pi} is not within 0.05 of {}",
        std::f64::consts::PI
    );
    assert!(
        summary_int(&summary, "/totals/tasks") >= slices,
        "the {slices} slice files should be sampled by at least {slices} tasks: {summary}"
    );
}

#[test]
fn tpch_example_runs_query_3() {
    let _machine = shared();
    // The example is query 3 of bench/queries (it needs generated data, run by the tpch tests).
    let job = load_job("tpch");
    let normalize = |sql: &str| sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let example = normalize(job["steps"][0]["sql"].as_str().expect("step sql"));
    let q3 = normalize(&read_query(&workspace_root().join("bench/queries/q3.sql")));
    assert_eq!(
        example, q3,
        "examples/tpch/job.yaml should run bench/queries/q3.sql"
    );
    for input in job["inputs"].as_sequence().expect("inputs") {
        let uri = input["uri"].as_str().expect("uri");
        assert!(
            uri.starts_with("../../data/tpch-sf0.1/"),
            "{uri}: the example reads the data `kiln tpch --scale 0.1 --out data/tpch-sf0.1` writes"
        );
    }
}
