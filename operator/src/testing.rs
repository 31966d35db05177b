//! Test fixtures: jobs and pods in the states the reconciler meets.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kiln_api::{ComputeJob, JobSpec};

/// A valid job `name` in namespace `ns`.
pub fn job(name: &str) -> ComputeJob {
    let spec: JobSpec = kiln_api::parse_job(
        r#"
executors: {count: 2, cpu: 500m, memory: 512Mi}
shufflePartitions: 4
inputs: [{name: lines, format: text, uri: /data/corpus/}]
steps:
  - {name: counts, sql: "SELECT line, count(*) AS n FROM lines GROUP BY line"}
output: {uri: /data/out/, format: csv}
"#,
    )
    .expect("a valid spec");
    let mut job = ComputeJob::new(name, spec);
    job.metadata.namespace = Some("ns".into());
    job.metadata.uid = Some(format!("uid-{name}"));
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("1".into());
    job
}

/// Time `secs` seconds after the test epoch.
pub fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).unwrap()
}

fn status(pod: &mut Pod) -> &mut PodStatus {
    pod.status.get_or_insert_with(PodStatus::default)
}

/// `pod` scheduled on `node`, created at `created`.
pub fn scheduled(mut pod: Pod, node: &str, created: i64) -> Pod {
    pod.spec.as_mut().unwrap().node_name = Some(node.into());
    pod.metadata.creation_timestamp = Some(Time(at(created)));
    status(&mut pod).phase = Some("Pending".into());
    pod
}

/// `pod` running and ready with IP `ip`.
pub fn running(mut pod: Pod, ip: &str) -> Pod {
    let s = status(&mut pod);
    s.phase = Some("Running".into());
    s.pod_ip = Some(ip.into());
    s.conditions = Some(vec![PodCondition {
        type_: "Ready".into(),
        status: "True".into(),
        ..Default::default()
    }]);
    s.container_statuses = Some(vec![ContainerStatus {
        name: "c".into(),
        ready: true,
        state: Some(ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

/// `pod` whose container ended with `code` after running from `start` to `end`, with
/// termination message `message`.
pub fn exited(mut pod: Pod, code: i32, message: Option<&str>, start: i64, end: i64) -> Pod {
    let s = status(&mut pod);
    s.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
    s.container_statuses = Some(vec![ContainerStatus {
        name: "c".into(),
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                message: message.map(Into::into),
                started_at: Some(Time(at(start))),
                finished_at: Some(Time(at(end))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

/// `pod` marked for disruption and being deleted (taint-based eviction).
pub fn evicted(mut pod: Pod, when: i64) -> Pod {
    pod.metadata.deletion_timestamp = Some(Time(at(when)));
    let s = status(&mut pod);
    let mut conditions = s.conditions.clone().unwrap_or_default();
    conditions.push(PodCondition {
        type_: "DisruptionTarget".into(),
        status: "True".into(),
        reason: Some("DeletionByTaintManager".into()),
        ..Default::default()
    });
    s.conditions = Some(conditions);
    pod
}

/// `pod` waiting on an image it cannot pull.
pub fn image_pull_failing(mut pod: Pod) -> Pod {
    status(&mut pod).container_statuses = Some(vec![ContainerStatus {
        name: "c".into(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ErrImagePull".into()),
                message: Some("no such image".into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

/// Labels of a pod, for assertions.
pub fn labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.labels.clone().unwrap_or_default()
}
