//! Kiln's engine.
#![forbid(unsafe_code)]
