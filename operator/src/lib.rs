//! Kiln's operator: reconciles ComputeJobs into a driver pod on on-demand nodes and executor
//! pods (by default on spot nodes), replaces lost executors, tells the driver about them and
//! keeps the job's status.
//!
//! - [`state`]: the pure core, job + pods + driver progress → a [`state::Plan`]
//! - [`pods`], [`children`]: pure builders of the children
//! - [`reconcile`]: the I/O around the core (server-side apply, status, events, metrics)
//! - [`run`]: the process: leader election ([`leader`]), health and metrics ([`server`])
//! - [`rbac`]: the API access all of that needs
#![forbid(unsafe_code)]
// `Error` carries the `kube::Error` it wraps; errors are the rare path, boxing every source
// would only obscure the variants.
#![allow(clippy::result_large_err)]

pub mod admission;
pub mod children;
pub mod config;
pub mod driver;
mod error;
pub mod leader;
pub mod metrics;
pub mod netpol;
pub mod pods;
pub mod podstate;
pub mod rbac;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod run;
pub mod server;
pub mod state;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod testing;

pub use config::OperatorConfig;
pub use error::{Error, Result};
pub use run::{Settings, run, shutdown_signal};
