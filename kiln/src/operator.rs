//! `kiln operator`: the Kubernetes operator process. Every flag also reads an environment
//! variable, which is how the Helm chart configures it.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use kiln_operator::{OperatorConfig, Settings};

#[derive(clap::Args)]
pub struct OperatorArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "KILN_METRICS_BIND", default_value = "0.0.0.0:8080")]
    metrics_bind: SocketAddr,
    /// Namespaces to watch, comma-separated; empty: all.
    #[arg(
        long,
        env = "KILN_WATCH_NAMESPACES",
        default_value = "",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Image of job pods whose ComputeJob names none.
    #[arg(long, env = "KILN_DEFAULT_IMAGE", default_value = concat!("ghcr.io/kiln-dev/kiln:", env!("CARGO_PKG_VERSION")))]
    default_image: String,
    /// Operator configuration (YAML): spot/on-demand node labels, spot tolerations, limits.
    #[arg(long, env = "KILN_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Elect a leader on a Lease so that only one replica reconciles.
    #[arg(long, env = "KILN_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leadership Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "KILN_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leadership Lease.
    #[arg(long, default_value = "kiln-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Logs to stderr as text or JSON lines; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kiln-operator".into())
}

pub async fn operator(args: OperatorArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = match &args.config {
        Some(path) => OperatorConfig::load(path)?,
        None => OperatorConfig::default(),
    };
    let settings = Settings {
        metrics_bind: args.metrics_bind,
        namespaces: args
            .namespaces
            .into_iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        default_image: args.default_image,
        config,
        leader_elect: args.leader_elect,
        lease_namespace: args
            .lease_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        lease_name: args.lease_name,
        identity: args
            .identity
            .filter(|i| !i.is_empty())
            .unwrap_or_else(hostname),
    };
    // In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster, or KUBECONFIG)")?;
    tracing::info!(
        namespaces = ?settings.namespaces,
        image = %settings.default_image,
        leader_elect = settings.leader_elect,
        identity = %settings.identity,
        "kiln operator starting"
    );
    kiln_operator::run(client, settings, kiln_operator::shutdown_signal()).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
