//! The map side of a shuffle: runs one partition of its input and stores the rows in the
//! executor's block store, hash-partitioned into reduce blocks or as one pass-through block.
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::StreamExt;

use super::{ShuffleEnv, write_stats, write_stats_schema};
use crate::blocks::BlockId;

/// Rows buffered for one reduce partition before they are appended to its block.
const FLUSH_ROWS: usize = 16 * 1024;

/// Root of a map stage: stores its input's rows as blocks `(stage, partition, reduce)`.
#[derive(Debug)]
pub struct ShuffleWriterExec {
    input: Arc<dyn ExecutionPlan>,
    stage: u32,
    partitioning: Option<Partitioning>,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ShuffleWriterExec {
    /// A writer for `stage`; `partitioning` None writes each task's rows as one block.
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        stage: u32,
        partitioning: Option<Partitioning>,
    ) -> Self {
        let props = PlanProperties::new(
            EquivalenceProperties::new(write_stats_schema()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            input,
            stage,
            partitioning,
            props: Arc::new(props),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The stage this writer is the root of.
    pub fn stage(&self) -> u32 {
        self.stage
    }

    /// The hash (or round-robin) partitioning, None for pass-through.
    pub fn partitioning(&self) -> Option<&Partitioning> {
        self.partitioning.as_ref()
    }

    /// Blocks each task writes.
    pub fn reduce_partitions(&self) -> usize {
        self.partitioning
            .as_ref()
            .map_or(1, |p| p.partition_count())
    }

    /// The plan whose rows are written.
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }
}

impl DisplayAs for ShuffleWriterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match &self.partitioning {
            Some(p) => write!(
                f,
                "ShuffleWriterExec: stage={}, partitioning={p}",
                self.stage
            ),
            None => write!(f, "ShuffleWriterExec: stage={}, pass-through", self.stage),
        }
    }
}

impl ExecutionPlan for ShuffleWriterExec {
    fn name(&self) -> &'static str {
        "ShuffleWriterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        if let Some(Partitioning::Hash(exprs, _)) = &self.partitioning {
            for e in exprs {
                if f(e)? == TreeNodeRecursion::Stop {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            children.remove(0),
            self.stage,
            self.partitioning.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let env = ShuffleEnv::from_task(&context)?;
        let input = self.input.execute(partition, context)?;
        let partitioner = self
            .partitioning
            .clone()
            .map(|p| {
                BatchPartitioner::try_new(
                    p,
                    MetricBuilder::new(&self.metrics).subset_time("repart_time", partition),
                    partition,
                    self.input.output_partitioning().partition_count(),
                )
            })
            .transpose()?;
        let write = MapWrite {
            env,
            stage: self.stage,
            map: partition as u32,
            reduce_partitions: self.reduce_partitions(),
            schema: self.input.schema(),
            bytes_written: MetricBuilder::new(&self.metrics)
                .counter("shuffle_bytes_written", partition),
        };
        let fut = write.run(input, partitioner);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            write_stats_schema(),
            futures::stream::once(fut),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

struct MapWrite {
    env: Arc<ShuffleEnv>,
    stage: u32,
    map: u32,
    reduce_partitions: usize,
    schema: SchemaRef,
    bytes_written: Count,
}

impl MapWrite {
    fn id(&self, reduce: usize) -> BlockId {
        BlockId::new(self.stage, self.map, reduce as u32)
    }

    async fn run(
        self,
        mut input: SendableRecordBatchStream,
        mut partitioner: Option<BatchPartitioner>,
    ) -> DfResult<RecordBatch> {
        let n = self.reduce_partitions;
        for r in 0..n {
            self.env.store.create(self.id(r), self.schema.clone());
        }
        let mut buffers: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
        let mut totals = vec![(0u64, 0u64); n];
        while let Some(batch) = input.next().await {
            let batch = batch?;
            match partitioner.as_mut() {
                Some(p) => p.partition(batch, |r, b| {
                    buffers[r].push(b);
                    Ok(())
                })?,
                None => buffers[0].push(batch),
            }
            for r in 0..n {
                if buffers[r].iter().map(|b| b.num_rows()).sum::<usize>() >= FLUSH_ROWS {
                    self.flush(r, &mut buffers[r], &mut totals[r]).await?;
                }
            }
        }
        for r in 0..n {
            self.flush(r, &mut buffers[r], &mut totals[r]).await?;
        }
        write_stats(
            totals
                .iter()
                .enumerate()
                .map(|(r, (rows, bytes))| (r as u32, *rows, *bytes))
                .collect(),
        )
    }

    async fn flush(
        &self,
        r: usize,
        buffer: &mut Vec<RecordBatch>,
        total: &mut (u64, u64),
    ) -> DfResult<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let batches = std::mem::take(buffer);
        let merged = compact(concat_batches(&self.schema, &batches)?)?;
        let meta = self
            .env
            .store
            .append(self.id(r), vec![merged])
            .await
            .map_err(|e| e.into_datafusion())?;
        total.0 += meta.rows;
        total.1 += meta.bytes;
        self.bytes_written.add(meta.bytes as usize);
        Ok(())
    }
}

/// Copies view arrays (`Utf8View`, `BinaryView`) down to the bytes their rows use. A
/// partitioned batch's views still point into its whole input batch's buffers; kept as they
/// are, every block would hold (and Flight would send) all of them.
fn compact(batch: RecordBatch) -> DfResult<RecordBatch> {
    use arrow::array::{ArrayRef, AsArray};
    use arrow::datatypes::DataType;
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            match c.data_type() {
                DataType::Utf8View => Arc::new(c.as_string_view().gc()),
                DataType::BinaryView => Arc::new(c.as_binary_view().gc()),
                _ => c.clone(),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}
