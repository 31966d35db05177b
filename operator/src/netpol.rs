//! The job's NetworkPolicy: its pods accept connections only from pods of the same job, and
//! the driver's control port also from the operator. Without it, any pod on the cluster
//! network could fetch a job's shuffle and cached blocks or call its driver.
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kiln_api::ComputeJob;
use kiln_api::crd::LABEL_JOB;
use kiln_api::launch::DRIVER_PORT;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::children::child_meta;

/// Where the operator runs, so that a job's NetworkPolicy lets it reach the driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NetworkPolicyConfig {
    /// Whether each job gets a NetworkPolicy (default true). It takes effect where the
    /// cluster's network plugin enforces NetworkPolicies.
    pub enabled: bool,
    /// The operator's namespace (the chart sets it). Unset: the operator's pods are matched
    /// by their labels in any namespace.
    pub operator_namespace: Option<String>,
    /// Labels of the operator's pods (default: the chart's, `app.kubernetes.io/name: kiln`
    /// and `app.kubernetes.io/component: operator`).
    pub operator_pod_labels: BTreeMap<String, String>,
}

impl Default for NetworkPolicyConfig {
    fn default() -> Self {
        NetworkPolicyConfig {
            enabled: true,
            operator_namespace: None,
            operator_pod_labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "kiln".into()),
                ("app.kubernetes.io/component".into(), "operator".into()),
            ]),
        }
    }
}

/// `<job>-pods`: the NetworkPolicy around the job's pods.
pub fn network_policy_name(job: &str) -> String {
    format!("{job}-pods")
}

/// The NetworkPolicy of `job`: ingress to its pods only from its own pods (any port: the
/// driver's control service and the executors' block services), and to the driver's
/// control port from the operator's pods.
pub fn network_policy(job: &ComputeJob, config: &NetworkPolicyConfig) -> NetworkPolicy {
    let name = job.name_any();
    let same_job = LabelSelector {
        match_labels: Some(BTreeMap::from([(LABEL_JOB.to_string(), name.clone())])),
        ..Default::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: config.operator_namespace.as_ref().map(|ns| {
                BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.clone())])
            }),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(config.operator_pod_labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: child_meta(job, network_policy_name(&name), &[]),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(same_job.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(same_job),
                        ..Default::default()
                    }]),
                    ports: None,
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![operator]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(DRIVER_PORT.into())),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }]),
                },
            ]),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::job;

    #[test]
    fn only_the_jobs_own_pods_and_the_operator_get_in() {
        let j = job("wc");
        let config = NetworkPolicyConfig {
            operator_namespace: Some("kiln-system".into()),
            ..NetworkPolicyConfig::default()
        };
        let p = network_policy(&j, &config);
        assert_eq!(p.metadata.name.as_deref(), Some("wc-pods"));
        assert_eq!(p.metadata.owner_references.as_ref().unwrap().len(), 1);
        let spec = p.spec.unwrap();
        let wc = BTreeMap::from([(LABEL_JOB.to_string(), "wc".to_string())]);
        assert_eq!(spec.pod_selector.unwrap().match_labels, Some(wc.clone()));
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 2);
        let peers = rules[0].from.as_ref().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].pod_selector.as_ref().unwrap().match_labels,
            Some(wc)
        );
        assert!(peers[0].namespace_selector.is_none(), "this namespace only");
        assert!(rules[0].ports.is_none());
        let op = &rules[1].from.as_ref().unwrap()[0];
        assert_eq!(
            op.namespace_selector.as_ref().unwrap().match_labels,
            Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                "kiln-system".to_string()
            )]))
        );
        let ports = rules[1].ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, Some(IntOrString::Int(DRIVER_PORT.into())));
    }
}
