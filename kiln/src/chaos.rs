//! `kiln chaos`: drain or kill the node of a chosen executor of a running ComputeJob, then
//! follow the job to its end and print its recovery report (what was lost, moved and
//! recomputed, and how long detecting and recovering took).
//!
//! A drain is what `kubectl drain` does: cordon the node, then evict every pod on it
//! through the Eviction API (which honours PodDisruptionBudgets) with the grace period
//! given, as a spot reclaim or a node upgrade would. Kubernetes has no API that stops a
//! machine, so a kill runs the command given with `--command` (a cloud CLI, or whatever
//! powers the machine off), with the node's name and provider id in its environment.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use k8s_openapi::api::core::v1::{Node, Pod};
use kiln_api::crd::{LABEL_JOB, LABEL_ROLE, ROLE_EXECUTOR};
use kiln_api::{ComputeJob, ComputeJobStatus, JobPhase};
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;

/// The annotation the operator sets on executors holding outputs no other has: its value
/// is how many.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// The ComputeJob, running.
    job: String,
    /// What happens to the executor's node.
    #[arg(value_enum)]
    action: Action,
    /// Namespace of the ComputeJob (default: the kubeconfig context's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The executor whose node goes: its pod name or its number (`0` for JOB-exec-0).
    /// Default: the running executor holding the most outputs no other executor has.
    #[arg(long, short = 'e')]
    executor: Option<String>,
    /// Drain: seconds each evicted pod gets to shut down (`kubectl drain --grace-period`).
    #[arg(long, default_value_t = 30)]
    grace_period: u32,
    /// Drain: give up evicting (a PodDisruptionBudget refusing) after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Kill: the command that stops the machine, run with `sh -c`; `KILN_NODE` and
    /// `KILN_PROVIDER_ID` hold the node's name and its `spec.providerID`.
    #[arg(long)]
    command: Option<String>,
    /// Return once the node is drained or killed instead of following the job to its end.
    #[arg(long)]
    no_wait: bool,
    /// Print the recovery report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "camelCase")]
enum Action {
    /// Cordon the node and evict its pods, each with the grace period.
    Drain,
    /// Stop the machine with `--command`: no notice, no grace.
    Kill,
}

/// What `kiln chaos` did and what it cost the job.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChaosReport {
    pub job: String,
    pub executor: String,
    pub node: String,
    pub action: String,
    /// Pods evicted from the node (a drain).
    pub evicted: Vec<String>,
    /// The job's phase when the report was made.
    pub phase: String,
    /// Executors lost, by reason, as the operator settled them.
    pub executors_lost: BTreeMap<String, u32>,
    pub partitions_lost: u64,
    pub partitions_migrated: u64,
    pub partitions_recomputed: u64,
    /// For the last loss or notice: milliseconds to detect it and to run at full width again.
    pub detect_ms: Option<u64>,
    pub recover_ms: Option<u64>,
    /// Milliseconds from the drain or kill to the job's end.
    pub to_end_ms: Option<u64>,
}

impl ChaosReport {
    /// The report of a job's status after the node went.
    fn fill(&mut self, status: &ComputeJobStatus) {
        self.phase = status.phase.as_str().to_string();
        self.executors_lost = status.executors.lost_by_reason.clone();
        let r = &status.recovery;
        self.partitions_lost = r.partitions_lost;
        self.partitions_migrated = r.partitions_migrated;
        self.partitions_recomputed = r.partitions_recomputed;
        self.detect_ms = r.last_detect_ms;
        self.recover_ms = r.last_recover_ms;
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
        let lost = if self.executors_lost.is_empty() {
            "none".to_string()
        } else {
            self.executors_lost
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{action} of node {node} (executor {executor}) — job {job} {phase}\n\
             \x20 executors lost         {lost}\n\
             \x20 partitions lost        {}\n\
             \x20 partitions migrated    {}\n\
             \x20 partitions recomputed  {}\n\
             \x20 time to detect         {}\n\
             \x20 time to recover        {}\n\
             \x20 time to the job's end  {}",
            self.partitions_lost,
            self.partitions_migrated,
            self.partitions_recomputed,
            ms(self.detect_ms),
            ms(self.recover_ms),
            ms(self.to_end_ms),
            action = self.action,
            node = self.node,
            executor = self.executor,
            job = self.job,
            phase = self.phase,
        )
    }
}

pub async fn chaos(args: ChaosArgs) -> anyhow::Result<std::process::ExitCode> {
    ensure!(
        args.action == Action::Drain || args.command.is_some(),
        "kill needs --command: Kubernetes has no API that stops a machine; give the command \
         that does (your cloud's CLI), with $KILN_NODE and $KILN_PROVIDER_ID"
    );
    let client = Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig or in-cluster)")?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let job = jobs
        .get(&args.job)
        .await
        .with_context(|| format!("reading ComputeJob {ns}/{}", args.job))?;
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    ensure!(
        !phase.is_finished(),
        "ComputeJob {ns}/{} is {}: chaos needs a running job",
        args.job,
        phase.as_str()
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let executors = pods
        .list(&ListParams::default().labels(&format!(
            "{LABEL_JOB}={},{LABEL_ROLE}={ROLE_EXECUTOR}",
            args.job
        )))
        .await
        .context("listing the job's executor pods")?
        .items;
    let victim = choose_executor(&args.job, args.executor.as_deref(), &executors)?;
    let executor = victim.metadata.name.clone().unwrap_or_default();
    let node = victim
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("executor pod {executor} is not on a node yet"))?;
    let mut report = ChaosReport {
        job: args.job.clone(),
        executor: executor.clone(),
        node: node.clone(),
        action: format!("{:?}", args.action).to_lowercase(),
        ..Default::default()
    };
    let at = Instant::now();
    match args.action {
        Action::Drain => {
            eprintln!(
                "draining node {node} (executor {executor}), grace period {} s",
                args.grace_period
            );
            report.evicted = drain(
                &client,
                &node,
                args.grace_period,
                Duration::from_secs(args.timeout),
            )
            .await?;
            eprintln!(
                "node {node} drained: {} pod(s) evicted; `kubectl uncordon {node}` brings it back",
                report.evicted.len()
            );
        }
        Action::Kill => {
            let command = args.command.as_deref().unwrap_or_default();
            kill(&client, &node, command).await?;
            eprintln!("node {node} (executor {executor}) killed");
        }
    }
    if args.no_wait {
        return print(&report, args.json);
    }
    let status = follow(&jobs, &args.job).await?;
    report.to_end_ms = Some(at.elapsed().as_millis() as u64);
    report.fill(&status);
    print(&report, args.json)?;
    Ok(if status.phase == JobPhase::Succeeded {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn print(report: &ChaosReport, json: bool) -> anyhow::Result<std::process::ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{}", report.render());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The executor pod to take: the one named (pod name or number), else the running one
/// holding the most outputs no other executor has (ties: the first by name).
fn choose_executor<'a>(
    job: &str,
    wanted: Option<&str>,
    pods: &'a [Pod],
) -> anyhow::Result<&'a Pod> {
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    if let Some(w) = wanted {
        let full = if w.chars().all(|c| c.is_ascii_digit()) {
            format!("{job}-exec-{w}")
        } else {
            w.to_string()
        };
        return pods.iter().find(|p| name(p) == full).with_context(|| {
            let known: Vec<String> = pods.iter().map(name).collect();
            format!(
                "--executor {w}: no executor pod {full} in job {job} (it has {})",
                known.join(", ")
            )
        });
    }
    let running = |p: &&Pod| {
        p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    };
    let holding = |p: &Pod| -> i64 {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELETION_COST))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut candidates: Vec<&Pod> = pods.iter().filter(running).collect();
    candidates.sort_by_key(|p| (std::cmp::Reverse(holding(p)), name(p)));
    candidates
        .first()
        .copied()
        .with_context(|| format!("job {job} has no running executor"))
}

/// Whether a drain evicts this pod: not mirror pods (the kubelet's own), not DaemonSet
/// pods (they would come straight back, as `kubectl drain --ignore-daemonsets` says), not
/// pods already finished or going.
fn evictable(pod: &Pod) -> bool {
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let daemon = pod.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.kind == "DaemonSet" && r.controller == Some(true))
    });
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !mirror && !daemon && !finished && pod.metadata.deletion_timestamp.is_none()
}

/// Cordons `node` and evicts its pods, retrying those a PodDisruptionBudget holds back
/// until `timeout`; then waits for them to be gone. Returns the pods evicted.
async fn drain(
    client: &Client,
    node: &str,
    grace: u32,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .with_context(|| format!("cordoning node {node}"))?;
    let all: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let mut left: Vec<(String, String)> = all
        .list(&on_node)
        .await
        .with_context(|| format!("listing the pods on node {node}"))?
        .items
        .iter()
        .filter(|p| evictable(p))
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let evict = EvictParams {
        delete_options: Some(DeleteParams {
            grace_period_seconds: Some(grace),
            ..Default::default()
        }),
        ..Default::default()
    };
    let deadline = Instant::now() + timeout;
    let mut evicted = Vec::new();
    while !left.is_empty() {
        let mut held = Vec::new();
        for (ns, name) in left {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            match pods.evict(&name, &evict).await {
                Ok(_) => {
                    eprintln!("evicted pod {ns}/{name}");
                    evicted.push(format!("{ns}/{name}"));
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                // 429: a PodDisruptionBudget allows no disruption now; try again.
                Err(kube::Error::Api(s)) if s.code == 429 => held.push((ns, name)),
                Err(e) => return Err(e).with_context(|| format!("evicting pod {ns}/{name}")),
            }
        }
        if !held.is_empty() && Instant::now() > deadline {
            let names: Vec<String> = held.iter().map(|(n, p)| format!("{n}/{p}")).collect();
            bail!(
                "a PodDisruptionBudget still holds back {} after {} s",
                names.join(", "),
                timeout.as_secs()
            );
        }
        if !held.is_empty() {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        left = held;
    }
    // As `kubectl drain` does: done once the evicted pods are gone.
    let gone_by = Instant::now() + Duration::from_secs(u64::from(grace) + 60);
    loop {
        let still: Vec<String> = all
            .list(&on_node)
            .await?
            .items
            .iter()
            .filter_map(|p| {
                let key = format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                );
                evicted.contains(&key).then_some(key)
            })
            .collect();
        if still.is_empty() {
            return Ok(evicted);
        }
        ensure!(
            Instant::now() < gone_by,
            "evicted pods still on node {node}: {}",
            still.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the command that stops the machine behind `node`.
async fn kill(client: &Client, node: &str, command: &str) -> anyhow::Result<()> {
    let provider_id = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .with_context(|| format!("reading node {node}"))?
        .spec
        .and_then(|s| s.provider_id)
        .unwrap_or_default();
    eprintln!("killing node {node}: {command}");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("KILN_NODE", node)
        .env("KILN_PROVIDER_ID", provider_id)
        .output()
        .await
        .context("running the kill command")?;
    ensure!(
        out.status.success(),
        "the kill command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Follows the job until it ends, with a progress bar of its tasks and a line for each
/// executor loss; returns its final status.
async fn follow(jobs: &Api<ComputeJob>, name: &str) -> anyhow::Result<ComputeJobStatus> {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>5}/{len:<5} tasks  {msg}")
            .expect("a valid template"),
    );
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let status = jobs
            .get(name)
            .await
            .with_context(|| format!("reading ComputeJob {name}"))?
            .status
            .unwrap_or_default();
        for (reason, n) in &status.executors.lost_by_reason {
            let before = seen.insert(reason.clone(), *n).unwrap_or(0);
            if *n > before {
                bar.println(format!("executors lost: {reason} +{}", n - before));
            }
        }
        bar.set_length(status.progress.tasks);
        bar.set_position(status.progress.tasks_done);
        bar.set_message(format!(
            "{} · {} executors running, {} draining",
            status.phase.as_str(),
            status.executors.running,
            status.executors.draining.len()
        ));
        if status.phase.is_finished() {
            bar.finish_and_clear();
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: &str, cost: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.annotations = cost.map(|c| [(DELETION_COST.to_string(), c.to_string())].into());
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    }

    fn name(p: &Pod) -> &str {
        p.metadata.name.as_deref().unwrap()
    }

    #[test]
    fn the_executor_holding_most_is_taken_unless_one_is_named() {
        let pods = [
            pod("j-exec-0", "Running", Some("3")),
            pod("j-exec-1", "Running", Some("12")),
            pod("j-exec-2", "Pending", Some("40")),
            pod("j-exec-3", "Running", None),
        ];
        assert_eq!(name(choose_executor("j", None, &pods).unwrap()), "j-exec-1");
        assert_eq!(
            name(choose_executor("j", Some("3"), &pods).unwrap()),
            "j-exec-3"
        );
        assert_eq!(
            name(choose_executor("j", Some("j-exec-0"), &pods).unwrap()),
            "j-exec-0"
        );
        let e = choose_executor("j", Some("7"), &pods)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no executor pod j-exec-7") && e.contains("j-exec-1"),
            "{e}"
        );
        // None holds anything: the first running one by name.
        let idle = [
            pod("j-exec-5", "Running", None),
            pod("j-exec-4", "Running", None),
        ];
        assert_eq!(name(choose_executor("j", None, &idle).unwrap()), "j-exec-4");
        assert!(choose_executor("j", None, &[]).is_err());
    }

    #[test]
    fn a_drain_leaves_mirror_daemonset_and_finished_pods() {
        assert!(evictable(&pod("a", "Running", None)));
        assert!(!evictable(&pod("a", "Succeeded", None)));
        let mut mirror = pod("m", "Running", None);
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into());
        assert!(!evictable(&mirror));
        let mut daemon = pod("d", "Running", None);
        daemon.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                kind: "DaemonSet".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        assert!(!evictable(&daemon));
    }

    #[test]
    fn the_report_says_what_was_lost_moved_and_recomputed() {
        let mut status = ComputeJobStatus {
            phase: JobPhase::Succeeded,
            ..Default::default()
        };
        status.executors.lost_by_reason = [("Drained".to_string(), 2)].into();
        status.recovery.partitions_migrated = 69;
        status.recovery.last_detect_ms = Some(40);
        let mut report = ChaosReport {
            job: "j".into(),
            executor: "j-exec-0".into(),
            node: "spot-1".into(),
            action: "drain".into(),
            ..Default::default()
        };
        report.fill(&status);
        let text = report.render();
        assert!(text.starts_with("drain of node spot-1 (executor j-exec-0) — job j Succeeded"));
        assert!(text.contains("executors lost         Drained 2"), "{text}");
        assert!(text.contains("partitions migrated    69"), "{text}");
        assert!(text.contains("time to detect         40 ms"), "{text}");
        assert!(text.contains("time to recover        -"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["partitionsMigrated"], 69);
        assert_eq!(json["executorsLost"]["Drained"], 2);
    }
}
