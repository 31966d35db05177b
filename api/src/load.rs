//! Reading a job file: a bare job spec, or a whole ComputeJob manifest whose `spec` is one.
use std::path::Path;

use crate::{Error, JobSpec, Result, validate};

/// Reads, parses and validates a job file.
pub fn load_job(path: &Path) -> Result<JobSpec> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadJobFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_job(&text)
}

/// Parses and validates a job document (YAML or JSON), its locations under `kiln run`'s
/// policy ([`LocationPolicy::local`](crate::LocationPolicy::local)). A document with `kind: ComputeJob`
/// is a manifest and its `spec` is the job; any other document is a bare job spec.
pub fn parse_job(text: &str) -> Result<JobSpec> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| Error::ParseJob {
        field: e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "document".into()),
        message: e.to_string(),
    })?;
    // A manifest's name becomes the names of its pods and Service on a cluster: checked
    // here too, so a job that runs locally also applies.
    let name_error = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .and_then(crate::validate_name);
    let (doc, prefix) = match doc.get("kind") {
        Some(kind) => {
            let kind = kind.as_str().unwrap_or_default();
            if kind != crate::KIND {
                return Err(Error::WrongKind { kind: kind.into() });
            }
            let spec = doc.get("spec").cloned().ok_or_else(|| Error::ParseJob {
                field: "spec".into(),
                message: "a ComputeJob manifest needs a `spec`".into(),
            })?;
            (spec, "spec.")
        }
        None => (doc, ""),
    };
    let spec: JobSpec = serde_path_to_error::deserialize(doc).map_err(|e| Error::ParseJob {
        field: format!("{prefix}{}", e.path()),
        message: e.inner().to_string(),
    })?;
    let errors: Vec<_> = name_error
        .into_iter()
        .chain(
            validate(&spec)
                .into_iter()
                .chain(crate::LocationPolicy::local().validate(&spec))
                .map(|mut e| {
                    e.field = format!("{prefix}{}", e.field);
                    e
                }),
        )
        .collect();
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(Error::Invalid(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: &str = r#"
inputs:
  - {name: lines, format: text, uri: corpus/}
steps:
  - {name: words, sql: "SELECT line FROM lines", cache: Memory}
  - {name: counts, sql: "SELECT count(*) FROM words"}
executors: {count: 3, memory: 512Mi}
"#;

    #[test]
    fn bare_spec_parses_with_defaults() {
        let spec = parse_job(BARE).unwrap();
        assert_eq!(spec.executors.count, 3);
        assert_eq!(spec.shuffle_partitions, 16);
        assert_eq!(spec.steps[0].cache, crate::CacheLevel::Memory);
        assert_eq!(spec.target_step().unwrap().name, "counts");
    }

    #[test]
    fn manifest_spec_is_the_job() {
        let manifest = format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: ComputeJob\nmetadata: {{name: wc}}\nspec:\n{}",
            BARE.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        assert_eq!(parse_job(&manifest).unwrap(), parse_job(BARE).unwrap());
    }

    #[test]
    fn errors_name_the_field() {
        let bad = BARE.replace("cache: Memory", "cache: Memroy");
        match parse_job(&bad) {
            Err(Error::ParseJob { field, message }) => {
                assert_eq!(field, "steps[0].cache");
                assert!(message.contains("Memroy"), "{message}");
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
        let bad = BARE.replace("memory: 512Mi", "memory: 512MB");
        match parse_job(&bad) {
            Err(Error::Invalid(errs)) => assert_eq!(errs[0].field, "executors.memory"),
            other => panic!("expected a validation error, got {other:?}"),
        }
        assert!(matches!(
            parse_job("kind: Deployment\nspec: {}"),
            Err(Error::WrongKind { .. })
        ));
    }
}
