//! The operator's errors: each names the action that failed and what it acted on.
use std::path::PathBuf;

/// What went wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the ComputeJob from the API server failed.
    #[error("reading ComputeJob {namespace}/{name}: {source}")]
    GetJob {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Listing a job's pods failed.
    #[error("listing the pods of ComputeJob {namespace}/{name}: {source}")]
    ListPods {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Reading a node (to tell whether it is lost) failed.
    #[error("reading node {node}: {source}")]
    GetNode { node: String, source: kube::Error },
    /// Reading the job's token Secret failed.
    #[error("reading Secret {namespace}/{name}: {source}")]
    GetSecret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Making a new job's TLS credentials failed.
    #[error("making the TLS credentials of ComputeJob {namespace}/{name}: {source}")]
    Credentials {
        namespace: String,
        name: String,
        source: kiln_api::Error,
    },
    /// A server-side apply of a child object failed.
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Deleting a pod failed.
    #[error("deleting pod {namespace}/{name}: {source}")]
    DeletePod {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Deleting a finished ComputeJob (its TTL ran out) failed.
    #[error("deleting ComputeJob {namespace}/{name}: {source}")]
    DeleteJob {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Writing the ComputeJob's status failed.
    #[error("writing the status of ComputeJob {namespace}/{name}: {source}")]
    PatchStatus {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// The object lacks a namespace or name (never true for objects from the API server).
    #[error("ComputeJob without {0}")]
    MissingMetadata(&'static str),
    /// The ComputeJob CRD is not installed in the cluster.
    #[error(
        "the ComputeJob CustomResourceDefinition (computejobs.kiln.dev) is not installed: \
         apply it with `kubectl apply -f crds/` (or install the Helm chart) and start the \
         operator again"
    )]
    CrdNotInstalled,
    /// Checking for the CRD failed for another reason (API server unreachable, forbidden).
    #[error("checking that the ComputeJob CRD is installed: {0}")]
    CheckCrd(#[source] kube::Error),
    /// The operator's configuration file could not be read.
    #[error("reading the operator configuration {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The operator's configuration file is not valid.
    #[error("invalid operator configuration {path}: {message}")]
    ParseConfig { path: PathBuf, message: String },
    /// The metrics/health endpoint could not listen.
    #[error("serving metrics on {address}: {source}")]
    ServeMetrics {
        address: String,
        source: std::io::Error,
    },
    /// Leader election on the Lease failed.
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// The lease was taken over or could not be renewed in time.
    #[error("lost the leadership Lease {namespace}/{name}")]
    LostLease { namespace: String, name: String },
}

impl Error {
    /// A short, stable category for metrics labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::GetJob { .. } | Error::ListPods { .. } | Error::GetNode { .. } => "Read",
            Error::GetSecret { .. } => "Read",
            Error::Credentials { .. } => "Credentials",
            Error::Apply { .. } => "Apply",
            Error::DeletePod { .. } | Error::DeleteJob { .. } => "Delete",
            Error::PatchStatus { .. } => "Status",
            Error::MissingMetadata(_) => "Metadata",
            Error::CrdNotInstalled | Error::CheckCrd(_) => "Crd",
            Error::ReadConfig { .. } | Error::ParseConfig { .. } => "Config",
            Error::ServeMetrics { .. } => "Metrics",
            Error::Lease { .. } | Error::LostLease { .. } => "LeaderElection",
        }
    }
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
