//! The job's steps, in order: checks every step's SQL up front, opens the output (so a bad
//! location or an `ErrorIfExists` conflict fails before any work), materializes cached steps
//! as they are reached, and runs the target step into the output or back to the caller.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use kiln_api::{CacheLevel, JobSpec, LocationPolicy, StepSpec, parse_memory};

use super::iterate;
use super::output::{OutputCommit, Prepared};
use super::runner::{JobRun, plan_err, query, referenced_tables, register_view};
use super::service::Shared;
use crate::plan::StagePlanner;
use crate::session::planning_context;
use crate::summary::JobSummary;
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

/// Runs the job to its end.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    spec: &JobSpec,
    locations: &LocationPolicy,
) -> Result<JobOutcome> {
    let started = Instant::now();
    let ctx = planning_context(spec, locations).await?;
    let needed = check_steps(spec, &ctx).await?;
    let target = spec.target_step().expect("checked above");
    let commit = match &spec.output {
        Some(out) => match OutputCommit::prepare(&ctx, out, &shared.job_uid, shared.epoch).await? {
            Prepared::Ready(commit) => Some(commit),
            Prepared::Committed(output) => {
                let mut summary = shared.read(|core| core.summary(spec));
                summary.succeeded = true;
                summary.output = Some(output);
                summary.elapsed_ms = started.elapsed().as_millis() as u64;
                return Ok(JobOutcome {
                    batches: Vec::new(),
                    schema: None,
                    summary,
                });
            }
        },
        None => None,
    };
    let mut job = JobRun {
        shared,
        ctx,
        planner: StagePlanner::new(spec.shuffle_partitions as usize),
        views: BTreeSet::new(),
        max_result_bytes: parse_memory(&spec.max_result_bytes)?,
    };
    let mut batches = Vec::new();
    let mut schema = None;
    let mut output = None;
    for step in needed {
        let name = step.name.as_str();
        let is_target = name == target.name;
        let sink = spec
            .output
            .as_ref()
            .zip(commit.as_ref())
            .filter(|_| is_target);
        // Each step is planned against the tables as they are now: earlier cached steps
        // read their blocks.
        let cached = if step.is_iterative() {
            Some(iterate::run(&mut job, step).await?)
        } else if step.cache == CacheLevel::None && !is_target {
            register_view(&job.ctx, name, name, &step.sql).await?;
            job.views.insert(name.to_ascii_lowercase());
            None
        } else if step.cache != CacheLevel::None && sink.is_none() {
            let df = query(&job.ctx, &step.sql).await.map_err(plan_err(name))?;
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
            None => query(&job.ctx, &step.sql).await,
        }
        .map_err(plan_err(name))?;
        match (sink, cached) {
            (Some((out, commit)), _) => output = Some(job.write(name, df, out, commit).await?),
            (None, Some(stage)) => {
                batches = job.fetch_result(name, stage).await?;
                schema = Some(df.schema().inner().clone());
            }
            (None, None) => {
                let (rows, row_schema) = job.collect(name, df).await?;
                batches = rows;
                schema = Some(row_schema);
            }
        }
    }
    let mut summary = shared.read(|core| core.summary(spec));
    summary.succeeded = true;
    if output.is_none() {
        summary.result_rows = Some(batches.iter().map(|b| b.num_rows() as u64).sum());
    }
    summary.output = output;
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(JobOutcome {
        batches,
        schema,
        summary,
    })
}
