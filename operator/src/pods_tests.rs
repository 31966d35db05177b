//! The pod builders: placement, lockdown, command lines (round-tripped through the launch
//! contract), template overrides and what a replacement driver takes over.
use super::*;
use crate::testing::job;

fn ctx<'a>(job: &'a ComputeJob, config: &'a OperatorConfig) -> PodContext<'a> {
    PodContext {
        job,
        config,
        image: "kiln:test",
    }
}

fn terms(p: &Pod) -> Vec<NodeSelectorTerm> {
    p.spec
        .as_ref()
        .unwrap()
        .affinity
        .clone()
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .map(|s| s.node_selector_terms)
        .unwrap_or_default()
}

#[test]
fn driver_stays_off_spot_and_runs_locked_down() {
    let (j, config) = (job("wc"), OperatorConfig::default());
    let p = driver_pod(ctx(&j, &config), 2, None);
    let labels = p.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_JOB], "wc");
    assert_eq!(labels[LABEL_ROLE], "driver");
    assert_eq!(labels[LABEL_ATTEMPT], "2");
    let annotations = p.metadata.annotations.clone().unwrap();
    assert_eq!(
        annotations.keys().collect::<Vec<_>>(),
        [ANNOTATION_SAFE_TO_EVICT, ANNOTATION_DO_NOT_DISRUPT],
        "nothing taken over; protected from voluntary disruption"
    );
    assert_eq!(annotations[ANNOTATION_DO_NOT_DISRUPT], "true");
    // An executor carries neither until it holds data nobody else has.
    let e = executor_pod(ctx(&j, &config), 0, "ip");
    assert_eq!(e.metadata.annotations, None);
    assert_eq!(Takeover::recorded(&p), None);
    let t = terms(&p);
    assert_eq!(t.len(), 1, "one term: every spot label absent");
    let exprs = t[0].match_expressions.clone().unwrap();
    assert!(exprs.iter().all(|e| e.operator == "NotIn"));
    assert!(exprs.iter().any(|e| e.key == "karpenter.sh/capacity-type"
        && e.values.as_deref() == Some(&["spot".to_string()][..])));
    let spec = p.spec.unwrap();
    assert_eq!(spec.tolerations, None);
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
    let c = &spec.containers[0];
    assert_eq!(c.command.as_deref().unwrap(), ["kiln"]);
    let args = c.args.as_deref().unwrap();
    assert_eq!(args[0], DriverLaunch::SUBCOMMAND);
    let launch = DriverLaunch::parse_args(&args[1..]).unwrap();
    assert_eq!(launch.spec.to_str(), Some("/etc/kiln/job.yaml"));
    assert_eq!(launch.bind.port(), DRIVER_PORT);
    assert_eq!(
        launch.termination_message.unwrap().to_str(),
        Some(TERMINATION_MESSAGE_PATH)
    );
    assert_eq!(launch.epoch, 2, "the epoch is the attempt");
    assert!(launch.attach.is_empty());
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(mounts, ["/tmp", "/etc/kiln"]);
    let uid = c.env.iter().flatten().find(|e| e.name == ENV_JOB_UID);
    assert_eq!(uid.unwrap().value.as_deref(), Some("uid-wc"));
    let token = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == ENV_TOKEN)
        .unwrap();
    assert_eq!(
        token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "wc-token"
    );
}

#[test]
fn a_replacement_driver_attaches_to_the_executors_left_behind() {
    let (j, config) = (job("wc"), OperatorConfig::default());
    let takeover = Takeover {
        attach: vec![
            executor_address("10.244.1.2"),
            executor_address("10.244.2.7"),
        ],
        stages_resumed_before: 3,
    };
    let p = driver_pod(ctx(&j, &config), 3, Some(&takeover));
    assert_eq!(labels_of(&p)[LABEL_ATTEMPT], "3");
    let args = p.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    assert!(
        args.contains(&"--attach=10.244.1.2:7078,10.244.2.7:7078".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&"--epoch=3".to_string()), "{args:?}");
    let launch = DriverLaunch::parse_args(&args[1..]).unwrap();
    assert_eq!(launch.epoch, 3);
    assert_eq!(launch.attach, ["10.244.1.2:7078", "10.244.2.7:7078"]);
    assert_eq!(launch.bind.port(), DRIVER_PORT);
    assert_eq!(Takeover::recorded(&p), Some((2, 3)));
    // A replacement with nobody to take over still records the count before it.
    let alone = Takeover {
        attach: Vec::new(),
        stages_resumed_before: 5,
    };
    let p = driver_pod(ctx(&j, &config), 2, Some(&alone));
    let args = p.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    let launch = DriverLaunch::parse_args(&args[1..]).unwrap();
    assert!(launch.attach.is_empty() && launch.epoch == 2);
    assert_eq!(Takeover::recorded(&p), Some((0, 5)));
    // The pod template's own annotations stay.
    let mut annotated = job("wc");
    annotated
        .spec
        .driver
        .template
        .annotations
        .insert("team".into(), "data".into());
    let p = driver_pod(ctx(&annotated, &config), 2, Some(&takeover));
    let annotations = p.metadata.annotations.unwrap();
    assert_eq!(annotations["team"], "data");
    assert_eq!(annotations[ANNOTATION_ATTACHED], "2");
    assert_eq!(executor_address("fd00::7"), "[fd00::7]:7078");
}

fn labels_of(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

#[test]
fn a_replacement_avoids_the_nodes_given_in_every_alternative() {
    let config = OperatorConfig::default();
    let j = job("wc");
    let dead: BTreeSet<String> = ["kiln-spot-2".to_string()].into();
    let p = avoiding_nodes(executor_pod(ctx(&j, &config), 3, "ip"), &dead);
    let t = terms(&p);
    assert_eq!(t.len(), config.spot_node_labels.len());
    for term in &t {
        let f = &term.match_fields.as_ref().unwrap()[0];
        assert_eq!(
            (f.key.as_str(), f.operator.as_str()),
            ("metadata.name", "NotIn")
        );
        assert_eq!(f.values.as_deref(), Some(&["kiln-spot-2".to_string()][..]));
    }
    // `Any` has no required terms: one is made.
    let mut any = job("wc");
    any.spec.executors.placement = Placement::Any;
    let p = avoiding_nodes(executor_pod(ctx(&any, &config), 3, "ip"), &dead);
    assert_eq!(terms(&p).len(), 1);
    // Nothing to avoid: the pod is unchanged.
    let p = executor_pod(ctx(&j, &config), 3, "ip");
    assert_eq!(avoiding_nodes(p.clone(), &BTreeSet::new()), p);
}

#[test]
fn executors_follow_their_placement() {
    let config = OperatorConfig::default();
    let mut j = job("wc");
    let p = executor_pod(ctx(&j, &config), 3, "10.244.1.5");
    assert_eq!(p.metadata.name.as_deref(), Some("wc-exec-3"));
    assert_eq!(p.metadata.labels.as_ref().unwrap()[LABEL_ROLE], "executor");
    let t = terms(&p);
    assert_eq!(
        t.len(),
        config.spot_node_labels.len(),
        "any spot label will do"
    );
    assert!(
        t.iter()
            .all(|t| t.match_expressions.as_ref().unwrap()[0].operator == "In")
    );
    let tolerations = p.spec.as_ref().unwrap().tolerations.clone().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some("kiln.dev/spot"))
    );
    let c = &p.spec.as_ref().unwrap().containers[0];
    let args = c.args.as_deref().unwrap();
    assert_eq!(args[0], ExecutorLaunch::SUBCOMMAND);
    let launch = ExecutorLaunch::parse_args(&args[1..]).unwrap();
    assert_eq!(launch.driver, "http://10.244.1.5:7077");
    assert_eq!(launch.id, "wc-exec-3");
    // Blocks on a fixed port, so that a replacement driver finds them by pod IP.
    assert_eq!(launch.port, EXECUTOR_PORT);
    let ports = c.ports.clone().unwrap();
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("blocks"), i32::from(EXECUTOR_PORT))
    );
    assert_eq!(launch.work_dir.to_str(), Some(WORK_DIR));
    // Spills have a disk of their own, bounded and requested from the scheduler.
    let requests = c.resources.as_ref().unwrap().requests.clone().unwrap();
    assert_eq!(requests["ephemeral-storage"].0, "10Gi");
    let scratch = &p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
    assert_eq!(
        scratch
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "10Gi"
    );
    let env = c.env.clone().unwrap();
    let field = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value_from.clone())
    };
    assert_eq!(
        field(ENV_ADVERTISE_HOST)
            .and_then(|f| f.field_ref)
            .map(|f| f.field_path)
            .as_deref(),
        Some("status.podIP")
    );
    let token = field(ENV_TOKEN).and_then(|f| f.secret_key_ref).unwrap();
    assert_eq!(token.name, "wc-token");
    // The executor's certificate and key and the job's CA, from the same Secret (optional:
    // a job made before TLS has none).
    for (var, key) in [
        ("KILN_TLS_CA", "ca.crt"),
        ("KILN_TLS_CERT", "executor.crt"),
        ("KILN_TLS_KEY", "executor.key"),
    ] {
        let r = field(var).and_then(|f| f.secret_key_ref).unwrap();
        assert_eq!(
            (r.name.as_str(), r.key.as_str(), r.optional),
            ("wc-token", key, Some(true))
        );
    }
    // The spill directory exists before the executor starts: a subPath of the scratch
    // volume, which the kubelet creates.
    let mounts = p.spec.as_ref().unwrap().containers[0]
        .volume_mounts
        .clone()
        .unwrap();
    let spill = mounts.iter().find(|m| m.sub_path.is_some()).unwrap();
    assert_eq!(
        (spill.name.as_str(), spill.mount_path.as_str()),
        ("scratch", "/tmp/kiln-work/spill")
    );
    assert_eq!(format!("{WORK_DIR}/spill"), spill.mount_path);

    j.spec.executors.placement = Placement::OnDemand;
    let p = executor_pod(ctx(&j, &config), 0, "ip");
    assert!(
        terms(&p)[0]
            .match_expressions
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.operator == "NotIn")
    );
    assert_eq!(p.spec.unwrap().tolerations, None);

    j.spec.executors.placement = Placement::Any;
    let p = executor_pod(ctx(&j, &config), 0, "ip");
    assert!(terms(&p).is_empty(), "no requirement for Any");
    assert!(p.spec.unwrap().tolerations.is_some(), "spot nodes allowed");
}

#[test]
fn template_overrides_are_added() {
    let config = OperatorConfig::default();
    let mut j = job("wc");
    j.spec.executors.template = serde_json::from_value(serde_json::json!({
        "labels": {"team": "data", "kiln.dev/role": "nope"},
        "annotations": {"a": "b"},
        "nodeSelector": {"disk": "ssd"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "env": [{"name": "AWS_REGION", "value": "eu-west-1"}],
        "envFrom": [{"secretRef": {"name": "s3-creds"}}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "inputs"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}],
        "serviceAccountName": "reader",
    }))
    .unwrap();
    let p = executor_pod(ctx(&j, &config), 0, "ip");
    let labels = p.metadata.labels.clone().unwrap();
    assert_eq!(
        (labels["team"].as_str(), labels[LABEL_ROLE].as_str()),
        ("data", "executor")
    );
    let spec = p.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("reader"));
    assert_eq!(spec.automount_service_account_token, Some(true));
    assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
    assert!(
        spec.tolerations
            .unwrap()
            .iter()
            .any(|t| t.key.as_deref() == Some("gpu"))
    );
    assert!(spec.volumes.unwrap().iter().any(|v| v.name == "data"));
    let c = &spec.containers[0];
    assert!(c.env.iter().flatten().any(|e| e.name == "AWS_REGION"));
    assert_eq!(c.env_from.as_ref().unwrap().len(), 1);
    assert!(
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/data")
    );
    // The driver is untouched by the executors' template.
    let d = driver_pod(ctx(&j, &config), 1, None);
    assert!(!d.metadata.labels.unwrap().contains_key("team"));
}

#[test]
fn memory_gets_room_for_the_process() {
    assert_eq!(memory_with_overhead(2 << 30).0, "2432Mi");
    assert_eq!(memory_with_overhead(8 << 30).0, "9012Mi");
}

#[test]
fn configured_on_demand_labels_are_required() {
    let config = OperatorConfig {
        on_demand_node_labels: vec![crate::config::NodeLabel {
            key: "pool".into(),
            values: vec!["stable".into()],
        }],
        ..Default::default()
    };
    let j = job("wc");
    let t = terms(&driver_pod(ctx(&j, &config), 1, None));
    let exprs = t[0].match_expressions.clone().unwrap();
    assert!(exprs.iter().any(|e| e.key == "pool" && e.operator == "In"));
}
