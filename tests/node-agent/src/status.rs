//! Pure builders of pod status: what the agent knows about a pod's containers
//! in, a `PodStatus` to patch out.

use k8s_openapi::api::core::v1::{
    ContainerState as KContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Pod phase, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// How a container's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub container_id: Option<String>,
}

impl Terminated {
    /// From a wait status: a process killed by signal `s` reports `128 + s`,
    /// as container runtimes do.
    pub fn from_exit(
        code: Option<i32>,
        signal: Option<i32>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
        message: Option<String>,
        container_id: Option<String>,
    ) -> Self {
        let exit_code = match (code, signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        };
        let reason = if exit_code == 0 { "Completed" } else { "Error" };
        Self {
            exit_code,
            signal,
            reason: reason.into(),
            message,
            started_at,
            finished_at,
            container_id,
        }
    }
}

/// One container's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
        container_id: String,
    },
    Terminated(Terminated),
}

/// What the agent knows about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRuntime {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_state: Option<Terminated>,
    pub restart_count: i32,
}

impl ContainerRuntime {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_state: None,
            restart_count: 0,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }
}

/// The phase of a pod whose containers are in these states. `restarting`
/// says whether some terminated container is going to be started again.
pub fn phase(containers: &[ContainerRuntime], started: bool, restarting: bool) -> Phase {
    if !started {
        return Phase::Pending;
    }
    let all_terminated = containers
        .iter()
        .all(|c| matches!(c.state, State::Terminated(_)));
    if !all_terminated || restarting {
        return Phase::Running;
    }
    let all_ok = containers
        .iter()
        .all(|c| matches!(&c.state, State::Terminated(t) if t.exit_code == 0));
    if all_ok {
        Phase::Succeeded
    } else {
        Phase::Failed
    }
}

/// Whether a container that ended with `exit_code` is restarted under `policy`.
pub fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn terminated(t: &Terminated) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        signal: t.signal,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: t.started_at.map(time),
        finished_at: Some(time(t.finished_at)),
        container_id: t.container_id.clone(),
    }
}

fn container_status(c: &ContainerRuntime) -> ContainerStatus {
    let (state, container_id, started) = match &c.state {
        State::Waiting { reason, message } => (
            KContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            None,
            false,
        ),
        State::Running {
            started_at,
            container_id,
        } => (
            KContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started_at)),
                }),
                ..Default::default()
            },
            Some(container_id.clone()),
            true,
        ),
        State::Terminated(t) => (
            KContainerState {
                terminated: Some(terminated(t)),
                ..Default::default()
            },
            t.container_id.clone(),
            false,
        ),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("kiln-node-agent://{}", c.image),
        container_id,
        ready: c.is_running(),
        started: Some(started),
        restart_count: c.restart_count,
        state: Some(state),
        last_state: c.last_state.as_ref().map(|t| KContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds a condition, keeping the previous transition time when its status
/// did not change.
fn condition(
    previous: Option<&PodStatus>,
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let last = previous
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone());
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        last_transition_time: Some(last.unwrap_or(time(now))),
        ..Default::default()
    }
}

/// Everything that goes into one status patch.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub phase: Phase,
    pub host_ip: &'a str,
    pub pod_ip: Option<String>,
    pub start_time: Timestamp,
    pub network_ready: bool,
    pub containers: &'a [ContainerRuntime],
}

/// The status the agent reports for a pod. Conditions are the kubelet's
/// (PodReadyToStartContainers, Initialized, ContainersReady, Ready); a
/// strategic-merge patch keyed by type leaves other conditions (PodScheduled,
/// DisruptionTarget) alone.
pub fn pod_status(view: &PodView<'_>, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let all_running = !view.containers.is_empty() && view.containers.iter().all(|c| c.is_running());
    let ready = all_running && view.phase == Phase::Running;
    let not_ready_reason = match view.phase {
        Phase::Succeeded | Phase::Failed => Some("PodCompleted"),
        _ if !ready => Some("ContainersNotReady"),
        _ => None,
    };
    let conditions = vec![
        condition(
            previous,
            "PodReadyToStartContainers",
            view.network_ready,
            None,
            now,
        ),
        condition(previous, "Initialized", true, None, now),
        condition(previous, "ContainersReady", ready, not_ready_reason, now),
        condition(previous, "Ready", ready, not_ready_reason, now),
    ];
    PodStatus {
        phase: Some(view.phase.as_str().into()),
        host_ip: Some(view.host_ip.into()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.into(),
        }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: Some(time(view.start_time)),
        conditions: Some(conditions),
        container_statuses: Some(view.containers.iter().map(container_status).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn term(code: i32) -> State {
        State::Terminated(Terminated::from_exit(
            Some(code),
            None,
            None,
            ts(2),
            None,
            None,
        ))
    }

    fn with_state(state: State) -> ContainerRuntime {
        ContainerRuntime {
            state,
            ..ContainerRuntime::new("c", "python:3")
        }
    }

    #[test]
    fn exit_codes_from_signals() {
        let t = Terminated::from_exit(None, Some(9), None, ts(1), None, None);
        assert_eq!(t.exit_code, 137);
        assert_eq!(t.reason, "Error");
        let t = Terminated::from_exit(Some(0), None, None, ts(1), None, None);
        assert_eq!(t.reason, "Completed");
    }

    #[test]
    fn phases() {
        let running = with_state(State::Running {
            started_at: ts(1),
            container_id: "x".into(),
        });
        assert_eq!(
            phase(std::slice::from_ref(&running), false, false),
            Phase::Pending
        );
        assert_eq!(
            phase(&[running.clone(), with_state(term(0))], true, false),
            Phase::Running
        );
        assert_eq!(phase(&[with_state(term(0))], true, false), Phase::Succeeded);
        assert_eq!(
            phase(&[with_state(term(0)), with_state(term(3))], true, false),
            Phase::Failed
        );
        assert_eq!(phase(&[with_state(term(3))], true, true), Phase::Running);
    }

    #[test]
    fn restart_policy() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("OnFailure", 1));
        assert!(!should_restart("OnFailure", 0));
        assert!(!should_restart("Never", 1));
    }

    #[test]
    fn status_of_running_pod() {
        let cs = [with_state(State::Running {
            started_at: ts(5),
            container_id: "kiln://n/42".into(),
        })];
        let view = PodView {
            phase: Phase::Running,
            host_ip: "10.244.1.1",
            pod_ip: Some("10.244.1.2".into()),
            start_time: ts(4),
            network_ready: true,
            containers: &cs,
        };
        let s = pod_status(&view, None, ts(6));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "10.244.1.2");
        let conds = s.conditions.clone().unwrap();
        let ready = conds.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        let st = &s.container_statuses.as_ref().unwrap()[0];
        assert!(st.ready);
        assert_eq!(st.container_id.as_deref(), Some("kiln://n/42"));

        // Same status later: transition times are kept.
        let again = pod_status(&view, Some(&s), ts(60));
        assert_eq!(again.conditions, s.conditions);
    }

    #[test]
    fn status_of_failed_pod_carries_exit_code_and_message() {
        let mut t =
            Terminated::from_exit(Some(3), None, Some(ts(1)), ts(2), Some("boom".into()), None);
        t.reason = "Error".into();
        let cs = [ContainerRuntime {
            restart_count: 2,
            ..with_state(State::Terminated(t))
        }];
        let view = PodView {
            phase: Phase::Failed,
            host_ip: "10.244.1.1",
            pod_ip: None,
            start_time: ts(0),
            network_ready: false,
            containers: &cs,
        };
        let s = pod_status(&view, None, ts(3));
        let st = &s.container_statuses.unwrap()[0];
        let term = st.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(term.exit_code, 3);
        assert_eq!(term.message.as_deref(), Some("boom"));
        assert_eq!(st.restart_count, 2);
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.reason.as_deref(), Some("PodCompleted"));
    }
}
