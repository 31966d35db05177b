//! Copies of a decommissioned executor's outputs: the driver names an output (every block
//! one task wrote) and where it lives; this executor fetches the blocks over Flight, keeps
//! them in its own store as if its own task had written them (so a replacement driver
//! adopts them too), and reports the copy until the driver acknowledges it.
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, MutableArrayData, RecordBatch, make_array};
use datafusion::physical_plan::metrics::Count;

use super::{CALL_DEADLINE, Session, jittered, with_deadline};
use crate::Result;
use crate::blocks::{BlockId, BlockStore};
use crate::rpc;

/// Copies one output and reports how it went.
pub(super) async fn copy_output(env: &Session, store: &BlockStore, m: rpc::BlockMigration) {
    let started = Instant::now();
    let outcome = copy_blocks(env, store, &m).await;
    let (ok, message, bytes) = match outcome {
        Ok(bytes) => (true, String::new(), bytes),
        Err(e) => (false, e.to_string(), 0),
    };
    if ok {
        env.holdings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(m.stage_id, m.fingerprint, m.partition);
        tracing::info!(stage = m.stage_id, partition = m.partition, from = %m.source_executor, bytes, ms = started.elapsed().as_millis() as u64, "output copied");
    } else {
        tracing::warn!(stage = m.stage_id, partition = m.partition, from = %m.source_executor, error = %message, "output copy failed");
    }
    let report = rpc::MigrationReport {
        executor_id: env.executor_id.clone(),
        stage_id: m.stage_id,
        partition: m.partition,
        source_executor: m.source_executor,
        ok,
        message,
        bytes,
        token: env.token.clone(),
    };
    let mut pause = Duration::from_millis(100);
    loop {
        let sent = env
            .client
            .clone()
            .report_migration(with_deadline(report.clone(), CALL_DEADLINE))
            .await;
        match sent {
            Ok(_) => return,
            Err(status) if started.elapsed() > env.patience => {
                tracing::error!(error = %status, "copy report never acknowledged; the driver is gone");
                return;
            }
            Err(_) => {
                tokio::time::sleep(jittered(pause)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Fetches every block of the output and stores it here; returns the bytes received.
async fn copy_blocks(env: &Session, store: &BlockStore, m: &rpc::BlockMigration) -> Result<u64> {
    let received = Count::new();
    for reduce in 0..m.reduce_partitions.max(1) {
        let id = BlockId::new(m.stage_id, m.partition, reduce);
        let (schema, batches) = env
            .peers
            .fetch_block(&m.source_address, id, received.clone())
            .await?;
        store.create(id, schema);
        if !batches.is_empty() {
            let batches = batches.iter().map(owned).collect::<Result<Vec<_>>>()?;
            store.append(id, batches).await?;
        }
    }
    Ok(received.value() as u64)
}

/// A copy of `batch` in buffers of its own. Batches decoded from Flight share the buffers
/// the messages arrived in, which hold other messages too: kept as they are, each would
/// count (and hold) all of that memory in the store, and be served with it.
fn owned(batch: &RecordBatch) -> Result<RecordBatch> {
    let copy = |array: &ArrayRef| -> Result<ArrayRef> {
        let data = array.to_data();
        let mut copy = MutableArrayData::new(vec![&data], false, array.len());
        copy.try_extend(0, 0, array.len())?;
        Ok(make_array(copy.freeze()))
    };
    let columns = batch.columns().iter().map(copy).collect::<Result<_>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}
