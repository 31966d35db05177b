//! Nodes: the Node object the agent registers, its status, and its Lease.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::config::{
    AGENT_NODE_LABEL, CAPACITY_TYPE_LABEL, CapacityType, NodeConfig, SPOT_TAINT_KEY,
};
use crate::error::{Error, Result};

/// Namespace of node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Lease duration written into each Lease.
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// Version reported as the kubelet's.
pub const AGENT_VERSION: &str = concat!("kiln-node-agent/", env!("CARGO_PKG_VERSION"));

/// Where node `index` lives on the pod network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeNet {
    /// The node's own address (on the host bridge), reported as InternalIP and hostIP.
    pub ip: Ipv4Addr,
    /// Third octet of the node's pod /24.
    pub subnet: u8,
    pub prefix: [u8; 2],
}

impl NodeNet {
    pub fn new(prefix: [u8; 2], index: usize) -> Self {
        let subnet = u8::try_from(index + 1).unwrap_or(u8::MAX);
        Self {
            ip: Ipv4Addr::new(prefix[0], prefix[1], subnet, 1),
            subnet,
            prefix,
        }
    }

    pub fn pod_cidr(&self) -> String {
        format!("{}.{}.{}.0/24", self.prefix[0], self.prefix[1], self.subnet)
    }

    /// The pod address with host part `host` (2..=254).
    pub fn pod_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.subnet, host)
    }
}

/// The labels of a node.
pub fn node_labels(cfg: &NodeConfig) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", cfg.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        (
            "node.kubernetes.io/instance-type",
            cfg.instance_type.as_str(),
        ),
        ("topology.kubernetes.io/zone", cfg.zone.as_str()),
        (CAPACITY_TYPE_LABEL, cfg.capacity_type.label_value()),
        (AGENT_NODE_LABEL, "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    labels.extend(cfg.labels.clone());
    labels
}

/// The taints of a node: spot nodes are tainted `kiln.dev/spot=true:NoSchedule`.
pub fn node_taints(cfg: &NodeConfig) -> Vec<Taint> {
    match cfg.capacity_type {
        CapacityType::Spot => vec![Taint {
            key: SPOT_TAINT_KEY.into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            ..Default::default()
        }],
        CapacityType::OnDemand => vec![],
    }
}

/// The Node object registered for `cfg`.
pub fn node_object(cfg: &NodeConfig, net: &NodeNet) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            labels: Some(node_labels(cfg)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(net.pod_cidr()),
            pod_cidrs: Some(vec![net.pod_cidr()]),
            provider_id: Some(format!("kiln://{}", cfg.name)),
            taints: Some(node_taints(cfg)),
            ..Default::default()
        }),
        status: None,
    }
}

fn node_condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    since: Timestamp,
    now: Timestamp,
) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    }
}

/// The node's status: capacity, Ready, addresses, system info.
pub fn node_status(
    cfg: &NodeConfig,
    net: &NodeNet,
    since: Timestamp,
    now: Timestamp,
) -> NodeStatus {
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", cfg.cpu.clone()),
        ("memory", cfg.memory.clone()),
        ("pods", cfg.pods.to_string()),
        ("ephemeral-storage", "500Gi".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v)))
    .collect();
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            node_condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kiln node agent",
                since,
                now,
            ),
            node_condition(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "kiln node agent",
                since,
                now,
            ),
            node_condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kiln node agent",
                since,
                now,
            ),
            node_condition(
                "Ready",
                true,
                "KubeletReady",
                "kiln node agent is posting ready status",
                since,
                now,
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: net.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: cfg.name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: 10250 }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            boot_id: format!("boot-{}", since.as_second()),
            container_runtime_version: AGENT_VERSION.into(),
            kernel_version: "linux".into(),
            kube_proxy_version: String::new(),
            kubelet_version: AGENT_VERSION.into(),
            machine_id: cfg.name.clone(),
            operating_system: "linux".into(),
            os_image: "kiln test node".into(),
            system_uuid: cfg.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node's Lease, owned by the Node so it goes with it.
pub fn lease_object(node: &str, node_uid: Option<&str>, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node.into(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Creates the Node, or brings an existing one's labels and taints in line
/// (and uncordons it). Returns the Node's UID.
pub async fn register(client: &Client, cfg: &NodeConfig, net: &NodeNet) -> Result<Option<String>> {
    let api: Api<Node> = Api::all(client.clone());
    let node = node_object(cfg, net);
    let err = |source| Error::RegisterNode {
        node: cfg.name.clone(),
        source: Box::new(source),
    };
    let created = match api.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch = serde_json::json!({
                "metadata": {"labels": node_labels(cfg)},
                "spec": {"taints": node_taints(cfg), "unschedulable": null},
            });
            api.patch(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    Ok(created.metadata.uid)
}

/// Posts the node's status (strategic merge: conditions keyed by type).
pub async fn post_status(
    client: &Client,
    cfg: &NodeConfig,
    net: &NodeNet,
    since: Timestamp,
) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "status": node_status(cfg, net, since, Timestamp::now()) });
    api.patch_status(
        &cfg.name,
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    )
    .await
    .map_err(|source| Error::NodeStatus {
        node: cfg.name.clone(),
        source: Box::new(source),
    })?;
    Ok(())
}

/// Renews (or creates) the node's Lease.
pub async fn renew_lease(client: &Client, node: &str, node_uid: Option<&str>) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease = lease_object(node, node_uid, Timestamp::now());
    let err = |source| Error::RenewLease {
        node: node.into(),
        source: Box::new(source),
    };
    let patch = serde_json::json!({ "spec": lease.spec });
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            api.create(&PostParams::default(), &lease)
                .await
                .map_err(err)?;
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(capacity_type: CapacityType) -> NodeConfig {
        serde_yaml::from_str::<NodeConfig>("{name: n1, capacityType: spot}")
            .map(|mut c| {
                c.capacity_type = capacity_type;
                c
            })
            .unwrap()
    }

    #[test]
    fn spot_nodes_are_labelled_and_tainted() {
        let net = NodeNet::new([10, 244], 0);
        let n = node_object(&cfg(CapacityType::Spot), &net);
        assert_eq!(
            n.metadata.labels.as_ref().unwrap()[CAPACITY_TYPE_LABEL],
            "spot"
        );
        let taints = n.spec.as_ref().unwrap().taints.clone().unwrap();
        assert_eq!(taints[0].key, SPOT_TAINT_KEY);
        assert_eq!(taints[0].effect, "NoSchedule");
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
    }

    #[test]
    fn on_demand_nodes_are_untainted() {
        let net = NodeNet::new([10, 244], 2);
        let n = node_object(&cfg(CapacityType::OnDemand), &net);
        assert_eq!(
            n.metadata.labels.as_ref().unwrap()[CAPACITY_TYPE_LABEL],
            "on-demand"
        );
        assert!(n.spec.unwrap().taints.unwrap().is_empty());
        assert_eq!(net.ip, Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(net.pod_ip(7), Ipv4Addr::new(10, 244, 3, 7));
    }

    #[test]
    fn status_reports_ready_and_capacity() {
        let net = NodeNet::new([10, 244], 0);
        let now = Timestamp::from_second(100).unwrap();
        let s = node_status(&cfg(CapacityType::Spot), &net, now, now);
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(s.capacity.unwrap()["pods"], Quantity("32".into()));
        assert_eq!(s.addresses.unwrap()[0].address, "10.244.1.1");
    }

    #[test]
    fn lease_is_owned_by_node() {
        let l = lease_object("n1", Some("u1"), Timestamp::from_second(5).unwrap());
        assert_eq!(l.metadata.owner_references.unwrap()[0].uid, "u1");
        assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("n1"));
    }
}
