//! The engines a benchmark compares: each runs one query at a time over the TPC-H tables and
//! reports how long it took. Add a peer (DuckDB, Spark, ...) by implementing [`Peer`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

/// The TPC-H tables, each read from `<data>/<table>.parquet`.
pub const TPCH_TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

/// One benchmark query.
#[derive(Clone, Debug)]
pub struct Query {
    /// Short name, e.g. `q3`.
    pub name: String,
    /// The SQL text, without a trailing `;`.
    pub sql: String,
}

/// One timed run of a query by a peer.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Wall-clock time, as the peer defines it (see each peer's docs).
    pub elapsed: Duration,
    /// Rows in the result.
    pub rows: u64,
    /// Peer-specific figures for the JSON report (e.g. Kiln's job summary).
    pub detail: Option<serde_json::Value>,
}

/// An engine that runs benchmark queries.
pub trait Peer {
    /// The name used in tables, JSON and `--peers`.
    fn name(&self) -> &str;
    /// Runs `query` once and times it.
    fn run(&mut self, query: &Query) -> Result<Measurement>;
}

/// How a Kiln peer meets failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No failure.
    None,
    /// The executor holding the most needed outputs is killed (SIGKILL) once half of the
    /// first shuffle stage is done; Kiln recomputes what it held.
    Kill,
    /// The same kill with `maxExecutorLosses: 0`, so the job fails; then it reruns from
    /// scratch. The time is both runs: what a loss costs without lineage recovery (and what
    /// losing the driver cost before replacement drivers took the executors over).
    Rerun,
    /// The driver is killed once half of the first shuffle stage is done; a replacement
    /// takes the executors and their outputs over.
    DriverKill,
    /// The busiest executor is given notice (SIGTERM, as an eviction or a node drain sends)
    /// at the chosen point: its outputs move to the others; the job allows no executor
    /// loss at all, so a drain that counted against the budget would fail it.
    Drain,
    /// No failure, and plain connections (`kiln run --no-tls`): beside [`Failure::None`],
    /// what mutual TLS costs.
    Plain,
}

/// Kiln through its CLI: `kiln run job.yaml --executors N`, one process per query, writing
/// Parquet to a temporary directory. The time is the whole command, from start to exit,
/// including the start of the driver and executor processes.
pub struct KilnPeer {
    binary: PathBuf,
    data: PathBuf,
    executors: u32,
    executor_memory: Option<String>,
    shuffle_partitions: u32,
    scratch: PathBuf,
    failure: Failure,
    /// The chaos event of [`Failure::Kill`] and [`Failure::Rerun`] (the busiest executor
    /// killed at the chosen point) and of [`Failure::DriverKill`].
    kill: String,
    driver_kill: String,
    drain: String,
}

impl KilnPeer {
    /// A Kiln peer running `binary` over the tables in `data`.
    pub fn new(
        binary: &Path,
        data: &Path,
        executors: u32,
        executor_memory: Option<&str>,
        shuffle_partitions: u32,
        kill_at: &str,
        failure: Failure,
    ) -> Self {
        let scratch =
            std::env::temp_dir().join(format!("kiln-bench-{}-{failure:?}", std::process::id()));
        Self {
            binary: binary.to_path_buf(),
            data: data.to_path_buf(),
            executors,
            executor_memory: executor_memory.map(str::to_string),
            shuffle_partitions,
            scratch,
            failure,
            kill: format!("{kill_at},executor=busiest"),
            driver_kill: format!("driver,{kill_at}"),
            drain: format!("{kill_at},executor=busiest,drain"),
        }
    }

    fn job(&self, query: &Query, out: &Path, losses: u32) -> serde_json::Value {
        let inputs: Vec<serde_json::Value> = TPCH_TABLES
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t,
                    "format": "parquet",
                    "uri": self.data.join(format!("{t}.parquet")).display().to_string(),
                })
            })
            .collect();
        let mut executors = serde_json::json!({"count": self.executors});
        if let Some(m) = &self.executor_memory {
            executors["memory"] = m.as_str().into();
        }
        serde_json::json!({
            "shufflePartitions": self.shuffle_partitions,
            "executors": executors,
            "inputs": inputs,
            "steps": [{"name": query.name, "sql": query.sql}],
            "output": {"uri": out.display().to_string(), "format": "parquet"},
            "failurePolicy": {"maxExecutorLosses": losses},
        })
    }

    /// One `kiln run`; returns its exit status, stderr and summary.
    fn run_once(
        &self,
        query: &Query,
        dir: &Path,
        losses: u32,
        chaos: Option<&str>,
    ) -> Result<(std::process::Output, Option<serde_json::Value>)> {
        let job_file = dir.join("job.yaml");
        let summary_file = dir.join("summary.json");
        let _ = std::fs::remove_file(&summary_file);
        let job = self.job(query, &dir.join("out"), losses);
        std::fs::write(&job_file, serde_yaml::to_string(&job)?)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .arg(&job_file)
            .args(["--executors", &self.executors.to_string(), "--quiet"])
            .arg("--summary")
            .arg(&summary_file)
            .stdin(Stdio::null());
        if let Some(event) = chaos {
            command.args(["--chaos", event, "--chaos-seed", "1"]);
        }
        if self.failure == Failure::Plain {
            command.arg("--no-tls");
        }
        let output = command
            .output()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        let summary = std::fs::read(&summary_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Ok((output, summary))
    }
}

impl Peer for KilnPeer {
    fn name(&self) -> &str {
        match self.failure {
            Failure::None => "kiln",
            Failure::Kill => "kiln-kill",
            Failure::Rerun => "kiln-rerun",
            Failure::DriverKill => "kiln-driver-kill",
            Failure::Drain => "kiln-drain",
            Failure::Plain => "kiln-plain",
        }
    }

    fn run(&mut self, query: &Query) -> Result<Measurement> {
        let dir = self.scratch.join(&query.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let started = Instant::now();
        let (output, summary) = match self.failure {
            Failure::None | Failure::Plain => self.run_once(query, &dir, 20, None)?,
            Failure::Kill => self.run_once(query, &dir, 20, Some(&self.kill))?,
            Failure::DriverKill => self.run_once(query, &dir, 20, Some(&self.driver_kill))?,
            Failure::Drain => self.run_once(query, &dir, 0, Some(&self.drain))?,
            Failure::Rerun => {
                let (first, _) = self.run_once(query, &dir, 0, Some(&self.kill))?;
                if first.status.success() {
                    bail!(
                        "the kill at {} did not fail the job with maxExecutorLosses 0",
                        self.kill
                    );
                }
                self.run_once(query, &dir, 20, None)?
            }
        };
        let elapsed = started.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!("kiln run exited with {}: {last}", output.status);
        }
        let summary = summary.context("kiln run wrote no summary")?;
        let rows = summary
            .pointer("/output/rows")
            .and_then(serde_json::Value::as_u64)
            .context("the summary has no output.rows")?;
        let detail = serde_json::json!({
            "jobMs": summary.get("elapsedMs"),
            "totals": summary.get("totals"),
            "recovery": summary.get("recovery"),
        });
        Ok(Measurement {
            elapsed,
            rows,
            detail: Some(detail),
        })
    }
}

impl Drop for KilnPeer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// DataFusion in this process, with its default configuration (one partition per core). The
/// tables are registered once; the time covers planning and collecting the result.
pub struct DataFusionPeer {
    runtime: tokio::runtime::Runtime,
    ctx: SessionContext,
}

impl DataFusionPeer {
    /// A DataFusion session over the tables in `data`.
    pub fn new(data: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let ctx = SessionContext::new_with_config(SessionConfig::new());
        runtime.block_on(async {
            for table in TPCH_TABLES {
                let path = data.join(format!("{table}.parquet"));
                let path = path.to_str().context("data path is not UTF-8")?;
                ctx.register_parquet(table, path, ParquetReadOptions::default())
                    .await
                    .with_context(|| format!("register {path}"))?;
            }
            anyhow::Ok(())
        })?;
        Ok(Self { runtime, ctx })
    }
}

impl Peer for DataFusionPeer {
    fn name(&self) -> &str {
        "datafusion"
    }

    fn run(&mut self, query: &Query) -> Result<Measurement> {
        let ctx = &self.ctx;
        self.runtime.block_on(async {
            let started = Instant::now();
            let batches = ctx.sql(&query.sql).await?.collect().await?;
            let elapsed = started.elapsed();
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            anyhow::Ok(Measurement {
                elapsed,
                rows,
                detail: None,
            })
        })
    }
}
