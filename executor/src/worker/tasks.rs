//! Running one task: decode its plan, execute its partition, count what it did, and say
//! whose fault a failure is.
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec;
use futures::TryStreamExt;

use super::Session;
use crate::Error;
use crate::error::{find_kiln_error, find_refusal};
use crate::plan::{KilnCodec, SinkExec, StagedAttempt};
use crate::rpc::{self, FailureKind, task_report::Outcome};
use crate::shuffle::read_write_stats;

/// Runs `task` and returns its report. A task that leaves blocks behind (not an output
/// task) is recorded in the holdings first, so a replacement driver can adopt them.
pub(super) async fn run_task(env: &Session, task: rpc::TaskDefinition) -> rpc::TaskReport {
    if !env.faults.task_delay.is_zero() {
        tokio::time::sleep(env.faults.task_delay).await;
    }
    let started = Instant::now();
    let staged = StagedAttempt {
        run_id: env.run_id.clone(),
        stage: task.stage_id,
        attempt: task.attempt,
    };
    let outcome = match execute(&env.ctx, &task, staged).await {
        Ok((mut metrics, sink)) => {
            metrics.elapsed_ms = started.elapsed().as_millis() as u64;
            tracing::debug!(
                stage = task.stage_id,
                partition = task.partition,
                elapsed_ms = metrics.elapsed_ms,
                "task done"
            );
            if !sink {
                env.holdings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(task.stage_id, task.fingerprint, task.partition);
            }
            Outcome::Success(rpc::TaskSuccess {
                metrics: Some(metrics),
            })
        }
        Err(e) => {
            tracing::warn!(stage = task.stage_id, partition = task.partition, error = %e, "task failed");
            Outcome::Failure(classify(&e))
        }
    };
    rpc::TaskReport {
        executor_id: env.executor_id.clone(),
        stage_id: task.stage_id,
        partition: task.partition,
        attempt: task.attempt,
        outcome: Some(outcome),
        token: env.token.clone(),
    }
}

/// Executes the task's partition; returns its metrics and whether it wrote output files.
async fn execute(
    ctx: &SessionContext,
    task: &rpc::TaskDefinition,
    staged: StagedAttempt,
) -> Result<(rpc::TaskMetrics, bool), DataFusionError> {
    let task_ctx = ctx.task_ctx();
    let mut plan =
        physical_plan_from_bytes_with_extension_codec(&task.plan, &task_ctx, &KilnCodec)?;
    // An output task writes into its attempt's own staging directory; the driver's job
    // commit moves the one attempt it chose into the output.
    if let Some(sink) = plan.downcast_ref::<SinkExec>() {
        plan = Arc::new(sink.staged(staged));
    }
    tracing::trace!(
        stage = task.stage_id,
        partition = task.partition,
        plan = %datafusion::physical_plan::displayable(plan.as_ref()).indent(true),
        "task plan"
    );
    let stream = plan.execute(task.partition as usize, task_ctx)?;
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let stats = read_write_stats(&batches);
    tracing::trace!(
        stage = task.stage_id,
        partition = task.partition,
        plan = %datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true),
        "task metrics"
    );
    let mut m = collect_metrics(&plan);
    m.output_rows = stats.iter().map(|s| s.1).sum();
    let sink = plan.is::<SinkExec>();
    if sink {
        m.files_written = stats
            .iter()
            .filter(|(p, rows, _)| *rows > 0 || *p == 0)
            .count() as u64;
    } else {
        m.shuffle_bytes_written = stats.iter().map(|s| s.2).sum();
    }
    Ok((m, sink))
}

fn collect_metrics(plan: &Arc<dyn ExecutionPlan>) -> rpc::TaskMetrics {
    let mut m = rpc::TaskMetrics::default();
    let _ = plan.apply(|node| {
        if let Some(set) = node.metrics() {
            let sum = |name: &str| set.sum_by_name(name).map_or(0, |v| v.as_usize() as u64);
            m.remote_bytes_fetched += sum("remote_bytes_fetched");
            m.local_bytes_fetched += sum("local_bytes_fetched");
            // Spill counters are built-in metric kinds, not named counters.
            m.spill_count += set.spill_count().unwrap_or(0) as u64;
            m.spilled_bytes += set.spilled_bytes().unwrap_or(0) as u64;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    m
}

/// Whose fault a failure is: a fetch of a lost block, the executor's environment (retry
/// elsewhere), or the task's own data (fail the job).
fn classify(e: &DataFusionError) -> rpc::TaskFailure {
    if let Some(Error::FetchFailed {
        executor,
        stage,
        map_partition,
        message,
        ..
    }) = find_kiln_error(e)
    {
        return rpc::TaskFailure {
            kind: FailureKind::Fetch as i32,
            message: message.clone(),
            fetch_executor: executor.clone(),
            fetch_stage: *stage,
            fetch_map_partition: *map_partition,
        };
    }
    // Where the job may not connect: retrying elsewhere cannot help.
    if let Some(refusal) = find_refusal(e) {
        return rpc::TaskFailure {
            kind: FailureKind::Data as i32,
            message: refusal.to_string(),
            ..Default::default()
        };
    }
    let kind = match e.find_root() {
        DataFusionError::ResourcesExhausted(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_) => FailureKind::Executor,
        _ => FailureKind::Data,
    };
    rpc::TaskFailure {
        kind: kind as i32,
        message: e.to_string(),
        ..Default::default()
    }
}
