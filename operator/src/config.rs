//! The operator's configuration file (`--config`): which node labels mean spot or on-demand
//! capacity, the tolerations spot nodes need, and the limits of the recovery policy.
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A node label and the values that mark a kind of capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLabel {
    /// The label's key, e.g. `karpenter.sh/capacity-type`.
    pub key: String,
    /// Values meaning this kind of capacity, e.g. `[spot]`.
    pub values: Vec<String>,
}

impl NodeLabel {
    fn new(key: &str, values: &[&str]) -> Self {
        NodeLabel {
            key: key.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// The operator's configuration. Every field has a default; a file only names what differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// A node with any of these labels is a spot (preemptible) node. The default covers
    /// Karpenter (which the test cluster uses too), EKS managed node groups, GKE and AKS.
    pub spot_node_labels: Vec<NodeLabel>,
    /// When set, on-demand pods (the driver, `OnDemand` executors) also require one of these
    /// labels; otherwise they only require the absence of every spot label.
    pub on_demand_node_labels: Vec<NodeLabel>,
    /// Tolerations executors on spot nodes need (spot node pools are often tainted).
    pub spot_tolerations: Vec<Toleration>,
    /// Driver pods lost (evicted, node lost, killed) and recreated before the job fails.
    pub max_driver_restarts: u32,
    /// Executor crashes in a row (each within `minExecutorUptimeSeconds` of its start)
    /// before the job fails as crash-looping.
    pub crash_loop_limit: u32,
    /// An executor that ends sooner than this after starting counts as a crash.
    pub min_executor_uptime_seconds: u64,
    /// How long a pod may fail to pull its image (or start its container) before the job
    /// fails.
    pub image_pull_grace_seconds: u64,
    /// How often a running job's progress is read from its driver.
    pub progress_interval_seconds: u64,
    /// Longest wait before replacing an executor after crashes in a row (the wait doubles
    /// with each crash).
    pub max_replacement_backoff_seconds: u64,
    /// Node taint keys that give notice a node is going (a spot reclaim, a scale-down, a
    /// consolidation): executors on such a node are decommissioned at once, their blocks
    /// move to other executors and their replacements start. The default covers Karpenter,
    /// the cluster autoscaler, GKE and the AWS node termination handler.
    pub disruption_taints: Vec<String>,
    /// How long an executor the driver stopped hearing from, on a node that still looks
    /// healthy, may wait for its node to be found lost (a free `NodeLost`) before the loss
    /// is settled as `HeartbeatTimeout` (a hung process, which counts). Its replacement
    /// starts at once either way. Keep it above the control plane's node monitor grace
    /// period (40 s by default).
    pub silence_settle_seconds: u64,
    /// Where jobs may read and write: `allowLoopback` (default false) lets inputs name
    /// hosts on the loopback network. Local paths under `/proc`, `/sys`, `/dev`,
    /// `/etc/kiln`, `/var/run/secrets` and `/run/secrets`, link-local addresses and cloud
    /// metadata services are refused whatever it says; a refused job fails `InvalidSpec`
    /// naming the field.
    pub locations: kiln_api::LocationPolicy,
    /// What jobs may ask of the cluster through their pods: `images` they may run besides
    /// the operator's own (exact, or a prefix ending in `*`; default none), `volumeTypes`
    /// their pod templates may add (default: no `hostPath`), and `allowServiceAccount`
    /// (default false). A refused job fails `InvalidSpec` naming the field.
    pub admission: crate::admission::AdmissionPolicy,
    /// Each job's NetworkPolicy (`enabled`, default true): its pods accept connections only
    /// from pods of the same job, and its driver also from the operator's pods
    /// (`operatorPodLabels` in `operatorNamespace`, which the chart sets).
    pub network_policy: crate::netpol::NetworkPolicyConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        let toleration = |key: &str, value: Option<&str>| Toleration {
            key: Some(key.into()),
            operator: Some(if value.is_some() { "Equal" } else { "Exists" }.into()),
            value: value.map(Into::into),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        };
        OperatorConfig {
            spot_node_labels: vec![
                NodeLabel::new("karpenter.sh/capacity-type", &["spot"]),
                NodeLabel::new("eks.amazonaws.com/capacityType", &["SPOT"]),
                NodeLabel::new("cloud.google.com/gke-spot", &["true"]),
                NodeLabel::new("cloud.google.com/gke-preemptible", &["true"]),
                NodeLabel::new("kubernetes.azure.com/scalesetpriority", &["spot"]),
            ],
            on_demand_node_labels: Vec::new(),
            spot_tolerations: vec![
                toleration("kiln.dev/spot", None),
                toleration("cloud.google.com/gke-spot", Some("true")),
                toleration("kubernetes.azure.com/scalesetpriority", Some("spot")),
            ],
            max_driver_restarts: 3,
            crash_loop_limit: 5,
            min_executor_uptime_seconds: 10,
            image_pull_grace_seconds: 60,
            progress_interval_seconds: 3,
            max_replacement_backoff_seconds: 30,
            silence_settle_seconds: 60,
            locations: kiln_api::LocationPolicy::cluster(),
            admission: crate::admission::AdmissionPolicy::default(),
            network_policy: crate::netpol::NetworkPolicyConfig::default(),
            disruption_taints: [
                "karpenter.sh/disrupted",
                "karpenter.sh/disruption",
                "ToBeDeletedByClusterAutoscaler",
                "cloud.google.com/impending-node-termination",
                "aws-node-termination-handler/spot-itn",
                "aws-node-termination-handler/scheduled-maintenance",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl OperatorConfig {
    /// Reads a configuration file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| Error::ParseConfig {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a configuration document; the error names the offending field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: OperatorConfig = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if config.spot_node_labels.is_empty() {
            return Err("spotNodeLabels: at least one label must mark spot nodes".into());
        }
        for (i, l) in config
            .spot_node_labels
            .iter()
            .chain(&config.on_demand_node_labels)
            .enumerate()
        {
            if l.key.is_empty() || l.values.is_empty() {
                return Err(format!(
                    "node label {i} (`{}`): needs a key and at least one value",
                    l.key
                ));
            }
        }
        Ok(config)
    }

    /// How often a running job's progress is read.
    pub fn progress_interval(&self) -> Duration {
        Duration::from_secs(self.progress_interval_seconds.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_only_what_it_names() {
        let c = OperatorConfig::parse(
            "spotNodeLabels: [{key: node.example/spot, values: [\"yes\"]}]\nimagePullGraceSeconds: 5\n",
        )
        .unwrap();
        assert_eq!(
            c.spot_node_labels,
            [NodeLabel::new("node.example/spot", &["yes"])]
        );
        assert_eq!(c.image_pull_grace_seconds, 5);
        assert_eq!(
            c.max_driver_restarts,
            OperatorConfig::default().max_driver_restarts
        );
        assert!(
            OperatorConfig::parse("spotNodeLables: []")
                .unwrap_err()
                .contains("spotNodeLables")
        );
        assert!(OperatorConfig::parse("spotNodeLabels: []").is_err());
    }

    #[test]
    fn defaults_cover_the_clouds_and_the_test_cluster() {
        let keys: Vec<String> = OperatorConfig::default()
            .spot_node_labels
            .into_iter()
            .map(|l| l.key)
            .collect();
        for key in [
            "karpenter.sh/capacity-type",
            "eks.amazonaws.com/capacityType",
            "cloud.google.com/gke-spot",
            "kubernetes.azure.com/scalesetpriority",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key}");
        }
    }
}
