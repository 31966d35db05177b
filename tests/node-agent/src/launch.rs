//! Turning a pod's container spec into a `Launch`: argv from the image
//! mapping, environment (values, downward API, ConfigMap and Secret refs),
//! and the start script with the container's mounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::process::{Launch, expand, field_value, start_script};
use crate::volumes::container_mounts;

/// Files of one container inside the pod directory.
pub fn container_files(pod_dir: &Path, container: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        pod_dir.join(format!("{container}.log")),
        pod_dir.join(format!("{container}.termination-log")),
        pod_dir.join(format!("{container}.start.sh")),
    )
}

/// The environment every container starts from.
pub fn base_env(pod: &Pod) -> BTreeMap<String, String> {
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    [
        ("PATH".to_string(), path),
        (
            "HOME".to_string(),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        ),
        (
            "HOSTNAME".to_string(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ]
    .into()
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
    let mut env = base_env(pod);
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
) -> Result<Launch> {
    let image = c.image.clone().unwrap_or_default();
    let mapping = config.image(&image).ok_or_else(|| Error::UnmappedImage {
        image: image.clone(),
        container: c.name.clone(),
    })?;
    let env = container_env(client, pod, c).await?;
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
    let text = start_script(&mounts, &workdir);
    std::fs::write(&script, text).map_err(|source| Error::WriteFile {
        path: script.clone(),
        source,
    })?;
    Ok(Launch {
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
