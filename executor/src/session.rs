//! DataFusion sessions for a job: the planning session of the driver (inputs as tables, steps
//! as views or cached datasets) and the execution session of an executor (object stores, a
//! memory pool with spilling, the block store).
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::Result as DfResult;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{SessionConfig, SessionContext};
use kiln_api::{InputFormat, InputSpec, JobSpec, LocationPolicy, parse_memory};
use object_store::ClientConfigKey;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use url::Url;

use crate::egress::GuardedConnector;
use crate::shuffle::{ReadMode, ShuffleEnv, ShuffleReaderExec};
use crate::{Error, Result, find_refusal};

/// Share of an executor's memory (and of its disk, `executors.disk`) given to operators
/// (aggregations, joins, sorts); the rest holds shuffle and cached blocks.
pub const OPERATOR_MEMORY_FRACTION: f64 = 0.6;

/// Byte that never separates fields of a `text` input: each line is one field.
const TEXT_DELIMITER: u8 = 0x1f;
/// Byte that never quotes fields of a `text` input.
const TEXT_QUOTE: u8 = 0x1e;

/// The session options every Kiln session shares, so that the driver's plans and the
/// executors' execution agree.
pub fn session_config(spec: &JobSpec) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(spec.shuffle_partitions as usize)
        .with_batch_size(8192);
    let o = config.options_mut();
    // Every exchange becomes a shuffle between tasks; a round-robin repartition inside a
    // task would only add one.
    o.optimizer.enable_round_robin_repartition = false;
    // Dynamic filters link operators of different stages in memory; they cannot cross
    // processes.
    o.optimizer.enable_dynamic_filter_pushdown = false;
    o.optimizer.enable_join_dynamic_filter_pushdown = false;
    o.optimizer.enable_topk_dynamic_filter_pushdown = false;
    o.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    // An uncorrelated scalar subquery becomes a join: the physical ScalarSubqueryExec shares
    // its results with expressions in memory, which cannot cross a stage boundary.
    o.optimizer.enable_physical_uncorrelated_scalar_subquery = false;
    o.optimizer.repartition_file_scans = true;
    // Each task runs one partition alone: a partition must read only its own file group,
    // never steal its siblings' files (they are read by other tasks).
    o.execution.enable_file_stream_work_stealing = false;
    let broadcast = parse_memory(&spec.broadcast_join_threshold).unwrap_or(10 << 20);
    o.optimizer.hash_join_single_partition_threshold = broadcast as usize;
    o.optimizer.hash_join_single_partition_threshold_rows = usize::MAX;
    o.execution.collect_statistics = true;
    config
}

/// Registers object stores for every non-local location the job reads or writes.
/// An HTTP store connects only where `locations` allows, checked at each connection; an S3
/// store's host is the operator's endpoint, not the job's to choose.
pub fn register_object_stores(
    runtime: &RuntimeEnv,
    spec: &JobSpec,
    locations: &LocationPolicy,
) -> Result<()> {
    let uris = spec
        .inputs
        .iter()
        .map(|i| i.uri.as_str())
        .chain(spec.output.iter().map(|o| o.uri.as_str()));
    for uri in uris {
        let url = parse_url(uri)?;
        let base = url.object_store();
        let base: &Url = base.as_ref();
        let store: Arc<dyn object_store::ObjectStore> = match base.scheme() {
            "file" => continue,
            "http" | "https" => Arc::new(
                HttpBuilder::new()
                    .with_url(base.as_str())
                    .with_config(
                        ClientConfigKey::AllowHttp,
                        (base.scheme() == "http").to_string(),
                    )
                    .with_http_connector(GuardedConnector::new(*locations))
                    .build()
                    .map_err(|source| Error::ObjectStore {
                        uri: uri.into(),
                        source,
                    })?,
            ),
            "s3" => {
                let bucket = base.host_str().unwrap_or_default();
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .ok();
                if let Some(endpoint) = endpoint {
                    b = b
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint);
                }
                Arc::new(b.build().map_err(|source| Error::ObjectStore {
                    uri: uri.into(),
                    source,
                })?)
            }
            other => {
                return Err(Error::InvalidUri {
                    uri: uri.into(),
                    reason: format!(
                        "unsupported scheme `{other}` (use a path, file://, http(s):// or s3://)"
                    ),
                });
            }
        };
        runtime.register_object_store(base, store);
    }
    Ok(())
}

fn parse_url(uri: &str) -> Result<ListingTableUrl> {
    ListingTableUrl::parse(uri).map_err(|e| Error::InvalidUri {
        uri: uri.into(),
        reason: e.to_string(),
    })
}

/// The driver's planning session: object stores and every input registered as a table.
pub async fn planning_context(
    spec: &JobSpec,
    locations: &LocationPolicy,
) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new().build_arc()?;
    register_object_stores(&runtime, spec, locations)?;
    let state = SessionStateBuilder::new()
        .with_config(session_config(spec))
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    let ctx = SessionContext::new_with_state(state);
    for input in &spec.inputs {
        register_input(&ctx, input).await.map_err(|source| {
            let (name, uri) = (input.name.clone(), input.uri.clone());
            match find_refusal(&source) {
                Some(refusal) => Error::InputRefused {
                    input: name,
                    uri,
                    reason: refusal.to_string(),
                },
                None => Error::RegisterInput {
                    input: name,
                    uri,
                    source,
                },
            }
        })?;
    }
    Ok(ctx)
}

fn text_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("line", DataType::Utf8, true)]))
}

fn single_byte(value: &Option<String>, default: u8) -> u8 {
    value.as_deref().map_or(default, |v| v.as_bytes()[0])
}

async fn register_input(ctx: &SessionContext, input: &InputSpec) -> DfResult<()> {
    let url = ListingTableUrl::parse(&input.uri)?;
    // A local input that is not there is a mistake in the job, not an empty table.
    let location: &Url = url.as_ref();
    // The lexical check of the spec again, on the path as resolved: relative to this
    // process's directory, symbolic links followed.
    if location.scheme() == "file"
        && let Ok(path) = location.to_file_path()
    {
        let resolved = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(why) = kiln_api::policy::check_path(&resolved) {
            return Err(datafusion::error::DataFusionError::Plan(format!(
                "{} (resolved to {}) is refused: {why}",
                path.display(),
                resolved.display()
            )));
        }
    }
    if location.scheme() == "file"
        && !input.uri.contains('*')
        && let Ok(path) = location.to_file_path()
        && !path.exists()
    {
        return Err(datafusion::error::DataFusionError::Plan(format!(
            "no file or folder at {}",
            path.display()
        )));
    }
    let o = &input.options;
    let csv = |delimiter: u8| {
        CsvFormat::default()
            .with_has_header(o.header.unwrap_or(true))
            .with_delimiter(single_byte(&o.delimiter, delimiter))
            .with_quote(single_byte(&o.quote, b'"'))
    };
    let (format, extension): (Arc<dyn FileFormat>, &str) = match input.format {
        InputFormat::Csv => (Arc::new(csv(b',')), ".csv"),
        InputFormat::Tsv => (Arc::new(csv(b'\t')), ".tsv"),
        InputFormat::Parquet => (Arc::new(ParquetFormat::default()), ".parquet"),
        InputFormat::Json => (Arc::new(JsonFormat::default()), ".json"),
        InputFormat::Text => (
            Arc::new(
                CsvFormat::default()
                    .with_has_header(false)
                    .with_delimiter(TEXT_DELIMITER)
                    .with_quote(TEXT_QUOTE)
                    .with_escape(None),
            ),
            "",
        ),
    };
    // A directory reads the files of its format; a file or glob names its files itself.
    let extension = match &o.file_extension {
        Some(e) => e.clone(),
        None if url.is_collection() => extension.to_string(),
        None => String::new(),
    };
    let options = ListingOptions::new(format).with_file_extension(extension);
    let schema = match input.format {
        InputFormat::Text => text_schema(),
        _ => options.infer_schema(&ctx.state(), &url).await?,
    };
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table(
        input.name.as_str(),
        Arc::new(ListingTable::try_new(config)?),
    )?;
    Ok(())
}

/// An executor's session: the job's object stores, a spilling memory pool of its operator
/// share of `memory_bytes`, spill files under `spill_dir` up to the operator share of
/// `disk_bytes`, and the shuffle env.
pub fn executor_context(
    spec: &JobSpec,
    memory_bytes: u64,
    disk_bytes: u64,
    spill_dir: PathBuf,
    env: Arc<ShuffleEnv>,
    locations: &LocationPolicy,
) -> Result<SessionContext> {
    let pool = FairSpillPool::new((memory_bytes as f64 * OPERATOR_MEMORY_FRACTION) as usize);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![spill_dir]))
                .with_max_temp_directory_size(
                    (disk_bytes as f64 * OPERATOR_MEMORY_FRACTION) as u64,
                ),
        )
        .build_arc()?;
    register_object_stores(&runtime, spec, locations)?;
    let config = session_config(spec).with_extension(env);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// A step's result kept in the executors' block stores: partition `p` is the pass-through
/// block `(stage, p, 0)`.
#[derive(Debug)]
pub struct CachedTable {
    stage: u32,
    schema: SchemaRef,
    partitions: usize,
}

impl CachedTable {
    /// The cached output of `stage`.
    pub fn new(stage: u32, schema: SchemaRef, partitions: usize) -> Self {
        Self {
            stage,
            schema,
            partitions,
        }
    }
}

#[async_trait]
impl TableProvider for CachedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
            self.stage,
            self.schema.clone(),
            ReadMode::PassThrough,
            self.partitions,
            None,
        ));
        let Some(projection) = projection else {
            return Ok(reader);
        };
        let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = projection
            .iter()
            .map(|&i| {
                let name = self.schema.field(i).name().clone();
                (Arc::new(Column::new(&name, i)) as _, name)
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, reader)?))
    }
}
