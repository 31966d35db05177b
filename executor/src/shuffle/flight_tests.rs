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

/// The session of executor `reader` with block store `store`, and the location of the
/// blocks its peer serves at `address`.
fn reader_session(store: Arc<BlockStore>, address: String) -> (SessionContext, Location) {
    let env = ShuffleEnv {
        executor_id: "reader".into(),
        store,
        peers: PeerClients::default(),
        replicas: Default::default(),
    };
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_extension(Arc::new(env)));
    let location = Location {
        executor: "peer".into(),
        address,
    };
    (ctx, location)
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

    let local = Arc::new(BlockStore::new(u64::MAX, dir.path().join("local")));
    let (ctx, location) = reader_session(local, address);
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

/// Tasks of one executor that read a broadcast build side whole fetch each remote block
/// once: the first fetch keeps a replica that the others (even those asking at the same
/// time) read locally, and dropping the stage drops the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_block_crosses_the_network_once_per_executor() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(BlockStore::new(u64::MAX, dir.path().join("remote")));
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let maps = 3u32;
    for m in 0..maps {
        let id = BlockId::new(4, m, 0);
        remote.create(id, schema.clone());
        let values: Int64Array = (0..1_000i64).map(|v| v * i64::from(m + 1)).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap();
        remote.append(id, vec![batch]).await.unwrap();
    }
    let address = serve(remote).await;
    let local = Arc::new(BlockStore::new(u64::MAX, dir.path().join("local")));
    let (ctx, location) = reader_session(local.clone(), address);
    let reader = Arc::new(
        ShuffleReaderExec::new(4, schema, ReadMode::Broadcast, maps as usize, None)
            .resolved(vec![location; maps as usize]),
    );
    // Four tasks, each reading every partition, two of them at the same time.
    let read_all = || {
        let (reader, task) = (reader.clone(), ctx.task_ctx());
        async move {
            let mut sum = 0i64;
            for p in 0..maps as usize {
                let batches: Vec<RecordBatch> = reader
                    .execute(p, task.clone())
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                for b in batches {
                    let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    sum += v.iter().flatten().sum::<i64>();
                }
            }
            sum
        }
    };
    let (a, b) = tokio::join!(read_all(), read_all());
    let (c, d) = (read_all().await, read_all().await);
    let want: i64 = (1..=i64::from(maps)).map(|k| k * 999 * 1000 / 2).sum();
    assert_eq!([a, b, c, d], [want; 4]);
    let metrics = reader.metrics().unwrap();
    let remote_bytes = metrics
        .sum_by_name("remote_bytes_fetched")
        .unwrap()
        .as_usize();
    let local_bytes = metrics
        .sum_by_name("local_bytes_fetched")
        .unwrap()
        .as_usize();
    assert!(remote_bytes > 0);
    assert!(
        local_bytes >= 3 * remote_bytes / 2,
        "three of four reads of each block should be local: {remote_bytes} remote, {local_bytes} local"
    );
    for m in 0..maps {
        assert!(local.contains(BlockId::new(4, m, 0).replica()));
    }
    local.drop_stages(&[4]);
    assert!(!local.contains(BlockId::new(4, 0, 0).replica()));
}
