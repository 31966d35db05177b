//! A lost driver: its replacement takes over the executors still running, and the blocks
//! they hold, instead of rerunning the job; and what each replacement reports it resumed.
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kiln_api::crd::{CONDITION_PROGRESSING, ROLE_EXECUTOR};
use kiln_api::{FailureReason, JobPhase};

use super::{Outlook, Run};
use crate::children::{driver_name, executor_index};
use crate::pods::{Takeover, executor_address};
use crate::podstate;

/// What becomes of an executor pod when its driver is lost.
#[derive(Debug, PartialEq, Eq)]
enum Handover {
    /// It runs: the replacement driver attaches to it at this block-service address.
    Attach(String),
    /// It has not started (it would dial the lost driver): deleted, and replaced by a pod
    /// that dials the new driver once that runs. No loss.
    Restart,
    /// Failed, going or on a lost node: left to the executor bookkeeping, which counts the
    /// loss and replaces it once the new driver runs.
    Lose,
}

impl Run<'_, '_> {
    fn handover(&self, pod: &Pod) -> Handover {
        if podstate::is_terminal(pod)
            || podstate::is_deleting(pod)
            || podstate::is_disrupted(pod)
            || podstate::terminated(pod).is_some()
            || self.node_lost(pod)
        {
            return Handover::Lose;
        }
        match podstate::ip(pod) {
            Some(ip) if podstate::phase(pod) == "Running" => Handover::Attach(executor_address(ip)),
            _ => Handover::Restart,
        }
    }

    /// Hands the job's executor pods over to the next driver: the addresses of those that
    /// run, sorted by executor number; the ones that have not started are deleted and no
    /// longer tracked; the rest stay tracked, so that their losses are counted and replaced
    /// as usual once the new driver runs.
    fn takeover(&mut self) -> Takeover {
        let job = self.name();
        let mut pods: Vec<(u32, Pod)> = self
            .pods_of(ROLE_EXECUTOR)
            .filter_map(|p| Some((executor_index(&job, podstate::name(p))?, p.clone())))
            .collect();
        pods.sort_by_key(|(i, _)| *i);
        let mut tracked = self.status.executors.pods.clone();
        let mut next = self.status.executors.next_index;
        let mut attach = Vec::new();
        for (i, pod) in &pods {
            let name = podstate::name(pod).to_string();
            let known = tracked.contains(&name);
            // Created before a status write that was lost (see `executors`).
            let adoptable = !known && *i >= self.status.executors.next_index;
            if !known && !adoptable {
                // A pod already given up on, on its way out.
                continue;
            }
            match self.handover(pod) {
                Handover::Attach(address) => {
                    attach.push(address);
                    if adoptable {
                        tracked.push(name);
                        next = next.max(i + 1);
                    }
                }
                Handover::Restart => {
                    self.delete(pod, false);
                    tracked.retain(|n| *n != name);
                }
                Handover::Lose => {}
            }
        }
        let e = &mut self.status.executors;
        e.pods = tracked;
        e.next_index = next;
        e.running = attach.len() as u32;
        Takeover {
            attach,
            stages_resumed_before: self.status.recovery.stages_resumed,
        }
    }

    /// Keeps the count of running executors current while no driver runs (a replacement
    /// starts): they wait for it, and are not touched meanwhile.
    pub(super) fn hold_executors(&mut self) {
        let running = self
            .status
            .executors
            .pods
            .iter()
            .filter_map(|name| self.obs.pods.iter().find(|p| podstate::name(p) == name))
            .filter(|p| podstate::is_running(p) && !self.node_lost(p))
            .count();
        self.status.executors.running = running as u32;
    }

    /// The driver pod vanished while the job ran: a replacement takes over its executors,
    /// within the restart budget.
    pub(super) fn driver_gone(&mut self) {
        let name = driver_name(&self.name());
        let max = self.config().max_driver_restarts;
        self.status.recovery.driver_losses += 1;
        if self.status.driver.restarts >= max {
            self.fail(
                FailureReason::DriverLost,
                format!(
                    "the driver pod was lost {} times (at most {max} restarts)",
                    self.status.driver.restarts + 1,
                ),
            );
            return;
        }
        // Unless it was seen lost before it went, this is the first word of the loss.
        let seen = self
            .old
            .condition(CONDITION_PROGRESSING)
            .is_some_and(|c| c.reason == "DriverLost");
        if !seen {
            self.event(
                true,
                "DriverLost",
                format!("driver pod {name} lost: the pod is gone"),
            );
        }
        let takeover = self.takeover();
        self.status.driver.restarts += 1;
        let attempt = self.status.driver.attempt + 1;
        let handed = match takeover.attach.len() {
            0 => "no executor is left to take over, so it starts the job over".to_string(),
            n => format!(
                "it takes over {n} running executor{} and the blocks {} hold{}",
                if n == 1 { "" } else { "s" },
                if n == 1 { "it" } else { "they" },
                if n == 1 { "s" } else { "" },
            ),
        };
        self.event(
            true,
            "DriverRestarted",
            format!(
                "driver pod {name} recreated as attempt {attempt} (restart {} of at most {max}); {handed}",
                self.status.driver.restarts,
            ),
        );
        self.start_driver(Some(takeover));
    }

    /// The driver pod is lost but still there: clear the way for its replacement, leaving
    /// the executors running for it to take over.
    pub(super) fn driver_lost(&mut self, pod: &Pod, detail: String, node_lost: bool) {
        let name = podstate::name(pod).to_string();
        if self.status.driver.restarts >= self.config().max_driver_restarts {
            self.status.recovery.driver_losses += 1;
            self.fail(
                FailureReason::DriverLost,
                format!(
                    "driver pod {name} was lost ({detail}) after {} restarts",
                    self.status.driver.restarts
                ),
            );
            return;
        }
        let first_sight = self
            .old
            .condition(CONDITION_PROGRESSING)
            .is_none_or(|c| c.reason != "DriverLost");
        if first_sight {
            self.event(
                true,
                "DriverLost",
                format!("driver pod {name} lost: {detail}"),
            );
        }
        self.delete(pod, node_lost);
        self.hold_executors();
        self.status.phase = JobPhase::Pending;
        self.state = Some(Outlook::Pending {
            reason: "DriverLost",
            message: format!(
                "driver pod {name} lost ({detail}); once it is gone, a replacement takes over its executors"
            ),
        });
        self.requeue(Duration::from_secs(1));
    }

    /// What the driver `pod` reports it resumed (`reported`, over all driver losses so far):
    /// the job's count never goes backwards, and the first report of a replacement above the
    /// count it started from is an event, once per driver attempt.
    pub(super) fn resumed(&mut self, pod: &Pod, reported: u64) {
        let had = self.status.recovery.stages_resumed;
        self.status.recovery.stages_resumed = had.max(reported);
        let Some((attached, before)) = Takeover::recorded(pod) else {
            return;
        };
        if had <= before && reported > before {
            let attempt = self.status.driver.attempt;
            let stages = reported - before;
            self.event(
                false,
                "DriverResumed",
                format!(
                    "driver attempt {attempt} took over {attached} executor{} and resumed {stages} stage{} without rerunning {}",
                    if attached == 1 { "" } else { "s" },
                    if stages == 1 { "" } else { "s" },
                    if stages == 1 { "it" } else { "them" },
                ),
            );
        }
    }
}
