//! Splits a DataFusion physical plan into stages at its exchange points: every
//! `RepartitionExec` becomes a shuffle (a writer rooting the stage below and a hash reader in
//! the stage above), and every `CoalescePartitionsExec` / `SortPreservingMergeExec` over more
//! than one partition becomes a pass-through exchange, so that each task of a stage runs one
//! partition of its plan and never re-executes a sibling partition's input.
use std::sync::Arc;

use datafusion::common::JoinType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec, PartitionMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, replace_children_if_necessary,
};
use kiln_api::OutputFormat;

use super::SinkExec;
use crate::shuffle::{ReadMode, ShuffleReaderExec, ShuffleWriterExec};

/// What the last stage of a plan does with its rows.
#[derive(Clone, Debug, PartialEq)]
pub enum FinalOutput {
    /// Keep each partition as a block (results the driver fetches, or a cached dataset).
    Blocks,
    /// Write each partition as a file under `uri`.
    Sink { uri: String, format: OutputFormat },
}

/// One stage: a plan whose root is a [`ShuffleWriterExec`] or a [`SinkExec`], run as one task
/// per partition.
#[derive(Clone, Debug)]
pub struct Stage {
    /// Job-wide unique id; also the `stage` of the blocks it writes.
    pub id: u32,
    /// The plan; its readers are unresolved (no locations) until the driver ships it.
    pub plan: Arc<dyn ExecutionPlan>,
    /// Number of tasks.
    pub partitions: usize,
    /// Stages whose output it reads, including cached datasets of earlier steps.
    pub inputs: Vec<u32>,
    /// A one-line description for progress and logs.
    pub description: String,
}

/// Hands out stage ids and splits plans.
#[derive(Debug)]
pub struct StagePlanner {
    next_id: u32,
    partitions: usize,
}

impl StagePlanner {
    /// A planner whose shuffles have `partitions` partitions.
    pub fn new(partitions: usize) -> Self {
        Self {
            next_id: 1,
            partitions: partitions.max(1),
        }
    }

    /// Splits `plan` into stages in dependency order; the last one produces `output`.
    pub fn split(
        &mut self,
        plan: Arc<dyn ExecutionPlan>,
        output: &FinalOutput,
    ) -> DfResult<Vec<Stage>> {
        let mut stages = Vec::new();
        let body = self.rewrite(plan, &mut stages)?;
        let id = self.take_id();
        let root: Arc<dyn ExecutionPlan> = match output {
            FinalOutput::Blocks => Arc::new(ShuffleWriterExec::new(body, id, None)),
            FinalOutput::Sink { uri, format } => {
                Arc::new(SinkExec::new(body, uri.clone(), *format))
            }
        };
        stages.push(stage(id, root)?);
        Ok(stages)
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn rewrite(
        &mut self,
        plan: Arc<dyn ExecutionPlan>,
        stages: &mut Vec<Stage>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let plan = self.distributable(plan)?;
        let children = plan
            .children()
            .into_iter()
            .map(|c| self.rewrite(c.clone(), stages))
            .collect::<DfResult<Vec<_>>>()?;
        if let Some(rep) = plan.downcast_ref::<RepartitionExec>() {
            let child = children
                .into_iter()
                .next()
                .expect("repartition has an input");
            let partitioning = rep.partitioning().clone();
            let reduce = partitioning.partition_count();
            let id = self.take_id();
            let schema = child.schema();
            stages.push(stage(
                id,
                Arc::new(ShuffleWriterExec::new(child, id, Some(partitioning))),
            )?);
            return Ok(Arc::new(ShuffleReaderExec::new(
                id,
                schema,
                ReadMode::Hash,
                reduce,
                None,
            )));
        }
        let merges = plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>();
        if merges && children[0].output_partitioning().partition_count() > 1 {
            let child = children.into_iter().next().expect("merge has an input");
            let n = child.output_partitioning().partition_count();
            let id = self.take_id();
            let schema = child.schema();
            stages.push(stage(
                id,
                Arc::new(ShuffleWriterExec::new(child, id, None)),
            )?);
            let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
                id,
                schema,
                ReadMode::PassThrough,
                n,
                None,
            ));
            return replace_children_if_necessary(plan, vec![reader]);
        }
        let children = broadcast_build_side(&plan, children)?;
        replace_children_if_necessary(plan, children)
    }
}

/// A join that collects its left side (a broadcast hash join, a nested-loop join) has every
/// task of its stage read that side whole: its pass-through reader becomes a broadcast
/// reader, so that an executor fetches each block once for all its tasks.
fn broadcast_build_side(
    plan: &Arc<dyn ExecutionPlan>,
    mut children: Vec<Arc<dyn ExecutionPlan>>,
) -> DfResult<Vec<Arc<dyn ExecutionPlan>>> {
    let collects_left = plan
        .downcast_ref::<HashJoinExec>()
        .is_some_and(|j| *j.partition_mode() == PartitionMode::CollectLeft)
        || plan.is::<NestedLoopJoinExec>();
    let Some(left) = children.first().filter(|_| collects_left) else {
        return Ok(children);
    };
    let Some(reader) = left
        .downcast_ref::<CoalescePartitionsExec>()
        .and_then(|m| m.input().downcast_ref::<ShuffleReaderExec>())
        .filter(|r| r.mode() == ReadMode::PassThrough)
    else {
        return Ok(children);
    };
    let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
        reader.stage(),
        reader.schema(),
        ReadMode::Broadcast,
        reader.partitions(),
        None,
    ));
    children[0] = replace_children_if_necessary(left.clone(), vec![reader])?;
    Ok(children)
}

impl StagePlanner {
    /// Joins that emit build-side rows once every probe partition is done (left, full,
    /// semi and anti joins collecting their left side) rely on all probe partitions running
    /// in one process. Here each probe partition is a task of its own, so such a join
    /// becomes a partitioned join (both sides shuffled on the keys), or, where that cannot
    /// keep its meaning (null-aware anti joins, nested-loop joins), reads its probe side as
    /// one partition.
    fn distributable(&self, plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(j) = plan.downcast_ref::<HashJoinExec>()
            && *j.partition_mode() == PartitionMode::CollectLeft
            && emits_build_rows_at_end(*j.join_type())
            && j.right().output_partitioning().partition_count() > 1
        {
            if j.null_aware {
                let probe: Arc<dyn ExecutionPlan> =
                    Arc::new(CoalescePartitionsExec::new(j.right().clone()));
                return replace_children_if_necessary(plan.clone(), vec![j.left().clone(), probe]);
            }
            let build = match j.left().downcast_ref::<CoalescePartitionsExec>() {
                Some(c) => c.input().clone(),
                None => j.left().clone(),
            };
            let (left_keys, right_keys): (Vec<_>, Vec<_>) = j.on().iter().cloned().unzip();
            let left = Arc::new(RepartitionExec::try_new(
                build,
                Partitioning::Hash(left_keys, self.partitions),
            )?);
            let right = Arc::new(RepartitionExec::try_new(
                j.right().clone(),
                Partitioning::Hash(right_keys, self.partitions),
            )?);
            let join = j
                .builder()
                .with_partition_mode(PartitionMode::Partitioned)
                .with_new_children(vec![left, right])?
                .build()?;
            return Ok(Arc::new(join));
        }
        if let Some(j) = plan.downcast_ref::<NestedLoopJoinExec>()
            && emits_build_rows_at_end(*j.join_type())
            && j.right().output_partitioning().partition_count() > 1
        {
            let probe: Arc<dyn ExecutionPlan> =
                Arc::new(CoalescePartitionsExec::new(j.right().clone()));
            return replace_children_if_necessary(plan.clone(), vec![j.left().clone(), probe]);
        }
        Ok(plan)
    }
}

fn emits_build_rows_at_end(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Left
            | JoinType::LeftAnti
            | JoinType::LeftSemi
            | JoinType::LeftMark
            | JoinType::Full
    )
}

fn stage(id: u32, plan: Arc<dyn ExecutionPlan>) -> DfResult<Stage> {
    let mut inputs = Vec::new();
    plan.apply(|node| {
        if let Some(r) = node.downcast_ref::<ShuffleReaderExec>() {
            inputs.push(r.stage());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    inputs.sort_unstable();
    inputs.dedup();
    Ok(Stage {
        id,
        partitions: plan.output_partitioning().partition_count(),
        description: describe(&plan),
        inputs,
        plan,
    })
}

/// Names the operators a stage runs, root first, skipping the plumbing.
fn describe(plan: &Arc<dyn ExecutionPlan>) -> String {
    let mut names: Vec<String> = Vec::new();
    let _ = plan.apply(|node| {
        let name = node.name().trim_end_matches("Exec").to_string();
        let skip = matches!(
            name.as_str(),
            "ShuffleWriter" | "Projection" | "CoalesceBatches" | "Filter" | "Sink"
        );
        if !skip && !names.contains(&name) {
            names.push(name);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    names.join(" ← ")
}
