//! A container's `securityContext`, applied as a kubelet applies it: the user and groups
//! the process runs as (`runAsUser`, `runAsGroup`, `fsGroup`, `supplementalGroups`),
//! `runAsNonRoot` checked before it starts, `allowPrivilegeEscalation: false` as
//! no_new_privs, and `readOnlyRootFilesystem` as a read-only view of every mount in the
//! process's mount namespace except its volumes, `/proc`, `/sys`, `/dev` and the agent's
//! shared paths.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::error::{Error, Result};
use crate::process::shell_quote;

/// The identity a container's process takes before it execs its program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What the start script enforces for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// None: the image's user, root here.
    pub run_as: Option<RunAs>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
}

fn id(container: &str, field: &'static str, value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::InvalidSecurityContext {
        container: container.to_owned(),
        field,
        value,
    })
}

/// The security a container gets from its own and its pod's `securityContext`. A
/// container that must not run as root but would is refused, as the kubelet refuses it.
pub fn security(pod: &Pod, c: &Container) -> Result<Security> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let uid = csc
        .and_then(|s| s.run_as_user)
        .or_else(|| psc.and_then(|s| s.run_as_user));
    let gid = csc
        .and_then(|s| s.run_as_group)
        .or_else(|| psc.and_then(|s| s.run_as_group));
    let non_root = csc
        .and_then(|s| s.run_as_non_root)
        .or_else(|| psc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let uid = uid.map(|u| id(&c.name, "runAsUser", u)).transpose()?;
    if non_root && uid.unwrap_or(0) == 0 {
        return Err(Error::RunsAsRoot {
            container: c.name.clone(),
        });
    }
    let gid = gid.map(|g| id(&c.name, "runAsGroup", g)).transpose()?;
    let mut groups = Vec::new();
    if let Some(g) = psc.and_then(|s| s.fs_group) {
        groups.push(id(&c.name, "fsGroup", g)?);
    }
    for g in psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
    {
        groups.push(id(&c.name, "supplementalGroups", g)?);
    }
    groups.sort_unstable();
    groups.dedup();
    let run_as = (uid.is_some() || gid.is_some() || !groups.is_empty()).then(|| RunAs {
        uid: uid.unwrap_or(0),
        gid: gid.unwrap_or(0),
        groups,
    });
    Ok(Security {
        run_as,
        no_new_privs: csc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        read_only_root: csc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
    })
}

/// The fsGroup of the pod: its volumes' group.
pub fn fs_group(pod: &Pod) -> Option<u32> {
    let g = pod.spec.as_ref()?.security_context.as_ref()?.fs_group?;
    u32::try_from(g).ok()
}

/// Script lines that turn every mount read-only but `/proc`, `/sys`, `/dev`, the
/// container's volume mounts (`writable`) and the shared paths, which are first bound onto
/// themselves so that they are mounts of their own.
pub fn read_only_root(writable: &[&str], shared: &[PathBuf]) -> String {
    let mut s = String::from("# readOnlyRootFilesystem\n");
    let mut keep = vec!["/proc".to_string(), "/sys".to_string(), "/dev".to_string()];
    for p in shared {
        let q = shell_quote(&p.to_string_lossy());
        s.push_str(&format!("if [ -d {q} ]; then mount --bind {q} {q}; fi\n"));
        keep.push(p.to_string_lossy().into_owned());
    }
    keep.extend(writable.iter().map(|w| w.to_string()));
    let patterns: Vec<String> = keep
        .iter()
        .map(|k| {
            let q = shell_quote(k);
            format!("{q}|{q}/*")
        })
        .collect();
    s.push_str("mount -o remount,bind,ro /\n");
    s.push_str("for m in $(awk '{print $2}' /proc/self/mounts); do\n");
    s.push_str(&format!(
        "  case \"$m\" in /|{}) ;; *) mount -o remount,bind,ro \"$m\" 2>/dev/null || true ;; esac\n",
        patterns.join("|")
    ));
    s.push_str("done\n");
    s
}

/// The line that runs the program ("$@") with the container's identity, keeping the
/// script's PID.
pub fn exec_line(sec: &Security) -> String {
    let mut args: Vec<String> = Vec::new();
    if let Some(r) = &sec.run_as {
        args.push(format!("--reuid={}", r.uid));
        args.push(format!("--regid={}", r.gid));
        if r.groups.is_empty() {
            args.push("--clear-groups".into());
        } else {
            let list: Vec<String> = r.groups.iter().map(u32::to_string).collect();
            args.push(format!("--groups={}", list.join(",")));
        }
    }
    if sec.no_new_privs {
        args.push("--no-new-privs".into());
    }
    if args.is_empty() {
        "exec \"$@\"\n".into()
    } else {
        format!("exec setpriv {} -- \"$@\"\n", args.join(" "))
    }
}

/// Makes an emptyDir writable for any user, as the kubelet does, and gives it the pod's
/// fsGroup.
pub fn open_empty_dir(dir: &Path, fs_group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::WriteFile {
        path: dir.to_owned(),
        source,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(err)?;
    if let Some(g) = fs_group {
        std::os::unix::fs::chown(dir, None, Some(g)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn identity_from_pod_and_container() {
        let p = pod(json!({
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                "supplementalGroups": [3000], "runAsNonRoot": true},
            "containers": [{"name": "a", "securityContext": {"runAsUser": 1001,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true}}],
        }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let s = security(&p, c).unwrap();
        assert_eq!(
            s.run_as,
            Some(RunAs {
                uid: 1001,
                gid: 1000,
                groups: vec![2000, 3000]
            })
        );
        assert!(s.no_new_privs && s.read_only_root);
        assert_eq!(
            exec_line(&s),
            "exec setpriv --reuid=1001 --regid=1000 --groups=2000,3000 --no-new-privs -- \"$@\"\n"
        );
        assert_eq!(fs_group(&p), Some(2000));
    }

    #[test]
    fn non_root_without_a_user_is_refused() {
        for spec in [
            json!({"securityContext": {"runAsNonRoot": true}, "containers": [{"name": "a"}]}),
            json!({"containers": [{"name": "a", "securityContext": {"runAsNonRoot": true, "runAsUser": 0}}]}),
        ] {
            let p = pod(spec);
            let c = &p.spec.as_ref().unwrap().containers[0];
            assert!(
                matches!(security(&p, c), Err(Error::RunsAsRoot { container }) if container == "a")
            );
        }
    }

    #[test]
    fn no_context_runs_the_program_as_is() {
        let p = pod(json!({"containers": [{"name": "a"}]}));
        let s = security(&p, &p.spec.as_ref().unwrap().containers[0]).unwrap();
        assert_eq!(s, Security::default());
        assert_eq!(exec_line(&s), "exec \"$@\"\n");
        let p = pod(json!({"containers": [{"name": "a", "securityContext": {"runAsUser": -1}}]}));
        assert!(matches!(
            security(&p, &p.spec.as_ref().unwrap().containers[0]),
            Err(Error::InvalidSecurityContext {
                field: "runAsUser",
                ..
            })
        ));
    }

    #[test]
    fn read_only_root_keeps_volumes_and_shared_paths() {
        let s = read_only_root(&["/tmp"], &[PathBuf::from("/data/shared")]);
        assert!(s.contains("mount --bind '/data/shared' '/data/shared'"));
        assert!(s.contains("mount -o remount,bind,ro /\n"));
        assert!(s.contains("'/tmp'|'/tmp'/*"));
        assert!(s.contains("'/data/shared'|'/data/shared'/*"));
        assert!(s.contains("'/proc'|'/proc'/*"));
    }
}
