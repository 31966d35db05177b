//! `kiln-bench`: runs the 22 TPC-H queries through `kiln run` and through single-process
//! DataFusion on the same data, and prints per-query times and ratios.
#![forbid(unsafe_code)]

mod peers;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use peers::{DataFusionPeer, Failure, KilnPeer, Peer, Query, TPCH_TABLES};
use report::{QueryResult, Report};

#[derive(Parser)]
#[command(name = "kiln-bench", about = "Kiln benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// The TPC-H queries through `kiln run` and in-process DataFusion.
    Tpch(TpchArgs),
}

#[derive(clap::Args)]
struct TpchArgs {
    /// TPC-H scale factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Executors of each `kiln run`.
    #[arg(long, default_value_t = 4)]
    executors: u32,
    /// `shufflePartitions` of each Kiln job.
    #[arg(long, default_value_t = 16)]
    shuffle_partitions: u32,
    /// `executors.memory` of each Kiln job (default: the spec's default, 2Gi); hash joins
    /// do not spill, so larger scales need more.
    #[arg(long)]
    executor_memory: Option<String>,
    /// When the failure peers strike, as a `kiln run --chaos` point: `at=50%` (half of the
    /// first shuffle stage) or `after-stage=4`.
    #[arg(long, default_value = "at=50%")]
    kill_at: String,
    /// Queries to run, e.g. `1,3,5` (default: all 22).
    #[arg(long, value_delimiter = ',')]
    queries: Vec<u32>,
    /// The `kiln` binary (default: target/release/kiln of this workspace).
    #[arg(long)]
    kiln: Option<PathBuf>,
    /// The data directory (default: data/tpch-sf<scale> of this workspace); generated with
    /// `kiln tpch` when a table is missing.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Runs per query and peer; the fastest counts.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Peers to compare, the baseline last.
    #[arg(long, value_delimiter = ',', default_values_t = ["kiln".to_string(), "datafusion".to_string()])]
    peers: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The workspace this binary was built from.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn load_queries(numbers: &[u32]) -> Result<Vec<Query>> {
    let dir = workspace_root().join("bench/queries");
    let numbers: Vec<u32> = if numbers.is_empty() {
        (1..=22).collect()
    } else {
        numbers.to_vec()
    };
    numbers
        .iter()
        .map(|n| {
            if !(1..=22).contains(n) {
                bail!("there is no TPC-H query {n} (queries are 1 to 22)");
            }
            let path = dir.join(format!("q{n}.sql"));
            let sql = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok(Query {
                name: format!("q{n}"),
                sql: sql.trim().trim_end_matches(';').trim_end().to_string(),
            })
        })
        .collect()
}

/// Generates the tables with `kiln tpch` unless all eight are there.
fn ensure_data(kiln: &Path, scale: f64, data: &Path) -> Result<()> {
    let missing = TPCH_TABLES
        .iter()
        .any(|t| !data.join(format!("{t}.parquet")).is_file());
    if !missing {
        return Ok(());
    }
    eprintln!("generating TPC-H scale {scale} into {}", data.display());
    let status = Command::new(kiln)
        .args(["tpch", "--scale", &scale.to_string(), "--out"])
        .arg(data)
        .status()
        .with_context(|| format!("cannot start {}", kiln.display()))?;
    if !status.success() {
        bail!("kiln tpch --scale {scale} failed ({status})");
    }
    Ok(())
}

fn make_peer(name: &str, args: &TpchArgs, kiln: &Path, data: &Path) -> Result<Box<dyn Peer>> {
    Ok(match name {
        "kiln" | "kiln-kill" | "kiln-rerun" | "kiln-driver-kill" | "kiln-drain" | "kiln-plain" => {
            Box::new(KilnPeer::new(
                kiln,
                data,
                args.executors,
                args.executor_memory.as_deref(),
                args.shuffle_partitions,
                &args.kill_at,
                match name {
                    "kiln-kill" => Failure::Kill,
                    "kiln-rerun" => Failure::Rerun,
                    "kiln-driver-kill" => Failure::DriverKill,
                    "kiln-drain" => Failure::Drain,
                    "kiln-plain" => Failure::Plain,
                    _ => Failure::None,
                },
            ))
        }
        "datafusion" => Box::new(DataFusionPeer::new(data)?),
        other => bail!(
            "unknown peer {other:?} (known: kiln, kiln-kill, kiln-rerun, kiln-driver-kill, kiln-drain, kiln-plain, datafusion)"
        ),
    })
}

fn tpch(args: TpchArgs) -> Result<()> {
    if !(args.scale.is_finite() && args.scale > 0.0) {
        bail!("--scale must be a positive number");
    }
    if args.peers.is_empty() || args.runs == 0 {
        bail!("--peers and --runs must not be empty or zero");
    }
    let root = workspace_root();
    let kiln = args
        .kiln
        .clone()
        .unwrap_or_else(|| root.join("target/release/kiln"));
    if !kiln.is_file() {
        bail!(
            "no kiln binary at {}: build it with `cargo build --release -p kiln` or pass --kiln",
            kiln.display()
        );
    }
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| root.join(format!("data/tpch-sf{}", args.scale)));
    let queries = load_queries(&args.queries)?;
    ensure_data(&kiln, args.scale, &data)?;

    let mut peers = args
        .peers
        .iter()
        .map(|p| make_peer(p, &args, &kiln, &data))
        .collect::<Result<Vec<_>>>()?;
    let mut report = Report {
        peers: peers.iter().map(|p| p.name().to_string()).collect(),
        queries: Vec::new(),
    };
    for query in &queries {
        let mut outcomes = Vec::new();
        for peer in peers.iter_mut() {
            let mut best: Option<report::Outcome> = None;
            for _ in 0..args.runs {
                let outcome = peer.run(query).map_err(|e| format!("{e:#}"));
                best = Some(match (best, outcome) {
                    (Some(Ok(b)), Ok(m)) => Ok(if m.elapsed < b.elapsed { m } else { b }),
                    (_, o @ Err(_)) | (None | Some(Err(_)), o) => o,
                });
            }
            let outcome = best.expect("at least one run");
            match &outcome {
                Ok(m) => eprintln!(
                    "{} {}: {:.0} ms, {} rows",
                    query.name,
                    peer.name(),
                    ms(m.elapsed),
                    m.rows
                ),
                Err(e) => eprintln!("{} {}: error: {e}", query.name, peer.name()),
            }
            outcomes.push(outcome);
        }
        report.queries.push(QueryResult {
            query: query.name.clone(),
            outcomes,
        });
    }

    println!(
        "TPC-H scale {} ({}), kiln with {} executors, {} shuffle partitions",
        args.scale,
        data.display(),
        args.executors,
        args.shuffle_partitions
    );
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let context = serde_json::json!({
            "benchmark": "tpch",
            "scale": args.scale,
            "executors": args.executors,
            "shufflePartitions": args.shuffle_partitions,
            "runs": args.runs,
            "data": data.display().to_string(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        });
        let json = serde_json::to_string_pretty(&report.json(context))?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Commands::Tpch(args) => tpch(args),
    }
}
