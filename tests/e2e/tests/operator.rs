//! End-to-end tests of the operator on the test cluster: the CRD applied with kubectl, the
//! operator running as a local process with the cluster's kubeconfig, ComputeJobs run to
//! `Succeeded` with the output `kiln run` gives locally, the driver on an on-demand node and
//! every executor on a spot node, a spot node killed mid-shuffle, the operator restarted
//! mid-job, a driver lost mid-job (its replacement takes over and resumes), and bad specs
//! refused or failed without disturbing good jobs; executors given notice (an eviction, a
//! disruption taint) drain, spot capacity gone falls back to on-demand nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kiln_api::{ComputeJob, FailureReason, JobPhase};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use kiln_e2e::operator::{
    Operator, access, apply_crds, create_job, csv_rows, driver_progress, job, kiln,
    refuses_strangers, run_locally, scratch, tpch, wait_finished,
};
use kiln_e2e::{
    PodWatch, TestNamespace, agent_control, client, kubectl, node_capacity_types, node_ready, repo,
    serial, wait_for,
};

#[path = "operator/spot.rs"]
mod spot;
#[path = "operator/takeover.rs"]
mod takeover;
use takeover::{TAKEOVER_PARTITIONS, driver_deleted, driver_node_killed};

/// The operator's configuration in these tests: progress read every second, a short
/// image-pull grace, and one image besides the operator's own that jobs may name (it
/// cannot be pulled).
const CONFIG: &str = "progressIntervalSeconds: 1\nimagePullGraceSeconds: 10\nadmission: {images: [\"nosuchimage:*\"]}\n";

fn wordcount(out: &str) -> String {
    let corpus = repo()
        .join("examples/wordcount/corpus")
        .canonicalize()
        .unwrap();
    format!(
        r#"
executors: {{count: 2, cpu: 500m, memory: 256Mi}}
shufflePartitions: 4
inputs:
  - {{name: lines, format: text, uri: "{}/", options: {{fileExtension: .txt}}}}
steps:
  - name: words
    sql: "SELECT word FROM (SELECT unnest(string_to_array(regexp_replace(lower(line), '[^a-z]+', ' ', 'g'), ' ')) AS word FROM lines) WHERE word <> ''"
  - name: counts
    sql: "SELECT word, count(*) AS n FROM words GROUP BY word"
output: {{uri: "{out}/", format: csv}}
"#,
        corpus.display()
    )
}

/// TPC-H Q3 without its LIMIT (so every group is output), joins shuffled rather than
/// broadcast: two shuffles and a final aggregation.
fn q3(data: &std::path::Path, out: &str, partitions: u32) -> String {
    let t = |name: &str| data.join(format!("{name}.parquet")).display().to_string();
    format!(
        r#"
executors: {{count: 2, cpu: "1", memory: 512Mi, slots: 1}}
shufflePartitions: {partitions}
broadcastJoinThreshold: "1"
inputs:
  - {{name: customer, format: parquet, uri: "{}"}}
  - {{name: orders, format: parquet, uri: "{}"}}
  - {{name: lineitem, format: parquet, uri: "{}"}}
steps:
  - name: q3
    sql: >-
      SELECT l_orderkey, sum(l_extendedprice * (1 - l_discount)) AS revenue, o_orderdate, o_shippriority
      FROM customer, orders, lineitem
      WHERE c_mktsegment = 'BUILDING' AND c_custkey = o_custkey AND l_orderkey = o_orderkey
        AND o_orderdate < CAST('1995-03-15' AS date) AND l_shipdate > CAST('1995-03-15' AS date)
      GROUP BY l_orderkey, o_orderdate, o_shippriority
output: {{uri: "{out}/", format: csv}}
"#,
        t("customer"),
        t("orders"),
        t("lineitem")
    )
}

/// The PageRank example (cached `links` and `pages`, an iterative `ranks`) run for
/// `iterations`, long enough to lose a node in the middle of it: many shuffles, each
/// iteration reading the cached partitions. Executors not heard from for 3 s are lost.
fn pagerank(out: &str, iterations: u32) -> Result<String> {
    let example = repo().join("examples/pagerank");
    let mut spec: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(example.join("job.yaml"))?)?;
    spec["inputs"][0]["uri"] = dir(&example.join("edges.csv").canonicalize()?).into();
    spec["steps"][2]["repeat"] = iterations.into();
    let extra: serde_yaml::Value = serde_yaml::from_str(&format!(
        r#"
executors: {{count: 2, cpu: "1", memory: 512Mi, slots: 1}}
shufflePartitions: 8
failurePolicy: {{heartbeatTimeoutSeconds: 3}}
output: {{uri: "{out}/", format: csv}}
"#
    ))?;
    for (k, v) in extra.as_mapping().context("a mapping")? {
        spec[k.as_str().context("a key")?] = v.clone();
    }
    Ok(serde_yaml::to_string(&spec)?)
}

fn dir(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// Checks the driver ran on an on-demand node and every executor on a spot node.
async fn check_placement(client: &Client, placements: &BTreeMap<String, String>) -> Result<()> {
    let capacities = node_capacity_types(client).await?;
    let capacity = |node: &str| capacities.get(node).cloned().unwrap_or_default();
    ensure!(
        placements.keys().any(|p| p.ends_with("-driver")),
        "no driver pod seen: {:?}",
        placements
    );
    ensure!(
        placements.keys().any(|p| p.contains("-exec-")),
        "no executor pod seen: {:?}",
        placements
    );
    for (pod, node) in placements {
        let want = if pod.ends_with("-driver") {
            "on-demand"
        } else {
            "spot"
        };
        ensure!(
            capacity(node) == want,
            "{pod} ran on {node} ({}), expected a {want} node",
            capacity(node)
        );
    }
    Ok(())
}

/// Waits until the PageRank job `name` has done its cached steps and a few iterations, and
/// still runs.
async fn few_iterations_done(client: &Client, ns: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let driver = format!("{name}-driver");
    let driver_ip = wait_for("the driver's address", Duration::from_secs(60), || async {
        Ok(pods
            .get_opt(&driver)
            .await?
            .and_then(|p| p.status?.pod_ip)
            .filter(|ip| !ip.is_empty()))
    })
    .await?;
    let access = access(client, ns, name).await?;
    wait_for("a few iterations", Duration::from_secs(120), || async {
        let p = driver_progress(&driver_ip, &access).await?;
        Ok((p.stages_done >= 12 && p.stages_done < p.stages_total).then_some(()))
    })
    .await
}

/// Waits for job `name` to finish.
async fn run_to_end(client: &Client, ns: &str, name: &str, want: JobPhase) -> Result<ComputeJob> {
    let api = Api::<ComputeJob>::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let j = api.get(name).await?;
        if j.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
            return wait_finished(client, ns, name, want, Duration::from_secs(1)).await;
        }
        ensure!(
            Instant::now() < deadline,
            "{name} did not finish in 180 s: {:?}",
            j.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn wordcount_and_tpch_succeed_with_the_local_output_on_the_right_nodes() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-op").await?;
    let op = Operator::start("op-run", "kiln-e2e-run", 18181, CONFIG).await?;
    let work = scratch(&ns.name)?;
    let data = tpch("0.02").await?;

    let wc_spec = wordcount(&dir(&work.join("wc")));
    let q3_spec = q3(&data, &dir(&work.join("q3")), 8);
    // Record where every pod of both jobs runs.
    let wc_watch = PodWatch::start(&client, &ns.name, "kiln.dev/job=wc").await?;
    let q3_watch = PodWatch::start(&client, &ns.name, "kiln.dev/job=q3").await?;
    create_job(&client, &ns.name, &job("wc", &wc_spec)?).await?;
    create_job(&client, &ns.name, &job("q3", &q3_spec)?).await?;

    let api = Api::<ComputeJob>::namespaced(client.clone(), &ns.name);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut finished = 0;
        for name in ["wc", "q3"] {
            let j = api.get(name).await?;
            finished += usize::from(j.status.is_some_and(|s| s.phase.is_finished()));
        }
        if finished == 2 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the jobs did not finish in 180 s\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `kubectl wait` works on the Succeeded condition.
    kubectl(&[
        "wait",
        "-n",
        &ns.name,
        "--for=condition=Succeeded",
        "computejob/wc",
        "computejob/q3",
        "--timeout=10s",
    ])
    .await?;
    // Each job's pods are fenced in by a NetworkPolicy the API server accepted: only the
    // job's own pods get in (and the operator, to the driver's port).
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    for name in ["wc", "q3"] {
        let spec = policies
            .get(&format!("{name}-pods"))
            .await
            .with_context(|| format!("{name}'s NetworkPolicy"))?
            .spec
            .context("a NetworkPolicy without a spec")?;
        let own = Some(BTreeMap::from([(
            "kiln.dev/job".to_string(),
            name.to_string(),
        )]));
        ensure!(spec.pod_selector.and_then(|s| s.match_labels) == own);
        let rules = spec.ingress.unwrap_or_default();
        ensure!(
            rules
                .first()
                .and_then(|r| r.from.as_ref())
                .is_some_and(|from| from.iter().all(|p| p
                    .pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone())
                    == own
                    && p.namespace_selector.is_none())),
            "{name}: {rules:?}"
        );
    }
    let wc = wait_finished(
        &client,
        &ns.name,
        "wc",
        JobPhase::Succeeded,
        Duration::from_secs(5),
    )
    .await?;
    let q3_job = wait_finished(
        &client,
        &ns.name,
        "q3",
        JobPhase::Succeeded,
        Duration::from_secs(5),
    )
    .await?;

    // The same rows as a local run of the same spec.
    let local_wc = run_locally(
        &wordcount(&dir(&work.join("wc-local"))),
        &work.join("wc-local"),
    )
    .await?;
    ensure!(!local_wc.is_empty());
    ensure!(
        csv_rows(&work.join("wc"))? == local_wc,
        "wordcount output differs from kiln run"
    );
    let local_q3 = run_locally(
        &q3(&data, &dir(&work.join("q3-local")), 8),
        &work.join("q3-local"),
    )
    .await?;
    ensure!(local_q3.len() > 10, "q3 rows: {}", local_q3.len());
    ensure!(
        csv_rows(&work.join("q3"))? == local_q3,
        "TPC-H Q3 output differs from kiln run"
    );

    // The driver's report made it into the status.
    for j in [&wc, &q3_job] {
        let s = j.status.clone().unwrap_or_default();
        let result = s.result.context("no result in the status")?;
        ensure!(
            result.succeeded && result.rows > 0 && result.files > 0,
            "{result:?}"
        );
        ensure!(s.completion_time.is_some() && s.start_time.is_some());
        ensure!(
            (s.driver.attempt, s.driver.restarts) == (1, 0),
            "{:?}",
            s.driver
        );
        ensure!(s.progress.tasks_done == s.progress.tasks && s.progress.tasks > 0);
    }
    ensure!(q3_job.status.unwrap().result.unwrap().rows == local_q3.len() as u64);

    // Placement: the driver pod is still there (it keeps its logs); the executors were seen
    // while they ran.
    let (wc_pods, q3_pods) = (wc_watch.placements(), q3_watch.placements());
    check_placement(&client, &wc_pods).await?;
    check_placement(&client, &q3_pods).await?;
    ensure!(q3_pods.keys().filter(|p| p.contains("-exec-")).count() == 2);
    // By the short name, which no built-in resource uses.
    let table = kubectl(&["get", "kjob", "-n", &ns.name]).await?;
    ensure!(
        table.contains("PHASE") && table.contains("Succeeded"),
        "{table}"
    );
    op.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_spot_node_killed_mid_shuffle_costs_partitions_not_the_job() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-chaos").await?;
    let op = Operator::start("op-chaos", "kiln-e2e-chaos", 18182, CONFIG).await?;
    let work = scratch(&ns.name)?;
    const ITERATIONS: u32 = 200;
    let spec = pagerank(&dir(&work.join("out")), ITERATIONS)?;
    // The pods log at debug level (through the pod templates), for a failure's diagnosis.
    let mut chaos = job("chaos", &spec)?;
    // A lost node is never the job's fault: not one loss of its own is allowed.
    chaos.spec.failure_policy.max_executor_losses = 0;
    let debug: k8s_openapi::api::core::v1::EnvVar =
        serde_json::from_value(json!({"name": "RUST_LOG", "value": "info,kiln_executor=debug"}))?;
    chaos.spec.driver.template.env.push(debug.clone());
    chaos.spec.executors.template.env.push(debug);
    let watch = PodWatch::start(&client, &ns.name, "kiln.dev/job=chaos").await?;
    create_job(&client, &ns.name, &chaos).await?;

    // Wait until the cached steps and a few iterations are done, then kill the spot node of
    // one executor: it holds cached partitions and the map outputs of the running iteration.
    few_iterations_done(&client, &ns.name, "chaos").await?;
    // Its driver and executors refuse whoever lacks the job's credentials.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let mut ips = Vec::new();
    for pod in ["chaos-driver", "chaos-exec-1"] {
        let ip = pods.get(pod).await?.status.and_then(|s| s.pod_ip);
        ips.push(ip.with_context(|| format!("{pod} has no address"))?);
    }
    refuses_strangers(&ips[0], &ips[1], &access(&client, &ns.name, "chaos").await?).await?;
    // `kiln chaos` kills the node (through the node agent, as a cloud CLI would stop a
    // machine), follows the job to its end and reports what the loss cost.
    let killed_at = Instant::now();
    let report = kiln(&[
        "chaos",
        "chaos",
        "kill",
        "--namespace",
        &ns.name,
        "--executor",
        "0",
        "--command",
        r#"curl -fsS -X POST "$KILN_NODE_AGENT_CONTROL/nodes/$KILN_NODE/kill""#,
        "--json",
    ])
    .await;
    let report: serde_json::Value = match report {
        Ok(out) => serde_json::from_str(&out).with_context(|| format!("report: {out}"))?,
        Err(e) => return Err(e.context(op.logs())),
    };
    eprintln!("kiln chaos report: {report:#}");
    let victim = report["node"]
        .as_str()
        .context("no node in the report")?
        .to_string();
    ensure!(report["executor"] == "chaos-exec-0", "{report}");

    let outcome = async {
        let done = run_to_end(&client, &ns.name, "chaos", JobPhase::Succeeded)
            .await
            .with_context(|| op.logs())?;
        let s = done.status.clone().unwrap_or_default();
        let result = s.result.clone().context("no result")?;
        eprintln!(
            "killed {victim}; the job finished {:?} later; status executors {:?}, recovery {:?}, result lost {:?}, recomputed {}",
            killed_at.elapsed(),
            s.executors,
            s.recovery,
            result.executors_lost,
            result.partitions_recomputed
        );
        let lost_by_operator = s.executors.lost_by_reason.get("NodeLost").copied().unwrap_or(0);
        for counted in ["Failed", "OOMKilled", "HeartbeatTimeout"] {
            ensure!(
                !s.executors.lost_by_reason.contains_key(counted),
                "a {counted} loss for a lost node: {:?}",
                s.executors
            );
        }
        let lost_by_driver: u64 = result.executors_lost.values().sum();
        ensure!(
            lost_by_operator >= 1 || lost_by_driver >= 1,
            "the loss is not in the status: {s:?}"
        );
        ensure!(s.executors.lost >= 1, "operator saw no loss: {:?}", s.executors);
        ensure!(
            s.recovery.partitions_recomputed > 0 && result.partitions_recomputed > 0,
            "no partition recomputed: {:?} / {result:?}",
            s.recovery
        );
        ensure!(s.recovery.last_loss.is_some(), "{:?}", s.recovery);
        // The report says what the loss cost, as the status does.
        ensure!(report["phase"] == "Succeeded", "{report}");
        ensure!(
            report["executorsLost"]["NodeLost"].as_u64() >= Some(1)
                && report["partitionsLost"].as_u64() > Some(0)
                && report["partitionsRecomputed"].as_u64() > Some(0),
            "{report}"
        );
        ensure!(report["detectMs"].is_u64() && report["recoverMs"].is_u64(), "{report}");
        // Every executor, replacements included, ran on a spot node, and no replacement
        // went to the dead node while the scheduler still thought it Ready.
        let placements = watch.placements();
        check_placement(&client, &placements).await?;
        let on_dead: Vec<_> = placements
            .iter()
            .filter(|(pod, node)| **node == victim && pod.as_str() != "chaos-exec-0")
            .collect();
        ensure!(on_dead.is_empty(), "replacements on the dead node: {on_dead:?}");
        let rows = csv_rows(&work.join("out"))?;
        let local = run_locally(
            &pagerank(&dir(&work.join("local")), ITERATIONS)?,
            &work.join("local"),
        )
        .await?;
        ensure!(rows == local, "output after the loss differs from the no-failure run");
        // Losses and replacement latency are in the operator's metrics.
        ensure!(op.metric("kiln_operator_executor_losses_total").await? >= 1.0);
        let replaced = op.metric("kiln_operator_loss_to_replacement_seconds_count").await?;
        let took = op.metric("kiln_operator_loss_to_replacement_seconds_sum").await?;
        ensure!(replaced >= 1.0, "no replacement recorded");
        eprintln!("loss to replacement: {:.3} s on average over {replaced}", took / replaced);
        ensure!(took / replaced < 2.0, "replacement took {:.3} s on average", took / replaced);
        Ok(())
    }
    .await;

    agent_control("POST", &format!("/nodes/{victim}/restore")).await?;
    wait_for("node Ready again", Duration::from_secs(60), || async {
        let n = Api::<Node>::all(client.clone()).get(&victim).await?;
        Ok((node_ready(&n).as_deref() == Some("True")).then_some(()))
    })
    .await?;
    op.stop().await?;
    outcome
}

#[tokio::test]
async fn an_operator_restart_mid_job_neither_reruns_nor_loses_the_job() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-restart").await?;
    // Two replicas on one Lease: `a` leads, `b` stands by.
    let a = Operator::start("op-a", "kiln-e2e-restart", 18183, CONFIG).await?;
    let b = Operator::start("op-b", "kiln-e2e-restart", 18184, CONFIG).await?;
    let work = scratch(&ns.name)?;
    let data = tpch("0.05").await?;
    let spec = q3(&data, &dir(&work.join("out")), 48);
    create_job(&client, &ns.name, &job("restart", &spec)?).await?;

    let api = Api::<ComputeJob>::namespaced(client.clone(), &ns.name);
    let running = wait_for(
        "the job to run with its executors",
        Duration::from_secs(90),
        || async {
            let j = api.get("restart").await?;
            let s = j.status.clone().unwrap_or_default();
            Ok((s.phase == JobPhase::Running && s.executors.running == 2).then_some(j))
        },
    )
    .await
    .with_context(|| a.logs())?;
    ensure!(
        b.metric("kiln_operator_reconciles_total").await? == 0.0,
        "the standby reconciled"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let driver_uid = pods.get("restart-driver").await?.uid();

    let restarted = k8s_openapi::jiff::Timestamp::now();
    a.stop().await?;
    let done = wait_finished(
        &client,
        &ns.name,
        "restart",
        JobPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await
    .with_context(|| b.logs())?;
    let s = done.status.clone().unwrap_or_default();
    ensure!(
        s.completion_time.as_ref().is_some_and(|t| t.0
            >= restarted
                .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1))
                .unwrap()),
        "the job finished before the restart ({:?}); make it longer",
        s.completion_time
    );
    ensure!(
        b.metric("kiln_operator_reconciles_total").await? > 0.0,
        "the standby never took over"
    );
    ensure!(
        (s.driver.attempt, s.driver.restarts) == (1, 0),
        "driver rerun: {:?}",
        s.driver
    );
    ensure!(
        pods.get("restart-driver").await?.uid() == driver_uid,
        "a second driver pod"
    );
    ensure!(s.start_time == running.status.unwrap().start_time);

    // A finished job stays finished across another restart: nothing is created, nothing
    // rewritten.
    let version = api.get("restart").await?.resource_version();
    b.stop().await?;
    let c = Operator::start("op-c", "kiln-e2e-restart", 18185, CONFIG).await?;
    wait_for(
        "the new operator to look at the job",
        Duration::from_secs(30),
        || async { Ok((c.metric("kiln_operator_reconciles_total").await? > 0.0).then_some(())) },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        api.get("restart").await?.resource_version() == version,
        "status rewritten"
    );
    let execs = pods
        .list(&ListParams::default().labels("kiln.dev/role=executor"))
        .await?;
    ensure!(execs.items.is_empty(), "executors created again");
    ensure!(csv_rows(&work.join("out"))?.len() as u64 == s.result.unwrap().rows);
    c.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_driver_lost_mid_job_is_replaced_by_one_that_resumes_it() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-takeover").await?;
    let op = Operator::start("op-takeover", "kiln-e2e-takeover", 18187, CONFIG).await?;
    let work = scratch(&ns.name)?;
    let data = tpch("0.05").await?;
    // Driver pods force-deleted, once and twice, side by side.
    let (once, twice) = tokio::try_join!(
        driver_deleted(&client, &ns.name, &data, &work, "once", 1),
        driver_deleted(&client, &ns.name, &data, &work, "twice", 2),
    )
    .with_context(|| op.logs())?;
    // The driver's node killed, alone: every driver runs on the on-demand nodes. Meanwhile,
    // the same query without a failure.
    let local_out = work.join("local");
    let local_spec = q3(&data, &dir(&local_out), TAKEOVER_PARTITIONS);
    let (node, local) = tokio::join!(
        driver_node_killed(&client, &ns.name, &data, &work, "node"),
        run_locally(&local_spec, &local_out),
    );
    let node = node.with_context(|| op.logs())?;
    let local = local?;
    ensure!(local.len() > 10, "q3 rows: {}", local.len());
    for r in [&once, &twice, &node] {
        ensure!(
            r.rows == local,
            "{}: the output differs from the no-failure run ({} rows, expected {})",
            r.name,
            r.rows.len(),
            local.len()
        );
    }
    op.stop().await?;
    Ok(())
}

fn dynamic_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kiln.dev", "v1alpha1", "ComputeJob");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

#[tokio::test]
async fn bad_specs_are_refused_or_failed_while_good_jobs_run() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    apply_crds().await?;
    let ns = TestNamespace::new(&client, "e2e-bad").await?;
    let op = Operator::start("op-bad", "kiln-e2e-bad", 18186, CONFIG).await?;
    let work = scratch(&ns.name)?;
    let good: serde_json::Value = serde_yaml::from_str(&wordcount(&dir(&work.join("good"))))?;

    // Refused by the CRD's schema and CEL rules, each naming its field.
    let dynamic = dynamic_api(&client, &ns.name);
    let refused = [
        (
            "too-many",
            json!({"executors": {"count": 1000}}),
            "spec.executors.count",
        ),
        (
            "placement",
            json!({"executors": {"placement": "Cheap"}}),
            "spec.executors.placement",
        ),
        (
            "quantity",
            json!({"executors": {"memory": "lots"}}),
            "spec.executors.memory",
        ),
        (
            "from",
            json!({"output": {"from": "nope", "uri": "/x/", "format": "csv"}}),
            "output.from must name one of the steps",
        ),
    ];
    for (name, patch, expected) in refused {
        let mut spec = good.clone();
        merge(&mut spec, &patch);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "ComputeJob",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        let err = dynamic
            .create(&PostParams::default(), &obj)
            .await
            .err()
            .with_context(|| format!("{name} was accepted"))?;
        ensure!(err.to_string().contains(expected), "{name}: {err}");
    }

    // Accepted, then failed with a condition naming the problem and why.
    let failing = [
        (
            "bad-sql",
            json!({"steps": [{"name": "counts", "sql": "SELEC word FROM lines"}]}),
            "SELEC",
            FailureReason::InvalidSql,
        ),
        (
            "no-input",
            json!({"inputs": [{"name": "lines", "format": "text", "uri": format!("{}/missing/", dir(&work))}]}),
            "missing",
            FailureReason::InvalidInput,
        ),
        (
            "bad-name",
            json!({"steps": [{"name": "1st", "sql": "SELECT 1"}]}),
            "spec.steps[0].name",
            FailureReason::InvalidSpec,
        ),
        (
            "bad-image",
            json!({"image": "nosuchimage:1"}),
            "nosuchimage:1",
            FailureReason::ImagePullFailed,
        ),
        // The admission policy: an image the operator does not allow, a host path.
        (
            "foreign-image",
            json!({"image": "miner:1"}),
            "spec.image: `miner:1` is not an allowed image",
            FailureReason::InvalidSpec,
        ),
        // Invalid only to the API server (a pod label key it refuses): failed, not retried.
        (
            "bad-label",
            json!({"driver": {"template": {"labels": {"not a key!": "x"}}}}),
            "refuses the job's objects as invalid: Pod bad-label-driver",
            FailureReason::InvalidSpec,
        ),
        (
            "host-path",
            json!({"executors": {"template": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}),
            "spec.executors.template.volumes[0] (`root`): hostPath volumes are not allowed",
            FailureReason::InvalidSpec,
        ),
    ];
    for (name, patch, _, _) in &failing {
        let mut spec = good.clone();
        merge(&mut spec, patch);
        if let Some(out) = spec.pointer_mut("/output/uri") {
            *out = json!(format!("{}/", dir(&work.join(name))));
        }
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "ComputeJob",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        dynamic
            .create(&PostParams::default(), &obj)
            .await
            .with_context(|| name.to_string())?;
    }
    // A good job alongside them.
    create_job(
        &client,
        &ns.name,
        &job("good", &wordcount(&dir(&work.join("good"))))?,
    )
    .await?;
    wait_finished(
        &client,
        &ns.name,
        "good",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await
    .with_context(|| op.logs())?;
    for (name, _, expected, reason) in &failing {
        let j = wait_finished(
            &client,
            &ns.name,
            name,
            JobPhase::Failed,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| op.logs())?;
        let s = j.status.unwrap_or_default();
        let c = s.condition("Failed").context("no Failed condition")?;
        ensure!(c.status == "True", "{name}: {c:?}");
        ensure!(
            c.reason == reason.as_str(),
            "{name}: failed for {}, expected {reason}: {}",
            c.reason,
            c.message
        );
        ensure!(
            c.message.contains(expected),
            "{name}: the Failed condition does not name the problem ({expected}): {} {}",
            c.reason,
            c.message
        );
    }

    // With the failed jobs still there, the operator is calm: no tight loop, no errors.
    let before = op.metric("kiln_operator_reconciles_total").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = op.metric("kiln_operator_reconciles_total").await?;
    ensure!(
        after - before <= 5.0,
        "{} reconciles in 10 s with nothing to do",
        after - before
    );
    let errors = op.metrics().await?;
    let reconcile_errors: Vec<&str> = errors
        .lines()
        .filter(|l| l.starts_with("kiln_operator_errors_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    ensure!(reconcile_errors.is_empty(), "errors: {reconcile_errors:?}");
    ensure!(op.metric("kiln_operator_jobs").await? >= 5.0);
    for (_, _, _, reason) in &failing {
        let series = format!("kiln_operator_job_failures_total{{reason=\"{reason}\"}}");
        ensure!(op.metric(&series).await? >= 1.0, "{series} not counted");
    }
    op.stop().await?;
    Ok(())
}

/// Merges `patch` into `value` (objects key by key; anything else replaces).
fn merge(value: &mut serde_json::Value, patch: &serde_json::Value) {
    match (value, patch) {
        (serde_json::Value::Object(v), serde_json::Value::Object(p)) => {
            for (k, pv) in p {
                merge(v.entry(k.clone()).or_insert(serde_json::Value::Null), pv);
            }
        }
        (v, p) => *v = p.clone(),
    }
}
