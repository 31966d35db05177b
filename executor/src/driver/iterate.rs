//! Iterative steps (`repeat` / `until`): the step's `initial` SQL gives iteration 0; each
//! iteration runs the step's `sql`, in which the step's own name is the previous result, and
//! replaces it. Every iteration's result is kept in the executors' memory like a cached
//! step, and the steps the loop body reads (its loop-invariant inputs) are computed once and
//! cached before the first iteration. `until` is checked after each iteration with the new
//! result as `<name>` and the one before as `<name>_previous`.
use std::collections::BTreeSet;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use kiln_api::StepSpec;

use super::runner::{JobRun, plan_err, query, referenced_tables, register_view};
use crate::{Error, Result};

fn previous_name(step: &StepSpec) -> String {
    format!("{}_previous", step.name)
}

fn columns(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plan_error(step: &StepSpec, message: String) -> Error {
    Error::PlanStep {
        step: step.name.clone(),
        source: DataFusionError::Plan(message),
    }
}

/// Plans the step's `initial`, `sql` and `until` in the scratch session, checks that an
/// iteration keeps the columns of `initial` and that `until` is one boolean, and leaves the
/// step's name registered for later steps. Returns the tables the step reads.
pub(super) async fn check(ctx: &SessionContext, step: &StepSpec) -> Result<BTreeSet<String>> {
    let name = step.name.as_str();
    let previous = previous_name(step);
    let initial = step.initial.as_deref().unwrap_or_default();
    let mut tables = referenced_tables(ctx, initial).map_err(plan_err(name))?;
    let start = query(ctx, initial).await.map_err(plan_err(name))?;
    let start_schema: SchemaRef = start.schema().inner().clone();
    register_view(ctx, name, name, initial).await?;
    tables.extend(referenced_tables(ctx, &step.sql).map_err(plan_err(name))?);
    let body = query(ctx, &step.sql).await.map_err(plan_err(name))?;
    let body_schema: SchemaRef = body.schema().inner().clone();
    let same = body_schema.fields().len() == start_schema.fields().len()
        && body_schema
            .fields()
            .iter()
            .zip(start_schema.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if !same {
        return Err(plan_error(
            step,
            format!(
                "an iteration (sql) must return the columns of initial: initial gives ({}), sql gives ({})",
                columns(&start_schema),
                columns(&body_schema)
            ),
        ));
    }
    if let Some(until) = &step.until {
        register_view(ctx, name, &previous, initial).await?;
        tables.extend(referenced_tables(ctx, until).map_err(plan_err(name))?);
        let cond = query(ctx, until).await.map_err(plan_err(name))?;
        let fields = cond.schema().fields();
        if fields.len() != 1 || fields[0].data_type() != &DataType::Boolean {
            return Err(plan_error(
                step,
                format!(
                    "until must return one boolean column, not ({})",
                    columns(cond.schema().inner())
                ),
            ));
        }
        ctx.deregister_table(previous.as_str())
            .map_err(plan_err(name))?;
    }
    tables.remove(&name.to_ascii_lowercase());
    tables.remove(&previous.to_ascii_lowercase());
    Ok(tables)
}

/// Runs the loop; returns the stage holding the final result, registered as the step's
/// table and kept (pinned) for later steps.
pub(super) async fn run(job: &mut JobRun<'_>, step: &StepSpec) -> Result<u32> {
    let name = step.name.as_str();
    let previous = previous_name(step);
    let initial = step.initial.as_deref().unwrap_or_default();

    // Loop-invariant inputs: steps the body reads that are still plain views would be
    // recomputed every iteration; compute them once and keep them.
    let invariant: Vec<String> = referenced_tables(&job.ctx, &step.sql)
        .map_err(plan_err(name))?
        .into_iter()
        .filter(|t| t != &name.to_ascii_lowercase() && job.views.contains(t))
        .collect();
    for table in invariant {
        tracing::info!(step = name, input = %table, "caching a loop-invariant input");
        let df = job
            .ctx
            .table(table.as_str())
            .await
            .map_err(plan_err(name))?;
        job.materialize(&table, &table, df).await?;
    }

    job.ctx.deregister_table(name).map_err(plan_err(name))?;
    let df = query(&job.ctx, initial).await.map_err(plan_err(name))?;
    let (mut current, schema) = job.materialize(name, name, df).await?;
    let max = step.max_iterations();
    let mut converged = step.until.is_none();
    for iteration in 1..=max {
        job.shared
            .act(|s| s.core.iteration_started(name, iteration, max));
        // `name` reads the previous result here.
        let df = query(&job.ctx, &step.sql).await.map_err(plan_err(name))?;
        let (next, _) = job.materialize(name, name, df).await?;
        let done = match &step.until {
            Some(until) => {
                job.register_cached(name, &previous, current, schema.clone())?;
                let done = condition(job, step, until).await?;
                job.ctx
                    .deregister_table(previous.as_str())
                    .map_err(plan_err(name))?;
                done
            }
            None => false,
        };
        job.release(current);
        current = next;
        job.shared.act(|s| s.core.iteration_done(name, iteration));
        if done {
            converged = true;
            break;
        }
    }
    if !converged {
        tracing::warn!(
            step = name,
            iterations = max,
            "until never held; stopped after the last allowed iteration"
        );
    }
    Ok(current)
}

/// Evaluates `until` over the current tables.
async fn condition(job: &mut JobRun<'_>, step: &StepSpec, until: &str) -> Result<bool> {
    let name = step.name.as_str();
    let df = query(&job.ctx, until).await.map_err(plan_err(name))?;
    let (batches, _) = job.collect(name, df).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let bad = |what: String| Error::Until {
        step: name.to_string(),
        reason: what,
    };
    if rows != 1 {
        return Err(bad(format!("it returned {rows} rows; it must return one")));
    }
    let batch = batches.iter().find(|b| b.num_rows() == 1).expect("one row");
    let column = batch.column(0).as_boolean_opt().ok_or_else(|| {
        bad(format!(
            "it returned {}, not a boolean",
            batch.column(0).data_type()
        ))
    })?;
    if column.is_null(0) {
        return Err(bad("it returned NULL".into()));
    }
    Ok(column.value(0))
}
