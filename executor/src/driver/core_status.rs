//! What the core says of the job: the status the operator polls, and the summary (stages,
//! totals, steps, losses and what they cost) written at the end.
use std::time::Duration;

use kiln_api::JobSpec;

use super::DriverCore;
use crate::rpc;
use crate::summary::{JobSummary, LossSummary, RecoverySummary, StageSummary, StepSummary, Totals};

impl DriverCore {
    /// Progress so far, for the operator.
    pub fn job_status(&self) -> rpc::JobStatusResponse {
        let mut status = rpc::JobStatusResponse::default();
        for id in self.stages.keys() {
            let (done, total) = self.sched.progress(*id);
            status.stages_total += 1;
            status.stages_done += u32::from(done == total);
            status.tasks_done += done as u64;
            status.tasks_total += total as u64;
            status.partitions_recomputed += self.sched.launch_counts(*id).1;
        }
        status.executors_live = self.live_width() as u32;
        status.driver_losses = self.driver_losses();
        status.stages_resumed = self.stages_resumed();
        status.executors_lost = self.sched.losses().len() as u32;
        status.last_lost_executor = self
            .sched
            .losses()
            .last()
            .map(|l| l.executor.clone())
            .unwrap_or_default();
        status.lost_executors = self
            .sched
            .losses()
            .iter()
            .map(|l| rpc::LostExecutor {
                executor_id: l.executor.clone(),
                reason: l.reason.as_str().to_string(),
            })
            .collect();
        status.partitions_migrated = self.partitions_migrated();
        status.partitions_lost = self.sched.outputs_lost();
        status.holding = self
            .outputs_held()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(executor_id, n)| rpc::ExecutorHolding {
                executor_id,
                outputs: n as u64,
            })
            .collect();
        status.draining = self.draining().cloned().collect();
        if let Some(t) = self.loss_timings.last() {
            let ms = |d: Duration| d.as_millis() as u64;
            let from = t.occurred.unwrap_or(t.detected);
            // 0 when unknown; a known detection takes at least 1 ms.
            status.last_detect_ms = t
                .occurred
                .map_or(0, |o| ms(t.detected.saturating_duration_since(o)).max(1));
            status.last_recover_ms = t
                .full_width
                .map_or(0, |f| ms(f.saturating_duration_since(from)).max(1));
        }
        status
    }

    /// The summary of what ran so far.
    pub fn summary(&self, spec: &JobSpec) -> JobSummary {
        let mut stages = Vec::new();
        let mut totals = Totals::default();
        for (id, info) in &self.stages {
            let (attempts, recomputed) = self.sched.launch_counts(*id);
            totals.tasks += info.partitions as u64;
            totals.attempts += attempts;
            totals.recomputed += recomputed;
            totals.counters.add(&info.counters);
            stages.push(StageSummary {
                id: *id,
                step: info.step.clone(),
                description: info.description.clone(),
                shuffle: info.shuffle,
                tasks: info.partitions as u64,
                attempts,
                recomputed,
                counters: info.counters.clone(),
            });
        }
        let steps = spec
            .steps
            .iter()
            .filter_map(|step| {
                let own: Vec<&StageSummary> =
                    stages.iter().filter(|s| s.step == step.name).collect();
                (!own.is_empty()).then(|| StepSummary {
                    name: step.name.clone(),
                    cached: step.cache != kiln_api::CacheLevel::None,
                    stages: own.iter().map(|s| s.id).collect(),
                    tasks: own.iter().map(|s| s.tasks).sum(),
                    attempts: own.iter().map(|s| s.attempts).sum(),
                    iterations: self.iterations.get(&step.name).copied(),
                })
            })
            .collect();
        JobSummary {
            executors: self.registered.len() as u64,
            stages,
            totals,
            steps,
            recovery: self.recovery(),
            ..Default::default()
        }
    }

    /// Losses and what they cost.
    fn recovery(&self) -> RecoverySummary {
        let ms = |d: Duration| d.as_millis() as u64;
        let mut recovery = RecoverySummary {
            outputs_lost: self.sched.outputs_lost(),
            partitions_migrated: self.partitions_migrated(),
            driver_losses: self.driver_losses(),
            stages_resumed: self.stages_resumed(),
            ..Default::default()
        };
        for loss in self.sched.losses() {
            *recovery
                .executors_lost
                .entry(loss.reason.as_str().to_string())
                .or_default() += 1;
            let Some(t) = self
                .loss_timings
                .iter()
                .rev()
                .find(|t| t.executor == loss.executor)
            else {
                continue;
            };
            recovery.losses.push(LossSummary {
                executor: loss.executor.clone(),
                reason: loss.reason.as_str().to_string(),
                at_ms: ms(t.detected.saturating_duration_since(self.started)),
                outputs_lost: loss.outputs_lost,
                detection_ms: t
                    .occurred
                    .map(|o| ms(t.detected.saturating_duration_since(o))),
                full_width_ms: t
                    .full_width
                    .map(|f| ms(f.saturating_duration_since(t.occurred.unwrap_or(t.detected)))),
            });
        }
        recovery
    }
}
