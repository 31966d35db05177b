//! Kiln's shared types: the job spec that a ComputeJob carries and the engine runs, resource
//! quantities, validation and the loader that accepts a bare spec or a whole manifest, and the
//! contracts between processes: why a job failed ([`FailureReason`]), what a driver reports
//! ([`DriverReport`]) and how the driver and executor processes are started ([`launch`]).
#![forbid(unsafe_code)]

pub mod crd;
mod error;
mod failure;
pub mod launch;
mod load;
mod loss;
pub mod policy;
mod quantity;
mod report;
mod spec;
pub mod tls;
mod validate;

#[cfg(test)]
mod malformed_tests;

/// The control protocol between the driver, its executors and the operator, generated from
/// `proto/kiln.proto`.
#[allow(missing_docs, clippy::all)]
pub mod rpc {
    tonic::include_proto!("kiln.v1");
}

pub use crd::{ComputeJob, ComputeJobStatus, JobPhase};
pub use error::{Error, Result};
pub use failure::FailureReason;
pub use load::{load_job, parse_job};
pub use loss::LossReason;
pub use policy::LocationPolicy;
pub use quantity::{MAX_QUANTITY, parse_cpu, parse_memory};
pub use report::{DriverReport, TERMINATION_MESSAGE_LIMIT};
pub use spec::*;
pub use validate::{
    FieldError, MAX_ATTEMPTS, MAX_EXECUTOR_LOSSES, MAX_JOB_NAME_LENGTH, MAX_POD_CPU,
    MAX_POD_MEMORY, MAX_SLOTS, RESERVED_ENV_PREFIX, RESERVED_MOUNT_PATHS, validate, validate_name,
};

/// The API group of Kiln's custom resources.
pub const GROUP: &str = "kiln.dev";
/// The API version of the ComputeJob resource.
pub const VERSION: &str = "v1alpha1";
/// The kind of Kiln's job resource.
pub const KIND: &str = "ComputeJob";
/// The most executors one job may ask for.
pub const MAX_EXECUTORS: u32 = 512;
