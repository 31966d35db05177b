//! Planning: splitting physical plans into stages, the sink node, and the codec that ships
//! stage plans to executors.
mod codec;
mod sink;
mod stages;

pub use codec::KilnCodec;
pub use sink::{STAGING_DIR, SinkExec, StagedAttempt, part_file_name};
pub use stages::{FinalOutput, Stage, StagePlanner};

#[cfg(test)]
mod tests;
