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

/// The field a JSON pointer names, as errors name it: `/spec/inputs/0/uri` is
/// `spec.inputs[0].uri`.
fn field_at(pointer: &str) -> String {
    let mut field = String::new();
    for part in pointer.split('/').skip(1) {
        if part.parse::<usize>().is_ok() {
            field.push_str(&format!("[{part}]"));
        } else {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(part);
        }
    }
    field
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
    // Each malformed value at its JSON pointer: the error names the field there...
    let mut cases: Vec<(&str, Value, String)> = [
        ("/metadata/name", json!("Upper")),
        ("/metadata/name", json!("1starts-with-digit")),
        ("/metadata/name", json!("has.dot")),
        ("/metadata/name", json!("under_score")),
        ("/metadata/name", json!("-leading")),
        ("/metadata/name", json!("trailing-")),
        ("/metadata/name", json!(long)),
        ("/metadata/name", json!("")),
        ("/spec/executors/count", json!(0)),
        ("/spec/executors/count", json!(513)),
        ("/spec/executors/count", json!(-1)),
        ("/spec/executors/count", json!("three")),
        ("/spec/executors/count", json!(1e20)),
        ("/spec/executors/memory", json!("1e99")),
        ("/spec/executors/memory", json!("4GB")),
        ("/spec/executors/memory", json!("0")),
        ("/spec/executors/memory", json!("64Ti")),
        ("/spec/executors/memory", json!("-1Gi")),
        ("/spec/executors/disk", json!("1e99")),
        ("/spec/executors/disk", json!("lots")),
        ("/spec/executors/memory", json!("99999999999999999999Ti")),
        ("/spec/executors/cpu", json!("0")),
        ("/spec/executors/cpu", json!("2000")),
        ("/spec/executors/cpu", json!("2 cores")),
        ("/spec/driver/memory", json!("huge")),
        ("/spec/driver/cpu", json!("1e300")),
        ("/spec/executors/slots", json!(0)),
        ("/spec/executors/slots", json!(5000)),
        ("/spec/executors/placement", json!("Cheap")),
        ("/spec/shufflePartitions", json!(0)),
        ("/spec/shufflePartitions", json!(100_001)),
        ("/spec/failurePolicy/maxTaskAttempts", json!(0)),
        ("/spec/failurePolicy/maxTaskAttempts", json!(1000)),
        ("/spec/failurePolicy/maxStageAttempts", json!(0)),
        ("/spec/failurePolicy/maxExecutorLosses", json!(20_000)),
        ("/spec/failurePolicy/heartbeatTimeoutSeconds", json!(0)),
        ("/spec/failurePolicy/heartbeatTimeoutSeconds", json!(4000)),
        ("/spec/failurePolicy/driverGraceSeconds", json!(4000)),
        ("/spec/failurePolicy/retries", json!(3)),
        ("/spec/inputs/0/name", json!("1t")),
        ("/spec/inputs/0/name", json!("a-b")),
        ("/spec/inputs/0/uri", json!("")),
        ("/spec/inputs/0/format", json!("xml")),
        ("/spec/inputs/0/options/delimiter", json!(";;")),
        ("/spec/inputs/0/options/quote", json!("«")),
        ("/spec/inputs/0/options/colour", json!("red")),
        ("/spec/steps", json!([])),
        ("/spec/steps/0/name", json!("select x")),
        ("/spec/steps/0/name", json!("t")),
        ("/spec/steps/0/sql", json!(" ")),
        ("/spec/steps/0/repeat", json!(0)),
        ("/spec/steps/0/repeat", json!(20_000)),
        ("/spec/steps/0/initial", json!("SELECT 1")),
        ("/spec/steps/0/cache", json!("Memroy")),
        ("/spec/output/from", json!("nope")),
        ("/spec/output/uri", json!("")),
        ("/spec/output/uri", json!("http://example.com/out/")),
        ("/spec/output/format", json!("xlsx")),
        ("/spec/maxResultBytes", json!("0")),
        ("/spec/broadcastJoinThreshold", json!("lots")),
        ("/spec/ttlSecondsAfterFinished", json!(40_000_000)),
        ("/spec/activeDeadlineSeconds", json!(0)),
        ("/spec/activeDeadlineSeconds", json!(-5)),
        ("/spec/executor", json!({"count": 2})),
        ("/spec/suspend", json!("yes")),
    ]
    .into_iter()
    .map(|(at, value)| (at, value, field_at(at)))
    .collect();
    // ... or, where the value is a list, a field of its first item.
    cases.push((
        "/spec/executors/template/env",
        json!([{"name": "KILN_TOKEN", "value": "x"}]),
        "spec.executors.template.env[0].name".into(),
    ));
    cases.push((
        "/spec/driver/template/volumeMounts",
        json!([{"name": "v", "mountPath": "/etc/kiln"}]),
        "spec.driver.template.volumeMounts[0].mountPath".into(),
    ));
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
