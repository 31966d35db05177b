//! `kiln run`: a job on this machine, through the same driver/executor path as a cluster.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use kiln_api::JobSpec;
use kiln_executor::JobSummary;
use kiln_executor::local::{LocalCluster, LocalOptions};

use crate::progress::ProgressBars;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The job: a job spec or a whole ComputeJob manifest (YAML or JSON).
    file: PathBuf,
    /// Executors to start (default: executors.count of the job).
    #[arg(long)]
    executors: Option<u32>,
    /// Run executors as tasks of this process instead of as separate processes.
    #[arg(long)]
    in_process: bool,
    /// Write the job summary as JSON to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// No progress bars, no result table, no closing line.
    #[arg(long, short)]
    quiet: bool,
    /// Result rows to print at most.
    #[arg(long, default_value_t = 100)]
    max_rows: usize,
    /// Seconds without a heartbeat before an executor is declared lost (default: the job's
    /// `failurePolicy.heartbeatTimeoutSeconds`).
    #[arg(long)]
    heartbeat_timeout: Option<u64>,
    /// Kill (or pause) an executor process during the run, as a spot reclaim would; may be
    /// given several times. `stage=3,at=50%` once half of stage 3's tasks are done;
    /// `at=50%` the same for the first shuffle stage; `after-stage=2` once stage 2 is done.
    /// Add `executor=exec-1` to choose the victim (default: random, from --chaos-seed;
    /// `executor=busiest` takes the one holding the most outputs still needed) and
    /// `pause=3s` to SIGSTOP it for that long instead of killing it, or `drain` to give it
    /// notice (SIGTERM) as an eviction would: it drains, its outputs moving to the other
    /// executors. A kill is a reclaim and spends no `maxExecutorLosses`; add `crash` to
    /// count it as the executor's own failure. `iteration=5` fires as iteration 5 of an iterative step starts.
    #[arg(long, value_name = "EVENT")]
    chaos: Vec<kiln_executor::local::ChaosEvent>,
    /// Seed for chaos's random choices (default: a fresh one, printed so a run can be
    /// repeated).
    #[arg(long)]
    chaos_seed: Option<u64>,
    /// Plain connections between the driver and the executors, for measuring what TLS
    /// costs (by default every connection is mutual TLS, with certificates made for this
    /// run alone).
    #[arg(long)]
    no_tls: bool,
}

/// Makes relative local paths of inputs and output relative to the job file's folder, so a
/// job runs the same from any working directory.
fn resolve_paths(spec: &mut JobSpec, base: &Path) {
    let resolve = |uri: &mut String| {
        if uri.contains("://") || Path::new(uri.as_str()).is_absolute() {
            return;
        }
        let trailing = uri.ends_with('/');
        let mut joined = base.join(uri.as_str()).to_string_lossy().into_owned();
        if trailing && !joined.ends_with('/') {
            joined.push('/');
        }
        *uri = joined;
    };
    for input in &mut spec.inputs {
        resolve(&mut input.uri);
    }
    if let Some(out) = &mut spec.output {
        resolve(&mut out.uri);
        if !out.uri.ends_with('/') {
            out.uri.push('/');
        }
    }
}

/// Renders at most `max` rows as a table.
pub fn format_rows(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    max: usize,
) -> anyhow::Result<String> {
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut shown = Vec::new();
    let mut left = max;
    for b in batches {
        if left == 0 {
            break;
        }
        let n = b.num_rows().min(left);
        shown.push(b.slice(0, n));
        left -= n;
    }
    if shown.is_empty() {
        shown.push(RecordBatch::new_empty(schema.clone()));
    }
    let mut out = arrow::util::pretty::pretty_format_batches(&shown)?.to_string();
    if total > max {
        out.push_str(&format!("\n… {} more rows", total - max));
    }
    out.push_str(&format!("\n({total} rows)"));
    Ok(out)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn closing_line(s: &JobSummary) -> String {
    let mut line = format!(
        "{} in {:.2}s: {} stages, {} tasks ({} attempts), {} shuffled ({} between executors)",
        if s.succeeded { "done" } else { "failed" },
        s.elapsed_ms as f64 / 1000.0,
        s.stages.len(),
        s.totals.tasks,
        s.totals.attempts,
        mib(s.totals.counters.shuffle_bytes_written),
        mib(s.totals.counters.remote_bytes_fetched),
    );
    if s.totals.counters.spill_count > 0 {
        line.push_str(&format!(
            ", {} spills ({})",
            s.totals.counters.spill_count,
            mib(s.totals.counters.spilled_bytes)
        ));
    }
    if let Some(o) = &s.output {
        line.push_str(&format!(
            "; wrote {} rows in {} files to {}",
            o.rows, o.files, o.uri
        ));
    }
    line
}

/// What losses cost, one line each, for the end of a run.
fn recovery_lines(s: &JobSummary) -> Vec<String> {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
    let mut lines: Vec<String> = s
        .recovery
        .losses
        .iter()
        .map(|l| {
            format!(
                "lost {} ({}) at {:.2}s: {} outputs to recompute; detected after {}, full width again after {}",
                l.executor,
                l.reason,
                l.at_ms as f64 / 1000.0,
                l.outputs_lost,
                ms(l.detection_ms),
                ms(l.full_width_ms),
            )
        })
        .collect();
    if !lines.is_empty() {
        lines.push(format!(
            "recovery: {} executors lost, {} outputs lost, {} partitions migrated, {} recomputed",
            s.recovery.losses.len(),
            s.recovery.outputs_lost,
            s.recovery.partitions_migrated,
            s.totals.recomputed
        ));
    }
    lines
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut spec = match kiln_api::load_job(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            return Ok(ExitCode::from(2));
        }
    };
    let base = args
        .file
        .canonicalize()
        .with_context(|| format!("locating {}", args.file.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    resolve_paths(&mut spec, &base);
    if let Some(n) = args.executors {
        spec.executors.count = n;
    }
    let work = tempfile::Builder::new().prefix("kiln-run-").tempdir()?;
    let chaos_seed = args.chaos_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    if !args.chaos.is_empty() && !args.quiet {
        eprintln!("chaos: seed {chaos_seed}");
    }
    let options = LocalOptions {
        in_process: args.in_process,
        heartbeat_timeout: Duration::from_secs(
            args.heartbeat_timeout
                .unwrap_or(spec.failure_policy.heartbeat_timeout_seconds.into()),
        ),
        chaos: args.chaos.clone(),
        chaos_seed,
        tls: !args.no_tls,
        ..LocalOptions::new(
            spec.executors.count,
            std::env::current_exe().context("locating the kiln program")?,
            work.path().to_path_buf(),
        )
    };
    let mut cluster = LocalCluster::start(&spec, &options).await?;
    let bars = (!args.quiet).then(|| ProgressBars::spawn(cluster.subscribe()));
    let outcome = tokio::select! {
        outcome = cluster.run(&spec) => outcome,
        () = kiln_operator::shutdown_signal() => {
            // Stop the executors and remove the work folder rather than leave them behind.
            if let Some(b) = bars {
                b.finish().await;
            }
            cluster.stop().await;
            eprintln!("interrupted: the job was stopped and its executors with it");
            return Ok(ExitCode::from(130));
        }
    };
    if let Some(b) = bars {
        b.finish().await;
    }
    let (summary, result) = match outcome {
        Ok(o) => (o.summary.clone(), Ok(o)),
        Err(e) => {
            let mut s = cluster.summary(&spec);
            s.error = Some(e.to_string());
            (s, Err(e))
        }
    };
    cluster.stop().await;
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing the summary to {}", path.display()))?;
    }
    match result {
        Ok(o) => {
            if !args.quiet {
                if let Some(schema) = &o.schema {
                    println!("{}", format_rows(schema, &o.batches, args.max_rows)?);
                }
                for line in recovery_lines(&summary) {
                    eprintln!("{line}");
                }
                eprintln!("{}", closing_line(&summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let logs = work.keep();
            for line in recovery_lines(&summary) {
                eprintln!("{line}");
            }
            eprintln!("error: {e}");
            if !args.in_process {
                eprintln!("executor logs: {}", logs.display());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_job_file() {
        let mut spec = kiln_api::parse_job(
            "inputs:\n  - {name: a, format: csv, uri: data/a.csv}\n  - {name: b, format: parquet, uri: 's3://bucket/b/'}\n  - {name: c, format: text, uri: /abs/c/}\nsteps:\n  - {name: s, sql: SELECT 1}\noutput: {uri: out, format: csv}\n",
        )
        .unwrap();
        resolve_paths(&mut spec, Path::new("/jobs/wc"));
        assert_eq!(spec.inputs[0].uri, "/jobs/wc/data/a.csv");
        assert_eq!(spec.inputs[1].uri, "s3://bucket/b/");
        assert_eq!(spec.inputs[2].uri, "/abs/c/");
        assert_eq!(spec.output.unwrap().uri, "/jobs/wc/out/");
    }
}
