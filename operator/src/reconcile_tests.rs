//! The reconciler against a mock API server (tower-test): each test scripts the API server's
//! side and asserts every request the reconciler makes, in order.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Pod, PodCondition, Secret};
use kiln_api::rpc::JobStatusResponse;
use kiln_api::{ComputeJob, ComputeJobStatus, FailureReason, JobPhase};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use crate::children::JobSecret;
use crate::config::OperatorConfig;
use crate::driver::{DriverApi, DriverCallError};
use crate::metrics::Metrics;
use crate::podstate::LossReason;
use crate::reconcile::{Context, reconcile};
use crate::testing::*;

/// Stands in for the job's driver and remembers what it was told.
#[derive(Default)]
struct FakeDriver {
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl DriverApi for FakeDriver {
    async fn executor_lost(
        &self,
        driver_ip: &str,
        executor: &str,
        reason: LossReason,
        _occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError> {
        self.calls.lock().unwrap().push(format!(
            "ExecutorLost {driver_ip} {executor} {} {}",
            reason.as_str(),
            secret.token
        ));
        Ok(true)
    }

    async fn job_status(
        &self,
        driver_ip: &str,
        secret: &JobSecret,
    ) -> Result<JobStatusResponse, DriverCallError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("JobStatus {driver_ip} {}", secret.token));
        Ok(JobStatusResponse {
            stages_total: 2,
            stages_done: 1,
            tasks_total: 8,
            tasks_done: 5,
            partitions_recomputed: 1,
            ..Default::default()
        })
    }

    async fn decommission(
        &self,
        driver_ip: &str,
        executor: &str,
        cause: &str,
        _occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError> {
        self.calls.lock().unwrap().push(format!(
            "Decommission {driver_ip} {executor} {cause} {}",
            secret.token
        ));
        Ok(true)
    }
}

struct ApiServer(Handle<Request<Body>, Response<Body>>);

type Reply = SendResponse<Response<Body>>;

impl ApiServer {
    /// The next request: asserts its method and path, returns its JSON body and the reply.
    async fn expect(&mut self, method: &str, path: &str) -> (Value, String, Reply) {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        let uri = request.uri().to_string();
        assert_eq!(
            (request.method().as_str(), uri.split('?').next().unwrap()),
            (method, path),
            "unexpected request {uri}"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (body, uri, reply)
    }

    /// The next request, answered with `value`.
    async fn answer(&mut self, method: &str, path: &str, value: Value) -> (Value, String) {
        let (body, uri, reply) = self.expect(method, path).await;
        ok(reply, value);
        (body, uri)
    }

    /// A server-side apply or create, answered with its own body.
    async fn echo(&mut self, method: &str, path: &str) -> Value {
        let (body, uri, reply) = self.expect(method, path).await;
        if method == "PATCH" {
            assert!(uri.contains("fieldManager=kiln-operator"), "{uri}");
            assert!(uri.contains("force=true"), "{uri}");
        }
        ok(reply, body.clone());
        body
    }

    /// A status write: checks it is an apply of the status alone, answers with `job` carrying
    /// it, and returns the status.
    async fn status(&mut self, job: &ComputeJob) -> ComputeJobStatus {
        let (body, uri, reply) = self
            .expect(
                "PATCH",
                "/apis/kiln.dev/v1alpha1/namespaces/ns/computejobs/wc/status",
            )
            .await;
        assert!(uri.contains("fieldManager=kiln-operator"), "{uri}");
        assert_eq!(body["kind"], "ComputeJob");
        assert!(
            body.get("spec").is_none(),
            "a status patch carries only the status"
        );
        let status: ComputeJobStatus = serde_json::from_value(body["status"].clone()).unwrap();
        let mut answer = job.clone();
        answer.status = Some(status.clone());
        ok(reply, serde_json::to_value(answer).unwrap());
        status
    }

    async fn event(&mut self, reason: &str) {
        let body = self
            .echo("POST", "/apis/events.k8s.io/v1/namespaces/ns/events")
            .await;
        assert_eq!(body["reason"], reason);
        assert_eq!(body["regarding"]["name"], "wc");
    }

    async fn job(&mut self, job: &ComputeJob) {
        self.answer(
            "GET",
            "/apis/kiln.dev/v1alpha1/namespaces/ns/computejobs/wc",
            serde_json::to_value(job).unwrap(),
        )
        .await;
    }

    async fn pods(&mut self, pods: &[Pod]) {
        let (_, uri) = self
            .answer(
                "GET",
                "/api/v1/namespaces/ns/pods",
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
            )
            .await;
        assert!(uri.contains("labelSelector=kiln.dev%2Fjob%3Dwc"), "{uri}");
    }

    async fn token(&mut self, exists: bool) {
        let (_, _, reply) = self
            .expect("GET", "/api/v1/namespaces/ns/secrets/wc-token")
            .await;
        if exists {
            let secret = crate::children::token_secret(
                &job("wc"),
                &JobSecret {
                    token: "tok".into(),
                    credentials: None,
                },
            );
            ok(reply, serde_json::to_value::<Secret>(secret).unwrap());
        } else {
            not_found(reply);
        }
    }

    async fn delete(&mut self, pod: &str) -> Value {
        let path = format!("/api/v1/namespaces/ns/pods/{pod}");
        let (body, _, reply) = self.expect("DELETE", &path).await;
        ok(
            reply,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod}}),
        );
        body
    }
}

fn ok(reply: Reply, value: Value) {
    reply.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&value).unwrap()))
            .unwrap(),
    );
}

fn not_found(reply: Reply) {
    reply.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(
                serde_json::to_vec(&json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "not found", "reason": "NotFound", "code": 404
                }))
                .unwrap(),
            ))
            .unwrap(),
    );
}

/// A context on a mock API server, at test time `now`.
fn context(
    now: fn() -> k8s_openapi::jiff::Timestamp,
) -> (Arc<Context>, ApiServer, Arc<FakeDriver>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ns");
    let driver = Arc::new(FakeDriver::default());
    let mut ctx = Context::new(
        client,
        OperatorConfig::default(),
        "kiln:test".into(),
        driver.clone(),
        Arc::new(Metrics::default()),
    );
    ctx.clock = now;
    (Arc::new(ctx), ApiServer(handle), driver)
}

/// Runs one reconcile of `job` against the scripted server; returns the requeue and the
/// driver's calls, and checks no request was left unscripted.
async fn reconcile_with<F>(
    job: &ComputeJob,
    now: fn() -> k8s_openapi::jiff::Timestamp,
    script: impl FnOnce(ApiServer) -> F,
) -> (kube::runtime::controller::Action, Vec<String>)
where
    F: std::future::Future<Output = ApiServer>,
{
    let (ctx, server, driver) = context(now);
    let task = tokio::spawn(reconcile(Arc::new(job.clone()), ctx));
    let mut server = script(server).await;
    let action = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("reconcile finished")
        .unwrap()
        .expect("reconcile succeeded");
    assert!(
        server.0.next_request().await.is_none(),
        "the reconciler made a request the test did not expect"
    );
    let calls = driver.calls.lock().unwrap().clone();
    (action, calls)
}

/// A job running at time 10: driver on the on-demand node, two executors on spot nodes.
fn running_job() -> (ComputeJob, Vec<Pod>) {
    let mut j = job("wc");
    let config = OperatorConfig::default();
    let ctx = crate::pods::PodContext {
        job: &j,
        config: &config,
        image: "kiln:test",
    };
    let driver = running(
        scheduled(crate::pods::driver_pod(ctx, 1, None), "kiln-ondemand-1", 0),
        "10.244.3.2",
    );
    let execs: Vec<Pod> = (0..2)
        .map(|i| {
            running(
                scheduled(
                    crate::pods::executor_pod(ctx, i, "10.244.3.2"),
                    if i == 0 { "kiln-spot-1" } else { "kiln-spot-2" },
                    1,
                ),
                &format!("10.244.{}.2", i + 1),
            )
        })
        .collect();
    let mut status = ComputeJobStatus {
        phase: JobPhase::Running,
        ..Default::default()
    };
    status.driver.attempt = 1;
    status.executors.pods = vec!["wc-exec-0".into(), "wc-exec-1".into()];
    status.executors.next_index = 2;
    status.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(0)));
    j.status = Some(status);
    let mut pods = vec![driver];
    pods.extend(execs);
    (j, pods)
}

#[tokio::test]
async fn a_new_job_gets_its_children_by_server_side_apply() {
    let j = job("wc");
    let script_job = j.clone();
    let (action, calls) = reconcile_with(
        &j,
        || at(0),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&[]).await;
            s.token(false).await;
            let secret = s
                .echo("PATCH", "/api/v1/namespaces/ns/secrets/wc-token")
                .await;
            assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "wc");
            let token = secret["data"]["token"].as_str().unwrap().to_string();
            assert!(token.len() > 40, "a fresh random token");
            for key in [
                "ca.crt",
                "driver.crt",
                "driver.key",
                "executor.key",
                "operator.crt",
            ] {
                assert!(
                    secret["data"][key].is_string(),
                    "a new job's credentials: {key}"
                );
            }
            let cm = s
                .echo("PATCH", "/api/v1/namespaces/ns/configmaps/wc-spec")
                .await;
            assert!(
                cm["data"]["job.yaml"]
                    .as_str()
                    .unwrap()
                    .contains("GROUP BY line")
            );
            let svc = s
                .echo("PATCH", "/api/v1/namespaces/ns/services/wc-driver")
                .await;
            assert_eq!(svc["spec"]["clusterIP"], "None");
            let policy = s
                .echo(
                    "PATCH",
                    "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/wc-pods",
                )
                .await;
            assert_eq!(
                policy["spec"]["podSelector"]["matchLabels"]["kiln.dev/job"],
                "wc"
            );
            let pod = s
                .echo("PATCH", "/api/v1/namespaces/ns/pods/wc-driver")
                .await;
            assert_eq!(pod["metadata"]["labels"]["kiln.dev/role"], "driver");
            assert_eq!(pod["metadata"]["labels"]["kiln.dev/job"], "wc");
            assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Pending);
            assert_eq!(status.driver.attempt, 1);
            assert_eq!(status.observed_generation, Some(1));
            s.event("Started").await;
            s
        },
    )
    .await;
    assert!(calls.is_empty(), "no driver to talk to yet: {calls:?}");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(3))
    );
}

#[tokio::test]
async fn an_executor_on_a_lost_node_is_reported_and_replaced() {
    let (j, mut pods) = running_job();
    // The control plane marked exec-1 not ready: its node stopped reporting.
    let conditions = pods[2]
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap();
    *conditions = vec![PodCondition {
        type_: "Ready".into(),
        status: "False".into(),
        ..Default::default()
    }];
    let script_job = j.clone();
    let (_, calls) = reconcile_with(
        &j,
        || at(30),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&pods).await;
            let node = Node {
                metadata: kube::api::ObjectMeta {
                    name: Some("kiln-spot-2".into()),
                    ..Default::default()
                },
                status: Some(NodeStatus {
                    conditions: Some(vec![NodeCondition {
                        type_: "Ready".into(),
                        status: "Unknown".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            s.answer(
                "GET",
                "/api/v1/nodes/kiln-spot-2",
                serde_json::to_value(node).unwrap(),
            )
            .await;
            s.token(true).await;
            let delete = s.delete("wc-exec-1").await;
            assert_eq!(
                delete["gracePeriodSeconds"], 0,
                "no kubelet will confirm it"
            );
            let pod = s
                .echo("PATCH", "/api/v1/namespaces/ns/pods/wc-exec-2")
                .await;
            assert_eq!(pod["metadata"]["labels"]["kiln.dev/role"], "executor");
            let status = s.status(&script_job).await;
            assert_eq!(status.executors.lost, 1);
            assert_eq!(status.executors.lost_by_reason["NodeLost"], 1);
            assert_eq!(status.executors.pods, ["wc-exec-0", "wc-exec-2"]);
            assert_eq!(status.recovery.last_loss.as_deref(), Some("wc-exec-1"));
            assert_eq!(status.recovery.partitions_recomputed, 1);
            assert_eq!(status.progress.summary, "5/8");
            assert!(status.is_true("Degraded"));
            s.event("ExecutorLost").await;
            s
        },
    )
    .await;
    assert_eq!(
        calls,
        [
            "JobStatus 10.244.3.2 tok",
            "ExecutorLost 10.244.3.2 wc-exec-1 NodeLost tok"
        ]
    );
}

#[tokio::test]
async fn a_vanished_driver_is_replaced_by_one_that_takes_over_the_executors() {
    let (j, mut pods) = running_job();
    // The driver pod was deleted outright; its executors run on.
    pods.remove(0);
    let script_job = j.clone();
    let (_, calls) = reconcile_with(
        &j,
        || at(30),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&pods).await;
            s.token(true).await;
            s.echo("PATCH", "/api/v1/namespaces/ns/secrets/wc-token")
                .await;
            s.echo("PATCH", "/api/v1/namespaces/ns/configmaps/wc-spec")
                .await;
            s.echo("PATCH", "/api/v1/namespaces/ns/services/wc-driver")
                .await;
            s.echo(
                "PATCH",
                "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/wc-pods",
            )
            .await;
            // No executor is deleted: the new driver pod comes next.
            let pod = s
                .echo("PATCH", "/api/v1/namespaces/ns/pods/wc-driver")
                .await;
            assert_eq!(pod["metadata"]["labels"]["kiln.dev/attempt"], "2");
            let args: Vec<String> =
                serde_json::from_value(pod["spec"]["containers"][0]["args"].clone()).unwrap();
            assert!(args.contains(&"--epoch=2".to_string()), "{args:?}");
            assert!(
                args.contains(&"--attach=10.244.1.2:7078,10.244.2.2:7078".to_string()),
                "{args:?}"
            );
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Pending);
            assert_eq!((status.driver.attempt, status.driver.restarts), (2, 1));
            assert_eq!(status.recovery.driver_losses, 1);
            assert_eq!(status.executors.pods, ["wc-exec-0", "wc-exec-1"]);
            assert_eq!(status.executors.lost, 0);
            s.event("DriverLost").await;
            s.event("DriverRestarted").await;
            s
        },
    )
    .await;
    assert!(calls.is_empty(), "no driver to talk to: {calls:?}");
}

#[tokio::test]
async fn driver_success_finishes_the_job() {
    let (j, mut pods) = running_job();
    let report = r#"{"succeeded":true,"elapsedMs":900,"stages":2,"tasks":8,"attempts":8,"partitionsRecomputed":0,"rows":42,"files":4,"outputUri":"/data/out/"}"#;
    pods[0] = exited(pods[0].clone(), 0, Some(report), 1, 40);
    for p in &mut pods[1..] {
        *p = exited(p.clone(), 0, None, 1, 40);
    }
    let script_job = j.clone();
    let (action, calls) = reconcile_with(
        &j,
        || at(41),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&pods).await;
            s.token(true).await;
            s.delete("wc-exec-0").await;
            s.delete("wc-exec-1").await;
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Succeeded);
            assert!(status.is_true("Succeeded"));
            assert_eq!(status.result.as_ref().unwrap().rows, 42);
            assert_eq!(status.completion_time.as_ref().unwrap().0, at(41));
            s.event("Succeeded").await;
            s
        },
    )
    .await;
    assert!(calls.is_empty());
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn driver_failure_fails_the_job_with_its_reason() {
    let (j, mut pods) = running_job();
    let reason = FailureReason::InvalidInput;
    let report = kiln_api::DriverReport {
        reason: Some(reason),
        message: Some("cannot read /data/corpus/: No such file or directory".into()),
        elapsed_ms: 30,
        ..Default::default()
    }
    .to_termination_message();
    pods[0] = exited(pods[0].clone(), 1, Some(&report), 1, 5);
    let script_job = j.clone();
    let (_, _) = reconcile_with(
        &j,
        || at(6),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&pods).await;
            s.token(true).await;
            s.delete("wc-exec-0").await;
            s.delete("wc-exec-1").await;
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Failed);
            let c = status.condition("Failed").unwrap();
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("True", reason.as_str())
            );
            assert!(c.message.contains("/data/corpus/"));
            s.event(reason.as_str()).await;
            s
        },
    )
    .await;
}

#[tokio::test]
async fn a_suspended_job_loses_its_pods_and_keeps_its_status() {
    let (mut j, pods) = running_job();
    j.spec.suspend = true;
    j.status.as_mut().unwrap().progress.tasks_done = 5;
    let script_job = j.clone();
    let (action, calls) = reconcile_with(
        &j,
        || at(20),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&pods).await;
            for pod in ["wc-driver", "wc-exec-0", "wc-exec-1"] {
                s.delete(pod).await;
            }
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Suspended);
            assert_eq!(status.progress.tasks_done, 5, "status kept");
            assert_eq!(status.driver.attempt, 1);
            s.event("Suspended").await;
            s
        },
    )
    .await;
    assert!(calls.is_empty(), "a suspended job's driver is not polled");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn a_bad_spec_is_answered_with_a_condition_not_a_retry() {
    let mut j = job("wc");
    j.spec.executors.memory = "4GB".into();
    j.spec.steps[0].name = "1st".into();
    let script_job = j.clone();
    let (action, calls) = reconcile_with(
        &j,
        || at(0),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&[]).await;
            let status = s.status(&script_job).await;
            assert_eq!(status.phase, JobPhase::Failed);
            let c = status.condition("Failed").unwrap();
            assert_eq!(c.reason, FailureReason::InvalidSpec.as_str());
            assert!(c.message.contains("spec.executors.memory"), "{}", c.message);
            assert!(c.message.contains("spec.steps[0].name"), "{}", c.message);
            s.event(FailureReason::InvalidSpec.as_str()).await;
            s
        },
    )
    .await;
    assert!(calls.is_empty());
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn a_finished_job_is_left_alone() {
    let (mut j, _) = running_job();
    j.status.as_mut().unwrap().phase = JobPhase::Succeeded;
    let finished = Arc::new(Mutex::new(None));
    let seen = finished.clone();
    let script_job = j.clone();
    let (action, calls) = reconcile_with(
        &j,
        || at(500),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&[]).await;
            // Conditions are filled in once; after that nothing changes and nothing is written.
            let status = s.status(&script_job).await;
            *seen.lock().unwrap() = Some(status);
            s
        },
    )
    .await;
    assert!(calls.is_empty());
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let mut again = j.clone();
    again.status = finished.lock().unwrap().clone();
    let script_job = again.clone();
    let (_, _) = reconcile_with(
        &again,
        || at(600),
        |mut s| async move {
            s.job(&script_job).await;
            s.pods(&[]).await;
            s
        },
    )
    .await;
}
