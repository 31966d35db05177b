//! Block transfers between executors over a real Flight server on a local port.
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
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
    reader_session_with_pool(store, address, Arc::new(UnboundedMemoryPool::default()))
}

/// As [`reader_session`], with the tasks' memory pool.
fn reader_session_with_pool(
    store: Arc<BlockStore>,
    address: String,
    pool: Arc<dyn MemoryPool>,
) -> (SessionContext, Location) {
    let env = ShuffleEnv {
        executor_id: "reader".into(),
        store,
        peers: PeerClients::default(),
        replicas: Default::default(),
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let ctx = SessionContext::new_with_config_rt(
        SessionConfig::new().with_extension(Arc::new(env)),
        runtime,
    );
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

/// Batches received from a peer count in the reading task's memory pool from their arrival
/// until the consumer takes them, and are all given back once read; a pool too small for one
/// block is never passed, and slows the reader to a block at a time but loses nothing. The
/// peer's blocks are all on its disk: it serves them back a batch at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_blocks_count_in_the_memory_pool_until_read() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(BlockStore::new(0, dir.path().join("remote")));
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let maps = 6u32;
    let half = 100_000i64;
    for m in 0..maps {
        let id = BlockId::new(7, m, 0);
        remote.create(id, schema.clone());
        let halves = (0..2)
            .map(|h| {
                let values: Int64Array = (0..half).map(|v| v + h * half).collect();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap()
            })
            .collect();
        remote.append(id, halves).await.unwrap();
    }
    assert_eq!(remote.in_memory(), 0, "the peer's blocks are spilled");
    let address = serve(remote).await;

    for pool_bytes in [64 << 20, 256 << 10] {
        let pool: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(pool_bytes));
        let local = Arc::new(BlockStore::new(u64::MAX, dir.path().join("local")));
        let (ctx, location) = reader_session_with_pool(local, address.clone(), pool.clone());
        let reader = ShuffleReaderExec::new(7, schema.clone(), ReadMode::Hash, 1, None)
            .resolved(vec![location; maps as usize]);
        let mut stream = reader.execute(0, ctx.task_ctx()).unwrap();
        let (mut rows, mut sum, mut most_held) = (0usize, 0i64, 0usize);
        while let Some(batch) = stream.try_next().await.unwrap() {
            // Half of the block is still held when its first half is taken.
            most_held = most_held.max(pool.reserved());
            tokio::time::sleep(Duration::from_millis(10)).await;
            rows += batch.num_rows();
            let v = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            sum += v.values().iter().sum::<i64>();
        }
        assert_eq!(rows, maps as usize * 2 * half as usize, "pool {pool_bytes}");
        assert_eq!(sum, i64::from(maps) * (2 * half) * (2 * half - 1) / 2);
        assert!(
            most_held <= pool_bytes,
            "pool {pool_bytes}: held {most_held}"
        );
        if pool_bytes > 2 << 20 {
            assert!(
                most_held >= half as usize * 8,
                "pool {pool_bytes}: held {most_held}"
            );
        }
        drop(stream);
        assert_eq!(
            pool.reserved(),
            0,
            "pool {pool_bytes}: every reservation given back"
        );
    }
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
