//! The root of a job's last stage when it has an output: writes one partition of its input
//! as `part-NNNNN.<ext>`, under the task attempt's own staging directory inside the output
//! location. Only the driver's job commit moves a file into the output (see the driver's
//! `output` module), so a retried, duplicate or zombie attempt never reaches it.
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::StreamExt;
use kiln_api::OutputFormat;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tokio::io::AsyncWriteExt;

use crate::shuffle::{write_stats, write_stats_schema};

/// The directory under an output location where attempts stage their files; readers skip
/// paths that start with `_`.
pub const STAGING_DIR: &str = "_temporary";

/// One task attempt of an output stage, whose files go to its own staging directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedAttempt {
    /// The driver run that handed out the attempt.
    pub run_id: String,
    /// The output stage.
    pub stage: u32,
    /// The attempt number.
    pub attempt: u32,
}

impl StagedAttempt {
    /// `<output>/_temporary/<run>/s<stage>-p<partition>-a<attempt>`.
    pub fn dir(&self, output: &Path, partition: u32) -> Path {
        output
            .clone()
            .join(STAGING_DIR)
            .join(self.run_id.as_str())
            .join(format!("s{}-p{partition}-a{}", self.stage, self.attempt))
    }
}

/// Writes each input partition to one file under `uri`: under the attempt's staging
/// directory when it has one (always, on executors), else straight into `uri`.
#[derive(Debug)]
pub struct SinkExec {
    input: Arc<dyn ExecutionPlan>,
    uri: String,
    format: OutputFormat,
    staging: Option<StagedAttempt>,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// The file a partition is written to, relative to the output location.
pub fn part_file_name(partition: usize, format: OutputFormat) -> String {
    format!("part-{partition:05}.{}", format.extension())
}

impl SinkExec {
    /// A sink of `input` into the directory `uri`.
    pub fn new(input: Arc<dyn ExecutionPlan>, uri: String, format: OutputFormat) -> Self {
        let props = PlanProperties::new(
            EquivalenceProperties::new(write_stats_schema()),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            input,
            uri,
            format,
            staging: None,
            props: Arc::new(props),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The same sink, writing into the staging directory of `attempt`.
    pub fn staged(&self, attempt: StagedAttempt) -> Self {
        let mut sink = Self::new(self.input.clone(), self.uri.clone(), self.format);
        sink.staging = Some(attempt);
        sink
    }

    /// The output location.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The file format.
    pub fn format(&self) -> OutputFormat {
        self.format
    }
}

impl DisplayAs for SinkExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "SinkExec: uri={}, format={:?}", self.uri, self.format)
    }
}

impl ExecutionPlan for SinkExec {
    fn name(&self) -> &'static str {
        "SinkExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut sink = Self::new(children.remove(0), self.uri.clone(), self.format);
        sink.staging = self.staging.clone();
        Ok(Arc::new(sink))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let url = ListingTableUrl::parse(&self.uri)?;
        let store = context.runtime_env().object_store(url.object_store())?;
        let dir = match &self.staging {
            Some(attempt) => attempt.dir(url.prefix(), partition as u32),
            None => url.prefix().clone(),
        };
        let path = dir.join(part_file_name(partition, self.format));
        let pool = Arc::clone(context.memory_pool());
        let input = self.input.execute(partition, context)?;
        let written = MetricBuilder::new(&self.metrics).counter("output_bytes", partition);
        let format = self.format;
        let schema = self.input.schema();
        let fut = async move {
            let (rows, bytes) =
                write_partition(input, schema, format, store, path, partition, &pool).await?;
            written.add(bytes as usize);
            write_stats(vec![(partition as u32, rows, bytes)])
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            write_stats_schema(),
            futures::stream::once(fut),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// A row group is written early, when the memory pool has no room for it, only once it holds
/// this much: smaller row groups would make the output slow to read.
const MIN_EARLY_ROW_GROUP_BYTES: usize = 8 << 20;

async fn write_partition(
    mut input: SendableRecordBatchStream,
    schema: SchemaRef,
    format: OutputFormat,
    store: Arc<dyn object_store::ObjectStore>,
    path: Path,
    partition: usize,
    pool: &Arc<dyn MemoryPool>,
) -> DfResult<(u64, u64)> {
    // Peek at the first batch: empty partitions write no file, except partition 0 so that
    // an empty result still leaves a readable file with its schema.
    let first = match input.next().await {
        Some(b) => Some(b?),
        None if partition == 0 => None,
        None => return Ok((0, 0)),
    };
    let mut input = futures::stream::iter(first.map(Ok)).chain(input);
    let out = BufWriter::new(store.clone(), path.clone());
    let mut rows = 0u64;
    let mut bytes = 0u64;
    match format {
        OutputFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut w = AsyncArrowWriter::try_new(out, schema, Some(props))?;
            // The row group being built is held in memory until it is full: reserved in the
            // pool, and written out early when the pool has no room for it.
            let buffered = MemoryConsumer::new(format!("OutputSink[partition {partition}]"))
                .with_can_spill(true)
                .register(pool);
            while let Some(b) = input.next().await {
                let b = b?;
                rows += b.num_rows() as u64;
                w.write(&b).await?;
                // Never forced in past the pool: that would leave the operators below no
                // memory even after they spilled. A refused row group stays counted at its
                // last size until it is written.
                if buffered.try_resize(w.memory_size()).is_err()
                    && w.in_progress_size() >= MIN_EARLY_ROW_GROUP_BYTES
                {
                    w.flush().await?;
                    buffered.shrink(buffered.size().saturating_sub(w.memory_size()));
                }
            }
            bytes += w.bytes_written() as u64;
            w.close().await?;
        }
        OutputFormat::Csv | OutputFormat::Json => {
            let mut out = out;
            let mut header = true;
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let mut buf = Vec::new();
                if format == OutputFormat::Csv {
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(header)
                        .build(&mut buf);
                    w.write(&batch)?;
                } else {
                    let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                    w.write(&batch)?;
                    w.finish()?;
                }
                header = false;
                rows += batch.num_rows() as u64;
                bytes += buf.len() as u64;
                out.write_all(&buf)
                    .await
                    .map_err(DataFusionError::IoError)?;
            }
            if header && format == OutputFormat::Csv {
                let mut buf = Vec::new();
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf)
                    .write(&arrow::array::RecordBatch::new_empty(schema))?;
                out.write_all(&buf)
                    .await
                    .map_err(DataFusionError::IoError)?;
            }
            out.shutdown().await.map_err(DataFusionError::IoError)?;
        }
    }
    Ok((rows, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::execution::memory_pool::{FairSpillPool, UnboundedMemoryPool};
    use object_store::local::LocalFileSystem;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// Writes 900,000 rows of hard-to-compress strings as one partition with memory pool
    /// `pool`; the number of row groups and rows in the file.
    async fn write_with(pool: Arc<dyn MemoryPool>) -> (usize, i64) {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("payload", DataType::Utf8, false),
        ]));
        let batches: Vec<DfResult<RecordBatch>> = (0..9i64)
            .map(|b| {
                let ids: Vec<i64> = (b * 100_000..(b + 1) * 100_000).collect();
                let payload = StringArray::from_iter_values(ids.iter().map(|i| {
                    let h = (*i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    format!("{h:016x}{:016x}", h.rotate_left(29) ^ 0xA5A5_5A5A)
                }));
                Ok(RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from(ids)), Arc::new(payload)],
                )
                .unwrap())
            })
            .collect();
        let input = Box::pin(RecordBatchStreamAdapter::new(
            schema.clone(),
            futures::stream::iter(batches),
        ));
        let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let (rows, _) = write_partition(
            input,
            schema,
            OutputFormat::Parquet,
            store,
            Path::from("part-0.parquet"),
            0,
            &pool,
        )
        .await
        .unwrap();
        assert_eq!(pool.reserved(), 0, "the writer's reservation is given back");
        let file = std::fs::File::open(dir.path().join("part-0.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let groups = reader.metadata().num_row_groups();
        assert_eq!(reader.metadata().file_metadata().num_rows(), rows as i64);
        (groups, rows as i64)
    }

    /// The row group being built counts in the memory pool; when the pool has no room for it,
    /// it is written out early (never below a floor), and no row is lost.
    #[tokio::test]
    async fn a_row_group_the_pool_has_no_room_for_is_written_early() {
        let (groups, rows) = write_with(Arc::new(UnboundedMemoryPool::default())).await;
        assert_eq!((groups, rows), (1, 900_000));
        let (groups, rows) = write_with(Arc::new(FairSpillPool::new(4 << 20))).await;
        assert_eq!(rows, 900_000);
        assert!(groups >= 2, "{groups} row groups under a 4 MiB pool");
    }
}
