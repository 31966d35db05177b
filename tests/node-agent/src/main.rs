//! kiln-node-agent: plays kubelet for several test nodes in one process,
//! running each pod bound to them as local processes in their own network
//! namespaces. See tests/cluster/README.md.
#![forbid(unsafe_code)]

mod agent;
mod config;
mod control;
mod error;
mod launch;
mod limits;
mod net;
mod node;
mod pod;
mod process;
mod security;
mod status;
mod volumes;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Plays kubelet for the test cluster's nodes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The agent's config file (nodes, pod network, image mappings).
    #[arg(long, env = "KILN_NODE_AGENT_CONFIG")]
    config: PathBuf,
    /// Directory for pod directories, logs and the record of created network objects.
    #[arg(long, env = "KILN_NODE_AGENT_STATE")]
    state_dir: PathBuf,
    /// Base of the relative program paths in the image mappings (the repository root).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let config = config::Config::load(&args.config)?;
    let repo = std::fs::canonicalize(&args.repo).context("resolving --repo")?;
    std::fs::create_dir_all(&args.state_dir).context("creating the state directory")?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let kube_config = kube::Config::infer()
        .await
        .context("reading the API server's address and credentials (KUBECONFIG)")?;
    let api_port = kube_config.cluster_url.port_u16().unwrap_or(443);
    let client =
        kube::Client::try_from(kube_config).context("connecting to the API server (KUBECONFIG)")?;
    let listener = control::bind(&config.control).await?;
    let agent = agent::Agent::new(client, config, repo, state_dir, api_port)?;
    agent.start().await?;
    tokio::spawn(control::serve(agent.clone(), listener));
    info!("node agent running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = agent.watch_pods() => r.context("pod watch ended")?,
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    agent.kill_all();
    // Give the workers a moment to kill processes and remove namespaces.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    Ok(())
}
