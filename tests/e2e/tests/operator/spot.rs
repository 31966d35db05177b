//! Spot capacity on the test cluster: executors on a node `kubectl drain`ed and one on a
//! node given a disruption taint move their blocks to other executors and cost the job no
//! budget; with
//! the spot nodes cordoned, executors fall back to on-demand nodes; a request no node can
//! hold fails the job at once, naming the field.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use kiln_api::crd::CONDITION_SPOT_FALLBACK;
use kiln_api::launch::ENV_FAULTS;
use kiln_api::{ComputeJob, FailureReason, JobPhase, SpotFallback};
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

use kiln_e2e::operator::{
    Operator, apply_crds, create_job, csv_rows, job, run_locally, scratch, wait_finished,
};
use kiln_e2e::{TestNamespace, client, kubectl, serial, wait_for};

use super::{CONFIG, dir, few_iterations_done, pagerank, run_to_end, wordcount};

/// Each task's pause in the fallback job: its tasks outlast the seconds between one
/// executor pod's fallback and the next.
const FALLBACK_TASK_DELAY_MS: u32 = 1000;

/// The taint Karpenter puts on a node it is about to take away.
const DISRUPTED: &str = "karpenter.sh/disrupted";

/// The node an executor pod runs on.
async fn node_of(pods: &Api<Pod>, name: &str) -> Result<String> {
    pods.get(name)
        .await?
        .spec
        .and_then(|s| s.node_name)
        .with_context(|| format!("{name} has no node"))
}

async fn status_of(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<kiln_api::ComputeJobStatus> {
    Ok(Api::<ComputeJob>::namespaced(client.clone(), ns)
        .get(name)
        .await?
        .status
        .unwrap_or_default())
}

#[tokio::test]
async fn executors_given_notice_move_their_blocks_and_cost_no_budget() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-drain").await?;
    let op = Operator::start("op-drain", "kiln-e2e-drain", 18188, CONFIG).await?;
    let work = scratch(&ns.name)?;
    const ITERATIONS: u32 = 200;
    let spec = pagerank(&dir(&work.join("out")), ITERATIONS)?;
    let mut drain = job("drain", &spec)?;
    // Not one loss of the job's own making is allowed: notice must cost nothing.
    drain.spec.failure_policy.max_executor_losses = 0;
    create_job(&client, &ns.name, &drain).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    few_iterations_done(&client, &ns.name, "drain").await?;

    // `kubectl drain` of the spot node of the first executor, with GCP's 30 s of notice:
    // every executor pod there is evicted (its blocks move), and it waits for them to go.
    let first = node_of(&pods, "drain-exec-0").await?;
    let drained_at = Instant::now();
    let drained = kubectl(&[
        "drain",
        &first,
        "--grace-period",
        "30",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout",
        "120s",
    ])
    .await;
    // The node comes back for the replacements either way.
    kubectl(&["uncordon", &first]).await?;
    drained.context("kubectl drain")?;
    eprintln!("kubectl drain of {first} took {:?}", drained_at.elapsed());
    wait_for("drain-exec-0 drained", Duration::from_secs(90), || async {
        let s = status_of(&client, &ns.name, "drain").await?;
        ensure!(
            !s.phase.is_finished(),
            "the job ended before the drain: {s:?}"
        );
        Ok(s.executors
            .lost_by_reason
            .contains_key("Drained")
            .then_some(()))
    })
    .await?;

    // A disruption taint on the node of an executor still running on the other node.
    let victim = wait_for(
        "an executor off the drained node",
        Duration::from_secs(60),
        || async {
            let on_other = pods
                .list(&ListParams::default().labels("kiln.dev/job=drain,kiln.dev/role=executor"))
                .await?
                .items
                .into_iter()
                .filter(|p| kiln_e2e::pod_ready(p) && p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.spec?.node_name)
                .find(|n| *n != first);
            Ok(on_other)
        },
    )
    .await?;
    kubectl(&[
        "taint",
        "nodes",
        &victim,
        &format!("{DISRUPTED}=:NoSchedule"),
    ])
    .await?;
    let outcome = async {
        let done = run_to_end(&client, &ns.name, "drain", JobPhase::Succeeded)
            .await
            .with_context(|| op.logs())?;
        let s = done.status.clone().unwrap_or_default();
        let result = s.result.clone().context("no result")?;
        eprintln!(
            "status executors {:?}, recovery {:?}, result lost {:?}, migrated {}, recomputed {}",
            s.executors,
            s.recovery,
            result.executors_lost,
            result.partitions_migrated,
            result.partitions_recomputed
        );
        let drained = s
            .executors
            .lost_by_reason
            .get("Drained")
            .copied()
            .unwrap_or(0);
        ensure!(drained >= 2, "not both drained: {:?}", s.executors);
        // Nearly everything moved; how long the job ran short is known.
        ensure!(
            result.partitions_recomputed * 10 <= result.partitions_migrated,
            "recomputed {} against {} migrated",
            result.partitions_recomputed,
            result.partitions_migrated
        );
        ensure!(
            s.recovery.last_recover_ms.is_some(),
            "no time to recover from the drains: {:?}",
            s.recovery
        );
        ensure!(
            result.partitions_migrated > 0 && s.recovery.partitions_migrated > 0,
            "no block moved: {result:?}"
        );
        for counted in ["Failed", "OOMKilled", "HeartbeatTimeout"] {
            ensure!(
                !s.executors.lost_by_reason.contains_key(counted),
                "a {counted} loss: {:?}",
                s.executors
            );
        }
        let rows = csv_rows(&work.join("out"))?;
        let local = run_locally(
            &pagerank(&dir(&work.join("local")), ITERATIONS)?,
            &work.join("local"),
        )
        .await?;
        ensure!(
            rows == local,
            "output after the drains differs from the no-failure run"
        );
        Ok(())
    }
    .await;
    kubectl(&[
        "taint",
        "nodes",
        &victim,
        &format!("{DISRUPTED}:NoSchedule-"),
    ])
    .await?;
    op.stop().await?;
    outcome
}

#[tokio::test]
async fn without_spot_capacity_executors_fall_back_and_impossible_requests_fail_at_once()
-> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-fallback").await?;
    let op = Operator::start("op-fallback", "kiln-e2e-fallback", 18189, CONFIG).await?;
    let work = scratch(&ns.name)?;
    let spot_nodes: Vec<String> = kiln_e2e::node_capacity_types(&client)
        .await?
        .into_iter()
        .filter(|(_, t)| t == "spot")
        .map(|(n, _)| n)
        .collect();
    ensure!(!spot_nodes.is_empty(), "the test cluster has no spot node");
    for n in &spot_nodes {
        kubectl(&["cordon", n]).await?;
    }
    let outcome = async {
        let mut fallback = job("fallback", &wordcount(&dir(&work.join("out"))))?;
        fallback.spec.executors.spot_fallback = Some(SpotFallback { after_seconds: 3 });
        // Each executor pod reaches its deadline on its own (the scheduler marks them
        // unschedulable moments apart): the job's tasks pause so that it cannot finish on
        // the first replacement before the second pod's deadline comes.
        let slow: EnvVar = serde_json::from_value(
            json!({"name": ENV_FAULTS, "value": format!("task-delay={FALLBACK_TASK_DELAY_MS}")}),
        )?;
        fallback.spec.executors.template.env.push(slow);
        create_job(&client, &ns.name, &fallback).await?;
        let mut huge = job("huge", &wordcount(&dir(&work.join("huge"))))?;
        huge.spec.executors.memory = "1Ti".into();
        let asked = Instant::now();
        create_job(&client, &ns.name, &huge).await?;

        let failed = wait_finished(
            &client,
            &ns.name,
            "huge",
            JobPhase::Failed,
            Duration::from_secs(60),
        )
        .await?;
        let took = asked.elapsed();
        let s = failed.status.unwrap_or_default();
        let c = s.condition("Failed").context("no Failed condition")?;
        eprintln!("huge failed after {took:?}: {}", c.message);
        ensure!(c.reason == FailureReason::Unschedulable.as_str(), "{c:?}");
        ensure!(c.message.contains("executors.memory"), "{}", c.message);
        ensure!(took < Duration::from_secs(30), "took {took:?} to fail");

        let done = run_to_end(&client, &ns.name, "fallback", JobPhase::Succeeded)
            .await
            .with_context(|| op.logs())?;
        let s = done.status.unwrap_or_default();
        eprintln!("fallback: executors {:?}", s.executors);
        ensure!(s.executors.spot_fallbacks >= 2, "{:?}", s.executors);
        ensure!(s.is_true(CONDITION_SPOT_FALLBACK), "{:?}", s.conditions);
        let rows = csv_rows(&work.join("out"))?;
        ensure!(!rows.is_empty(), "no output");
        Ok(())
    }
    .await;
    for n in &spot_nodes {
        kubectl(&["uncordon", n]).await?;
    }
    op.stop().await?;
    outcome
}
