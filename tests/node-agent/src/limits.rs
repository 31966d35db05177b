//! Memory limits, enforced as a kubelet does: each container process runs in a memory
//! cgroup of its own whose limit is the container's `resources.limits.memory`, on cgroup v2
//! where the machine has its memory controller, else on cgroup v1's. A container the kernel
//! kills for going over is reported `OOMKilled`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Which cgroup hierarchy holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy (`memory.max`, `memory.events`).
    V2,
    /// The v1 memory controller (`memory.limit_in_bytes`, `memory.oom_control`).
    V1,
}

impl Hierarchy {
    fn limit_file(self) -> &'static str {
        match self {
            Hierarchy::V2 => "memory.max",
            Hierarchy::V1 => "memory.limit_in_bytes",
        }
    }

    /// The file whose `oom_kill N` line counts the group's OOM kills.
    fn oom_file(self) -> &'static str {
        match self {
            Hierarchy::V2 => "memory.events",
            Hierarchy::V1 => "memory.oom_control",
        }
    }
}

/// The agent's own cgroup, parent of every container's.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    hierarchy: Hierarchy,
}

const AGENT_GROUP: &str = "kiln-node-agent";

fn write(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).map_err(|source| Error::WriteFile {
        path: path.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::WriteFile {
        path: path.to_owned(),
        source,
    })
}

impl Cgroups {
    /// Finds the memory controller under `mount` (normally `/sys/fs/cgroup`) and makes the
    /// agent's group there. None, with a warning, when the machine has no memory controller
    /// this process may write: limits are then not enforced.
    pub fn detect(mount: &Path) -> Option<Self> {
        match Self::try_detect(mount) {
            Ok(Some(c)) => {
                info!(root = %c.root.display(), hierarchy = ?c.hierarchy, "memory limits enforced");
                Some(c)
            }
            Ok(None) => {
                warn!("no memory cgroup controller: memory limits are not enforced");
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot use the memory cgroup controller: memory limits are not enforced");
                None
            }
        }
    }

    fn try_detect(mount: &Path) -> Result<Option<Self>> {
        let v2_controllers = std::fs::read_to_string(mount.join("cgroup.controllers"));
        if let Ok(list) = v2_controllers
            && list.split_whitespace().any(|c| c == "memory")
        {
            let root = mount.join(AGENT_GROUP);
            // Controllers reach a group only when its parent enables them for its children.
            write(&mount.join("cgroup.subtree_control"), "+memory")?;
            mkdir(&root)?;
            write(&root.join("cgroup.subtree_control"), "+memory")?;
            return Ok(Some(Self::cleaned(root, Hierarchy::V2)));
        }
        let v1 = mount.join("memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let root = v1.join(AGENT_GROUP);
            mkdir(&root)?;
            return Ok(Some(Self::cleaned(root, Hierarchy::V1)));
        }
        Ok(None)
    }

    /// Removes the empty groups an earlier run of the agent left.
    fn cleaned(root: PathBuf, hierarchy: Hierarchy) -> Self {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        Self { root, hierarchy }
    }

    /// The group of container `container` of the pod with uid `pod_uid` (not yet made).
    pub fn group(&self, pod_uid: &str, container: &str) -> Group {
        Group {
            dir: self.root.join(format!("{pod_uid}-{container}")),
            hierarchy: self.hierarchy,
        }
    }
}

/// One container's memory cgroup.
#[derive(Debug, Clone)]
pub struct Group {
    dir: PathBuf,
    hierarchy: Hierarchy,
}

impl Group {
    /// The file the start script writes its PID to, joining the group before it execs.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Makes the group (again, for a restart) with `limit` bytes, or no limit; returns its
    /// OOM-kill count so far, to compare with the count when the process ends.
    pub fn prepare(&self, limit: Option<u64>) -> Result<u64> {
        mkdir(&self.dir)?;
        let value = match (limit, self.hierarchy) {
            (Some(bytes), _) => bytes.to_string(),
            (None, Hierarchy::V2) => "max".into(),
            (None, Hierarchy::V1) => "-1".into(),
        };
        write(&self.dir.join(self.hierarchy.limit_file()), &value)?;
        match self.hierarchy {
            // The kubelet's choice on v2: an OOM kill takes the container's whole group,
            // and no swap stands in for the limit.
            Hierarchy::V2 => {
                let _ = write(&self.dir.join("memory.oom.group"), "1");
                let _ = write(&self.dir.join("memory.swap.max"), "0");
            }
            Hierarchy::V1 => {
                if limit.is_some() {
                    let _ = write(&self.dir.join("memory.memsw.limit_in_bytes"), &value);
                }
            }
        }
        Ok(self.oom_kills())
    }

    /// How many processes of the group the kernel has killed for going over its limit.
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(self.hierarchy.oom_file()))
            .map(|text| oom_kill_count(&text))
            .unwrap_or(0)
    }

    /// Removes the group if its processes are gone (a group with processes stays).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Removes the group, waiting up to 2 s for its last processes to go.
    pub async fn remove_when_empty(&self) {
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        warn!(group = %self.dir.display(), "memory cgroup still has processes; left for the next start");
    }
}

/// The `oom_kill N` count in a `memory.events` or `memory.oom_control` file.
pub fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A container's memory limit in bytes, from `resources.limits.memory`.
pub fn memory_limit(c: &Container) -> Result<Option<u64>> {
    let Some(q) = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
    else {
        return Ok(None);
    };
    kiln_api::parse_memory(&q.0)
        .map(Some)
        .map_err(|source| Error::InvalidLimit {
            container: c.name.clone(),
            quantity: q.0.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn limits_come_from_the_container() {
        let mut c = Container {
            name: "main".into(),
            ..Default::default()
        };
        assert_eq!(memory_limit(&c).unwrap(), None);
        c.resources = Some(ResourceRequirements {
            limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
            ..Default::default()
        });
        assert_eq!(memory_limit(&c).unwrap(), Some(64 << 20));
        c.resources = Some(ResourceRequirements {
            limits: Some([("memory".to_string(), Quantity("huge".into()))].into()),
            ..Default::default()
        });
        assert!(matches!(
            memory_limit(&c),
            Err(Error::InvalidLimit { container, quantity, .. }) if container == "main" && quantity == "huge"
        ));
    }

    #[test]
    fn oom_kill_counts_from_either_hierarchy() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(oom_kill_count(v2), 2);
        assert_eq!(oom_kill_count(v1), 1);
        assert_eq!(oom_kill_count(""), 0);
    }

    #[test]
    fn groups_on_a_fake_v1_mount() {
        let mount = tempfile::tempdir().unwrap();
        let memory = mount.path().join("memory");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::write(memory.join("memory.limit_in_bytes"), "max").unwrap();
        let cg = Cgroups::detect(mount.path()).expect("v1 memory controller");
        let g = cg.group("uid-1", "main");
        assert_eq!(g.prepare(Some(1 << 26)).unwrap(), 0);
        let dir = memory.join(AGENT_GROUP).join("uid-1-main");
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap(),
            "67108864"
        );
        std::fs::write(dir.join("memory.oom_control"), "oom_kill 3\n").unwrap();
        assert_eq!(g.oom_kills(), 3);
        assert_eq!(g.procs_file(), dir.join("cgroup.procs"));
    }
}
