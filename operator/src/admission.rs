//! What a job may ask of the cluster through its pods, in the operator's configuration
//! (`admission`): which images it may run, which volume types its pod templates may add,
//! and whether it may name a ServiceAccount. Where it may read and write is the
//! `locations` policy's. A job that asks for more fails `InvalidSpec`, the condition naming
//! the field and the rule.
use k8s_openapi::api::core::v1::Volume;
use kiln_api::{JobSpec, PodTemplate};
use serde::{Deserialize, Serialize};

/// Volume types allowed by default: all that hold the job's own data or configuration.
/// Not `hostPath` (the node's files), nor types that reach storage outside the cluster's
/// own claims (`nfs`, `iscsi`, inline `csi`, ...): a cluster that wants them lists them.
pub const DEFAULT_VOLUME_TYPES: [&str; 7] = [
    "configMap",
    "secret",
    "emptyDir",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "ephemeral",
];

/// What jobs may ask of the cluster through their pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdmissionPolicy {
    /// Images a job's `spec.image` may name besides the operator's own: exact references,
    /// or prefixes ending in `*` (`registry.example/kiln:*`). Empty (the default): only the
    /// operator's own image.
    pub images: Vec<String>,
    /// Volume types (as Kubernetes names them: `emptyDir`, `persistentVolumeClaim`, ...) a
    /// job's pod templates may add. The default allows those in [`DEFAULT_VOLUME_TYPES`]:
    /// no `hostPath`.
    pub volume_types: Vec<String>,
    /// Whether a job's pod templates may name a ServiceAccount (for cloud identity). Off by
    /// default: job pods run with no service-account token at all.
    pub allow_service_account: bool,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            images: Vec::new(),
            volume_types: DEFAULT_VOLUME_TYPES.map(String::from).to_vec(),
            allow_service_account: false,
        }
    }
}

/// The type of a volume: the one field of its source that is set (`hostPath`, ...).
fn volume_type(volume: &Volume) -> Option<String> {
    let serde_json::Value::Object(fields) = serde_json::to_value(volume).ok()? else {
        return None;
    };
    fields.into_iter().map(|(k, _)| k).find(|k| k != "name")
}

impl AdmissionPolicy {
    /// Whether `image` may run: the operator's own (`own`), or one the policy lists.
    fn allows_image(&self, image: &str, own: &str) -> bool {
        image == own
            || self
                .images
                .iter()
                .any(|allowed| match allowed.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => image == allowed,
                })
    }

    /// What `spec` asks that the policy refuses, each naming its field and the rule; `own`
    /// is the operator's image, which every job may run.
    pub fn validate(&self, spec: &JobSpec, own: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(image) = &spec.image
            && !self.allows_image(image, own)
        {
            problems.push(format!(
                "spec.image: `{image}` is not an allowed image (the operator runs `{own}`{}; \
                 the operator's admission.images lists what else jobs may run)",
                if self.images.is_empty() {
                    String::new()
                } else {
                    format!(", and allows {}", self.images.join(", "))
                }
            ));
        }
        let templates: [(&str, &PodTemplate); 2] = [
            ("driver", &spec.driver.template),
            ("executors", &spec.executors.template),
        ];
        for (role, template) in templates {
            for (i, v) in template.volumes.iter().enumerate() {
                let kind = volume_type(v).unwrap_or_default();
                if !self.volume_types.contains(&kind) {
                    problems.push(format!(
                        "spec.{role}.template.volumes[{i}] (`{}`): {} volumes are not allowed \
                         (the operator's admission.volumeTypes allows {})",
                        v.name,
                        if kind.is_empty() { "untyped" } else { &kind },
                        self.volume_types.join(", ")
                    ));
                }
            }
            if let Some(sa) = &template.service_account_name
                && !self.allow_service_account
            {
                problems.push(format!(
                    "spec.{role}.template.serviceAccountName: `{sa}`: jobs may not name a \
                     ServiceAccount (the operator's admission.allowServiceAccount is false)"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> JobSpec {
        let base = r#"
inputs: [{name: lines, format: text, uri: "s3://b/in/"}]
steps: [{name: counts, sql: "SELECT 1"}]
output: {from: counts, uri: "s3://b/out/", format: csv}
"#;
        let mut v: serde_json::Value = serde_yaml::from_str(base).unwrap();
        let extra: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in extra {
                v.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn by_default_only_the_operators_image_runs() {
        let p = AdmissionPolicy::default();
        assert!(p.validate(&spec("{}"), "kiln:1").is_empty());
        assert!(p.validate(&spec("image: kiln:1"), "kiln:1").is_empty());
        let refused = p.validate(&spec("image: evil/miner:latest"), "kiln:1");
        assert_eq!(refused.len(), 1);
        assert!(refused[0].starts_with("spec.image: `evil/miner:latest`"));
        assert!(refused[0].contains("admission.images"));
    }

    #[test]
    fn listed_images_and_prefixes_run() {
        let p = AdmissionPolicy {
            images: vec!["registry.example/kiln:*".into(), "mirror/kiln:2".into()],
            ..AdmissionPolicy::default()
        };
        for ok in ["registry.example/kiln:3", "mirror/kiln:2", "kiln:1"] {
            assert!(
                p.validate(&spec(&format!("image: {ok}")), "kiln:1")
                    .is_empty()
            );
        }
        for no in ["registry.example/other:3", "mirror/kiln:20", "mirror/kiln"] {
            assert_eq!(
                p.validate(&spec(&format!("image: {no}")), "kiln:1").len(),
                1
            );
        }
    }

    #[test]
    fn host_paths_are_refused_naming_the_volume() {
        let p = AdmissionPolicy::default();
        let s = spec(
            r#"
executors:
  template:
    volumes:
      - {name: data, persistentVolumeClaim: {claimName: inputs}}
      - {name: root, hostPath: {path: /}}
driver:
  template:
    volumes: [{name: scratch, emptyDir: {}}, {name: nfs, nfs: {server: n, path: /x}}]
"#,
        );
        let refused = p.validate(&s, "kiln:1");
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("spec.driver.template.volumes[1] (`nfs`): nfs volumes"));
        assert!(
            refused[1].starts_with("spec.executors.template.volumes[1] (`root`): hostPath volumes")
        );
        let open = AdmissionPolicy {
            volume_types: vec!["hostPath".into(), "nfs".into(), "emptyDir".into()],
            ..AdmissionPolicy::default()
        };
        let refused = open.validate(&s, "kiln:1");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("persistentVolumeClaim volumes are not allowed"));
    }

    #[test]
    fn service_accounts_only_where_allowed() {
        let s = spec("executors: {template: {serviceAccountName: reader}}");
        let refused = AdmissionPolicy::default().validate(&s, "kiln:1");
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].starts_with("spec.executors.template.serviceAccountName: `reader`"),
            "{refused:?}"
        );
        let allowed = AdmissionPolicy {
            allow_service_account: true,
            ..AdmissionPolicy::default()
        };
        assert!(allowed.validate(&s, "kiln:1").is_empty());
    }
}
