//! The `kiln run` integration tests: real executor processes started by the `kiln` binary,
//! their output checked against DataFusion or plain Rust. One test binary, so the shared
//! helpers and the DataFusion code the checks use are compiled and linked once.

mod common;

mod commit;
mod engine;
mod examples;
mod http;
mod iterative;
mod recovery;
mod refusals;
mod tpch;
