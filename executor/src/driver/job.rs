//! Runs a job's steps: checks every step's SQL up front, materializes cached steps as they
//! are reached, plans the target step into stages, submits them to the scheduler and waits,
//! then collects the result or finishes the output.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::view::ViewTable;
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::metrics::Count;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::TryStreamExt;
use kiln_api::{CacheLevel, JobSpec, OutputSpec, StepSpec, WriteMode};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::iterate;
use super::service::{Progress, Shared, StageRecord};
use crate::blocks::BlockId;
use crate::plan::{FinalOutput, Stage, StagePlanner};
use crate::session::{CachedTable, planning_context};
use crate::shuffle::{PeerClients, ReadMode, ShuffleReaderExec, ShuffleWriterExec};
use crate::summary::{JobSummary, OutputSummary};
use crate::{Error, Result};

/// What a finished job produced.
pub struct JobOutcome {
    /// The target step's rows, when the job has no output (empty otherwise).
    pub batches: Vec<RecordBatch>,
    /// Their schema.
    pub schema: Option<SchemaRef>,
    /// The summary.
    pub summary: JobSummary,
}

pub(super) fn plan_err(
    step: &str,
) -> impl FnOnce(datafusion::error::DataFusionError) -> Error + '_ {
    move |source| Error::PlanStep {
        step: step.to_string(),
        source,
    }
}

/// Tables a step's SQL names, subqueries and CTEs included, as written: the logical plan
/// cannot tell, because it already has views inlined.
pub(super) fn referenced_tables(ctx: &SessionContext, sql: &str) -> DfResult<BTreeSet<String>> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state.sql_to_statement(sql, &dialect)?;
    Ok(state
        .resolve_table_references(&statement)?
        .iter()
        .map(|t| t.table().to_ascii_lowercase())
        .collect())
}

/// Plans `sql` and registers it as the view `name`.
pub(super) async fn register_view(
    ctx: &SessionContext,
    step: &str,
    name: &str,
    sql: &str,
) -> Result<()> {
    let df = ctx.sql(sql).await.map_err(plan_err(step))?;
    let view = ViewTable::new(df.logical_plan().clone(), Some(sql.to_string()));
    ctx.deregister_table(name).map_err(plan_err(step))?;
    ctx.register_table(name, Arc::new(view))
        .map_err(plan_err(step))?;
    Ok(())
}

/// Plans every step as a view in a scratch session, so bad SQL fails before any work runs;
/// returns the steps the target needs, in order.
async fn check_steps<'a>(spec: &'a JobSpec, ctx: &SessionContext) -> Result<Vec<&'a StepSpec>> {
    let mut deps: HashMap<String, BTreeSet<String>> = HashMap::new();
    for step in &spec.steps {
        let name = step.name.to_ascii_lowercase();
        let mut tables = BTreeSet::new();
        if step.is_iterative() {
            tables.extend(iterate::check(ctx, step).await?);
        } else {
            tables.extend(referenced_tables(ctx, &step.sql).map_err(plan_err(&step.name))?);
            register_view(ctx, &step.name, &step.name, &step.sql).await?;
        }
        deps.insert(name, tables);
    }
    let target = spec
        .target_step()
        .ok_or_else(|| Error::Driver("the job has no steps".into()))?;
    let mut needed = BTreeSet::from([target.name.to_ascii_lowercase()]);
    for step in spec.steps.iter().rev() {
        let name = step.name.to_ascii_lowercase();
        if needed.contains(&name) {
            needed.extend(deps[&name].iter().cloned());
        }
    }
    Ok(spec
        .steps
        .iter()
        .filter(|s| needed.contains(&s.name.to_ascii_lowercase()))
        .collect())
}

/// What the job runner carries from step to step.
pub(super) struct JobRun<'a> {
    pub shared: &'a Arc<Shared>,
    pub ctx: SessionContext,
    pub planner: StagePlanner,
    /// Steps registered as views (not materialized): an iterative step caches those it reads.
    pub views: BTreeSet<String>,
}

impl JobRun<'_> {
    /// Runs `df`'s stages and keeps the result in the executors' block stores as table
    /// `name`; returns the result's stage (pinned until [`unpin`]) and schema.
    pub async fn materialize(
        &mut self,
        step: &str,
        name: &str,
        df: DataFrame,
    ) -> Result<(u32, SchemaRef)> {
        let (stage, schema) = self.run_to_blocks(step, df).await?;
        self.register_cached(step, name, stage, schema.clone())?;
        Ok((stage, schema))
    }

    /// Runs `df`'s stages, leaving the result in the executors' block stores; returns the
    /// result's stage (pinned until [`unpin`]) and schema.
    async fn run_to_blocks(&mut self, step: &str, df: DataFrame) -> Result<(u32, SchemaRef)> {
        let plan = df.create_physical_plan().await.map_err(plan_err(step))?;
        let schema = plan.schema();
        let stages = self
            .planner
            .split(plan, &FinalOutput::Blocks)
            .map_err(plan_err(step))?;
        let stage = run_stages(self.shared, step, stages, true).await?;
        Ok((stage, schema))
    }

    /// Runs `df` and brings its rows back to the driver.
    pub async fn collect(
        &mut self,
        step: &str,
        df: DataFrame,
    ) -> Result<(Vec<RecordBatch>, SchemaRef)> {
        let (stage, schema) = self.run_to_blocks(step, df).await?;
        let batches = fetch_result(self.shared, stage).await?;
        unpin(self.shared, stage);
        Ok((batches, schema))
    }

    /// Runs `df` into the job's output.
    pub async fn write(
        &mut self,
        step: &str,
        df: DataFrame,
        out: &OutputSpec,
    ) -> Result<OutputSummary> {
        let plan = df.create_physical_plan().await.map_err(plan_err(step))?;
        prepare_output(&self.ctx, out).await?;
        let sink = FinalOutput::Sink {
            uri: dir_uri(&out.uri),
            format: out.format,
        };
        let stages = self.planner.split(plan, &sink).map_err(plan_err(step))?;
        let stage = run_stages(self.shared, step, stages, false).await?;
        finish_output(self.shared, &self.ctx, out, stage).await
    }

    /// Makes table `name` read the cached output of `stage`.
    pub fn register_cached(
        &mut self,
        step: &str,
        name: &str,
        stage: u32,
        schema: SchemaRef,
    ) -> Result<()> {
        let partitions = self.shared.state.lock().unwrap().stages[&stage].partitions;
        let table: Arc<dyn TableProvider> = Arc::new(CachedTable::new(stage, schema, partitions));
        self.ctx.deregister_table(name).map_err(plan_err(step))?;
        self.ctx
            .register_table(name, table)
            .map_err(plan_err(step))?;
        self.views.remove(&name.to_ascii_lowercase());
        Ok(())
    }
}

pub(crate) async fn run(shared: &Arc<Shared>, spec: &JobSpec) -> Result<JobOutcome> {
    let started = Instant::now();
    let ctx = planning_context(spec).await?;
    let needed = check_steps(spec, &ctx).await?;
    let target = spec.target_step().expect("checked above");
    let mut job = JobRun {
        shared,
        ctx,
        planner: StagePlanner::new(spec.shuffle_partitions as usize),
        views: BTreeSet::new(),
    };
    let mut batches = Vec::new();
    let mut schema = None;
    let mut output = None;
    for step in needed {
        let name = step.name.as_str();
        let is_target = name == target.name;
        let sink = spec.output.as_ref().filter(|_| is_target);
        // Each step is planned against the tables as they are now: earlier cached steps
        // read their blocks.
        let cached = if step.is_iterative() {
            Some(iterate::run(&mut job, step).await?)
        } else if step.cache == CacheLevel::None && !is_target {
            register_view(&job.ctx, name, name, &step.sql).await?;
            job.views.insert(name.to_ascii_lowercase());
            None
        } else if step.cache != CacheLevel::None && sink.is_none() {
            let df = job.ctx.sql(&step.sql).await.map_err(plan_err(name))?;
            Some(job.materialize(name, name, df).await?.0)
        } else {
            None
        };
        if !is_target {
            continue;
        }
        // The target: into the output, or back to the caller.
        let df = match cached {
            Some(_) => job.ctx.table(name).await,
            None => job.ctx.sql(&step.sql).await,
        }
        .map_err(plan_err(name))?;
        match (sink, cached) {
            (Some(out), _) => output = Some(job.write(name, df, out).await?),
            (None, Some(stage)) => {
                batches = fetch_result(shared, stage).await?;
                schema = Some(df.schema().inner().clone());
            }
            (None, None) => {
                let (rows, row_schema) = job.collect(name, df).await?;
                batches = rows;
                schema = Some(row_schema);
            }
        }
    }
    let mut summary = shared.summary(spec);
    summary.succeeded = true;
    summary.output = output;
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(JobOutcome {
        batches,
        schema,
        summary,
    })
}

fn dir_uri(uri: &str) -> String {
    if uri.ends_with('/') {
        uri.to_string()
    } else {
        format!("{uri}/")
    }
}

/// The stage whose partition `p` a stage's task `p` reads whole, if any: tasks run best
/// where that partition lives.
fn preferred_input(stage: &Stage) -> Option<u32> {
    let mut found = None;
    let _ = stage.plan.apply(|node| {
        if let Some(r) = node.downcast_ref::<ShuffleReaderExec>()
            && r.mode() == ReadMode::PassThrough
            && r.partitions() == stage.partitions
        {
            found = Some(r.stage());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Submits a step's stages and waits for the last one; intermediate stages are released
/// once it succeeds. The last stage stays pinned when its blocks are still to be read.
async fn run_stages(
    shared: &Arc<Shared>,
    step: &str,
    stages: Vec<Stage>,
    keep_final: bool,
) -> Result<u32> {
    let final_stage = stages.last().expect("a plan has at least one stage").id;
    {
        let mut state = shared.state.lock().unwrap();
        for stage in stages {
            tracing::debug!(
                stage = stage.id,
                step,
                plan = %datafusion::physical_plan::displayable(stage.plan.as_ref()).indent(true),
                "stage planned"
            );
            let preferred = preferred_input(&stage);
            let shuffle = stage
                .plan
                .downcast_ref::<ShuffleWriterExec>()
                .is_some_and(|w| w.partitioning().is_some());
            shared.emit(Progress::StageSubmitted {
                stage: stage.id,
                step: step.to_string(),
                description: stage.description.clone(),
                tasks: stage.partitions,
                shuffle,
            });
            state.stages.insert(
                stage.id,
                StageRecord {
                    plan: stage.plan,
                    step: step.to_string(),
                    description: stage.description,
                    shuffle,
                    partitions: stage.partitions,
                    encoded: None,
                    counters: Default::default(),
                },
            );
            let events = state
                .sched
                .add_stage(stage.id, stage.partitions, stage.inputs, preferred);
            shared.handle(events);
        }
        state.sched.pin(final_stage, keep_final);
    }
    shared.work.notify_waiters();
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let state = shared.state.lock().unwrap();
            if let Some(failure) = state.sched.failure() {
                return Err(Error::JobFailed {
                    failure: failure.clone(),
                });
            }
            if state.sched.status(final_stage) == Some(super::scheduler::StageStatus::Succeeded) {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }
    collect_garbage(shared);
    Ok(final_stage)
}

/// A result or cached dataset no longer needed: it and the lineage only it kept go.
pub(super) fn unpin(shared: &Arc<Shared>, stage: u32) {
    shared.state.lock().unwrap().sched.pin(stage, false);
    collect_garbage(shared);
}

/// Stages nothing needs any more: never recomputed, their blocks dropped by executors.
fn collect_garbage(shared: &Arc<Shared>) {
    let mut state = shared.state.lock().unwrap();
    let stages = state.sched.collect_garbage();
    if stages.is_empty() {
        return;
    }
    let executors: Vec<String> = state.sched.executors().cloned().collect();
    for e in executors {
        state.drops.entry(e).or_default().extend_from_slice(&stages);
    }
}

/// Fetches the result blocks in partition order.
async fn fetch_result(shared: &Arc<Shared>, stage: u32) -> Result<Vec<RecordBatch>> {
    let locations = shared
        .state
        .lock()
        .unwrap()
        .sched
        .locations(stage)
        .ok_or_else(|| Error::Driver(format!("result stage {stage} has lost partitions")))?;
    let peers = PeerClients::default();
    let mut out = Vec::new();
    for (p, (executor, address)) in locations.into_iter().enumerate() {
        let id = BlockId::new(stage, p as u32, 0);
        let failed = |message: String| Error::FetchFailed {
            executor: executor.clone(),
            stage,
            map_partition: p as u32,
            reduce_partition: 0,
            message,
        };
        let batches = peers
            .fetch(&address, id, Count::new())
            .await
            .map_err(|e| failed(e.to_string()))?;
        out.extend(batches);
    }
    Ok(out)
}

fn output_store(
    ctx: &SessionContext,
    out: &OutputSpec,
) -> Result<(Arc<dyn ObjectStore>, object_store::path::Path)> {
    let uri = dir_uri(&out.uri);
    let url = ListingTableUrl::parse(&uri).map_err(|e| Error::InvalidUri {
        uri: uri.clone(),
        reason: e.to_string(),
    })?;
    let store = ctx.runtime_env().object_store(url.object_store())?;
    Ok((store, url.prefix().clone()))
}

/// Applies the write mode before any task writes: `Overwrite` removes the files an earlier
/// run left (so a rerun never duplicates rows), `ErrorIfExists` refuses a non-empty location.
async fn prepare_output(ctx: &SessionContext, out: &OutputSpec) -> Result<()> {
    let (store, prefix) = output_store(ctx, out)?;
    let write_err = |source| Error::WriteOutput {
        uri: out.uri.clone(),
        source,
    };
    let existing: Vec<object_store::ObjectMeta> =
        match store.list(Some(&prefix)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(write_err(e)),
        };
    if existing.is_empty() {
        return Ok(());
    }
    if out.mode == WriteMode::ErrorIfExists {
        return Err(Error::OutputExists {
            uri: out.uri.clone(),
        });
    }
    for meta in existing {
        let name = meta.location.filename().unwrap_or_default();
        let direct = meta
            .location
            .prefix_match(&prefix)
            .is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none());
        if direct && (name.starts_with("part-") || name == "_SUCCESS") {
            store.delete(&meta.location).await.map_err(write_err)?;
        }
    }
    Ok(())
}

async fn finish_output(
    shared: &Arc<Shared>,
    ctx: &SessionContext,
    out: &OutputSpec,
    stage: u32,
) -> Result<OutputSummary> {
    let (store, prefix) = output_store(ctx, out)?;
    store
        .put(&prefix.clone().join("_SUCCESS"), PutPayload::default())
        .await
        .map_err(|source| Error::WriteOutput {
            uri: out.uri.clone(),
            source,
        })?;
    let state = shared.state.lock().unwrap();
    let counters = &state.stages[&stage].counters;
    Ok(OutputSummary {
        uri: out.uri.clone(),
        rows: counters.output_rows,
        files: counters.files_written,
    })
}
