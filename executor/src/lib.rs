//! Kiln's engine: the job spec becomes DataFusion plans split into stages at shuffles; a
//! driver schedules their tasks on executors, which keep shuffle and cached blocks in memory
//! and serve them to each other over Arrow Flight.
#![forbid(unsafe_code)]

pub mod blocks;
pub mod driver;
pub mod egress;
mod error;
pub mod guard;
#[cfg(test)]
mod guard_tests;
pub mod local;
pub mod plan;
pub mod session;
pub mod shuffle;
mod summary;
pub mod worker;

/// The control protocol between driver, executors and operator (defined in `kiln-api`).
pub use kiln_api::rpc;

pub use error::{Error, Result, find_kiln_error, find_refusal};
pub use summary::*;
