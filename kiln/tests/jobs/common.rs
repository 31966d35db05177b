//! Helpers shared by the `kiln run` integration tests: locating the workspace, running the
//! `kiln` binary on a job, reading a job's Parquet output back, and comparing row sets.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{self as dt, DataType};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

/// Held by every test: tests that measure recovery take it alone, the others share it, so a
/// recovery test never runs beside another job of executor processes (on a 2-core machine
/// those would make its heartbeats late for no reason).
static MACHINE: RwLock<()> = RwLock::new(());

/// The machine to this test alone (recovery and commit tests).
pub fn alone() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// The machine shared with other tests that share it.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// The wordcount example over a shuffle of eight partitions, writing Parquet to `out`.
pub fn wordcount_job(out: &Path) -> serde_yaml::Value {
    let root = workspace_root().join("examples/wordcount");
    let text = std::fs::read_to_string(root.join("job.yaml")).expect("read the wordcount job");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&text).expect("wordcount job yaml");
    job["inputs"][0]["uri"] = format!("{}/", root.join("corpus").display()).into();
    job["shufflePartitions"] = 8.into();
    job["output"] = serde_yaml::to_value(serde_json::json!({
        "uri": out.display().to_string(),
        "format": "parquet",
    }))
    .expect("yaml");
    job
}

/// The workspace root (the parent of the `kiln` package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kiln package lives inside the workspace")
        .to_path_buf()
}

/// The `kiln` binary cargo built for these tests.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs `kiln` with `args`, killing it after `timeout`; returns its output.
pub fn run_kiln(args: &[&str], timeout: Duration) -> Output {
    run_kiln_env(args, &[], timeout)
}

/// Like [`run_kiln`], with extra environment variables (its executor processes inherit them).
pub fn run_kiln_env(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut child = Command::new(kiln_bin())
        .args(args)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", kiln_bin().display()));
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).ok();
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).ok();
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for kiln") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("wait for killed kiln");
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("kiln {args:?} did not finish within {timeout:?} ({status}); stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// The outcome of one `kiln run`.
pub struct JobRun {
    /// The process output.
    pub output: Output,
    /// The `--summary` JSON, when the file was written.
    pub summary: Option<serde_json::Value>,
    /// How long the run took, start to exit.
    pub elapsed: Duration,
}

impl JobRun {
    /// The summary of a successful run; panics with stderr otherwise.
    pub fn expect_success(&self, what: &str) -> &serde_json::Value {
        self.check_success(what).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The summary of a successful run, or a description of the failure.
    pub fn check_success(&self, what: &str) -> Result<&serde_json::Value, String> {
        let stderr = String::from_utf8_lossy(&self.output.stderr);
        if !self.output.status.success() {
            return Err(format!(
                "{what}: kiln run exited with {}; stderr:\n{}",
                self.output.status,
                tail(&stderr, 40)
            ));
        }
        let summary = self
            .summary
            .as_ref()
            .ok_or_else(|| format!("{what}: kiln run wrote no --summary file"))?;
        if summary["succeeded"] != serde_json::Value::Bool(true) {
            return Err(format!(
                "{what}: summary says the job did not succeed: {}",
                summary["error"]
            ));
        }
        Ok(summary)
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes `job` to `dir/job.yaml` and runs `kiln run` on it with `--executors executors`,
/// `--summary` and `--quiet`.
pub fn run_job(dir: &Path, job: &serde_yaml::Value, executors: u32, timeout: Duration) -> JobRun {
    run_job_with(dir, job, executors, &[], timeout)
}

/// Like [`run_job`], with extra `kiln run` arguments (e.g. `--chaos`).
pub fn run_job_with(
    dir: &Path,
    job: &serde_yaml::Value,
    executors: u32,
    extra: &[&str],
    timeout: Duration,
) -> JobRun {
    run_job_with_env(dir, job, executors, extra, &[], timeout)
}

/// Like [`run_job_with`], with extra environment variables for `kiln run` and its executor
/// processes (e.g. `KILN_FAULTS`).
pub fn run_job_with_env(
    dir: &Path,
    job: &serde_yaml::Value,
    executors: u32,
    extra: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> JobRun {
    let job_file = dir.join("job.yaml");
    fs::write(
        &job_file,
        serde_yaml::to_string(job).expect("serialize job"),
    )
    .expect("write job");
    let summary_file = dir.join("summary.json");
    let _ = fs::remove_file(&summary_file);
    let started = Instant::now();
    let executors = executors.to_string();
    let mut args = vec![
        "run",
        job_file.to_str().expect("utf-8 temp path"),
        "--executors",
        &executors,
        "--summary",
        summary_file.to_str().expect("utf-8 temp path"),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let output = run_kiln_env(&args, envs, timeout);
    let elapsed = started.elapsed();
    let summary = fs::read(&summary_file).ok().map(|bytes| {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "summary {} is not JSON ({e}): {}",
                summary_file.display(),
                String::from_utf8_lossy(&bytes)
            )
        })
    });
    JobRun {
        output,
        summary,
        elapsed,
    }
}

/// An integer from the summary, at a JSON pointer such as `/totals/remoteBytesFetched`.
pub fn summary_int(summary: &serde_json::Value, pointer: &str) -> i64 {
    summary
        .pointer(pointer)
        .and_then(serde_json::Value::as_i64)
        .unwrap_or_else(|| panic!("summary has no integer at {pointer}: {summary}"))
}

/// The `steps[]` entry of the summary named `name`.
pub fn summary_step<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("summary has no step {name}: {summary}"))
}

/// Reads every `part-*.parquet` file under `dir` with DataFusion. A result with no part files
/// is an empty result.
pub async fn read_parquet_dir(dir: &Path) -> Result<Vec<RecordBatch>, String> {
    let mut parts: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot list output {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    let paths: Vec<String> = parts.iter().map(|p| p.display().to_string()).collect();
    ctx.read_parquet(paths, ParquetReadOptions::default())
        .await
        .map_err(|e| format!("cannot read output {}: {e}", dir.display()))?
        .collect()
        .await
        .map_err(|e| format!("cannot read output {}: {e}", dir.display()))
}

/// Checks that `dir` is a committed output: `_SUCCESS`, part files and nothing else (no
/// staging directory, no stray file); returns how many part files it holds.
pub fn check_output_layout(dir: &Path) -> Result<usize, String> {
    if !dir.join("_SUCCESS").is_file() {
        return Err(format!("output {} has no _SUCCESS marker", dir.display()));
    }
    let mut parts = 0;
    for entry in
        fs::read_dir(dir).map_err(|e| format!("cannot list output {}: {e}", dir.display()))?
    {
        let name = entry
            .map_err(|e| format!("cannot list output {}: {e}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("part-") {
            parts += 1;
        } else if name != "_SUCCESS" {
            return Err(format!("output {} holds a stray `{name}`", dir.display()));
        }
    }
    Ok(parts)
}

/// One cell of a result, normalised for comparison across engines and file round trips.
#[derive(Clone, Debug)]
pub enum Cell {
    Null,
    Int(i128),
    Float(f64),
    /// A decimal: unscaled value and scale.
    Decimal(i128, i8),
    /// Anything else (strings, dates, timestamps, ...) as arrow displays it.
    Text(String),
}

impl Cell {
    fn rank(&self) -> u8 {
        match self {
            Cell::Null => 0,
            Cell::Int(_) | Cell::Float(_) | Cell::Decimal(..) => 1,
            Cell::Text(_) => 2,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Cell::Int(v) => Some(*v as f64),
            Cell::Float(v) => Some(*v),
            Cell::Decimal(v, s) => Some(*v as f64 / 10f64.powi(i32::from(*s))),
            _ => None,
        }
    }

    /// Equal, with floats within a relative tolerance of 1e-6 (plus 1e-9 absolute) and
    /// decimals exact.
    pub fn matches(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Null, Cell::Null) => true,
            (Cell::Int(a), Cell::Int(b)) => a == b,
            (Cell::Text(a), Cell::Text(b)) => a == b,
            (Cell::Decimal(a, sa), Cell::Decimal(b, sb)) => match rescale(*a, *b, *sa, *sb) {
                Some((a, b)) => a == b,
                None => approx_eq(self.as_f64(), other.as_f64()),
            },
            _ => approx_eq(self.as_f64(), other.as_f64()),
        }
    }

    fn order(&self, other: &Cell) -> Ordering {
        match (self, other) {
            (Cell::Int(a), Cell::Int(b)) => a.cmp(b),
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Decimal(a, sa), Cell::Decimal(b, sb)) => match rescale(*a, *b, *sa, *sb) {
                Some((a, b)) => a.cmp(&b),
                None => self.as_f64().unwrap().total_cmp(&other.as_f64().unwrap()),
            },
            _ => match (self.as_f64(), other.as_f64()) {
                (Some(a), Some(b)) => a.total_cmp(&b),
                _ => self.rank().cmp(&other.rank()),
            },
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Null => write!(f, "NULL"),
            Cell::Int(v) => write!(f, "{v}"),
            Cell::Float(v) => write!(f, "{v}"),
            Cell::Decimal(v, s) => write!(f, "{v}e-{s}"),
            Cell::Text(v) => write!(f, "{v:?}"),
        }
    }
}

fn rescale(a: i128, b: i128, sa: i8, sb: i8) -> Option<(i128, i128)> {
    let up = |v: i128, by: i8| {
        10i128
            .checked_pow(u32::from(by.unsigned_abs()))?
            .checked_mul(v)
    };
    match sa.cmp(&sb) {
        Ordering::Equal => Some((a, b)),
        Ordering::Less => Some((up(a, sb - sa)?, b)),
        Ordering::Greater => Some((a, up(b, sa - sb)?)),
    }
}

fn approx_eq(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a == b
                || (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-9
                || (a.is_nan() && b.is_nan())
        }
        _ => false,
    }
}

/// A result as rows of cells.
pub fn to_rows(batches: &[RecordBatch]) -> Vec<Vec<Cell>> {
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<Vec<Cell>> = batch
            .columns()
            .iter()
            .map(|c| to_cells(c.as_ref()))
            .collect();
        for row in 0..batch.num_rows() {
            rows.push(columns.iter().map(|c| c[row].clone()).collect());
        }
    }
    rows
}

fn to_cells(array: &dyn Array) -> Vec<Cell> {
    macro_rules! ints {
        ($t:ty) => {
            array
                .as_primitive::<$t>()
                .iter()
                .map(|v| v.map_or(Cell::Null, |v| Cell::Int(i128::from(v))))
                .collect()
        };
    }
    match array.data_type() {
        DataType::Int8 => ints!(dt::Int8Type),
        DataType::Int16 => ints!(dt::Int16Type),
        DataType::Int32 => ints!(dt::Int32Type),
        DataType::Int64 => ints!(dt::Int64Type),
        DataType::UInt8 => ints!(dt::UInt8Type),
        DataType::UInt16 => ints!(dt::UInt16Type),
        DataType::UInt32 => ints!(dt::UInt32Type),
        DataType::UInt64 => ints!(dt::UInt64Type),
        DataType::Float32 => array
            .as_primitive::<dt::Float32Type>()
            .iter()
            .map(|v| v.map_or(Cell::Null, |v| Cell::Float(f64::from(v))))
            .collect(),
        DataType::Float64 => array
            .as_primitive::<dt::Float64Type>()
            .iter()
            .map(|v| v.map_or(Cell::Null, Cell::Float))
            .collect(),
        DataType::Decimal128(_, scale) => array
            .as_primitive::<dt::Decimal128Type>()
            .iter()
            .map(|v| v.map_or(Cell::Null, |v| Cell::Decimal(v, *scale)))
            .collect(),
        _ => (0..array.len())
            .map(|i| {
                if array.is_null(i) {
                    Cell::Null
                } else {
                    Cell::Text(array_value_to_string(array, i).expect("display a value"))
                }
            })
            .collect(),
    }
}

fn compare_rows(a: &[Cell], b: &[Cell]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.order(y))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| a.len().cmp(&b.len()))
}

fn show_row(row: &[Cell]) -> String {
    let cells: Vec<String> = row.iter().map(ToString::to_string).collect();
    format!("[{}]", cells.join(", "))
}

/// Compares two results as row sets (order ignored). Returns a description of the
/// differences, or `None` when they match.
pub fn diff_row_sets(expected: &[RecordBatch], actual: &[RecordBatch]) -> Option<String> {
    let mut problems = Vec::new();
    let names = |batches: &[RecordBatch]| -> Option<Vec<String>> {
        batches.first().map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        })
    };
    if let (Some(e), Some(a)) = (names(expected), names(actual))
        && e != a
    {
        problems.push(format!("columns differ: expected {e:?}, got {a:?}"));
    }
    let mut expected = to_rows(expected);
    let mut actual = to_rows(actual);
    expected.sort_by(|a, b| compare_rows(a, b));
    actual.sort_by(|a, b| compare_rows(a, b));
    if expected.len() != actual.len() {
        problems.push(format!(
            "row counts differ: expected {}, got {}",
            expected.len(),
            actual.len()
        ));
    }
    let mismatched: Vec<usize> = (0..expected.len().min(actual.len()))
        .filter(|&i| {
            let (e, a) = (&expected[i], &actual[i]);
            e.len() != a.len() || e.iter().zip(a).any(|(x, y)| !x.matches(y))
        })
        .collect();
    if !mismatched.is_empty() {
        problems.push(format!(
            "{} of {} sorted rows differ",
            mismatched.len(),
            expected.len().min(actual.len())
        ));
    }
    for &i in mismatched.iter().take(5) {
        problems.push(format!(
            "  row {i}: expected {}\n          got      {}",
            show_row(&expected[i]),
            show_row(&actual[i])
        ));
    }
    if expected.len() > actual.len() && mismatched.is_empty() {
        for row in expected[actual.len()..].iter().take(5) {
            problems.push(format!("  missing {}", show_row(row)));
        }
    }
    if actual.len() > expected.len() && mismatched.is_empty() {
        for row in actual[expected.len()..].iter().take(5) {
            problems.push(format!("  extra   {}", show_row(row)));
        }
    }
    (!problems.is_empty()).then(|| problems.join("\n"))
}

/// Total rows of a result.
pub fn row_count(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// A directory of TPC-H data at `scale`, generated once with `kiln tpch` under the
/// workspace's `target/` and reused by later runs. Test processes that ask at the same time
/// wait on a lock file for the first one to finish.
pub fn tpch_data(scale: f64) -> PathBuf {
    let target = workspace_root().join("target");
    let dir = target.join(format!("tpch-sf{scale}"));
    fs::create_dir_all(&target).expect("create target/");
    let lock = File::create(target.join(format!("tpch-sf{scale}.lock"))).expect("lock file");
    lock.lock().expect("lock the TPC-H data directory");
    let marker = dir.join("_COMPLETE");
    if !marker.is_file() {
        let started = Instant::now();
        let out = run_kiln(
            &[
                "tpch",
                "--scale",
                &scale.to_string(),
                "--out",
                dir.to_str().expect("utf-8 path"),
            ],
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "kiln tpch --scale {scale} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for table in TPCH_TABLES {
            let file = dir.join(format!("{table}.parquet"));
            assert!(file.is_file(), "kiln tpch did not write {}", file.display());
        }
        fs::write(&marker, format!("kiln tpch --scale {scale}\n")).expect("write marker");
        eprintln!("generated TPC-H scale {scale} in {:?}", started.elapsed());
    }
    lock.unlock().expect("unlock the TPC-H data directory");
    dir
}

/// The job that runs `sql` over the eight tables under `data` and writes Parquet to `out`.
pub fn tpch_job(
    data: &Path,
    sql: &str,
    step: &str,
    out: &Path,
    executors: u32,
) -> serde_yaml::Value {
    let inputs: Vec<serde_yaml::Value> = TPCH_TABLES
        .iter()
        .map(|table| {
            serde_yaml::to_value(serde_json::json!({
                "name": table,
                "format": "parquet",
                "uri": data.join(format!("{table}.parquet")).display().to_string(),
            }))
            .expect("yaml value")
        })
        .collect();
    serde_yaml::to_value(serde_json::json!({
        "shufflePartitions": 8,
        "executors": {"count": executors},
        "inputs": inputs,
        "steps": [{"name": step, "sql": sql}],
        "output": {"uri": out.display().to_string(), "format": "parquet"},
    }))
    .expect("yaml value")
}

/// The eight TPC-H tables.
pub const TPCH_TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

/// A SQL file's text without its trailing `;`.
pub fn read_query(path: &Path) -> String {
    let sql = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    sql.trim().trim_end_matches(';').trim_end().to_string()
}

/// A multi-threaded tokio runtime for DataFusion work inside a synchronous test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
