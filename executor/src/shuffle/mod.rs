//! The shuffle: map tasks hash-partition their output into the executor's block store
//! ([`ShuffleWriterExec`]); consumers fetch the blocks of every map output, locally or over
//! Arrow Flight ([`ShuffleReaderExec`]).
mod flight;
#[cfg(test)]
mod flight_tests;
mod reader;
mod writer;

use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;

pub use flight::{
    ATTACH_ACTION, AttachHandler, AttachRequest, BlockFlightService, PeerClients, send_attach,
};
pub use reader::{Location, ReadMode, ShuffleReaderExec};
pub use writer::ShuffleWriterExec;

use crate::blocks::{BlockId, BlockStore};

/// What Kiln's execution nodes need from the executor they run in; carried as an extension
/// of the session config.
pub struct ShuffleEnv {
    /// This executor's id.
    pub executor_id: String,
    /// Its block store.
    pub store: Arc<BlockStore>,
    /// Flight clients to other executors.
    pub peers: PeerClients,
    /// One lock per replica being fetched for broadcast reads, so that it is fetched once.
    pub replicas: ReplicaGates,
}

/// Locks of the replicas of broadcast blocks, by replica id.
#[derive(Debug, Default)]
pub struct ReplicaGates(
    std::sync::Mutex<std::collections::HashMap<BlockId, Arc<tokio::sync::Mutex<()>>>>,
);

impl ShuffleEnv {
    /// The lock a task holds while it looks for or fetches `replica`.
    pub fn replica_gate(&self, replica: BlockId) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.replicas.0.lock().unwrap();
        gates.entry(replica).or_default().clone()
    }

    /// The env of the session a task runs in.
    pub fn from_task(ctx: &TaskContext) -> DfResult<Arc<ShuffleEnv>> {
        ctx.session_config()
            .get_extension::<ShuffleEnv>()
            .ok_or_else(|| {
                DataFusionError::Internal("Kiln nodes run only inside an executor session".into())
            })
    }
}

/// Schema of the one batch writer and sink nodes return: one row per block or file written.
pub fn write_stats_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
    ]))
}

/// Builds a write-stats batch.
pub fn write_stats(rows: Vec<(u32, u64, u64)>) -> DfResult<RecordBatch> {
    let p: UInt32Array = rows.iter().map(|r| r.0).collect();
    let n: UInt64Array = rows.iter().map(|r| r.1).collect();
    let b: UInt64Array = rows.iter().map(|r| r.2).collect();
    Ok(RecordBatch::try_new(
        write_stats_schema(),
        vec![Arc::new(p), Arc::new(n), Arc::new(b)],
    )?)
}

/// Reads back `(partition, rows, bytes)` from write-stats batches.
pub fn read_write_stats(batches: &[RecordBatch]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    for b in batches {
        let (Some(p), Some(n), Some(s)) = (
            b.column(0).as_any().downcast_ref::<UInt32Array>(),
            b.column(1).as_any().downcast_ref::<UInt64Array>(),
            b.column(2).as_any().downcast_ref::<UInt64Array>(),
        ) else {
            continue;
        };
        for i in 0..b.num_rows() {
            out.push((p.value(i), n.value(i), s.value(i)));
        }
    }
    out.sort_unstable();
    out
}
