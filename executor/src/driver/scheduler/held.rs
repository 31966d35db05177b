//! What executors hold: the attempts each says it runs (reconciled with what the scheduler
//! gave it, for assignments and reports lost on the wire), outputs a replacement driver
//! adopts from the executors it takes over, and the outputs still needed on each.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{ExecutorId, Scheduler, SchedulerEvent, StageStatus, TaskId, TaskState};

impl Scheduler {
    /// Reconciles what the driver thinks `executor` runs with the attempts it says it holds
    /// (running, or finished with the report not yet acknowledged): an attempt the executor
    /// does not know (its assignment or its report was lost on the wire) goes back to
    /// pending without counting as a failure. Returns the tasks put back.
    pub fn reconcile(&mut self, executor: &str, known: &BTreeSet<(TaskId, u32)>) -> Vec<TaskId> {
        let Some(info) = self.executors.get(executor) else {
            return Vec::new();
        };
        let forgotten: Vec<TaskId> = info
            .running
            .iter()
            .filter(|t| {
                let attempt = match self
                    .stages
                    .get(&t.stage)
                    .map(|s| &s.tasks[t.partition as usize])
                {
                    Some(TaskState::Running { attempt, .. }) => *attempt,
                    _ => return false,
                };
                !known.contains(&(**t, attempt))
            })
            .copied()
            .collect();
        for t in &forgotten {
            self.executors
                .get_mut(executor)
                .expect("checked above")
                .running
                .remove(t);
            if let Some(s) = self.stages.get_mut(&t.stage) {
                s.tasks[t.partition as usize] = TaskState::Pending;
            }
        }
        forgotten
    }

    /// Takes partition `partition` of `stage` as done by `executor` without running it: an
    /// output an earlier driver left (blocks `executor` holds, or committed files). Returns
    /// `None` unless the partition was pending; else the events it caused.
    pub fn adopt(
        &mut self,
        stage: u32,
        partition: u32,
        executor: &str,
    ) -> Option<Vec<SchedulerEvent>> {
        let s = self.stages.get_mut(&stage)?;
        let p = partition as usize;
        if s.tasks.get(p)? != &TaskState::Pending {
            return None;
        }
        s.tasks[p] = TaskState::Done {
            executor: executor.to_string(),
        };
        let mut events = Vec::new();
        if s.tasks.iter().all(|t| matches!(t, TaskState::Done { .. })) {
            s.status = StageStatus::Succeeded;
            events.push(SchedulerEvent::StageSucceeded(stage));
            events.extend(self.refresh());
        }
        Some(events)
    }

    /// How many outputs still needed each live executor holds (0 for one holding none).
    pub fn needed_outputs_by_executor(&self) -> BTreeMap<ExecutorId, usize> {
        let mut held: BTreeMap<ExecutorId, usize> =
            self.executors.keys().map(|e| (e.clone(), 0)).collect();
        for (id, s) in &self.stages {
            if s.released || !self.needed(*id) {
                continue;
            }
            for t in &s.tasks {
                if let TaskState::Done { executor } = t
                    && let Some(n) = held.get_mut(executor)
                {
                    *n += 1;
                }
            }
        }
        held
    }

    /// Outputs of each live executor, for tests and diagnostics: `stage -> partitions`.
    pub fn outputs_on(&self, executor: &str) -> HashMap<u32, Vec<u32>> {
        let mut out: HashMap<u32, Vec<u32>> = HashMap::new();
        for (sid, s) in &self.stages {
            for (p, t) in s.tasks.iter().enumerate() {
                if matches!(t, TaskState::Done { executor: e } if e == executor) {
                    out.entry(*sid).or_default().push(p as u32);
                }
            }
        }
        out
    }
}
