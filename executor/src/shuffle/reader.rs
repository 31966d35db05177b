//! The reduce side of a shuffle, and the scan of cached datasets: fetches the blocks a
//! partition needs from the executors holding them (its own store without a network hop).
use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesOrdered};
use futures::{FutureExt, StreamExt};

use super::ShuffleEnv;
use crate::Error;
use crate::blocks::BlockId;

/// Blocks fetched at once by one reader partition while its memory pool has room.
const FETCH_CONCURRENCY: usize = 4;

/// Which blocks a reader partition reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Partition `r` reads block `(stage, m, r)` of every map task `m`.
    Hash,
    /// Partition `p` reads block `(stage, p, 0)`: the whole output of map task `p`.
    PassThrough,
    /// As `PassThrough`, read whole by every task of the stage (the build side of a
    /// broadcast join): an executor fetches each remote block once, keeps it as a replica in
    /// its block store, and serves its other tasks from there.
    Broadcast,
}

/// Where one map task's output lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The executor holding it.
    pub executor: String,
    /// Its Flight address (`host:port`).
    pub address: String,
}

/// Reads the output of an upstream stage. Planned with no locations; the driver fills them in
/// (one per map partition) before it ships the consuming stage.
#[derive(Debug)]
pub struct ShuffleReaderExec {
    stage: u32,
    schema: SchemaRef,
    mode: ReadMode,
    partitions: usize,
    locations: Option<Vec<Location>>,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ShuffleReaderExec {
    /// A reader of `stage` with `partitions` output partitions.
    pub fn new(
        stage: u32,
        schema: SchemaRef,
        mode: ReadMode,
        partitions: usize,
        locations: Option<Vec<Location>>,
    ) -> Self {
        let props = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            stage,
            schema,
            mode,
            partitions,
            locations,
            props: Arc::new(props),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The stage it reads.
    pub fn stage(&self) -> u32 {
        self.stage
    }

    /// How it reads.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// Its output partitions.
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    /// Map-output locations (one per map partition), None until resolved.
    pub fn locations(&self) -> Option<&[Location]> {
        self.locations.as_deref()
    }

    /// A copy with the given map-output locations.
    pub fn resolved(&self, locations: Vec<Location>) -> Self {
        Self::new(
            self.stage,
            self.schema.clone(),
            self.mode,
            self.partitions,
            Some(locations),
        )
    }
}

impl DisplayAs for ShuffleReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "ShuffleReaderExec: stage={}, mode={:?}, partitions={}",
            self.stage, self.mode, self.partitions
        )
    }
}

impl ExecutionPlan for ShuffleReaderExec {
    fn name(&self) -> &'static str {
        "ShuffleReaderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let Some(locations) = &self.locations else {
            return Err(DataFusionError::Internal(format!(
                "reader of stage {} was shipped before its inputs were resolved",
                self.stage
            )));
        };
        let env = ShuffleEnv::from_task(&context)?;
        let blocks: Vec<(BlockId, Location)> = match self.mode {
            ReadMode::Hash => locations
                .iter()
                .enumerate()
                .map(|(m, l)| {
                    (
                        BlockId::new(self.stage, m as u32, partition as u32),
                        l.clone(),
                    )
                })
                .collect(),
            ReadMode::PassThrough | ReadMode::Broadcast => vec![(
                BlockId::new(self.stage, partition as u32, 0),
                locations.get(partition).cloned().ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "stage {} has no partition {partition}",
                        self.stage
                    ))
                })?,
            )],
        };
        let counters = FetchCounters {
            remote: MetricBuilder::new(&self.metrics).counter("remote_bytes_fetched", partition),
            local: MetricBuilder::new(&self.metrics).counter("local_bytes_fetched", partition),
        };
        let fetching = Fetching {
            env,
            counters,
            broadcast: self.mode == ReadMode::Broadcast,
            pending: blocks.into(),
            in_flight: FuturesOrdered::new(),
            limit: FETCH_CONCURRENCY,
            held: MemoryConsumer::new(format!(
                "ShuffleReader[stage {}, partition {partition}]",
                self.stage
            ))
            .with_can_spill(true)
            .register(context.memory_pool()),
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            fetching.into_stream(),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

#[derive(Clone)]
struct FetchCounters {
    remote: Count,
    local: Count,
}

fn fetch_failed(id: BlockId, loc: &Location, message: String) -> DataFusionError {
    Error::FetchFailed {
        executor: loc.executor.clone(),
        stage: id.stage,
        map_partition: id.map,
        reduce_partition: id.reduce,
        message,
    }
    .into_datafusion()
}

/// A fetched block: batches shared with the block store (a local block, or a broadcast
/// replica), which counts them, or batches received from a peer, which the reader holds.
enum Fetched {
    Shared(BoxStream<'static, DfResult<RecordBatch>>),
    /// The batches, and the reservation they were counted in while the pool had room.
    Received(Vec<RecordBatch>, Arc<MemoryReservation>),
}

/// The blocks of one reader partition, fetched a few ahead of the consumer. Batches received
/// from peers are reserved in the task's memory pool from their arrival until the consumer
/// takes them, so the operators above spill sooner instead of the executor passing its
/// memory limit. The reader is one of the pool's spilling consumers, held to a fair share
/// like the task's aggregations and sorts: past it, the reader stops fetching ahead (one
/// block at a time) until it has room again.
struct Fetching {
    env: Arc<ShuffleEnv>,
    counters: FetchCounters,
    broadcast: bool,
    pending: VecDeque<(BlockId, Location)>,
    in_flight: FuturesOrdered<BoxFuture<'static, DfResult<Fetched>>>,
    /// Blocks fetched at once: `FETCH_CONCURRENCY`, or 1 while the pool refuses.
    limit: usize,
    /// The reader's consumer in the memory pool: each transfer counts in a reservation of it.
    held: MemoryReservation,
}

impl Fetching {
    fn into_stream(self) -> BoxStream<'static, DfResult<RecordBatch>> {
        futures::stream::unfold(self, |mut st| async move {
            while st.in_flight.len() < st.limit {
                let Some((id, loc)) = st.pending.pop_front() else {
                    break;
                };
                let fetch = fetch(
                    Arc::clone(&st.env),
                    id,
                    loc,
                    st.counters.clone(),
                    st.broadcast,
                    Arc::new(st.held.new_empty()),
                );
                st.in_flight.push_back(fetch.boxed());
            }
            let block = match st.in_flight.next().await? {
                Ok(Fetched::Shared(batches)) => batches,
                Ok(Fetched::Received(batches, held)) => {
                    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
                    let refused = held.size() < bytes;
                    st.limit = if refused { 1 } else { FETCH_CONCURRENCY };
                    hold(batches, held)
                }
                Err(e) => {
                    // The task fails; nothing more is fetched for it.
                    st.pending.clear();
                    st.in_flight = FuturesOrdered::new();
                    futures::stream::once(async { Err(e) }).boxed()
                }
            };
            Some((block, st))
        })
        .flatten()
        .boxed()
    }
}

/// `batches` as a stream that gives their reservation back as they are taken.
fn hold(
    batches: Vec<RecordBatch>,
    held: Arc<MemoryReservation>,
) -> BoxStream<'static, DfResult<RecordBatch>> {
    futures::stream::unfold(
        (batches.into_iter(), held),
        |(mut batches, held)| async move {
            let batch = batches.next()?;
            held.shrink(batch.get_array_memory_size().min(held.size()));
            Some((Ok(batch), (batches, held)))
        },
    )
    .boxed()
}

async fn fetch(
    env: Arc<ShuffleEnv>,
    id: BlockId,
    loc: Location,
    counters: FetchCounters,
    broadcast: bool,
    held: Arc<MemoryReservation>,
) -> DfResult<Fetched> {
    if loc.executor == env.executor_id {
        // Read a batch at a time: a spilled block comes back from disk as it is consumed.
        let (_, batches) = env
            .store
            .stream(id)
            .map_err(|e| fetch_failed(id, &loc, e.to_string()))?;
        let local = counters.local;
        let batches = batches.map(move |b| {
            let b = b.map_err(|e| fetch_failed(id, &loc, e.to_string()))?;
            local.add(b.get_array_memory_size());
            Ok(b)
        });
        return Ok(Fetched::Shared(batches.boxed()));
    }
    if broadcast {
        let batches = fetch_replica(&env, id, &loc, &counters).await?;
        return Ok(Fetched::Shared(
            futures::stream::iter(batches.into_iter().map(Ok)).boxed(),
        ));
    }
    let batches = env
        .peers
        .fetch_held(&loc.address, id, counters.remote, Arc::clone(&held))
        .await
        .map_err(|e| fetch_failed(id, &loc, e.to_string()))?;
    Ok(Fetched::Received(batches, held))
}

/// A remote block every task reads whole: from this executor's replica when an earlier task
/// fetched it, else fetched once (tasks that want it meanwhile wait for that fetch) and kept
/// as a replica in the block store, which counts, spills and drops it with its stage.
async fn fetch_replica(
    env: &ShuffleEnv,
    id: BlockId,
    loc: &Location,
    counters: &FetchCounters,
) -> DfResult<Vec<RecordBatch>> {
    let replica = id.replica();
    let failed = |e: Error| fetch_failed(id, loc, e.to_string());
    let gate = env.replica_gate(replica);
    let _only_fetch = gate.lock().await;
    if env.store.contains(replica) {
        let (_, batches) = env.store.get(replica).await.map_err(failed)?;
        counters
            .local
            .add(batches.iter().map(|b| b.get_array_memory_size()).sum());
        return Ok(batches);
    }
    let (schema, batches) = env
        .peers
        .fetch_block(&loc.address, id, counters.remote.clone())
        .await
        .map_err(failed)?;
    env.store.create(replica, schema);
    env.store
        .append(replica, batches.clone())
        .await
        .map_err(failed)?;
    Ok(batches)
}
