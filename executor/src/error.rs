//! The engine's error type: one enum, variants named after the action that failed.
use datafusion::error::DataFusionError;
use kiln_api::FailureReason;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job spec is invalid.
    #[error(transparent)]
    Spec(#[from] kiln_api::Error),
    /// An input could not be registered (bad URI, unreadable files, schema inference).
    #[error("input `{input}` ({uri}): {source}")]
    RegisterInput {
        input: String,
        uri: String,
        source: DataFusionError,
    },
    /// A URI that Kiln cannot turn into an object store location.
    #[error("`{uri}`: {reason}")]
    InvalidUri { uri: String, reason: String },
    /// Building an object store client failed.
    #[error("object store for `{uri}`: {source}")]
    ObjectStore {
        uri: String,
        source: object_store::Error,
    },
    /// An input's server is where the location policy refuses to connect (found at connect
    /// time: a host name's addresses, a redirect).
    #[error("input `{input}` ({uri}) is refused: {reason}")]
    InputRefused {
        input: String,
        uri: String,
        reason: String,
    },
    /// Every address a job's host name resolves to is refused by the location policy.
    #[error("`{host}` resolves to {address}, which is refused: {reason}")]
    RefusedAddress {
        host: String,
        address: std::net::IpAddr,
        reason: String,
    },
    /// A server redirected a job's read or write to a location the policy refuses.
    #[error("the redirect to {to} is refused: {reason}")]
    RefusedRedirect { to: String, reason: String },
    /// A step's SQL does not parse or plan.
    #[error("step `{step}`: {source}")]
    PlanStep {
        step: String,
        source: DataFusionError,
    },
    /// A shuffle or cached block could not be fetched from the executor holding it.
    #[error(
        "fetch of block {stage}/{map_partition}/{reduce_partition} from executor {executor} failed: {message}"
    )]
    FetchFailed {
        executor: String,
        stage: u32,
        map_partition: u32,
        reduce_partition: u32,
        message: String,
    },
    /// The block store has no such block.
    #[error("block {0} is not in this executor's block store")]
    BlockNotFound(crate::blocks::BlockId),
    /// Reading or writing a spilled block failed.
    #[error("{action} spill file {path}: {source}")]
    SpillIo {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A spill would pass the executor's disk budget (its share of `executors.disk`).
    #[error(
        "spilling {bytes} bytes would pass this executor's disk budget of {budget} bytes ({on_disk} already on disk): raise executors.disk or executors.memory"
    )]
    DiskBudget {
        budget: u64,
        on_disk: u64,
        bytes: u64,
    },
    /// Arrow encoding or decoding failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A block transfer over Arrow Flight failed.
    #[error("flight: {0}")]
    Flight(#[from] arrow_flight::error::FlightError),
    /// Work was cancelled before it finished (the runtime shutting down).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A plan could not be encoded for, or decoded on, an executor.
    #[error("{action} plan of stage {stage}: {source}")]
    CodecPlan {
        action: &'static str,
        stage: u32,
        source: DataFusionError,
    },
    /// DataFusion failed while executing a plan.
    #[error(transparent)]
    Execute(#[from] DataFusionError),
    /// A gRPC call failed.
    #[error("{call}: {source}")]
    Rpc {
        call: &'static str,
        source: Box<tonic::Status>,
    },
    /// Could not connect to a peer.
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    /// Could not listen on an address.
    #[error("listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    /// Serving a gRPC endpoint failed.
    #[error("serve {what}: {source}")]
    Serve {
        what: &'static str,
        source: tonic::transport::Error,
    },
    /// Starting or supervising a local executor process failed.
    #[error("executor process {executor}: {source}")]
    ExecutorProcess {
        executor: String,
        source: std::io::Error,
    },
    /// An iterative step's `until` did not give one boolean.
    #[error("step `{step}`: until: {reason}")]
    Until { step: String, reason: String },
    /// A `--chaos` event could not be read.
    #[error("--chaos `{spec}`: {reason}")]
    Chaos { spec: String, reason: String },
    /// The output location already holds files and the mode forbids overwriting.
    #[error("output.uri `{uri}` already holds files and output.mode is ErrorIfExists")]
    OutputExists { uri: String },
    /// Writing the job's output failed.
    #[error("writing output to `{uri}`: {source}")]
    WriteOutput {
        uri: String,
        source: object_store::Error,
    },
    /// A driver found, at its job commit, that a replacement of a later epoch prepared the
    /// same output: it was taken over and must not commit.
    #[error(
        "driver epoch {epoch} was replaced by epoch {newer}: its commit into `{uri}` is refused"
    )]
    Fenced { uri: String, epoch: u64, newer: u64 },
    /// A job without `output` returned more than `maxResultBytes`.
    #[error(
        "the result of step `{step}` is larger than maxResultBytes ({limit} bytes): write it to an `output` instead"
    )]
    ResultTooLarge { step: String, limit: u64 },
    /// The job failed; the reason says why (a task's error, a spent budget).
    #[error("job failed: {failure}")]
    JobFailed {
        /// Why.
        failure: crate::driver::scheduler::JobFailure,
    },
    /// The driver could not be reached or refused this executor.
    #[error("driver: {0}")]
    Driver(String),
    /// Reading or writing a local file.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Why a job that ends with this error failed, as the driver reports it and the
    /// ComputeJob's status, Events and metrics name it.
    pub fn reason(&self) -> FailureReason {
        match self {
            Error::Spec(e) => e.reason(),
            Error::RegisterInput { .. }
            | Error::InvalidUri { .. }
            | Error::ObjectStore { .. }
            | Error::InputRefused { .. }
            | Error::RefusedAddress { .. }
            | Error::RefusedRedirect { .. } => FailureReason::InvalidInput,
            Error::PlanStep { .. } | Error::Until { .. } => FailureReason::InvalidSql,
            Error::OutputExists { .. } => FailureReason::OutputExists,
            Error::WriteOutput { .. } => FailureReason::OutputWriteFailed,
            Error::Fenced { .. } => FailureReason::DriverLost,
            Error::ResultTooLarge { .. } => FailureReason::ResultTooLarge,
            Error::JobFailed { failure } => failure.reason(),
            Error::FetchFailed { .. }
            | Error::BlockNotFound(_)
            | Error::SpillIo { .. }
            | Error::DiskBudget { .. }
            | Error::Arrow(_)
            | Error::Flight(_)
            | Error::Cancelled(_)
            | Error::CodecPlan { .. }
            | Error::Execute(_)
            | Error::Rpc { .. }
            | Error::Connect { .. }
            | Error::Bind { .. }
            | Error::Serve { .. }
            | Error::ExecutorProcess { .. }
            | Error::Chaos { .. }
            | Error::Driver(_)
            | Error::Io { .. } => FailureReason::Internal,
        }
    }

    /// Wraps this error for returning through DataFusion's streams, so it can be found again
    /// by [`find_kiln_error`].
    pub fn into_datafusion(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }

    pub(crate) fn rpc(call: &'static str, status: tonic::Status) -> Self {
        Error::Rpc {
            call,
            source: Box::new(status),
        }
    }
}

/// Finds a Kiln error inside DataFusion's wrapping (External, Context, Shared, Arrow's
/// ExternalError), by downcasting along the error's source chain, never by its text.
pub fn find_kiln_error(e: &DataFusionError) -> Option<&Error> {
    match e {
        DataFusionError::External(inner) => inner
            .downcast_ref::<Error>()
            .or_else(|| find_in_dyn(inner.as_ref())),
        DataFusionError::Context(_, inner) => find_kiln_error(inner),
        DataFusionError::Shared(inner) => find_kiln_error(inner),
        DataFusionError::ArrowError(inner, _) => find_in_dyn(inner.as_ref()),
        other => std::error::Error::source(other).and_then(find_in_dyn),
    }
}

fn find_in_dyn<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    loop {
        if let Some(k) = e.downcast_ref::<Error>() {
            return Some(k);
        }
        if let Some(d) = e.downcast_ref::<DataFusionError>() {
            return find_kiln_error(d);
        }
        e = e.source()?;
    }
}

/// The connect-time refusal (a refused address or redirect) beneath `e`, if that is why it
/// failed.
pub fn find_refusal(e: &DataFusionError) -> Option<&Error> {
    find_kiln_error(e).filter(|k| {
        matches!(
            k,
            Error::RefusedAddress { .. } | Error::RefusedRedirect { .. }
        )
    })
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fetch_failed_survives_datafusion_wrapping() {
        let fetch = Error::FetchFailed {
            executor: "exec-2".into(),
            stage: 3,
            map_partition: 7,
            reduce_partition: 1,
            message: "connection refused".into(),
        };
        let wrapped = DataFusionError::Context(
            "while running HashJoinExec".into(),
            Box::new(DataFusionError::Shared(Arc::new(fetch.into_datafusion()))),
        );
        match find_kiln_error(&wrapped) {
            Some(Error::FetchFailed {
                executor,
                stage,
                map_partition,
                ..
            }) => assert_eq!(
                (executor.as_str(), *stage, *map_partition),
                ("exec-2", 3, 7)
            ),
            other => panic!("not found: {other:?}"),
        }
        let arrow = DataFusionError::ArrowError(
            Box::new(arrow::error::ArrowError::ExternalError(Box::new(
                Error::BlockNotFound(crate::blocks::BlockId::new(1, 2, 3)),
            ))),
            None,
        );
        assert!(matches!(
            find_kiln_error(&arrow),
            Some(Error::BlockNotFound(_))
        ));
        assert!(find_kiln_error(&DataFusionError::Plan("x".into())).is_none());
    }

    #[test]
    fn errors_name_why_the_job_failed() {
        let spec = Error::Spec(kiln_api::Error::WrongKind { kind: "Pod".into() });
        let sql = Error::PlanStep {
            step: "counts".into(),
            source: DataFusionError::Plan("no such table".into()),
        };
        let uri = Error::InvalidUri {
            uri: "ftp://x".into(),
            reason: "unknown scheme".into(),
        };
        let exists = Error::OutputExists {
            uri: "/out/".into(),
        };
        let internal = Error::Driver("gone".into());
        for (e, reason) in [
            (spec, FailureReason::InvalidSpec),
            (sql, FailureReason::InvalidSql),
            (uri, FailureReason::InvalidInput),
            (exists, FailureReason::OutputExists),
            (internal, FailureReason::Internal),
        ] {
            assert_eq!(e.reason(), reason, "{e}");
        }
    }
}
