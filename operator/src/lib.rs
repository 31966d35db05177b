//! Kiln's operator: reconciles ComputeJobs into driver and executor pods.
#![forbid(unsafe_code)]
