//! Turning a pod's container spec into a `Launch`: argv from the image
//! mapping, environment (values, downward API, ConfigMap and Secret refs),
//! and the start script with the container's mounts.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::limits::{self, Cgroups};
use crate::process::{Launch, ScriptOptions, expand, field_value, start_script};
use crate::security;
use crate::volumes::container_mounts;

/// Files of one container inside the pod directory.
pub fn container_files(pod_dir: &Path, container: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        pod_dir.join(format!("{container}.log")),
        pod_dir.join(format!("{container}.termination-log")),
        pod_dir.join(format!("{container}.start.sh")),
    )
}

/// The environment every container starts from. `HOME` is `/`, as for an image that sets
/// none: never the agent's own, whose kubeconfig a client would otherwise pick up instead
/// of its service account. `api` is where pods reach the API server (see
/// [`crate::agent::Agent::start`]): the `KUBERNETES_SERVICE_*` variables a kubelet sets.
pub fn base_env(pod: &Pod, api: Option<SocketAddrV4>) -> BTreeMap<String, String> {
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut env: BTreeMap<String, String> = [
        ("PATH".to_string(), path),
        ("HOME".to_string(), "/".to_string()),
        (
            "HOSTNAME".to_string(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ]
    .into();
    if let Some(api) = api {
        let (host, port) = (api.ip().to_string(), api.port().to_string());
        env.insert("KUBERNETES_PORT".into(), format!("tcp://{api}"));
        env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone());
        env.insert("KUBERNETES_SERVICE_HOST".into(), host);
        env.insert("KUBERNETES_SERVICE_PORT".into(), port);
    }
    env
}

async fn config_map_key(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|c| c.data)
        .unwrap_or_default())
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|s| s.data)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect())
}

/// Resolves a container's environment. `pod` must already carry the pod IP
/// and host IP in its status, for `fieldRef`s.
pub async fn container_env(
    client: &Client,
    pod: &Pod,
    c: &Container,
    api: Option<SocketAddrV4>,
) -> Result<BTreeMap<String, String>> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let read_err = |kind: &'static str, name: &str| {
        let (pod_name, ns, name) = (pod_name.clone(), ns.clone(), name.to_owned());
        move |source| Error::ReadPodSource {
            pod: pod_name,
            kind,
            namespace: ns,
            name,
            source: Box::new(source),
        }
    };
    let mut env = base_env(pod, api);
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            config_map_key(client, &ns, &r.name)
                .await
                .map_err(read_err("ConfigMap", &r.name))?
        } else if let Some(r) = &from.secret_ref {
            secret_data(client, &ns, &r.name)
                .await
                .map_err(read_err("Secret", &r.name))?
        } else {
            BTreeMap::new()
        };
        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in c.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), &env),
            Some(src) => {
                let value = if let Some(f) = &src.field_ref {
                    field_value(pod, f)
                } else if let Some(r) = &src.config_map_key_ref {
                    config_map_key(client, &ns, &r.name)
                        .await
                        .map_err(read_err("ConfigMap", &r.name))?
                        .remove(&r.key)
                } else if let Some(r) = &src.secret_key_ref {
                    secret_data(client, &ns, &r.name)
                        .await
                        .map_err(read_err("Secret", &r.name))?
                        .remove(&r.key)
                } else {
                    None
                };
                // An optional key that is missing leaves the variable unset, as the kubelet
                // does.
                let optional = src
                    .secret_key_ref
                    .as_ref()
                    .and_then(|r| r.optional)
                    .or_else(|| src.config_map_key_ref.as_ref().and_then(|r| r.optional))
                    .unwrap_or(false);
                if value.is_none() && optional {
                    continue;
                }
                value.ok_or_else(|| Error::UnsupportedEnv {
                    var: var.name.clone(),
                    container: c.name.clone(),
                })?
            }
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// Everything needed to start container `c` of `pod` (whose status carries
/// its IPs): resolves the image, env and argv, writes the start script.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    client: &Client,
    config: &Config,
    repo: &Path,
    pod: &Pod,
    c: &Container,
    netns: &str,
    pod_dir: &Path,
    volumes: &BTreeMap<String, PathBuf>,
    api: Option<SocketAddrV4>,
    cgroups: Option<&Cgroups>,
) -> Result<Launch> {
    let image = c.image.clone().unwrap_or_default();
    let mapping = config.image(&image).ok_or_else(|| Error::UnmappedImage {
        image: image.clone(),
        container: c.name.clone(),
    })?;
    let env = container_env(client, pod, c, api).await?;
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, &env))
        .collect();
    let args: Vec<String> = c.args.iter().flatten().map(|s| expand(s, &env)).collect();
    let argv = mapping.argv(repo, &c.name, &command, &args)?;
    let (log, termination, script) = container_files(pod_dir, &c.name);
    let mounts = container_mounts(c, volumes, &termination);
    let workdir = c
        .working_dir
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| pod_dir.to_owned());
    let security = security::security(pod, c)?;
    let limit = limits::memory_limit(c)?;
    let group = cgroups.map(|cg| cg.group(&pod.metadata.uid.clone().unwrap_or_default(), &c.name));
    let shared = config.shared_paths(repo);
    let text = start_script(
        &mounts,
        &ScriptOptions {
            workdir: &workdir,
            security: &security,
            shared: &shared,
        },
    );
    std::fs::write(&script, text).map_err(|source| Error::WriteFile {
        path: script.clone(),
        source,
    })?;
    Ok(Launch {
        memory: group.map(|g| (g, limit)),
        netns: netns.to_owned(),
        script,
        argv,
        env,
        log,
        cwd: pod_dir.to_owned(),
    })
}

/// The termination message: the file the container wrote (at most 4 KiB),
/// or with `FallbackToLogsOnError` and a failure, the tail of its log.
pub fn termination_message(
    termination: &Path,
    log: &Path,
    policy: Option<&str>,
    failed: bool,
) -> Option<String> {
    let read_tail = |p: &Path, max: usize| -> Option<String> {
        let data = std::fs::read(p).ok()?;
        let start = data.len().saturating_sub(max);
        let text = String::from_utf8_lossy(&data[start..]).into_owned();
        (!text.is_empty()).then_some(text)
    };
    read_tail(termination, 4096).or_else(|| {
        (failed && policy == Some("FallbackToLogsOnError"))
            .then(|| read_tail(log, 2048))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_the_api_servers_address_and_never_the_agents_home() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("op-1".into());
        let api = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 1), 16443);
        let env = base_env(&pod, Some(api));
        assert_eq!(env["HOME"], "/");
        assert_eq!(env["HOSTNAME"], "op-1");
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.0.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "16443");
        assert_eq!(env["KUBERNETES_PORT"], "tcp://10.0.0.1:16443");
        assert!(!base_env(&pod, None).contains_key("KUBERNETES_SERVICE_HOST"));
    }

    #[test]
    fn termination_message_prefers_file_then_log_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let (log, term, _) = container_files(dir.path(), "c");
        std::fs::write(&log, "line1\nfatal: boom\n").unwrap();
        assert_eq!(termination_message(&term, &log, None, true), None);
        assert_eq!(
            termination_message(&term, &log, Some("FallbackToLogsOnError"), true).as_deref(),
            Some("line1\nfatal: boom\n")
        );
        assert_eq!(
            termination_message(&term, &log, Some("FallbackToLogsOnError"), false),
            None
        );
        std::fs::write(&term, "{\"ok\":true}").unwrap();
        assert_eq!(
            termination_message(&term, &log, None, false).as_deref(),
            Some("{\"ok\":true}")
        );
    }
}
