//! End-to-end tests of the test cluster itself: nodes, placement, pod
//! networking, container status, and node loss.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use kiln_e2e::operator::scratch;
use kiln_e2e::{
    CAPACITY_TYPE, SPOT_TAINT, TestNamespace, agent_control, client, has_condition, http, kubectl,
    node_capacity_types, node_ready, pod_ready, repo, serial, wait_for,
};

/// A small HTTP server (python3 from the host, via the `python:*` mapping).
fn web_deployment(name: &str, replicas: i32, spot: bool) -> Result<Deployment> {
    let mut spec = json!({
        "containers": [{
            "name": "web",
            "image": "python:3",
            "command": ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
            "ports": [{"containerPort": 8080}],
        }],
        "terminationGracePeriodSeconds": 5,
    });
    if spot {
        spec["nodeSelector"] = json!({ CAPACITY_TYPE: "spot" });
        spec["tolerations"] =
            json!([{ "key": SPOT_TAINT, "operator": "Exists", "effect": "NoSchedule" }]);
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))?)
}

async fn ready_pods(pods: &Api<Pod>, app: &str, want: usize) -> Result<Vec<Pod>> {
    wait_for(
        &format!("{want} ready pods of {app}"),
        Duration::from_secs(60),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await?;
            let ready: Vec<Pod> = list.items.into_iter().filter(pod_ready).collect();
            Ok((ready.len() >= want).then_some(ready))
        },
    )
    .await
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn ip_of(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn nodes_are_ready_and_server_reports_its_version() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("kiln.dev/node-agent=true"))
        .await?;
    let count = |v: &str| {
        nodes
            .items
            .iter()
            .filter(|n| {
                n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(CAPACITY_TYPE))
                    .map(String::as_str)
                    == Some(v)
            })
            .count()
    };
    ensure!(count("spot") >= 2, "want at least 2 spot nodes");
    ensure!(count("on-demand") >= 1, "want at least 1 on-demand node");
    for n in &nodes.items {
        ensure!(
            node_ready(n).as_deref() == Some("True"),
            "node {:?} not Ready",
            n.metadata.name
        );
        let spot = n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CAPACITY_TYPE))
            .map(String::as_str)
            == Some("spot");
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| {
                ts.iter()
                    .any(|t| t.key == SPOT_TAINT && t.effect == "NoSchedule")
            });
        ensure!(
            spot == tainted,
            "node {:?}: spot={spot} but tainted={tainted}",
            n.metadata.name
        );
    }

    let table = kubectl(&["get", "nodes", "-L", CAPACITY_TYPE]).await?;
    ensure!(
        table.contains("kiln-spot-1") && table.contains(" Ready"),
        "kubectl get nodes:\n{table}"
    );

    let version: serde_json::Value =
        serde_json::from_str(&kubectl(&["version", "-o", "json"]).await?)?;
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let client_v = version["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    ensure!(server.starts_with("v1.34."), "server version {server}");
    ensure!(server == client_v, "server {server} vs kubectl {client_v}");
    let info = client.apiserver_version().await?;
    ensure!(
        info.git_version == server,
        "/version says {}",
        info.git_version
    );
    ensure!(info.minor == "34", "/version minor {}", info.minor);
    Ok(())
}

#[tokio::test]
async fn deployments_land_where_selectors_and_tolerations_allow_and_pods_talk() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "e2e-place").await?;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deploys
        .create(
            &PostParams::default(),
            &web_deployment("web-spot", 3, true)?,
        )
        .await?;
    deploys
        .create(
            &PostParams::default(),
            &web_deployment("web-plain", 2, false)?,
        )
        .await?;

    let capacities = node_capacity_types(&client).await?;
    let capacity = |node: &str| capacities.get(node).cloned().unwrap_or_default();
    let spot_pods = ready_pods(&pods, "web-spot", 3).await?;
    for p in &spot_pods {
        ensure!(
            capacity(&node_of(p)) == "spot",
            "spot pod on {}",
            node_of(p)
        );
    }
    // Without a toleration, the spot taint leaves only on-demand nodes.
    let plain_pods = ready_pods(&pods, "web-plain", 2).await?;
    for p in &plain_pods {
        ensure!(
            capacity(&node_of(p)) == "on-demand",
            "untolerating pod on {}",
            node_of(p)
        );
    }

    // Host → pod: the operator's view.
    let target = ip_of(&spot_pods[0]);
    ensure!(target.starts_with("10.244."), "pod IP {target}");
    let (code, _) = wait_for(
        "the web pod to answer the host",
        Duration::from_secs(20),
        || async { Ok(http(&format!("{target}:8080"), "GET", "/").await.ok()) },
    )
    .await?;
    ensure!(code == 200, "host GET → {code}");

    // Pod → pod: a client pod on the on-demand node fetches from a spot pod
    // and reports through its termination message.
    let script = format!(
        "import time, urllib.request\n\
         for i in range(40):\n\
         \x20   try:\n\
         \x20       r = urllib.request.urlopen('http://{target}:8080/', timeout=2)\n\
         \x20       open('/dev/termination-log', 'w').write('status=%d' % r.status)\n\
         \x20       break\n\
         \x20   except Exception as e:\n\
         \x20       time.sleep(0.25)\n\
         else:\n\
         \x20   raise SystemExit(1)\n"
    );
    let fetch: Pod = serde_json::from_value(json!({
        "metadata": {"name": "fetch"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "fetch", "image": "python:3", "command": ["python3", "-c", script]}],
        },
    }))?;
    pods.create(&PostParams::default(), &fetch).await?;
    let done = wait_for(
        "the fetch pod to finish",
        Duration::from_secs(60),
        || async {
            let p = pods.get("fetch").await?;
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(p))
        },
    )
    .await?;
    let status = done.status.clone().unwrap_or_default();
    let term = status.container_statuses.unwrap_or_default()[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .context("fetch container not terminated")?;
    ensure!(
        status.phase.as_deref() == Some("Succeeded"),
        "fetch pod {:?}: {term:?}",
        status.phase
    );
    ensure!(
        term.message.as_deref() == Some("status=200"),
        "termination message {:?}",
        term.message
    );
    ensure!(
        capacity(&node_of(&done)) == "on-demand",
        "fetch pod on {}",
        node_of(&done)
    );
    Ok(())
}

#[tokio::test]
async fn container_status_restart_policy_and_process_kill() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "e2e-status").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = |name: &str, policy: &str, cmd: &str| -> Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "main", "image": "busybox:1", "command": ["sh", "-c", cmd],
                    "terminationMessagePath": "/tmp/kiln-e2e-message",
                    "env": [{"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "GREETING", "value": "ip=$(MY_IP)"}],
                }],
            },
        }))?)
    };
    pods.create(
        &PostParams::default(),
        &pod(
            "fails",
            "Never",
            "echo \"$GREETING\" > /tmp/kiln-e2e-message; exit 3",
        )?,
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod("sleeper", "Always", "sleep 300")?,
    )
    .await?;

    let failed = wait_for("pod fails", Duration::from_secs(60), || async {
        let p = pods.get("fails").await?;
        Ok((p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")).then_some(p))
    })
    .await?;
    let st = failed.status.clone().unwrap_or_default();
    let term = st.container_statuses.unwrap_or_default()[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .context("terminated")?;
    ensure!(term.exit_code == 3, "exit code {}", term.exit_code);
    let want = format!("ip={}", st.pod_ip.clone().unwrap_or_default());
    ensure!(
        term.message.as_deref().map(str::trim) == Some(want.as_str()),
        "message {:?}, want {want}",
        term.message
    );

    // Kill the sleeper's process: restartPolicy Always restarts it.
    let running = wait_for("sleeper running", Duration::from_secs(60), || async {
        let p = pods.get("sleeper").await?;
        Ok(pod_ready(&p).then_some(p))
    })
    .await?;
    ensure!(!node_of(&running).is_empty());
    agent_control(
        "POST",
        &format!("/pods/{}/sleeper/kill?signal=KILL", ns.name),
    )
    .await?;
    let restarted = wait_for("sleeper restarted", Duration::from_secs(30), || async {
        let p = pods.get("sleeper").await?;
        let cs = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        Ok((cs.first().is_some_and(|c| c.restart_count >= 1 && c.ready)).then_some(cs))
    })
    .await?;
    let last = restarted[0]
        .last_state
        .clone()
        .and_then(|s| s.terminated)
        .context("last state")?;
    ensure!(
        last.exit_code == 137,
        "killed process exit code {}",
        last.exit_code
    );

    // Graceful delete: SIGTERM, then the pod object goes away.
    let started = Instant::now();
    pods.delete("sleeper", &Default::default()).await?;
    wait_for("sleeper deleted", Duration::from_secs(30), || async {
        Ok(pods.get_opt("sleeper").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "delete took {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn node_status(client: &Client, name: &str) -> Result<String> {
    Ok(node_ready(&Api::<Node>::all(client.clone()).get(name).await?).unwrap_or_default())
}

#[tokio::test]
async fn killed_spot_node_goes_not_ready_and_its_pods_are_replaced_elsewhere() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "e2e-loss").await?;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deploys
        .create(
            &PostParams::default(),
            &web_deployment("spot-web", 2, true)?,
        )
        .await?;
    let before = ready_pods(&pods, "spot-web", 2).await?;
    let victim = node_of(&before[0]);
    let victims: Vec<String> = before
        .iter()
        .filter(|p| node_of(p) == victim)
        .filter_map(|p| p.metadata.name.clone())
        .collect();

    let t0 = Instant::now();
    agent_control("POST", &format!("/nodes/{victim}/kill")).await?;
    let result = async {
        wait_for("node NotReady", Duration::from_secs(30), || async {
            let s = node_status(&client, &victim).await?;
            Ok((s != "True").then_some(()))
        })
        .await?;
        let not_ready_after = t0.elapsed();
        // Taint-based eviction: DisruptionTarget on each pod of the dead node.
        for name in &victims {
            wait_for(
                &format!("DisruptionTarget on {name}"),
                Duration::from_secs(30),
                || async {
                    // The pod stays (Terminating) while its node is dead:
                    // no kubelet confirms the deletion.
                    let p = pods.get(name).await?;
                    Ok(has_condition(&p, "DisruptionTarget").then_some(()))
                },
            )
            .await?;
        }
        // Replacements run on the other spot node.
        let replaced = wait_for("replacement pods", Duration::from_secs(40), || async {
            let list = pods
                .list(&ListParams::default().labels("app=spot-web"))
                .await?;
            let ready: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| pod_ready(p) && node_of(p) != victim)
                .collect();
            Ok((ready.len() >= 2).then_some(ready))
        })
        .await?;
        let all_after = t0.elapsed();
        for p in &replaced {
            ensure!(
                node_of(p) != victim && node_of(p).contains("spot"),
                "replacement on {}",
                node_of(p)
            );
        }
        eprintln!(
            "node NotReady after {not_ready_after:?}; replacements ready after {all_after:?}"
        );
        ensure!(
            all_after < Duration::from_secs(60),
            "recovery took {all_after:?}"
        );
        Ok(())
    }
    .await;

    // Bring the node back for the other tests, whatever happened.
    agent_control("POST", &format!("/nodes/{victim}/restore")).await?;
    wait_for("node Ready again", Duration::from_secs(40), || async {
        Ok((node_status(&client, &victim).await? == "True").then_some(()))
    })
    .await?;
    result
}

#[tokio::test]
async fn drained_node_evicts_gracefully() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "e2e-drain").await?;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deploys
        .create(
            &PostParams::default(),
            &web_deployment("drain-web", 2, true)?,
        )
        .await?;
    let before = ready_pods(&pods, "drain-web", 2).await?;
    let node = node_of(&before[0]);
    let result = async {
        kubectl(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=60s",
        ])
        .await?;
        let after = wait_for(
            "pods off the drained node",
            Duration::from_secs(60),
            || async {
                let list = pods
                    .list(&ListParams::default().labels("app=drain-web"))
                    .await?;
                let ready: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| pod_ready(p) && node_of(p) != node)
                    .collect();
                Ok((ready.len() >= 2).then_some(ready))
            },
        )
        .await?;
        ensure!(after.iter().all(|p| node_of(p) != node));
        Ok(())
    }
    .await;
    kubectl(&["uncordon", &node]).await?;
    result
}

/// The node agent holds containers to their memory limit and security context as a
/// kubelet does, so that a regression in Kiln's own pods (more memory than their limit, a
/// write outside their volumes, running as root) fails the end-to-end tests as it would
/// fail on a real node.
#[tokio::test]
async fn containers_are_held_to_their_memory_limit_and_security_context() -> Result<()> {
    let _g = serial().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "e2e-confine").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // Writable by anyone, but not one of the agent's shared paths: only a read-only root
    // stops a write there.
    let outside = repo().join(".cache/rootfs-probe");
    std::fs::create_dir_all(&outside)?;
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777))?;
    let shared = scratch("confine")?;
    let run = |name: &str, image: &str, command: serde_json::Value, extra: serde_json::Value| {
        let mut p = json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "command": command}],
            },
        });
        json_patch(&mut p["spec"], extra);
        serde_json::from_value::<Pod>(p)
    };
    let probe = format!(
        r#"set -u
say() {{ echo "$1" > /dev/termination-log; exit "$2"; }}
[ "$(id -u)" = 65532 ] || say "uid $(id -u)" 11
id -G | grep -qw 65532 || say "groups $(id -G)" 12
grep -q 'NoNewPrivs:[[:space:]]*1' /proc/self/status || say "no_new_privs unset" 13
if echo x 2>/dev/null > '{outside}/probe'; then say "wrote outside its volumes" 14; fi
echo x > /tmp/probe || say "emptyDir not writable" 15
echo x > '{shared}/probe' || say "shared path not writable" 16
say confined 0
"#,
        outside = outside.display(),
        shared = shared.display(),
    );
    let confined = json!({
        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                            "fsGroup": 65532},
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{"name": "main", "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false}}],
    });
    let hog = json!({"containers": [{"name": "main",
        "resources": {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}}]});
    let root = json!({"securityContext": {"runAsNonRoot": true}});
    for p in [
        run(
            "confined",
            "busybox:1",
            json!(["sh", "-c", probe]),
            confined,
        )?,
        run(
            "hog",
            "python:3",
            json!(["python3", "-c", "b = b'x' * (512 << 20); print(len(b))"]),
            hog,
        )?,
        run("root", "busybox:1", json!(["sh", "-c", "exit 0"]), root)?,
    ] {
        pods.create(&PostParams::default(), &p).await?;
    }

    let ended = |name: &'static str| {
        let pods = pods.clone();
        async move {
            wait_for(name, Duration::from_secs(60), || async {
                let p = pods.get(name).await?;
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                Ok(matches!(phase.as_deref(), Some("Succeeded" | "Failed")).then_some(p))
            })
            .await
        }
    };
    let terminated = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone())
            .context("no terminated state")
    };
    let t = terminated(&ended("confined").await?)?;
    ensure!(
        t.exit_code == 0 && t.message.as_deref().map(str::trim) == Some("confined"),
        "confined pod: exit {} {:?}",
        t.exit_code,
        t.message
    );
    let t = terminated(&ended("hog").await?)?;
    ensure!(
        t.reason.as_deref() == Some("OOMKilled") && t.exit_code == 137,
        "a pod over its memory limit ended {:?} with exit {}",
        t.reason,
        t.exit_code
    );
    let waiting = wait_for("root refused", Duration::from_secs(30), || async {
        let p = pods.get("root").await?;
        let w = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|cs| cs.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.waiting);
        Ok(w.filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError")))
    })
    .await?;
    ensure!(
        waiting
            .message
            .as_deref()
            .is_some_and(|m| m.contains("runAsNonRoot")),
        "message {:?}",
        waiting.message
    );
    Ok(())
}

/// Merges `patch` into `base`: objects key by key, the containers list item by item.
fn json_patch(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                json_patch(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (serde_json::Value::Array(b), serde_json::Value::Array(p)) => {
            for (i, v) in p.into_iter().enumerate() {
                match b.get_mut(i) {
                    Some(slot) => json_patch(slot, v),
                    None => b.push(v),
                }
            }
        }
        (b, p) => *b = p,
    }
}
