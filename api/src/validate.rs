//! Pure validation of a job spec: every rule names the field it is about.
use std::collections::HashSet;

use crate::{InputFormat, JobSpec, MAX_EXECUTORS, MAX_ITERATIONS, parse_cpu, parse_memory};

/// Environment variables the operator sets on job pods; a pod template may not set them.
pub const RESERVED_ENV_PREFIX: &str = "KILN_";
/// The one `KILN_` variable a template may set: faults an executor injects for tests
/// (`KILN_FAULTS`), which the operator never sets.
const TEMPLATE_ENV_ALLOWED: &str = crate::launch::ENV_FAULTS;
/// Mount paths the operator uses in job pods (the job spec, scratch space).
pub const RESERVED_MOUNT_PATHS: [&str; 2] = ["/etc/kiln", "/tmp"];

/// Longest ComputeJob name: the driver's Service, `<name>-driver`, must be a DNS-1035 label
/// (at most 63 characters).
pub const MAX_JOB_NAME_LENGTH: usize = 56;
/// Most memory one pod may ask for (the largest machines hold about 24 TiB).
pub const MAX_POD_MEMORY: u64 = 32 << 40;
/// Most CPU one pod may ask for, in millicores.
pub const MAX_POD_CPU: u64 = 1024 * 1000;
/// Most concurrent tasks per executor.
pub const MAX_SLOTS: u32 = 1024;
/// Most attempts of one task or one stage.
pub const MAX_ATTEMPTS: u32 = 100;
/// Most executor losses a job may be allowed.
pub const MAX_EXECUTOR_LOSSES: u32 = 10_000;

/// One broken rule: the field's path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `steps[2].name`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn single_ascii(value: &str) -> bool {
    value.len() == 1 && value.is_ascii()
}

/// Checks a ComputeJob's name: a DNS-1035 label (lower-case letters, digits and `-`,
/// starting with a letter and ending with a letter or digit) short enough for the names
/// the operator derives from it (`<name>-driver`).
pub fn validate_name(name: &str) -> Option<FieldError> {
    let err = |message: String| {
        Some(FieldError {
            field: "metadata.name".into(),
            message,
        })
    };
    if name.is_empty() {
        return err("must not be empty".into());
    }
    if name.len() > MAX_JOB_NAME_LENGTH {
        return err(format!(
            "at most {MAX_JOB_NAME_LENGTH} characters (the driver's Service is `<name>-driver`), got {}",
            name.len()
        ));
    }
    let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let starts = name.starts_with(|c: char| c.is_ascii_lowercase());
    let ends = name.ends_with(lower);
    if !starts || !ends || !name.chars().all(|c| lower(c) || c == '-') {
        return err(format!(
            "`{name}` is not a DNS-1035 label: lower-case letters, digits and `-`, starting with a letter and ending with a letter or digit"
        ));
    }
    None
}

/// Checks the rules serde cannot express. An empty list means the spec is valid.
pub fn validate(spec: &JobSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(FieldError { field, message });

    if spec.executors.count == 0 || spec.executors.count > MAX_EXECUTORS {
        err(
            "executors.count".into(),
            format!(
                "must be between 1 and {MAX_EXECUTORS}, got {}",
                spec.executors.count
            ),
        );
    }
    if let Some(slots) = spec.executors.slots
        && !(1..=MAX_SLOTS).contains(&slots)
    {
        err(
            "executors.slots".into(),
            format!("must be between 1 and {MAX_SLOTS}, got {slots}"),
        );
    }
    for (field, value) in [
        ("executors.memory", &spec.executors.memory),
        ("executors.disk", &spec.executors.disk),
        ("driver.memory", &spec.driver.memory),
    ] {
        match parse_memory(value) {
            Ok(b) if b < (1 << 20) => err(field.into(), format!("`{value}` is below 1Mi")),
            Ok(b) if b > MAX_POD_MEMORY => err(field.into(), format!("`{value}` is above 32Ti")),
            Ok(_) => {}
            Err(e) => err(field.into(), e.to_string()),
        }
    }
    for (field, value) in [
        ("executors.cpu", &spec.executors.cpu),
        ("driver.cpu", &spec.driver.cpu),
    ] {
        match parse_cpu(value) {
            Ok(0) => err(field.into(), "must be above zero".into()),
            Ok(m) if m > MAX_POD_CPU => err(field.into(), format!("`{value}` is above 1024")),
            Ok(_) => {}
            Err(e) => err(field.into(), e.to_string()),
        }
    }
    if let Err(e) = parse_memory(&spec.broadcast_join_threshold) {
        err("broadcastJoinThreshold".into(), e.to_string());
    }
    match parse_memory(&spec.max_result_bytes) {
        Ok(0) => err("maxResultBytes".into(), "must be above zero".into()),
        Ok(_) => {}
        Err(e) => err("maxResultBytes".into(), e.to_string()),
    }
    if spec.shuffle_partitions == 0 || spec.shuffle_partitions > 100_000 {
        err(
            "shufflePartitions".into(),
            "must be between 1 and 100000".into(),
        );
    }
    let fp = &spec.failure_policy;
    for (field, value) in [
        ("failurePolicy.maxTaskAttempts", fp.max_task_attempts),
        ("failurePolicy.maxStageAttempts", fp.max_stage_attempts),
    ] {
        if !(1..=MAX_ATTEMPTS).contains(&value) {
            err(
                field.into(),
                format!("must be between 1 and {MAX_ATTEMPTS}, got {value}"),
            );
        }
    }
    if fp.max_executor_losses > MAX_EXECUTOR_LOSSES {
        err(
            "failurePolicy.maxExecutorLosses".into(),
            format!(
                "must be at most {MAX_EXECUTOR_LOSSES}, got {}",
                fp.max_executor_losses
            ),
        );
    }
    if !(1..=3600).contains(&fp.heartbeat_timeout_seconds) {
        err(
            "failurePolicy.heartbeatTimeoutSeconds".into(),
            "must be between 1 and 3600".into(),
        );
    }
    if fp.driver_grace_seconds > 3600 {
        err(
            "failurePolicy.driverGraceSeconds".into(),
            "must be at most 3600".into(),
        );
    }

    let mut names = HashSet::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let at = format!("inputs[{i}]");
        if !is_identifier(&input.name) {
            err(
                format!("{at}.name"),
                format!("`{}` is not a SQL identifier", input.name),
            );
        } else if !names.insert(input.name.to_ascii_lowercase()) {
            err(
                format!("{at}.name"),
                format!("`{}` is used twice", input.name),
            );
        }
        if input.uri.trim().is_empty() {
            err(format!("{at}.uri"), "must not be empty".into());
        }
        let csv_like = matches!(input.format, InputFormat::Csv | InputFormat::Tsv);
        let o = &input.options;
        for (key, value) in [("delimiter", &o.delimiter), ("quote", &o.quote)] {
            match value {
                Some(_) if !csv_like => err(
                    format!("{at}.options.{key}"),
                    "only applies to csv and tsv inputs".into(),
                ),
                Some(v) if !single_ascii(v) => err(
                    format!("{at}.options.{key}"),
                    format!("must be one ASCII character, got `{v}`"),
                ),
                _ => {}
            }
        }
        if o.header.is_some() && !csv_like {
            err(
                format!("{at}.options.header"),
                "only applies to csv and tsv inputs".into(),
            );
        }
    }

    if spec.steps.is_empty() {
        err("steps".into(), "a job needs at least one step".into());
    }
    for (i, step) in spec.steps.iter().enumerate() {
        let at = format!("steps[{i}]");
        if !is_identifier(&step.name) {
            err(
                format!("{at}.name"),
                format!("`{}` is not a SQL identifier", step.name),
            );
        } else if !names.insert(step.name.to_ascii_lowercase()) {
            err(
                format!("{at}.name"),
                format!("`{}` is already the name of an input or step", step.name),
            );
        }
        if step.sql.trim().is_empty() {
            err(format!("{at}.sql"), "must not be empty".into());
        }
        if step.is_iterative() {
            if step.initial.as_deref().is_none_or(|s| s.trim().is_empty()) {
                err(
                    format!("{at}.initial"),
                    "an iterative step (with `repeat` or `until`) needs the SQL of its starting value"
                        .into(),
                );
            }
            if let Some(n) = step.repeat
                && !(1..=MAX_ITERATIONS).contains(&n)
            {
                err(
                    format!("{at}.repeat"),
                    format!("must be between 1 and {MAX_ITERATIONS}, got {n}"),
                );
            }
            if step.until.as_deref().is_some_and(|s| s.trim().is_empty()) {
                err(format!("{at}.until"), "must not be empty".into());
            }
        } else if step.initial.is_some() {
            err(
                format!("{at}.initial"),
                "only iterative steps (with `repeat` or `until`) have a starting value".into(),
            );
        }
    }

    for (role, template) in [
        ("driver", &spec.driver.template),
        ("executors", &spec.executors.template),
    ] {
        for (i, var) in template.env.iter().enumerate() {
            if var.name.starts_with(RESERVED_ENV_PREFIX) && var.name != TEMPLATE_ENV_ALLOWED {
                err(
                    format!("{role}.template.env[{i}].name"),
                    format!(
                        "`{}`: variables starting with {RESERVED_ENV_PREFIX} are set by the operator",
                        var.name
                    ),
                );
            }
        }
        for (i, mount) in template.volume_mounts.iter().enumerate() {
            let path = mount.mount_path.trim_end_matches('/');
            if RESERVED_MOUNT_PATHS.contains(&path) {
                err(
                    format!("{role}.template.volumeMounts[{i}].mountPath"),
                    format!(
                        "`{}` is where the operator mounts the job's own files",
                        mount.mount_path
                    ),
                );
            }
            if !template.volumes.iter().any(|v| v.name == mount.name) {
                err(
                    format!("{role}.template.volumeMounts[{i}].name"),
                    format!(
                        "no volume in {role}.template.volumes is named `{}`",
                        mount.name
                    ),
                );
            }
        }
    }
    if spec
        .ttl_seconds_after_finished
        .is_some_and(|t| t > 365 * 24 * 3600)
    {
        err(
            "ttlSecondsAfterFinished".into(),
            "must be at most a year (31536000)".into(),
        );
    }
    if spec.active_deadline_seconds == Some(0) {
        err("activeDeadlineSeconds".into(), "must be at least 1".into());
    }

    if let Some(out) = &spec.output {
        if let Some(from) = &out.from
            && !spec.steps.iter().any(|s| &s.name == from)
        {
            err("output.from".into(), format!("no step is named `{from}`"));
        }
        if out.uri.trim().is_empty() {
            err("output.uri".into(), "must not be empty".into());
        }
        if out.uri.starts_with("http://") || out.uri.starts_with("https://") {
            err(
                "output.uri".into(),
                "HTTP locations are read-only; write to a path or s3://".into(),
            );
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InputOptions, InputSpec, StepSpec};

    fn job() -> JobSpec {
        JobSpec {
            inputs: vec![InputSpec {
                name: "t".into(),
                format: InputFormat::Parquet,
                uri: "data/".into(),
                options: InputOptions::default(),
            }],
            steps: vec![StepSpec {
                name: "s".into(),
                sql: "SELECT 1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn fields(spec: &JobSpec) -> Vec<String> {
        validate(spec).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_good_spec_is_valid() {
        let mut spec = job();
        spec.shuffle_partitions = 4;
        spec.executors.count = 2;
        assert_eq!(validate(&spec), vec![]);
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut spec = job();
        spec.shuffle_partitions = 4;
        spec.executors.count = MAX_EXECUTORS + 1;
        spec.executors.memory = "huge".into();
        spec.inputs[0].options.delimiter = Some(";".into());
        spec.steps.push(StepSpec {
            name: "t".into(),
            sql: " ".into(),
            ..Default::default()
        });
        spec.steps.push(StepSpec {
            name: "loop".into(),
            sql: "SELECT 1".into(),
            repeat: Some(0),
            ..Default::default()
        });
        spec.output = Some(crate::OutputSpec {
            from: Some("nope".into()),
            uri: "out/".into(),
            format: crate::OutputFormat::Csv,
            mode: Default::default(),
        });
        assert_eq!(
            fields(&spec),
            [
                "executors.count",
                "executors.memory",
                "inputs[0].options.delimiter",
                "steps[1].name",
                "steps[1].sql",
                "steps[2].initial",
                "steps[2].repeat",
                "output.from"
            ]
        );
    }

    #[test]
    fn pod_templates_may_not_take_the_operators_names() {
        let mut spec = job();
        let t: crate::PodTemplate = serde_json::from_value(serde_json::json!({
            "env": [{"name": "AWS_REGION", "value": "x"}, {"name": "KILN_TOKEN", "value": "x"},
                    {"name": "KILN_FAULTS", "value": "task-delay=5"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "c"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"},
                             {"name": "data", "mountPath": "/tmp/"},
                             {"name": "nope", "mountPath": "/x"}],
        }))
        .unwrap();
        spec.executors.template = t;
        spec.active_deadline_seconds = Some(0);
        assert_eq!(
            fields(&spec),
            [
                "executors.template.env[1].name",
                "executors.template.volumeMounts[1].mountPath",
                "executors.template.volumeMounts[2].name",
                "activeDeadlineSeconds"
            ]
        );
    }
}
