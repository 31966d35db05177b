//! The agent's configuration: which nodes it plays, the pod network, and how
//! container images map to local executables.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Label that says whether a node is spot or on-demand (Karpenter's well-known label).
pub const CAPACITY_TYPE_LABEL: &str = "karpenter.sh/capacity-type";
/// Taint key put on every spot node (effect NoSchedule, value "true"): only
/// pods that tolerate it may run there.
pub const SPOT_TAINT_KEY: &str = "kiln.dev/spot";
/// Label on every node the agent plays.
pub const AGENT_NODE_LABEL: &str = "kiln.dev/node-agent";

/// The whole config file (YAML).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The pod network, a /16 (for example 10.244.0.0/16). The host bridge gets
    /// the first address; node `i` (from 0) gets the /24 number `i + 1`.
    #[serde(default = "default_pod_cidr")]
    pub pod_cidr: String,
    /// Name of the host bridge every pod's veth is attached to.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Prefix of the network namespaces the agent creates.
    #[serde(default = "default_netns_prefix")]
    pub netns_prefix: String,
    /// Address of the fault-injection endpoint (loopback only).
    #[serde(default = "default_control")]
    pub control: String,
    /// How often each node renews its Lease.
    #[serde(default = "default_lease_seconds")]
    pub lease_renew_seconds: u64,
    /// How often each node posts its status.
    #[serde(default = "default_status_seconds")]
    pub status_seconds: u64,
    /// Cap of the restart back-off of crashing containers.
    #[serde(default = "default_backoff")]
    pub max_restart_backoff_seconds: u64,
    /// The nodes this agent plays.
    pub nodes: Vec<NodeConfig>,
    /// Image → executable mappings, first match wins.
    pub images: Vec<ImageMapping>,
    /// Host directories that stay writable in a container with `readOnlyRootFilesystem`
    /// (relative paths are relative to the repository root): they stand for a shared
    /// volume every node mounts, where jobs of the end-to-end tests read and write.
    #[serde(default)]
    pub shared_paths: Vec<String>,
}

/// Spot or on-demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

impl CapacityType {
    /// The value of the `karpenter.sh/capacity-type` label.
    pub fn label_value(self) -> &'static str {
        match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on-demand",
        }
    }
}

/// One node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub capacity_type: CapacityType,
    #[serde(default = "default_instance_type")]
    pub instance_type: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    #[serde(default = "default_cpu")]
    pub cpu: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_pods")]
    pub pods: u32,
    /// Extra labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Maps images matching `image` to a local program.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageMapping {
    /// An image reference; a trailing `*` matches any suffix (for example `kiln:*`).
    pub image: String,
    /// The image's ENTRYPOINT: used when the container sets no `command`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Names (or absolute in-image paths) a container `command[0]` may use,
    /// mapped to local programs; matched on the full string, then on its file name.
    #[serde(default)]
    pub binaries: BTreeMap<String, String>,
}

fn default_pod_cidr() -> String {
    "10.244.0.0/16".into()
}
fn default_bridge() -> String {
    "kiln0".into()
}
fn default_netns_prefix() -> String {
    "kiln-".into()
}
fn default_control() -> String {
    "127.0.0.1:10350".into()
}
fn default_lease_seconds() -> u64 {
    2
}
fn default_status_seconds() -> u64 {
    5
}
fn default_backoff() -> u64 {
    10
}
fn default_instance_type() -> String {
    "kiln.test".into()
}
fn default_zone() -> String {
    "test-a".into()
}
fn default_cpu() -> String {
    "4".into()
}
fn default_memory() -> String {
    "8Gi".into()
}
fn default_pods() -> u32 {
    32
}

impl Config {
    /// The shared paths, absolute.
    pub fn shared_paths(&self, repo: &Path) -> Vec<PathBuf> {
        self.shared_paths.iter().map(|p| repo.join(p)).collect()
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = serde_yaml::from_str(&text).map_err(|source| Error::ParseConfig {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.network_prefix()?;
        if self.nodes.is_empty() {
            return Err(Error::InvalidConfig("no nodes".into()));
        }
        if self.nodes.len() > 250 {
            return Err(Error::InvalidConfig("at most 250 nodes".into()));
        }
        if !self.control.starts_with("127.") {
            return Err(Error::InvalidConfig(format!(
                "control endpoint {} must be on the loopback",
                self.control
            )));
        }
        if self.bridge.len() > 15 || self.netns_prefix.len() > 20 {
            return Err(Error::InvalidConfig(
                "bridge name or netns prefix too long".into(),
            ));
        }
        Ok(())
    }

    /// The first two octets of the pod /16.
    pub fn network_prefix(&self) -> Result<[u8; 2]> {
        let bad =
            || Error::InvalidConfig(format!("podCidr {:?} is not an a.b.0.0/16", self.pod_cidr));
        let (addr, len) = self.pod_cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let o = addr.octets();
        if len != "16" || o[2] != 0 || o[3] != 0 {
            return Err(bad());
        }
        Ok([o[0], o[1]])
    }

    /// The bridge's (and every pod's gateway) address.
    pub fn gateway(&self) -> Result<Ipv4Addr> {
        let [a, b] = self.network_prefix()?;
        Ok(Ipv4Addr::new(a, b, 0, 1))
    }

    /// Finds the mapping for an image.
    pub fn image(&self, image: &str) -> Option<&ImageMapping> {
        self.images.iter().find(|m| image_matches(&m.image, image))
    }
}

/// Whether `pattern` (exact, or with one trailing `*`) matches `image`.
/// An image without a tag or digest also matches `name:*`.
pub fn image_matches(pattern: &str, image: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            image.starts_with(prefix)
                || prefix
                    .strip_suffix(':')
                    .is_some_and(|name| image == name || image.starts_with(&format!("{name}@")))
        }
        None => pattern == image,
    }
}

/// Turns a mapped program path into an absolute one: relative paths are
/// relative to `base` (the repository root), bare names are left to `PATH`.
pub fn resolve_program(base: &Path, program: &str) -> PathBuf {
    if program.contains('/') {
        base.join(program)
    } else {
        PathBuf::from(program)
    }
}

impl ImageMapping {
    /// The argv a container runs: Kubernetes' rules (command overrides the
    /// entrypoint, args are appended) with `command[0]` mapped through `binaries`.
    pub fn argv(
        &self,
        base: &Path,
        container: &str,
        command: &[String],
        args: &[String],
    ) -> Result<Vec<String>> {
        let mut argv: Vec<String> = if command.is_empty() {
            self.entrypoint.clone()
        } else {
            command.to_vec()
        };
        let Some(first) = argv.first_mut() else {
            return Err(Error::NoCommand {
                container: container.to_owned(),
            });
        };
        let file_name = first.rsplit('/').next().unwrap_or(first).to_owned();
        let mapped = self
            .binaries
            .get(first.as_str())
            .or_else(|| self.binaries.get(&file_name));
        let program = mapped.cloned().unwrap_or_else(|| first.clone());
        // Entrypoints and mapped binaries come from the config, so relative
        // paths there are repository paths; a pod's own command is taken as is.
        *first = if command.is_empty() || mapped.is_some() {
            resolve_program(base, &program)
                .to_string_lossy()
                .into_owned()
        } else {
            program
        };
        argv.extend(args.iter().cloned());
        Ok(argv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> ImageMapping {
        ImageMapping {
            image: "kiln:*".into(),
            entrypoint: vec!["target/release/kiln".into()],
            binaries: [("kiln".to_string(), "target/release/kiln".to_string())].into(),
        }
    }

    #[test]
    fn image_patterns() {
        assert!(image_matches("kiln:*", "kiln:dev"));
        assert!(image_matches("kiln:*", "kiln"));
        assert!(image_matches("kiln:*", "kiln@sha256:00"));
        assert!(!image_matches("kiln:*", "kilnx:dev"));
        assert!(image_matches(
            "ghcr.io/kiln-dev/kiln:*",
            "ghcr.io/kiln-dev/kiln:0.1"
        ));
        assert!(image_matches("python:3", "python:3"));
        assert!(!image_matches("python:3", "python:3.12"));
    }

    #[test]
    fn argv_uses_entrypoint_without_command() {
        let argv = mapping()
            .argv(Path::new("/r"), "c", &[], &["executor".into()])
            .unwrap();
        assert_eq!(argv, ["/r/target/release/kiln", "executor"]);
    }

    #[test]
    fn argv_maps_command_binary() {
        let argv = mapping()
            .argv(
                Path::new("/r"),
                "c",
                &["/usr/local/bin/kiln".into(), "driver".into()],
                &["--x".into()],
            )
            .unwrap();
        assert_eq!(argv, ["/r/target/release/kiln", "driver", "--x"]);
        let argv = mapping()
            .argv(Path::new("/r"), "c", &["sh".into(), "-c".into()], &[])
            .unwrap();
        assert_eq!(argv, ["sh", "-c"]);
    }

    #[test]
    fn argv_without_any_command_fails() {
        let m = ImageMapping {
            entrypoint: vec![],
            ..mapping()
        };
        assert!(matches!(
            m.argv(Path::new("/r"), "c", &[], &[]),
            Err(Error::NoCommand { .. })
        ));
    }

    #[test]
    fn network_plan() {
        let c: Config =
            serde_yaml::from_str("nodes: [{name: a, capacityType: spot}]\nimages: []\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.network_prefix().unwrap(), [10, 244]);
        assert_eq!(c.gateway().unwrap(), Ipv4Addr::new(10, 244, 0, 1));
        let bad = Config {
            pod_cidr: "10.244.1.0/24".into(),
            ..c
        };
        assert!(bad.validate().is_err());
    }
}
