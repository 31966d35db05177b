//! Kiln's engine: the job spec becomes DataFusion plans split into stages at shuffles; a
//! driver schedules their tasks on executors, which keep shuffle and cached blocks in memory
//! and serve them to each other over Arrow Flight.
#![forbid(unsafe_code)]

pub mod blocks;
pub mod driver;
mod error;
pub mod local;
pub mod plan;
pub mod session;
pub mod shuffle;
mod summary;
pub mod worker;

/// The control protocol, generated from `proto/kiln.proto`.
#[allow(missing_docs, clippy::all)]
pub mod rpc {
    tonic::include_proto!("kiln.v1");
}

pub use error::{Error, Result, find_kiln_error};
pub use summary::*;
