//! Pod networking with iproute2: one host bridge, and per pod a network
//! namespace joined to it by a veth pair.
//!
//! Every name the agent creates is recorded as a file under
//! `<state>/created/` so that `tests/cluster/down` removes exactly those.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::error::{Error, Result};

/// Runs `ip ARGS`, failing with its stderr.
pub async fn ip(args: &[&str]) -> Result<()> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| Error::RunCommand {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Where the names of created namespaces and links are recorded.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn new(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("created");
        std::fs::create_dir_all(&dir).map_err(|source| Error::WriteFile {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn record(&self, kind: &str, name: &str) -> Result<()> {
        let path = self.dir.join(format!("{kind}.{name}"));
        std::fs::write(&path, b"").map_err(|source| Error::WriteFile { path, source })
    }

    fn forget(&self, kind: &str, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{kind}.{name}")));
    }
}

/// The host bridge with the gateway address and one address per node.
pub async fn ensure_bridge(
    registry: &Registry,
    bridge: &str,
    gateway: Ipv4Addr,
    node_addrs: &[Ipv4Addr],
) -> Result<()> {
    registry.record("link", bridge)?;
    if ip(&["link", "show", bridge]).await.is_err() {
        ip(&["link", "add", bridge, "type", "bridge"]).await?;
    }
    for addr in std::iter::once(&gateway).chain(node_addrs) {
        let cidr = format!("{addr}/16");
        // "File exists" when already there: fine.
        if let Err(e) = ip(&["addr", "add", &cidr, "dev", bridge]).await
            && !e.to_string().contains("File exists")
        {
            return Err(e);
        }
    }
    ip(&["link", "set", bridge, "up"]).await
}

/// Adds `addr/32` to the bridge (nothing when already there); it goes with the bridge.
pub async fn add_address(bridge: &str, addr: Ipv4Addr) -> Result<()> {
    let cidr = format!("{addr}/32");
    match ip(&["addr", "add", &cidr, "dev", bridge]).await {
        Err(e) if !e.to_string().contains("File exists") => Err(e),
        _ => Ok(()),
    }
}

/// A pod's namespace and host-side veth names, derived from its UID (veth
/// names are limited to 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub netns: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
}

impl PodNet {
    pub fn new(prefix: &str, uid: &str, ip: Ipv4Addr) -> Self {
        let short: String = uid
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(10)
            .collect();
        Self {
            netns: format!("{prefix}{short}"),
            host_veth: format!("kv{short}"),
            ip,
        }
    }
}

/// Creates the pod's namespace, veth pair, address and routes.
pub async fn setup_pod(
    registry: &Registry,
    bridge: &str,
    gateway: Ipv4Addr,
    net: &PodNet,
) -> Result<()> {
    // A leftover from an earlier run of the same pod: start clean.
    teardown_pod(registry, net).await;
    registry.record("netns", &net.netns)?;
    ip(&["netns", "add", &net.netns]).await?;
    ip(&[
        "link",
        "add",
        &net.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &net.netns,
    ])
    .await?;
    ip(&["link", "set", &net.host_veth, "master", bridge, "up"]).await?;
    let ns = net.netns.as_str();
    let cidr = format!("{}/16", net.ip);
    let gw = gateway.to_string();
    ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
    ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]).await?;
    ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
    ip(&["-n", ns, "route", "add", "default", "via", &gw]).await?;
    Ok(())
}

/// Deletes the pod's namespace (which deletes its veth pair). Best effort.
pub async fn teardown_pod(registry: &Registry, net: &PodNet) {
    let _ = ip(&["link", "del", &net.host_veth]).await;
    let _ = ip(&["netns", "del", &net.netns]).await;
    registry.forget("netns", &net.netns);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits() {
        let n = PodNet::new(
            "kiln-",
            "6f1c2a8e-1b2c-4d5e-8f90-123456789abc",
            Ipv4Addr::new(10, 244, 1, 2),
        );
        assert_eq!(n.netns, "kiln-6f1c2a8e1b");
        assert_eq!(n.host_veth, "kv6f1c2a8e1b");
        assert!(n.host_veth.len() <= 15);
    }
}

/// Host parts (2..=254) of one node's pod /24, handed out round-robin so an
/// address is not reused right after its pod went away.
#[derive(Debug, Clone)]
pub struct IpPool {
    used: std::collections::BTreeSet<u8>,
    next: u8,
}

impl Default for IpPool {
    fn default() -> Self {
        Self {
            used: Default::default(),
            next: 2,
        }
    }
}

impl IpPool {
    pub fn alloc(&mut self) -> Option<u8> {
        for _ in 2..=254u8 {
            let host = self.next;
            self.next = if self.next >= 254 { 2 } else { self.next + 1 };
            if self.used.insert(host) {
                return Some(host);
            }
        }
        None
    }

    pub fn release(&mut self, host: u8) {
        self.used.remove(&host);
    }
}

#[cfg(test)]
mod pool_tests {
    use super::IpPool;

    #[test]
    fn round_robin_and_exhaustion() {
        let mut p = IpPool::default();
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), Some(3));
        p.release(2);
        assert_eq!(p.alloc(), Some(4));
        // 3 and 4 are in use; the other 251 of 2..=254 are handed out, then none.
        let mut n = 2;
        while p.alloc().is_some() {
            n += 1;
        }
        assert_eq!(n, 253);
        p.release(100);
        assert_eq!(p.alloc(), Some(100));
    }
}
