use std::path::PathBuf;

/// Errors of the `api` crate: reading and checking a job spec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job file could not be read.
    #[error("cannot read job file {path}: {source}")]
    ReadJobFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The document is not valid YAML/JSON or does not match the spec's shape; `field` is the
    /// path of the offending field (`steps[1].cache`).
    #[error("invalid job spec at `{field}`: {message}")]
    ParseJob { field: String, message: String },
    /// A manifest whose `kind` is not ComputeJob.
    #[error("manifest kind is `{kind}`, expected `ComputeJob` (or a bare job spec)")]
    WrongKind { kind: String },
    /// The spec parsed but breaks one or more rules; each names its field.
    #[error("invalid job spec:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<crate::FieldError>),
    /// A resource quantity (`4Gi`, `500m`) that does not parse.
    #[error("invalid quantity `{value}`: {reason}")]
    Quantity { value: String, reason: &'static str },
    /// A job's TLS credentials could not be made or read.
    #[error("cannot {what}: {message}")]
    Tls { what: &'static str, message: String },
}

impl Error {
    /// Why a job with this error fails: a bad job file or spec, or (credentials) Kiln's own
    /// fault.
    pub fn reason(&self) -> crate::FailureReason {
        match self {
            Error::ReadJobFile { .. }
            | Error::ParseJob { .. }
            | Error::WrongKind { .. }
            | Error::Invalid(_)
            | Error::Quantity { .. } => crate::FailureReason::InvalidSpec,
            Error::Tls { .. } => crate::FailureReason::Internal,
        }
    }
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
