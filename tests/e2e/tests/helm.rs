//! End-to-end tests of the Helm chart (charts/kiln) on the test cluster: the rendered chart,
//! the plain manifests and the examples pass the API server's validation, and a release
//! runs the operator in-cluster (its own ServiceAccount and RBAC, the node agent running
//! the `kiln:dev` image as this checkout's binary), runs a ComputeJob to `Succeeded`, and
//! `helm uninstall` leaves nothing but the CRD.
//!
//! The cluster-free checks (lint, rendered objects, drift, Argo CD health) are
//! `tests/helm/check`. Run these with `tests/cluster/e2e --workspace --test helm`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use kiln_e2e::{
    PodWatch, TestNamespace, client, container_log_tail, kubectl, node_capacity_types, repo,
    serial, wait_for,
};

const CHART: &str = "charts/kiln";
const CRD: &str = "charts/kiln/crds/computejob.yaml";
const CRD_NAME: &str = "computejobs.kiln.dev";
const TEST_VALUES: &str = "tests/helm/values/test-cluster.yaml";
/// The image the test values give the operator and, by default, every job pod.
const TEST_IMAGE: &str = "kiln:dev";
/// The chart's default lease name.
const LEASE: &str = "kiln-operator";

/// Runs `program` from the repository root with `args`, feeding `stdin`; returns stdout.
async fn run(program: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("stdin")?;
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}): {}{}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pinned Helm (tests/helm/build: cached per machine, built from Go modules once).
async fn helm_bin() -> Result<PathBuf> {
    let out = run(&repo().join("tests/helm/build"), &[], None).await?;
    let path = out.lines().last().unwrap_or_default().trim();
    ensure!(!path.is_empty(), "tests/helm/build printed no path");
    Ok(PathBuf::from(path))
}

async fn run_helm(bin: &PathBuf, args: &[&str]) -> Result<String> {
    run(bin, args, None).await
}

/// The cluster's kubectl with a manifest on stdin.
async fn kubectl_stdin(args: &[&str], input: &str) -> Result<String> {
    run(&repo().join("tests/cluster/kubectl"), args, Some(input)).await
}

/// The program the image runs: its exec-form ENTRYPOINT and the directories of its PATH,
/// from the Dockerfile's runtime stage.
struct Image {
    entrypoint: Vec<String>,
    path: Vec<String>,
}

fn image() -> Result<Image> {
    let text = std::fs::read_to_string(repo().join("Dockerfile"))?;
    let last_stage = &text[text.rfind("\nFROM ").context("Dockerfile has no FROM")?..];
    let line = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .context("the runtime stage has no ENTRYPOINT")?;
    let path = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("ENV PATH="))
        .context("the runtime stage sets no PATH")?;
    Ok(Image {
        entrypoint: serde_json::from_str(line.trim())?,
        path: path.trim().split(':').map(str::to_owned).collect(),
    })
}

/// Checks that a pod's container runs the image's program with `subcommand`: without a
/// `command` (the ENTRYPOINT runs with `args`), or with a command naming the same program,
/// by path or as a bare name the image's PATH resolves to it.
fn check_entrypoint(pod: &str, c: &Container, image: &Image, subcommand: &str) -> Result<()> {
    let command = c.command.clone().unwrap_or_default();
    let args = c.args.clone().unwrap_or_default();
    let program = &image.entrypoint[0];
    let argv: Vec<String> = if command.is_empty() {
        image.entrypoint.iter().cloned().chain(args).collect()
    } else {
        let resolved = if command[0].contains('/') {
            command[0] == *program
        } else {
            image
                .path
                .iter()
                .any(|dir| format!("{}/{}", dir.trim_end_matches('/'), command[0]) == *program)
        };
        ensure!(
            resolved,
            "{pod}: command {command:?} does not run the image's entrypoint {:?} (PATH {:?})",
            image.entrypoint,
            image.path
        );
        std::iter::once(program.clone())
            .chain(command.into_iter().skip(1))
            .chain(args)
            .collect()
    };
    ensure!(
        argv.get(image.entrypoint.len()).map(String::as_str) == Some(subcommand),
        "{pod}: runs {argv:?}, want `{} {subcommand} ...`",
        image.entrypoint.join(" ")
    );
    Ok(())
}

/// The operator pods' logs, for failure messages.
async fn operator_logs(client: &Client, namespace: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
    else {
        return String::new();
    };
    list.items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .map(|name| {
            format!(
                "--- {name}\n{}",
                container_log_tail(namespace, &name, "operator", 40)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks every version seen of a job's pods: the chart's job image run through the image's
/// entrypoint, no API token, executors on spot nodes. Returns the roles seen bound to a node.
fn check_job_pods(
    pods: &[Pod],
    image: &Image,
    capacities: &BTreeMap<String, String>,
) -> Result<BTreeSet<String>> {
    let mut bound = BTreeSet::new();
    for p in pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let role = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kiln.dev/role"))
            .cloned()
            .unwrap_or_default();
        let spec = p.spec.clone().unwrap_or_default();
        let Some(c) = spec.containers.first() else {
            continue;
        };
        ensure!(
            c.image.as_deref() == Some(TEST_IMAGE),
            "{name}: image {:?}, want the chart's default job image",
            c.image
        );
        check_entrypoint(&name, c, image, &role)?;
        ensure!(
            spec.automount_service_account_token == Some(false),
            "{name}: job pods need no API access, yet get a token"
        );
        let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
            continue;
        };
        if role == "executor" {
            ensure!(
                capacities.get(&node).map(String::as_str) == Some("spot"),
                "{name} runs on {node}: the chart's spot placement did not reach the operator"
            );
        }
        bound.insert(role);
    }
    Ok(bound)
}

fn computejob_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kiln.dev", "v1alpha1", "ComputeJob");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

/// Applies the chart's CRD and waits until the API serves ComputeJobs.
async fn install_crd() -> Result<()> {
    let crd = std::fs::read_to_string(repo().join(CRD))?;
    kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &crd,
    )
    .await?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD_NAME}"),
        "--timeout=30s",
    ])
    .await?;
    Ok(())
}

#[tokio::test]
async fn chart_manifests_and_examples_pass_server_side_validation() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let helm = helm_bin().await?;
    let ns = TestNamespace::new(&client, "e2e-helm-tpl").await?;

    // The CRD itself, then for real: the examples need it served.
    let crd = std::fs::read_to_string(repo().join(CRD))?;
    kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &crd).await?;
    install_crd().await?;

    // The chart as the e2e test installs it, with defaults, and in namespaced mode.
    let watch = format!("watchNamespaces={{{}}}", ns.name);
    let renders: [(&str, Vec<&str>); 3] = [
        ("test values", vec!["-f", TEST_VALUES]),
        ("default values", vec![]),
        ("namespaced mode", vec!["--set", &watch]),
    ];
    for (what, extra) in renders {
        let mut args = vec!["template", "kiln", CHART, "--namespace", &ns.name];
        args.extend(extra);
        let manifest = run_helm(&helm, &args).await?;
        let out = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &manifest)
            .await
            .with_context(|| format!("helm template with {what}"))?;
        ensure!(
            out.contains("deployment.apps/kiln-operator") && out.contains("(server dry run)"),
            "{what}: {out}"
        );
    }

    // manifests/install.yaml puts everything in kiln-system: a server dry run needs the
    // namespace to exist (a dry-run Namespace is not created).
    let created = kubectl(&[
        "get",
        "namespace",
        "kiln-system",
        "--ignore-not-found",
        "-o",
        "name",
    ])
    .await?
    .trim()
    .is_empty();
    if created {
        kubectl(&["create", "namespace", "kiln-system"]).await?;
    }
    let install = std::fs::read_to_string(repo().join("manifests/install.yaml"))?;
    let result = kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "-",
        ],
        &install,
    )
    .await;
    if created {
        kubectl(&["delete", "namespace", "kiln-system", "--wait=false"]).await?;
    }
    let out = result.context("manifests/install.yaml")?;
    ensure!(
        out.contains("deployment.apps/kiln-operator"),
        "install.yaml: {out}"
    );

    // The example ComputeJobs against the CRD's schema (strict field validation).
    let out = kubectl(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        &ns.name,
        "-f",
        &repo().join("manifests/examples").to_string_lossy(),
    ])
    .await?;
    ensure!(
        out.matches("computejob.kiln.dev/").count() >= 3,
        "examples: {out}"
    );
    Ok(())
}

#[tokio::test]
async fn helm_release_runs_a_job_and_uninstall_leaves_only_the_crd() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let helm = helm_bin().await?;
    let image = image()?;
    let release_ns = TestNamespace::new(&client, "e2e-helm").await?;
    let jobs_ns = TestNamespace::new(&client, "e2e-helm-jobs").await?;
    let release = "kiln-e2e";
    let ns = release_ns.name.as_str();

    run_helm(
        &helm,
        &[
            "install",
            release,
            CHART,
            "--namespace",
            ns,
            "-f",
            TEST_VALUES,
        ],
    )
    .await?;

    let result = async {
        // Two operator pods, as the chart defines them, on on-demand nodes.
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let operators = wait_for(
            "two running operator pods",
            Duration::from_secs(60),
            || async {
                let list = pods
                    .list(&ListParams::default().labels(&format!(
                        "app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
                    )))
                    .await?;
                let running: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect();
                Ok((running.len() == 2).then_some(running))
            },
        )
        .await;
        let operators = match operators {
            Ok(pods) => pods,
            Err(e) => bail!(
                "{e:#}\noperator logs:\n{}",
                operator_logs(&client, ns).await
            ),
        };
        let capacities = node_capacity_types(&client).await?;
        let mut names = Vec::new();
        for p in &operators {
            let spec = p.spec.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            ensure!(
                spec.service_account_name.as_deref() == Some(&format!("{release}-operator")),
                "{name} runs as {:?}",
                spec.service_account_name
            );
            let c = &spec.containers[0];
            ensure!(
                c.image.as_deref() == Some(TEST_IMAGE),
                "{name}: image {:?}",
                c.image
            );
            check_entrypoint(&name, c, &image, "operator")?;
            let node = spec.node_name.clone().unwrap_or_default();
            ensure!(
                capacities.get(&node).map(String::as_str) == Some("on-demand"),
                "{name} runs on {node}, not an on-demand node"
            );
            names.push(name);
        }

        // One of them leads: it reached the API server from its pod, with its
        // ServiceAccount's token, and the chart's Role lets it hold the Lease.
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let holder = wait_for("a leader in the Lease", Duration::from_secs(60), || async {
            let lease = leases.get(LEASE).await?;
            Ok(lease
                .spec
                .and_then(|s| s.holder_identity)
                .filter(|h| !h.is_empty()))
        })
        .await
        .with_context(|| {
            "no operator pod took the Lease: it cannot reach the API server from its pod, \
             or its RBAC is short (operator logs below)"
        });
        let holder = match holder {
            Ok(h) => h,
            Err(e) => bail!("{e:#}\n{}", operator_logs(&client, ns).await),
        };
        ensure!(
            names.contains(&holder),
            "lease holder {holder} is none of {names:?}"
        );

        // A ComputeJob in another namespace runs to Succeeded. Job pods run on this host,
        // so the inputs are this checkout's example files.
        let data = repo().join("examples/tsv-join").canonicalize()?;
        let job = json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ComputeJob",
            "metadata": {"name": "helm-tsv-join", "namespace": jobs_ns.name.clone()},
            "spec": {
                "executors": {"count": 2, "cpu": "500m", "memory": "512Mi", "placement": "Spot"},
                "driver": {"cpu": "500m", "memory": "512Mi"},
                "shufflePartitions": 4,
                "inputs": [
                    {"name": "customers", "format": "tsv", "options": {"header": true},
                     "uri": data.join("customers.tsv").to_string_lossy()},
                    {"name": "orders", "format": "tsv", "options": {"header": true},
                     "uri": data.join("orders.tsv").to_string_lossy()},
                ],
                "steps": [{"name": "revenue", "sql":
                    "SELECT c.country, count(*) AS orders, sum(o.amount) AS revenue \
                     FROM orders o JOIN customers c ON o.customer_id = c.customer_id \
                     WHERE o.status <> 'returned' GROUP BY c.country"}],
            },
        });
        // Every version of the job's pods, even of those that live less than a poll.
        let watch = PodWatch::start(&client, &jobs_ns.name, "kiln.dev/job=helm-tsv-join").await?;
        kubectl_stdin(&["apply", "-f", "-"], &job.to_string()).await?;
        let jobs = computejob_api(&client, &jobs_ns.name);
        let deadline = Instant::now() + Duration::from_secs(180);
        let (phase, status) = loop {
            // Check the pods the operator built while the job runs; a mismatch fails at once.
            check_job_pods(&watch.seen(), &image, &capacities)?;
            let obj = jobs.get("helm-tsv-join").await?;
            let status = obj.data["status"].clone();
            let phase = status["phase"].as_str().unwrap_or_default().to_owned();
            if matches!(phase.as_str(), "Succeeded" | "Failed") {
                break (phase, status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the ComputeJob did not finish in 180 s: {status:#}\noperator logs:\n{}",
                    operator_logs(&client, ns).await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(
            phase == "Succeeded",
            "the job {phase}: {status:#}\noperator logs:\n{}",
            operator_logs(&client, ns).await
        );
        let roles = check_job_pods(&watch.seen(), &image, &capacities)?;
        ensure!(
            roles.iter().map(String::as_str).eq(["driver", "executor"]),
            "saw job pods of roles {roles:?} bound to nodes"
        );

        // Delete the job while the operator runs (it may hold a finalizer).
        jobs.delete("helm-tsv-join", &DeleteParams::default())
            .await?;
        wait_for("the ComputeJob gone", Duration::from_secs(60), || async {
            Ok(jobs.get_opt("helm-tsv-join").await?.is_none().then_some(()))
        })
        .await?;
        Ok(())
    }
    .await;

    // Uninstall whatever happened; a failure above is the one to report.
    let uninstall = run_helm(
        &helm,
        &[
            "uninstall",
            release,
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "60s",
        ],
    )
    .await;
    result?;
    uninstall?;

    // Nothing of the release is left, in its namespace or cluster-wide; the CRD stays.
    let kinds = "deployments,replicasets,pods,services,endpointslices,serviceaccounts,configmaps,\
                 secrets,roles,rolebindings,leases,poddisruptionbudgets";
    let left = wait_for(
        "the release's objects gone",
        Duration::from_secs(60),
        || async {
            let names = kubectl(&["get", kinds, "-n", ns, "-o", "name"]).await?;
            let left: Vec<String> = names
                .lines()
                .filter(|l| !matches!(*l, "serviceaccount/default" | "configmap/kube-root-ca.crt"))
                .map(str::to_owned)
                .collect();
            Ok(left.is_empty().then_some(()))
        },
    )
    .await;
    if left.is_err() {
        let names = kubectl(&["get", kinds, "-n", ns, "-o", "name"]).await?;
        bail!("left in {ns} after helm uninstall:\n{names}");
    }
    let cluster_left = kubectl(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        &format!("app.kubernetes.io/instance={release}"),
        "-o",
        "name",
    ])
    .await?;
    ensure!(
        cluster_left.trim().is_empty(),
        "left cluster-wide after helm uninstall:\n{cluster_left}"
    );
    let crd = kubectl(&["get", "crd", CRD_NAME, "-o", "name"]).await?;
    ensure!(
        crd.trim() == format!("customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}"),
        "the CRD should stay: {crd}"
    );
    Ok(())
}
