//! Decommissioning: an executor given notice (SIGTERM, an eviction, a disruption taint on
//! its node) takes no more tasks, and the outputs only it holds that are still needed are
//! listed, most urgent first, for the driver to have other executors copy. Each copy that arrives moves the
//! output's location; what does not arrive before the executor leaves is recomputed from
//! lineage like any lost output.
//!
//! The attempts it was running carry on while it drains (they are *continuing*), for as
//! long as the driver lets them (see `core_drain`): a task caught by a notice late in its
//! run then costs nothing, where a restart elsewhere would cost its whole length, and no
//! task runs twice. When time is up (or the executor goes first), they go back to pending
//! counting as no failure, and the executor is told to stop them; one that fails meanwhile
//! counts as no failure either.
use super::{Scheduler, StageStatus, TaskId, TaskState};

impl Scheduler {
    /// Gives `executor` notice. Returns `None` for an executor that is not live; else the
    /// outputs still needed that live only there, most urgent first: those a runnable stage
    /// reads now, then those of stages still waiting for other inputs, then results and
    /// cached datasets kept for later.
    pub fn decommission(&mut self, executor: &str) -> Option<Vec<TaskId>> {
        self.executors.get_mut(executor)?.draining = true;
        Some(self.outputs_only_on(executor))
    }

    /// Attempts still running on draining `executor`.
    pub fn continuing_on(&self, executor: &str) -> usize {
        self.executors.get(executor).map_or(0, |e| e.running.len())
    }

    /// Stops waiting for draining `executor`'s running attempts (its time is up): their
    /// tasks go back to pending, counting as no failure, and the executor is to stop them.
    pub fn abandon_continuing(&mut self, executor: &str) {
        let Some(info) = self.executors.get_mut(executor) else {
            return;
        };
        for task in std::mem::take(&mut info.running) {
            let Some(s) = self.stages.get_mut(&task.stage) else {
                continue;
            };
            let p = task.partition as usize;
            if let TaskState::Running { attempt, .. } = s.tasks[p] {
                self.cancels
                    .entry(executor.to_string())
                    .or_default()
                    .push((task, attempt));
            }
            s.tasks[p] = TaskState::Pending;
        }
    }

    /// Attempts `executor` is to stop, handed over with its poll.
    pub fn take_cancels(&mut self, executor: &str) -> Vec<(TaskId, u32)> {
        self.cancels.remove(executor).unwrap_or_default()
    }

    /// Whether `task`'s output is still needed where it lives now (not in a sink's files,
    /// nor of a stage released or no longer needed): worth moving off a draining executor.
    pub fn worth_moving(&self, task: TaskId) -> bool {
        self.stages
            .get(&task.stage)
            .is_some_and(|s| !s.durable && !s.released && self.needed(task.stage))
    }

    /// Whether `executor` was given notice.
    pub fn is_draining(&self, executor: &str) -> bool {
        self.executors.get(executor).is_some_and(|e| e.draining)
    }

    /// The block-service address of a live executor.
    pub fn address(&self, executor: &str) -> Option<&str> {
        self.executors.get(executor).map(|e| e.address.as_str())
    }

    /// The outputs still needed that live on `executor`, most urgent first.
    pub fn outputs_only_on(&self, executor: &str) -> Vec<TaskId> {
        let mut out: Vec<(u8, TaskId)> = Vec::new();
        for (sid, s) in &self.stages {
            if s.durable || s.released || !self.needed(*sid) {
                continue;
            }
            let consumers = self.stages.values().filter(|c| {
                !c.released && c.inputs.contains(sid) && c.status != StageStatus::Succeeded
            });
            let urgency = consumers
                .map(|c| match c.status {
                    StageStatus::Resolved | StageStatus::Running => 0,
                    _ => 1,
                })
                .min()
                .unwrap_or(2);
            for (p, t) in s.tasks.iter().enumerate() {
                if matches!(t, TaskState::Done { executor: e } if e == executor) {
                    let task = TaskId {
                        stage: *sid,
                        partition: p as u32,
                    };
                    out.push((urgency, task));
                }
            }
        }
        out.sort();
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// A copy of `task`'s output arrived on `to` from `from`: it lives on `to` now. Stages
    /// reading it are re-resolved (their plans name the new location). Returns false when
    /// the output no longer lives on `from` (recomputed or released meanwhile) or `to` is
    /// not live: the copy is not used.
    pub fn move_output(&mut self, task: TaskId, from: &str, to: &str) -> bool {
        if !self.executors.contains_key(to) {
            return false;
        }
        let Some(s) = self.stages.get_mut(&task.stage) else {
            return false;
        };
        let Some(t) = s.tasks.get_mut(task.partition as usize) else {
            return false;
        };
        if s.released || !matches!(t, TaskState::Done { executor } if executor == from) {
            return false;
        }
        *t = TaskState::Done {
            executor: to.to_string(),
        };
        for c in self.stages.values_mut() {
            if c.inputs.contains(&task.stage) && c.status != StageStatus::Succeeded {
                c.epoch += 1;
            }
        }
        true
    }

    /// Attempts running now of stages that read any of `inputs`: tasks whose plans may
    /// still name an output's old location.
    pub fn running_readers(&self, inputs: &std::collections::BTreeSet<u32>) -> Vec<(TaskId, u32)> {
        self.stages
            .iter()
            .filter(|(_, s)| s.inputs.iter().any(|i| inputs.contains(i)))
            .flat_map(|(sid, s)| {
                s.tasks
                    .iter()
                    .enumerate()
                    .filter_map(move |(p, t)| match t {
                        TaskState::Running { attempt, .. } => Some((
                            TaskId {
                                stage: *sid,
                                partition: p as u32,
                            },
                            *attempt,
                        )),
                        _ => None,
                    })
            })
            .collect()
    }

    /// Whether attempt `attempt` of `task` is running.
    pub fn is_running(&self, task: TaskId, attempt: u32) -> bool {
        self.stages
            .get(&task.stage)
            .and_then(|s| s.tasks.get(task.partition as usize))
            .is_some_and(|t| matches!(t, TaskState::Running { attempt: a, .. } if *a == attempt))
    }
}
