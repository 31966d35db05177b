//! The `kiln` command: run a job locally, and the driver and executor processes of a job on
//! a cluster.
#![forbid(unsafe_code)]

mod chaos;
mod crd;
mod operator;
mod progress;
mod run;
mod tpch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_api::LocationPolicy;
use kiln_api::launch::{DriverLaunch, ExecutorLaunch};
use kiln_api::tls::{Role, TlsIdentity};

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
    #[command(name = DriverLaunch::SUBCOMMAND)]
    Driver(DriverLaunch),
    /// Run an executor (what executor pods run): registers with the driver and runs tasks.
    #[command(name = ExecutorLaunch::SUBCOMMAND)]
    Executor(ExecutorLaunch),
    /// Generate the 8 TPC-H tables as Parquet files.
    Tpch(TpchArgs),
    /// Write the ComputeJob CustomResourceDefinition (crds/computejob.yaml) generated from
    /// the types; `--check` fails when the file differs from them.
    Crd(crd::CrdArgs),
    /// Run the Kubernetes operator: reconciles ComputeJobs into driver and executor pods.
    Operator(operator::OperatorArgs),
    /// Drain or kill the node of an executor of a running ComputeJob (kubeconfig as
    /// kubectl), follow the job to its end and print its recovery report.
    Chaos(chaos::ChaosArgs),
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
            Command::Chaos(args) => {
                init_tracing("warn");
                chaos::chaos(args).await
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

async fn driver(args: DriverLaunch) -> anyhow::Result<std::process::ExitCode> {
    // The operator reads why from the termination message, also when the job never starts.
    let report_early = |reason: kiln_api::FailureReason, message: String| {
        let report = kiln_api::DriverReport {
            reason: Some(reason),
            message: Some(message),
            ..Default::default()
        };
        write_report(args.termination_message.as_deref(), &report)
    };
    let spec = match kiln_api::load_job(&args.spec) {
        Ok(spec) => spec,
        Err(e) => {
            report_early(e.reason(), e.to_string())?;
            return Err(e.into());
        }
    };
    let tls = match TlsIdentity::from_env(Role::Driver) {
        Ok(tls) => tls,
        Err(e) => {
            report_early(e.reason(), e.to_string())?;
            return Err(e.into());
        }
    };
    let started = kiln_executor::driver::Driver::start(
        &spec,
        kiln_executor::driver::DriverOptions {
            bind: args.bind,
            token: args.token,
            heartbeat_timeout: Duration::from_secs(
                args.heartbeat_timeout
                    .unwrap_or(spec.failure_policy.heartbeat_timeout_seconds.into()),
            ),
            job_uid: args.job_uid,
            epoch: args.epoch,
            attach: args.attach,
            tls,
            locations: LocationPolicy::pods(args.allow_loopback),
        },
    )
    .await;
    let driver = match started {
        Ok(driver) => driver,
        Err(e) => {
            report_early(e.reason(), e.to_string())?;
            return Err(e.into());
        }
    };
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
            (s, Some(e.reason()), std::process::ExitCode::FAILURE)
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

async fn executor(args: ExecutorLaunch) -> anyhow::Result<std::process::ExitCode> {
    let memory = args
        .memory
        .as_deref()
        .map(kiln_api::parse_memory)
        .transpose()?;
    kiln_executor::worker::run_executor(kiln_executor::worker::ExecutorOptions {
        driver: args.driver,
        executor_id: args.id,
        bind_host: args.host,
        port: args.port,
        advertise_host: args.advertise_host,
        slots: args.slots,
        memory,
        work_dir: args.work_dir,
        token: args.token,
        faults: args.faults,
        tls: TlsIdentity::from_env(Role::Executor)?,
        locations: LocationPolicy::pods(args.allow_loopback),
    })
    .await?;
    Ok(std::process::ExitCode::SUCCESS)
}
