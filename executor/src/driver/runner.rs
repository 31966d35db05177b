//! Running stages for the job's steps: a step's plan is split into stages, submitted to the
//! core, and waited for; its result stays in the executors' block stores (cached steps,
//! iterations), comes back to the driver (a job without output), or goes to the output.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::view::ViewTable;
use datafusion::error::Result as DfResult;
use datafusion::execution::context::SQLOptions;
use datafusion::physical_plan::metrics::Count;
use datafusion::prelude::{DataFrame, SessionContext};
use kiln_api::OutputSpec;

use super::core::StageOutcome;
use super::output::OutputCommit;
use super::service::Shared;
use crate::blocks::BlockId;
use crate::plan::{FinalOutput, Stage, StagePlanner};
use crate::session::CachedTable;
use crate::summary::OutputSummary;
use crate::{Error, Result};

/// Wraps a planning error with the step it came from.
pub(super) fn plan_err(
    step: &str,
) -> impl FnOnce(datafusion::error::DataFusionError) -> Error + '_ {
    move |source| Error::PlanStep {
        step: step.to_string(),
        source,
    }
}

/// Plans a step's SQL as a query: DDL (`CREATE`, `DROP`), DML (`INSERT`, `COPY`) and
/// statements (`SET`, transactions) are refused, so a step can read only its job's tables
/// and change nothing of the session or the files around it.
pub(super) async fn query(ctx: &SessionContext, sql: &str) -> DfResult<DataFrame> {
    let only_queries = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    ctx.sql_with_options(sql, only_queries).await
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
    let df = query(ctx, sql).await.map_err(plan_err(step))?;
    let view = ViewTable::new(df.logical_plan().clone(), Some(sql.to_string()));
    ctx.deregister_table(name).map_err(plan_err(step))?;
    ctx.register_table(name, Arc::new(view))
        .map_err(plan_err(step))?;
    Ok(())
}

/// What the job runner carries from step to step.
pub(super) struct JobRun<'a> {
    pub shared: &'a Arc<Shared>,
    pub ctx: SessionContext,
    pub planner: StagePlanner,
    /// Steps registered as views (not materialized): an iterative step caches those it reads.
    pub views: BTreeSet<String>,
    /// The most bytes a result brought back to the driver may hold (`maxResultBytes`).
    pub max_result_bytes: u64,
}

impl JobRun<'_> {
    /// Runs `df`'s stages and keeps the result in the executors' block stores as table
    /// `name`; returns the result's stage (pinned until [`JobRun::release`]) and schema.
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
    /// result's stage (pinned until [`JobRun::release`]) and schema.
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
        let batches = self.fetch_result(step, stage).await?;
        self.release(stage);
        Ok((batches, schema))
    }

    /// Runs `df` into the job's output and commits it.
    pub async fn write(
        &mut self,
        step: &str,
        df: DataFrame,
        out: &OutputSpec,
        commit: &OutputCommit,
    ) -> Result<OutputSummary> {
        let plan = df.create_physical_plan().await.map_err(plan_err(step))?;
        let sink = FinalOutput::Sink {
            uri: commit.dir_uri().to_string(),
            format: out.format,
        };
        let stages = self.planner.split(plan, &sink).map_err(plan_err(step))?;
        let stage = run_stages(self.shared, step, stages, false).await?;
        let (committed, rows) = self.shared.read(|core| {
            (
                core.commits(stage),
                core.stage(stage).map_or(0, |s| s.counters.output_rows),
            )
        });
        commit.commit(&committed, rows).await
    }

    /// Makes table `name` read the cached output of `stage`.
    pub fn register_cached(
        &mut self,
        step: &str,
        name: &str,
        stage: u32,
        schema: SchemaRef,
    ) -> Result<()> {
        let partitions = self
            .shared
            .read(|core| core.stage(stage).map_or(0, |s| s.partitions));
        let table: Arc<dyn TableProvider> = Arc::new(CachedTable::new(stage, schema, partitions));
        self.ctx.deregister_table(name).map_err(plan_err(step))?;
        self.ctx
            .register_table(name, table)
            .map_err(plan_err(step))?;
        self.views.remove(&name.to_ascii_lowercase());
        Ok(())
    }

    /// A result or cached dataset no longer needed: it and the lineage only it kept go.
    pub fn release(&self, stage: u32) {
        self.shared.act(|s| s.core.release(stage));
    }

    /// Fetches the result blocks of `stage` in partition order. A partition whose executor
    /// cannot serve it is recomputed from its lineage and fetched again; more than
    /// `maxResultBytes` fails the job rather than the driver's memory.
    pub async fn fetch_result(&self, step: &str, stage: u32) -> Result<Vec<RecordBatch>> {
        let peers = &self.shared.peers;
        let mut out: Vec<Vec<RecordBatch>> = Vec::new();
        let mut bytes = 0u64;
        loop {
            let locations = wait_for_stage(self.shared, stage).await?;
            let p = out.len();
            let Some((executor, address)) = locations.into_iter().nth(p) else {
                return Ok(out.into_iter().flatten().collect());
            };
            match peers
                .fetch(&address, BlockId::new(stage, p as u32, 0), Count::new())
                .await
            {
                Ok(batches) => {
                    bytes += batches
                        .iter()
                        .map(|b| b.get_array_memory_size() as u64)
                        .sum::<u64>();
                    if bytes > self.max_result_bytes {
                        return Err(Error::ResultTooLarge {
                            step: step.to_string(),
                            limit: self.max_result_bytes,
                        });
                    }
                    out.push(batches);
                }
                Err(e) => {
                    tracing::warn!(stage, partition = p, %executor, error = %e, "result partition could not be fetched; recomputing it");
                    self.shared
                        .act(|s| s.core.result_lost(stage, p as u32, &executor));
                }
            }
        }
    }
}

/// Waits until `stage` is complete and every partition lives on a live executor; returns
/// where.
async fn wait_for_stage(shared: &Shared, stage: u32) -> Result<Vec<(String, String)>> {
    shared
        .wait_for(Duration::from_secs(1), |core| match core.outcome(stage) {
            StageOutcome::Failed(failure) => Some(Err(Error::JobFailed { failure })),
            StageOutcome::Succeeded => core.locations(stage).map(Ok),
            StageOutcome::Waiting => None,
        })
        .await
}

/// Submits a step's stages and waits for the last one; intermediate stages are released
/// once it succeeds. The last stage stays pinned when its blocks are still to be read.
async fn run_stages(
    shared: &Arc<Shared>,
    step: &str,
    stages: Vec<Stage>,
    keep_final: bool,
) -> Result<u32> {
    let final_stage = shared.act(|s| {
        let submissions = s.plans.add(stages);
        s.core.submit(step, submissions, keep_final)
    });
    // Only completion matters here: an output stage's partitions may have been written by
    // executors lost since (their files outlive them), so there are no locations to wait for.
    shared
        .wait_for(Duration::from_secs(1), |core| {
            match core.outcome(final_stage) {
                StageOutcome::Failed(failure) => Some(Err(Error::JobFailed { failure })),
                StageOutcome::Succeeded => Some(Ok(())),
                StageOutcome::Waiting => None,
            }
        })
        .await?;
    shared.act(|s| s.core.collect_garbage());
    Ok(final_stage)
}
