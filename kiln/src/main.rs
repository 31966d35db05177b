//! The `kiln` command: run a job locally, and the driver and executor processes of a job on
//! a cluster.
#![forbid(unsafe_code)]

mod crd;
mod operator;
mod progress;
mod run;
mod tpch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Spark-style batch compute on Kubernetes, in Rust.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job (a job spec or a ComputeJob manifest) on this machine: one driver and N
    /// executor processes on loopback.
    Run(run::RunArgs),
    /// Run a job's driver (what the driver pod runs): plans the job, waits for executors to
    /// register, schedules their tasks and writes the summary.
    Driver(DriverArgs),
    /// Run an executor (what executor pods run): registers with the driver and runs tasks.
    Executor(ExecutorArgs),
    /// Generate the 8 TPC-H tables as Parquet files.
    Tpch(TpchArgs),
    /// Write the ComputeJob CustomResourceDefinition (crds/computejob.yaml) generated from
    /// the types; `--check` fails when the file differs from them.
    Crd(crd::CrdArgs),
    /// Run the Kubernetes operator: reconciles ComputeJobs into driver and executor pods.
    Operator(operator::OperatorArgs),
}

#[derive(clap::Args)]
struct DriverArgs {
    /// The job file (job spec or ComputeJob manifest).
    #[arg(long)]
    spec: PathBuf,
    /// Address of the control service.
    #[arg(long, default_value = "0.0.0.0:7077")]
    bind: std::net::SocketAddr,
    /// The per-job secret executors must present.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds without a heartbeat before an executor is declared lost (default: the job's
    /// `failurePolicy.heartbeatTimeoutSeconds`).
    #[arg(long)]
    heartbeat_timeout: Option<u64>,
    /// Where to write the full JSON job summary.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Where to write the short JSON report (at most 4 KiB) the operator copies into the
    /// ComputeJob's status, e.g. `/dev/termination-log`.
    #[arg(long, env = "KILN_TERMINATION_MESSAGE")]
    termination_message: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ExecutorArgs {
    /// The driver's control service, `http://host:port`.
    #[arg(long, env = "KILN_DRIVER")]
    driver: String,
    /// This executor's id, unique within the job.
    #[arg(long, env = "KILN_EXECUTOR_ID")]
    id: String,
    /// Address to serve blocks on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Address other executors reach this one at (default: --host).
    #[arg(long, env = "KILN_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Concurrent tasks (default: from the job spec).
    #[arg(long)]
    slots: Option<u32>,
    /// Memory budget, a quantity like 4Gi (default: executors.memory of the job).
    #[arg(long)]
    memory: Option<String>,
    /// Where blocks and operators spill.
    #[arg(long, default_value = "/tmp/kiln")]
    work_dir: PathBuf,
    /// The per-job secret.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
}

#[derive(clap::Args)]
struct TpchArgs {
    /// Scale factor (1 = about 1 GB of CSV, 6 million lineitem rows).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                init_tracing("warn");
                run::run(args).await
            }
            Command::Driver(args) => {
                init_tracing("info");
                driver(args).await
            }
            Command::Executor(args) => {
                init_tracing("info");
                executor(args).await
            }
            Command::Crd(args) => {
                init_tracing("warn");
                crd::crd(args)
            }
            Command::Operator(args) => {
                operator::init_tracing(&args.log_format);
                operator::operator(args).await
            }
            Command::Tpch(args) => {
                init_tracing("warn");
                tokio::task::spawn_blocking(move || tpch::generate(args.scale, &args.out))
                    .await
                    .context("TPC-H generator panicked")??;
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn driver(args: DriverArgs) -> anyhow::Result<std::process::ExitCode> {
    let spec = match kiln_api::load_job(&args.spec) {
        Ok(spec) => spec,
        Err(e) => {
            // The operator reads why from the termination message.
            let report = kiln_api::DriverReport {
                reason: Some(e.category().to_string()),
                message: Some(e.to_string()),
                ..Default::default()
            };
            write_report(args.termination_message.as_deref(), &report)?;
            return Err(e.into());
        }
    };
    let driver = kiln_executor::driver::Driver::start(
        &spec,
        kiln_executor::driver::DriverOptions {
            bind: args.bind,
            token: args.token,
            heartbeat_timeout: Duration::from_secs(
                args.heartbeat_timeout
                    .unwrap_or(spec.failure_policy.heartbeat_timeout_seconds.into()),
            ),
        },
    )
    .await?;
    tracing::info!(address = %driver.address(), "driver listening");
    let outcome = driver.run(&spec).await;
    let (summary, reason, code) = match outcome {
        Ok(o) => {
            if let Some(schema) = &o.schema {
                println!("{}", run::format_rows(schema, &o.batches, 1000)?);
            }
            (o.summary, None, std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            let mut s = driver.summary(&spec);
            s.error = Some(e.to_string());
            tracing::error!(error = %e, "job failed");
            (s, Some(e.category()), std::process::ExitCode::FAILURE)
        }
    };
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec(&summary)?)
            .with_context(|| format!("writing the summary to {}", path.display()))?;
    }
    write_report(args.termination_message.as_deref(), &summary.report(reason))?;
    driver.shutdown(Duration::from_secs(5)).await;
    Ok(code)
}

/// Writes the driver's short report where the operator reads it, when asked to.
fn write_report(
    path: Option<&std::path::Path>,
    report: &kiln_api::DriverReport,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, report.to_termination_message())
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(())
}

async fn executor(args: ExecutorArgs) -> anyhow::Result<std::process::ExitCode> {
    let memory = args
        .memory
        .as_deref()
        .map(kiln_api::parse_memory)
        .transpose()?;
    kiln_executor::worker::run_executor(kiln_executor::worker::ExecutorOptions {
        driver: args.driver,
        executor_id: args.id,
        bind_host: args.host,
        advertise_host: args.advertise_host,
        slots: args.slots,
        memory,
        work_dir: args.work_dir,
        token: args.token,
    })
    .await?;
    Ok(std::process::ExitCode::SUCCESS)
}
