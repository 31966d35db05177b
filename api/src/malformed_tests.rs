//! Malformed job files, one rule each: every one is refused with an error naming the field
//! (what `kiln run` prints, and what the operator's `Failed` condition says), never a panic;
//! the good file they all start from is accepted.
use serde_json::{Value, json};

use crate::{Error, parse_job};

fn good() -> Value {
    json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ComputeJob",
        "metadata": {"name": "good-job"},
        "spec": {
            "inputs": [{"name": "t", "format": "csv", "uri": "data/"}],
            "steps": [{"name": "s", "sql": "SELECT * FROM t"}],
            "output": {"uri": "out/", "format": "csv"},
        }
    })
}

/// The good manifest with `value` set at the JSON pointer `at` (objects on the way made).
fn with(at: &str, value: Value) -> String {
    let mut doc = good();
    let (parent, key) = at.rsplit_once('/').expect("a pointer");
    let mut node = &mut doc;
    for part in parent.split('/').skip(1) {
        node = match part.parse::<usize>() {
            Ok(i) => &mut node[i],
            Err(_) => {
                if node.get(part).is_none() {
                    node[part] = json!({});
                }
                &mut node[part]
            }
        };
    }
    match key.parse::<usize>() {
        Ok(i) => node[i] = value,
        Err(_) => node[key] = value,
    }
    serde_yaml::to_string(&doc).unwrap()
}

/// The fields an error names.
fn fields(result: crate::Result<crate::JobSpec>) -> Vec<String> {
    match result {
        Ok(_) => Vec::new(),
        Err(Error::ParseJob { field, .. }) => vec![field],
        Err(Error::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
        Err(other) => vec![format!("unexpected error: {other}")],
    }
}

#[test]
fn the_starting_point_is_good() {
    assert_eq!(
        fields(parse_job(&with("/metadata/name", json!("good-job")))),
        Vec::<String>::new()
    );
}

#[test]
fn every_malformed_spec_is_refused_naming_its_field() {
    let long = "a".repeat(crate::MAX_JOB_NAME_LENGTH + 1);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/metadata/name", json!("Upper"), "metadata.name"),
        (
            "/metadata/name",
            json!("1starts-with-digit"),
            "metadata.name",
        ),
        ("/metadata/name", json!("has.dot"), "metadata.name"),
        ("/metadata/name", json!("under_score"), "metadata.name"),
        ("/metadata/name", json!("-leading"), "metadata.name"),
        ("/metadata/name", json!("trailing-"), "metadata.name"),
        ("/metadata/name", json!(long), "metadata.name"),
        ("/metadata/name", json!(""), "metadata.name"),
        ("/spec/executors/count", json!(0), "spec.executors.count"),
        ("/spec/executors/count", json!(513), "spec.executors.count"),
        ("/spec/executors/count", json!(-1), "spec.executors.count"),
        (
            "/spec/executors/count",
            json!("three"),
            "spec.executors.count",
        ),
        ("/spec/executors/count", json!(1e20), "spec.executors.count"),
        (
            "/spec/executors/memory",
            json!("1e99"),
            "spec.executors.memory",
        ),
        (
            "/spec/executors/memory",
            json!("4GB"),
            "spec.executors.memory",
        ),
        (
            "/spec/executors/memory",
            json!("0"),
            "spec.executors.memory",
        ),
        (
            "/spec/executors/memory",
            json!("64Ti"),
            "spec.executors.memory",
        ),
        (
            "/spec/executors/memory",
            json!("-1Gi"),
            "spec.executors.memory",
        ),
        (
            "/spec/executors/memory",
            json!("99999999999999999999Ti"),
            "spec.executors.memory",
        ),
        ("/spec/executors/cpu", json!("0"), "spec.executors.cpu"),
        ("/spec/executors/cpu", json!("2000"), "spec.executors.cpu"),
        (
            "/spec/executors/cpu",
            json!("2 cores"),
            "spec.executors.cpu",
        ),
        ("/spec/driver/memory", json!("huge"), "spec.driver.memory"),
        ("/spec/driver/cpu", json!("1e300"), "spec.driver.cpu"),
        ("/spec/executors/slots", json!(0), "spec.executors.slots"),
        ("/spec/executors/slots", json!(5000), "spec.executors.slots"),
        (
            "/spec/executors/placement",
            json!("Cheap"),
            "spec.executors.placement",
        ),
        (
            "/spec/shufflePartitions",
            json!(0),
            "spec.shufflePartitions",
        ),
        (
            "/spec/shufflePartitions",
            json!(100_001),
            "spec.shufflePartitions",
        ),
        (
            "/spec/failurePolicy/maxTaskAttempts",
            json!(0),
            "spec.failurePolicy.maxTaskAttempts",
        ),
        (
            "/spec/failurePolicy/maxTaskAttempts",
            json!(1000),
            "spec.failurePolicy.maxTaskAttempts",
        ),
        (
            "/spec/failurePolicy/maxStageAttempts",
            json!(0),
            "spec.failurePolicy.maxStageAttempts",
        ),
        (
            "/spec/failurePolicy/maxExecutorLosses",
            json!(20_000),
            "spec.failurePolicy.maxExecutorLosses",
        ),
        (
            "/spec/failurePolicy/heartbeatTimeoutSeconds",
            json!(0),
            "spec.failurePolicy.heartbeatTimeoutSeconds",
        ),
        (
            "/spec/failurePolicy/heartbeatTimeoutSeconds",
            json!(4000),
            "spec.failurePolicy.heartbeatTimeoutSeconds",
        ),
        (
            "/spec/failurePolicy/driverGraceSeconds",
            json!(4000),
            "spec.failurePolicy.driverGraceSeconds",
        ),
        (
            "/spec/failurePolicy/retries",
            json!(3),
            "spec.failurePolicy.retries",
        ),
        ("/spec/inputs/0/name", json!("1t"), "spec.inputs[0].name"),
        ("/spec/inputs/0/name", json!("a-b"), "spec.inputs[0].name"),
        ("/spec/inputs/0/uri", json!(""), "spec.inputs[0].uri"),
        (
            "/spec/inputs/0/format",
            json!("xml"),
            "spec.inputs[0].format",
        ),
        (
            "/spec/inputs/0/options/delimiter",
            json!(";;"),
            "spec.inputs[0].options.delimiter",
        ),
        (
            "/spec/inputs/0/options/quote",
            json!("«"),
            "spec.inputs[0].options.quote",
        ),
        (
            "/spec/inputs/0/options/colour",
            json!("red"),
            "spec.inputs[0].options.colour",
        ),
        ("/spec/steps", json!([]), "spec.steps"),
        (
            "/spec/steps/0/name",
            json!("select x"),
            "spec.steps[0].name",
        ),
        ("/spec/steps/0/name", json!("t"), "spec.steps[0].name"),
        ("/spec/steps/0/sql", json!("  "), "spec.steps[0].sql"),
        ("/spec/steps/0/repeat", json!(0), "spec.steps[0].repeat"),
        (
            "/spec/steps/0/repeat",
            json!(20_000),
            "spec.steps[0].repeat",
        ),
        (
            "/spec/steps/0/initial",
            json!("SELECT 1"),
            "spec.steps[0].initial",
        ),
        (
            "/spec/steps/0/cache",
            json!("Memroy"),
            "spec.steps[0].cache",
        ),
        ("/spec/output/from", json!("nope"), "spec.output.from"),
        ("/spec/output/uri", json!(""), "spec.output.uri"),
        (
            "/spec/output/uri",
            json!("http://example.com/out/"),
            "spec.output.uri",
        ),
        ("/spec/output/format", json!("xlsx"), "spec.output.format"),
        ("/spec/maxResultBytes", json!("0"), "spec.maxResultBytes"),
        (
            "/spec/broadcastJoinThreshold",
            json!("lots"),
            "spec.broadcastJoinThreshold",
        ),
        (
            "/spec/ttlSecondsAfterFinished",
            json!(40_000_000),
            "spec.ttlSecondsAfterFinished",
        ),
        (
            "/spec/activeDeadlineSeconds",
            json!(0),
            "spec.activeDeadlineSeconds",
        ),
        (
            "/spec/activeDeadlineSeconds",
            json!(-5),
            "spec.activeDeadlineSeconds",
        ),
        (
            "/spec/executors/template/env",
            json!([{"name": "KILN_TOKEN", "value": "x"}]),
            "spec.executors.template.env[0].name",
        ),
        (
            "/spec/driver/template/volumeMounts",
            json!([{"name": "v", "mountPath": "/etc/kiln"}]),
            "spec.driver.template.volumeMounts[0].mountPath",
        ),
        ("/spec/executor", json!({"count": 2}), "spec.executor"),
        ("/spec/suspend", json!("yes"), "spec.suspend"),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for (at, value, field) in &cases {
        let doc = with(at, value.clone());
        let got = std::panic::catch_unwind(|| fields(parse_job(&doc)));
        match got {
            Ok(f) if f.iter().any(|f| f == field) => {}
            Ok(f) => wrong.push(format!("{at} = {value}: expected `{field}`, got {f:?}")),
            Err(_) => wrong.push(format!("{at} = {value}: panicked")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
