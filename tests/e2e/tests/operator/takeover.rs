//! Scenario parts of the driver-loss test (`a_driver_lost_mid_job_is_replaced_by_one_that_resumes_it`):
//! a job whose driver pod is force-deleted, once or more, and one whose driver's node dies;
//! each checked for a replacement that took over the executors and resumed the job, and for
//! an output committed once.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::{EnvVar, Node, Pod};
use kiln_api::launch::ENV_FAULTS;
use kiln_api::rpc::JobStatusResponse;
use kiln_api::{ComputeJob, JobPhase};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;

use kiln_e2e::operator::{
    DriverAccess, RunningDriver, access, committed_once, create_job, csv_rows, driver_progress,
    force_delete_pod, job, job_events, running_driver, wait_finished,
};
use kiln_e2e::{
    PodWatch, agent_control, container_log_tail, node_capacity_types, node_ready, wait_for,
};

use super::{check_placement, dir, q3};

/// Partitions of the jobs that lose their driver: enough tasks per stage that a replacement
/// finds work left to do.
pub(crate) const TAKEOVER_PARTITIONS: u32 = 48;

/// Each task's pause (the executors' `task-delay` fault): the job's stages last long enough
/// on any machine for the test to kill a driver mid-job.
const TASK_DELAY_MS: u32 = 25;

/// TPC-H Q3 as job `name` writing to `out`, whose executors wait `patience` seconds for a
/// replacement driver; its pods log at debug level, for a failure's diagnosis.
fn takeover_job(data: &Path, name: &str, out: &Path, patience: u32) -> Result<ComputeJob> {
    let mut j = job(name, &q3(data, &dir(out), TAKEOVER_PARTITIONS))?;
    j.spec.failure_policy.heartbeat_timeout_seconds = patience;
    let debug: EnvVar =
        serde_json::from_value(json!({"name": "RUST_LOG", "value": "info,kiln_executor=debug"}))?;
    j.spec.driver.template.env.push(debug.clone());
    j.spec.executors.template.env.push(debug);
    let slow: EnvVar = serde_json::from_value(
        json!({"name": ENV_FAULTS, "value": format!("task-delay={TASK_DELAY_MS}")}),
    )?;
    j.spec.executors.template.env.push(slow);
    Ok(j)
}

/// Polls the driver at `driver` until its progress satisfies `ready`; fails at once if job
/// `name` finishes first (then it is too short for the test).
async fn progress_until(
    client: &Client,
    ns: &str,
    name: &str,
    driver: &RunningDriver,
    access: &DriverAccess,
    what: &str,
    ready: impl Fn(&JobStatusResponse) -> bool,
) -> Result<JobStatusResponse> {
    let jobs = &Api::<ComputeJob>::namespaced(client.clone(), ns);
    let ready = &ready;
    wait_for(
        &format!("{name}: {what}"),
        Duration::from_secs(120),
        || async move {
            if let Some(s) = jobs.get(name).await?.status
                && s.phase.is_finished()
            {
                return Ok(Some(Err(anyhow!(
                    "{name} finished ({:?}) before {what}: make the job longer",
                    s.phase
                ))));
            }
            let p = driver_progress(&driver.ip, access).await?;
            Ok(ready(&p).then_some(Ok(p)))
        },
    )
    .await?
}

/// The last lines of job `name`'s driver and executor logs, for a failure's diagnosis.
fn job_logs(ns: &str, name: &str) -> String {
    let mut logs = container_log_tail(ns, &format!("{name}-driver"), "driver", 30);
    for i in 0..4 {
        logs.push_str(&container_log_tail(
            ns,
            &format!("{name}-exec-{i}"),
            "executor",
            30,
        ));
    }
    logs
}

/// A job that lost its driver and succeeded: its output rows.
pub(crate) struct Resumed {
    pub(crate) name: String,
    pub(crate) rows: Vec<String>,
}

/// Waits for job `name`, which lost its driver `losses` times, to succeed, and checks that
/// each replacement took over the job's two executors and resumed it: the loss and what was
/// resumed are in the status, a `DriverResumed` event was recorded, no executor was lost or
/// replaced, and the output in `out` was committed once, as the job's.
async fn check_resumed(
    client: &Client,
    ns: &str,
    name: &str,
    out: &Path,
    losses: u32,
    watch: &PodWatch,
) -> Result<Resumed> {
    let done = wait_finished(
        client,
        ns,
        name,
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await?;
    let s = done.status.clone().unwrap_or_default();
    let result = s.result.clone().context("no result in the status")?;
    eprintln!(
        "{name}: driver {:?}, recovery {:?}, executors {:?}",
        s.driver, s.recovery, s.executors
    );
    ensure!(
        s.recovery.driver_losses == losses,
        "{name}: {} driver losses in the status, expected {losses}: {:?}\n{}",
        s.recovery.driver_losses,
        s.recovery,
        job_logs(ns, name)
    );
    ensure!(
        s.driver.restarts == s.recovery.driver_losses && s.driver.attempt == s.driver.restarts + 1,
        "{name}: each lost driver is replaced once: {:?} / {:?}\n{}",
        s.driver,
        s.recovery,
        job_logs(ns, name)
    );
    ensure!(
        s.recovery.stages_resumed >= 1,
        "{name}: no stage resumed, the replacement reran the job: {:?}",
        s.recovery
    );
    ensure!(
        s.executors.lost == 0,
        "{name}: executors were lost, not taken over: {:?}\n{}",
        s.executors,
        job_logs(ns, name)
    );
    let events = wait_for(
        &format!("{name}: a DriverResumed event"),
        Duration::from_secs(15),
        || async {
            let events = job_events(client, ns, name).await?;
            Ok(events
                .iter()
                .any(|(reason, _)| reason == "DriverResumed")
                .then_some(events))
        },
    )
    .await?;
    let resumed: Vec<&str> = events
        .iter()
        .filter(|(reason, _)| reason == "DriverResumed")
        .map(|(_, note)| note.as_str())
        .collect();
    ensure!(
        resumed.len() as u32 <= s.recovery.driver_losses,
        "{name}: more DriverResumed events than driver losses: {resumed:?}"
    );
    // The same two executors ran the job from start to end, on spot nodes; every driver
    // attempt ran on an on-demand node.
    let placements = watch.placements();
    check_placement(client, &placements).await?;
    let executors: Vec<&str> = placements
        .keys()
        .filter(|p| p.contains("-exec-"))
        .map(String::as_str)
        .collect();
    ensure!(
        executors == [format!("{name}-exec-0"), format!("{name}-exec-1")],
        "{name}: executor pods {executors:?}: the replacement drivers did not keep them"
    );
    // Written once: with every executor gone (so no late writer is left), the directory
    // holds exactly the part files `_SUCCESS` lists.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("kiln.dev/job={name},kiln.dev/role=executor");
    wait_for(
        &format!("{name}: executor pods gone"),
        Duration::from_secs(60),
        || async {
            let left = pods.list(&ListParams::default().labels(&selector)).await?;
            Ok(left.items.is_empty().then_some(()))
        },
    )
    .await?;
    let committed = committed_once(out).with_context(|| format!("output of {name}"))?;
    ensure!(
        Some(committed.job_uid.as_str()) == done.metadata.uid.as_deref(),
        "{name}: _SUCCESS names job {}, not this one ({:?})",
        committed.job_uid,
        done.metadata.uid
    );
    let rows = csv_rows(out)?;
    ensure!(
        rows.len() as u64 == committed.rows && committed.rows == result.rows,
        "{name}: {} rows in the files, {} in _SUCCESS, {} in the status",
        rows.len(),
        committed.rows,
        result.rows
    );
    Ok(Resumed {
        name: name.to_string(),
        rows,
    })
}

/// Job `name`, whose driver pod is force-deleted `kills` times: first once a stage is done,
/// then each time its replacement has made progress beyond where the last driver was lost.
pub(crate) async fn driver_deleted(
    client: &Client,
    ns: &str,
    data: &Path,
    work: &Path,
    name: &str,
    kills: u32,
) -> Result<Resumed> {
    let out = work.join(name);
    let watch = PodWatch::start(client, ns, &format!("kiln.dev/job={name}")).await?;
    create_job(client, ns, &takeover_job(data, name, &out, 20)?).await?;
    let mut driver = running_driver(client, ns, name, None, Duration::from_secs(90)).await?;
    let access = access(client, ns, name).await?;
    let mut at_kill = progress_until(client, ns, name, &driver, &access, "a stage done", |p| {
        p.stages_done >= 1 && p.stages_done < p.stages_total
    })
    .await?;
    for kill in 1..=kills {
        if kill > 1 {
            driver = running_driver(client, ns, name, Some(&driver.uid), Duration::from_secs(90))
                .await?;
            let before = at_kill.tasks_done;
            at_kill = progress_until(
                client,
                ns,
                name,
                &driver,
                &access,
                "progress of the replacement's own",
                |p| p.tasks_done > before && p.stages_done < p.stages_total,
            )
            .await?;
        }
        force_delete_pod(client, ns, &format!("{name}-driver")).await?;
        eprintln!(
            "{name}: driver pod {} force-deleted (loss {kill}) at {}/{} stages, {}/{} tasks",
            driver.uid,
            at_kill.stages_done,
            at_kill.stages_total,
            at_kill.tasks_done,
            at_kill.tasks_total
        );
    }
    check_resumed(client, ns, name, &out, kills, &watch).await
}

/// Job `name`, whose driver's node dies once a stage is done. The replacement needs an
/// on-demand node: when there is none to spare, the dead node comes back once the operator
/// has replaced the driver pod (the executors, on spot nodes, wait for it meanwhile).
pub(crate) async fn driver_node_killed(
    client: &Client,
    ns: &str,
    data: &Path,
    work: &Path,
    name: &str,
) -> Result<Resumed> {
    let out = work.join(name);
    let watch = PodWatch::start(client, ns, &format!("kiln.dev/job={name}")).await?;
    // The control plane takes ~10 s to see the node dead: the executors wait longer.
    create_job(client, ns, &takeover_job(data, name, &out, 60)?).await?;
    let driver = running_driver(client, ns, name, None, Duration::from_secs(90)).await?;
    let access = access(client, ns, name).await?;
    progress_until(client, ns, name, &driver, &access, "a stage done", |p| {
        p.stages_done >= 1 && p.stages_done < p.stages_total
    })
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut spare = false;
    for (node, capacity) in node_capacity_types(client).await? {
        if capacity == "on-demand" && node != driver.node {
            spare |= node_ready(&nodes.get(&node).await?).as_deref() == Some("True");
        }
    }
    let victim = driver.node.clone();
    agent_control("POST", &format!("/nodes/{victim}/kill")).await?;
    let killed_at = Instant::now();
    let restored = AtomicBool::new(false);
    let outcome = async {
        if !spare {
            let jobs = Api::<ComputeJob>::namespaced(client.clone(), ns);
            wait_for(
                &format!("{name}: the driver pod replaced"),
                Duration::from_secs(90),
                || async {
                    let s = jobs.get(name).await?.status.unwrap_or_default();
                    Ok((s.recovery.driver_losses >= 1).then_some(()))
                },
            )
            .await?;
            agent_control("POST", &format!("/nodes/{victim}/restore")).await?;
            restored.store(true, Ordering::SeqCst);
        }
        let resumed = check_resumed(client, ns, name, &out, 1, &watch).await?;
        eprintln!(
            "{name}: killed {victim} (a spare on-demand node: {spare}); the job finished {:?} later",
            killed_at.elapsed()
        );
        Ok(resumed)
    }
    .await;
    if !restored.load(Ordering::SeqCst) {
        agent_control("POST", &format!("/nodes/{victim}/restore")).await?;
    }
    wait_for("node Ready again", Duration::from_secs(60), || async {
        Ok((node_ready(&nodes.get(&victim).await?).as_deref() == Some("True")).then_some(()))
    })
    .await?;
    outcome
}
