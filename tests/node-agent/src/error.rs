//! The crate's one error type.

use std::path::PathBuf;

/// Everything the node agent can fail at, named after the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    ParseConfig {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("reading the `kubernetes` Service (the API server's address for pods): {source}")]
    ApiService { source: Box<kube::Error> },
    #[error("registering node {node}: {source}")]
    RegisterNode {
        node: String,
        source: Box<kube::Error>,
    },
    #[error("updating status of node {node}: {source}")]
    NodeStatus {
        node: String,
        source: Box<kube::Error>,
    },
    #[error("renewing lease of node {node}: {source}")]
    RenewLease {
        node: String,
        source: Box<kube::Error>,
    },
    #[error("patching status of pod {pod}: {source}")]
    PodStatus {
        pod: String,
        source: Box<kube::Error>,
    },
    #[error("deleting pod {pod}: {source}")]
    DeletePod {
        pod: String,
        source: Box<kube::Error>,
    },
    #[error("reading {kind} {namespace}/{name} for pod {pod}: {source}")]
    ReadPodSource {
        pod: String,
        kind: &'static str,
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("{kind} {namespace}/{name} used by pod {pod} does not exist")]
    MissingPodSource {
        pod: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("requesting a service-account token for pod {pod}: {source}")]
    RequestToken {
        pod: String,
        source: Box<kube::Error>,
    },
    #[error("no image mapping for image {image:?} (container {container})")]
    UnmappedImage { image: String, container: String },
    #[error("container {container} has no command: neither the pod nor the image mapping sets one")]
    NoCommand { container: String },
    #[error("container {container} has runAsNonRoot and image will run as root")]
    RunsAsRoot { container: String },
    #[error("container {container}: securityContext {field} {value} is not a valid id")]
    InvalidSecurityContext {
        container: String,
        field: &'static str,
        value: i64,
    },
    #[error("container {container}: memory limit {quantity:?}: {source}")]
    InvalidLimit {
        container: String,
        quantity: String,
        source: kiln_api::Error,
    },
    #[error("unsupported env source for {var} in container {container}")]
    UnsupportedEnv { var: String, container: String },
    #[error("running `{command}`: {source}")]
    RunCommand {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },
    #[error("no free pod IP on node {node}")]
    NoFreeIp { node: String },
    #[error("writing {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting container {container}: {source}")]
    SpawnContainer {
        container: String,
        source: std::io::Error,
    },
    #[error("signalling process group {pgid}: {source}")]
    Signal { pgid: i32, source: std::io::Error },
    #[error("binding the control endpoint {addr}: {source}")]
    BindControl {
        addr: String,
        source: std::io::Error,
    },
}

impl Error {
    /// A short, bounded label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ReadConfig { .. } | Error::ParseConfig { .. } | Error::InvalidConfig(_) => {
                "config"
            }
            Error::RegisterNode { .. } | Error::NodeStatus { .. } | Error::RenewLease { .. } => {
                "node"
            }
            Error::PodStatus { .. }
            | Error::DeletePod { .. }
            | Error::ReadPodSource { .. }
            | Error::MissingPodSource { .. }
            | Error::RequestToken { .. } => "pod-api",
            Error::UnmappedImage { .. }
            | Error::NoCommand { .. }
            | Error::UnsupportedEnv { .. }
            | Error::RunsAsRoot { .. }
            | Error::InvalidSecurityContext { .. }
            | Error::InvalidLimit { .. }
            | Error::SpawnContainer { .. }
            | Error::Signal { .. } => "container",
            Error::RunCommand { .. }
            | Error::CommandFailed { .. }
            | Error::NoFreeIp { .. }
            | Error::ApiService { .. } => "network",
            Error::WriteFile { .. } => "filesystem",
            Error::BindControl { .. } => "control",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
