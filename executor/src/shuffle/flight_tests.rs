//! Block transfers between executors over a real Flight server on a local port.
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::TryStreamExt;

use super::{BlockFlightService, Location, PeerClients, ReadMode, ShuffleEnv, ShuffleReaderExec};
use crate::blocks::{BlockId, BlockStore};

/// Serves `store` on an ephemeral port and returns the address.
async fn serve(store: Arc<BlockStore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                FlightServiceServer::new(BlockFlightService::new(store))
                    .max_encoding_message_size(usize::MAX),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    address
}

/// A reduce partition reading several large blocks from one peer, one after another, must
/// not stall: the blocks it has opened but not yet read may not starve the one it reads of
/// the connection's HTTP/2 flow-control window (5 MiB) when each is larger than a stream's
/// window (2 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blocks_from_one_peer_read_one_after_another_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(BlockStore::new(u64::MAX, dir.path().join("remote")));
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let maps = 6u32;
    let rows_per_block = 1_000_000i64; // 8 MB of values per block
    for m in 0..maps {
        let id = BlockId::new(7, m, 0);
        remote.create(id, schema.clone());
        let values: Int64Array = (0..rows_per_block).map(|v| v + i64::from(m)).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap();
        remote.append(id, vec![batch]).await.unwrap();
    }
    let address = serve(remote).await;

    let env = ShuffleEnv {
        executor_id: "reader".into(),
        store: Arc::new(BlockStore::new(u64::MAX, dir.path().join("local"))),
        peers: PeerClients::default(),
    };
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_extension(Arc::new(env)));
    let location = Location {
        executor: "peer".into(),
        address,
    };
    let reader = ShuffleReaderExec::new(7, schema, ReadMode::Hash, 1, None)
        .resolved(vec![location; maps as usize]);
    let stream = reader.execute(0, ctx.task_ctx()).unwrap();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        // Consume slowly, as a busy operator would: the later blocks arrive meanwhile.
        stream
            .try_fold(0usize, |rows, batch| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(rows + batch.num_rows())
            })
            .await
    })
    .await
    .expect("the reader stalled: a block never finished arriving")
    .unwrap();
    assert_eq!(read, maps as usize * rows_per_block as usize);
}
