//! The stage plans: each stage's physical plan as the planner split it, resolved (its shuffle
//! readers pointed at where their inputs live now) and encoded for executors once per
//! resolution. The only part of the driver's state that is DataFusion's; the core says where
//! outputs live and when a stage's epoch moves on.
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec;

use super::core::{DriverCore, StageSubmission};
use super::journal::fingerprint;
use crate::plan::{KilnCodec, SinkExec, Stage};
use crate::shuffle::{Location, ReadMode, ShuffleReaderExec, ShuffleWriterExec};
use crate::{Error, Result};

struct StagePlan {
    plan: Arc<dyn ExecutionPlan>,
    /// What identifies the plan across driver runs.
    fingerprint: u64,
    /// The plan encoded at an epoch of the stage.
    encoded: Option<(u64, Bytes)>,
}

/// Every stage's plan.
#[derive(Default)]
pub(crate) struct StagePlans {
    plans: BTreeMap<u32, StagePlan>,
}

impl StagePlans {
    /// Keeps the plans of `stages` and describes them for the core.
    pub fn add(&mut self, stages: Vec<Stage>) -> Vec<StageSubmission> {
        stages
            .into_iter()
            .map(|stage| {
                let text = datafusion::physical_plan::displayable(stage.plan.as_ref())
                    .indent(true)
                    .to_string();
                tracing::debug!(stage = stage.id, plan = %text, "stage planned");
                // The plan as displayed names every input file, expression and partitioning
                // (not where shuffle inputs live): the same job plans the same text.
                let fingerprint = fingerprint(&format!("{} {} {text}", stage.id, stage.partitions));
                let submission = StageSubmission {
                    id: stage.id,
                    description: stage.description.clone(),
                    partitions: stage.partitions,
                    inputs: stage.inputs.clone(),
                    preferred: preferred_input(&stage),
                    shuffle: stage
                        .plan
                        .downcast_ref::<ShuffleWriterExec>()
                        .is_some_and(|w| w.partitioning().is_some()),
                    sink: stage.plan.is::<SinkExec>(),
                    fingerprint,
                    blocks_per_task: stage
                        .plan
                        .downcast_ref::<ShuffleWriterExec>()
                        .map_or(1, |w| w.reduce_partitions() as u32),
                };
                self.plans.insert(
                    stage.id,
                    StagePlan {
                        plan: stage.plan,
                        fingerprint,
                        encoded: None,
                    },
                );
                submission
            })
            .collect()
    }

    /// The fingerprint of a stage's plan (0 for a stage not planned here).
    pub fn fingerprint(&self, stage: u32) -> u64 {
        self.plans.get(&stage).map_or(0, |p| p.fingerprint)
    }

    /// The stage's plan with its readers pointing at the current locations of their inputs,
    /// encoded once per resolution of the stage.
    pub fn encoded(&mut self, stage: u32, core: &DriverCore) -> Result<Bytes> {
        let epoch = core.epoch(stage);
        let rec = self
            .plans
            .get_mut(&stage)
            .ok_or_else(|| Error::Driver(format!("unknown stage {stage}")))?;
        if let Some((e, bytes)) = &rec.encoded
            && *e == epoch
        {
            return Ok(bytes.clone());
        }
        let resolved = rec
            .plan
            .clone()
            .transform_up(|node| {
                let Some(r) = node.downcast_ref::<ShuffleReaderExec>() else {
                    return Ok(Transformed::no(node));
                };
                let locations = core
                    .locations(r.stage())
                    .ok_or_else(|| {
                        datafusion::error::DataFusionError::Internal(format!(
                            "stage {} read before its input stage {} completed",
                            stage,
                            r.stage()
                        ))
                    })?
                    .into_iter()
                    .map(|(executor, address)| Location { executor, address })
                    .collect();
                Ok(Transformed::yes(
                    Arc::new(r.resolved(locations)) as Arc<dyn ExecutionPlan>
                ))
            })
            .map_err(|source| Error::CodecPlan {
                action: "resolve",
                stage,
                source,
            })?
            .data;
        let bytes = physical_plan_to_bytes_with_extension_codec(resolved, &KilnCodec).map_err(
            |source| Error::CodecPlan {
                action: "encode",
                stage,
                source,
            },
        )?;
        rec.encoded = Some((epoch, bytes.clone()));
        Ok(bytes)
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
