//! Pod volumes, materialised as directories under the pod's directory and
//! bind-mounted at each container's mount paths by its start script.
//! Supported: emptyDir, configMap, secret, downwardAPI and projected
//! (configMap, secret, downwardAPI, serviceAccountToken); anything else is
//! an empty directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result};
use crate::process::{Mount, field_value};
use crate::security;

fn write(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| Error::WriteFile {
            path: parent.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, data).map_err(|source| Error::WriteFile {
        path: path.to_owned(),
        source,
    })
}

/// The files a key/value source yields under `items` (all keys when empty).
pub fn select_items(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|v| (i.path.clone(), v.clone())))
            .collect(),
        _ => data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

struct Sources<'a> {
    client: &'a Client,
    pod: &'a Pod,
    namespace: String,
    pod_name: String,
}

impl Sources<'_> {
    async fn config_map(&self, name: &str, optional: bool) -> Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(name).await {
            Ok(Some(cm)) => {
                let mut out: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                out.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(out)
            }
            Ok(None) if optional => Ok(BTreeMap::new()),
            Ok(None) => Err(self.missing("ConfigMap", name)),
            Err(source) => Err(self.read_err("ConfigMap", name, source)),
        }
    }

    async fn secret(&self, name: &str, optional: bool) -> Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(name).await {
            Ok(Some(s)) => {
                let mut out: BTreeMap<String, Vec<u8>> = s
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                out.extend(
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Ok(out)
            }
            Ok(None) if optional => Ok(BTreeMap::new()),
            Ok(None) => Err(self.missing("Secret", name)),
            Err(source) => Err(self.read_err("Secret", name, source)),
        }
    }

    fn missing(&self, kind: &'static str, name: &str) -> Error {
        Error::MissingPodSource {
            pod: self.pod_name.clone(),
            kind,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
        }
    }

    fn read_err(&self, kind: &'static str, name: &str, source: kube::Error) -> Error {
        Error::ReadPodSource {
            pod: self.pod_name.clone(),
            kind,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            source: Box::new(source),
        }
    }

    fn downward(&self, items: &[DownwardAPIVolumeFile]) -> BTreeMap<String, Vec<u8>> {
        items
            .iter()
            .filter_map(|i| {
                let f = i.field_ref.as_ref()?;
                Some((i.path.clone(), field_value(self.pod, f)?.into_bytes()))
            })
            .collect()
    }

    async fn token(&self, audience: Option<String>, seconds: Option<i64>) -> Result<Vec<u8>> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: seconds,
                ..Default::default()
            },
            ..Default::default()
        };
        let tr = api
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
            .map_err(|source| Error::RequestToken {
                pod: self.pod_name.clone(),
                source: Box::new(source),
            })?;
        Ok(tr.status.map(|s| s.token).unwrap_or_default().into_bytes())
    }
}

/// Writes the files of `volume` into `dir`.
async fn materialise(src: &Sources<'_>, volume: &Volume, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::WriteFile {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(cm) = &volume.config_map {
        let data = src
            .config_map(&cm.name, cm.optional.unwrap_or(false))
            .await?;
        files.extend(select_items(&data, cm.items.as_deref()));
    }
    if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = src.secret(&name, s.optional.unwrap_or(false)).await?;
        files.extend(select_items(&data, s.items.as_deref()));
    }
    if let Some(d) = &volume.downward_api {
        files.extend(src.downward(d.items.as_deref().unwrap_or_default()));
    }
    if let Some(p) = &volume.projected {
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                let data = src
                    .config_map(&cm.name, cm.optional.unwrap_or(false))
                    .await?;
                files.extend(select_items(&data, cm.items.as_deref()));
            }
            if let Some(s) = &source.secret {
                let data = src.secret(&s.name, s.optional.unwrap_or(false)).await?;
                files.extend(select_items(&data, s.items.as_deref()));
            }
            if let Some(d) = &source.downward_api {
                files.extend(src.downward(d.items.as_deref().unwrap_or_default()));
            }
            if let Some(t) = &source.service_account_token {
                let token = src.token(t.audience.clone(), t.expiration_seconds).await?;
                files.push((t.path.clone(), token));
            }
        }
    }
    for (rel, data) in files {
        if rel.split('/').any(|c| c == "..") {
            continue;
        }
        write(&dir.join(rel), &data)?;
    }
    Ok(())
}

/// Materialises all the pod's volumes under `<pod_dir>/volumes/`; returns
/// each volume's directory by name.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<BTreeMap<String, PathBuf>> {
    let src = Sources {
        client,
        pod,
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod_name: pod.metadata.name.clone().unwrap_or_default(),
    };
    let mut out = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let dir = pod_dir.join("volumes").join(&v.name);
        materialise(&src, v, &dir).await?;
        if v.empty_dir.is_some() {
            security::open_empty_dir(&dir, security::fs_group(pod))?;
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

/// Creates the directories from `base` down to `path` that are missing, each with the mode
/// and group of `base`: a subPath of an emptyDir is as open as the emptyDir.
fn make_sub_dirs(base: &Path, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(base) else {
        return;
    };
    let mut dir = base.to_path_buf();
    for part in path
        .strip_prefix(base)
        .into_iter()
        .flat_map(Path::components)
    {
        dir.push(part);
        if dir.exists() {
            continue;
        }
        if std::fs::create_dir(&dir).is_err() {
            return;
        }
        let _ = std::fs::set_permissions(&dir, meta.permissions());
        let _ = std::os::unix::fs::chown(&dir, None, Some(meta.gid()));
    }
}

/// The bind mounts of one container: its volume mounts, then its
/// termination-message file.
pub fn container_mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    termination_file: &Path,
) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let base = volumes.get(&m.name)?;
            let source = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() && !sub.contains("..") => {
                    let path = base.join(sub);
                    // Like the kubelet: a missing subPath of a directory volume is created.
                    if base.is_dir() && !path.exists() {
                        make_sub_dirs(base, &path);
                    }
                    path
                }
                _ => base.clone(),
            };
            Some(Mount {
                file: source.is_file(),
                source,
                target: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
            })
        })
        .collect();
    let path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push(Mount {
        source: termination_file.to_owned(),
        target: path,
        file: true,
        read_only: false,
    });
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn items_select_keys() {
        let data: BTreeMap<String, Vec<u8>> = [
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]
        .into();
        assert_eq!(select_items(&data, None).len(), 2);
        let items = [KeyToPath {
            key: "b".into(),
            path: "x/b.txt".into(),
            ..Default::default()
        }];
        assert_eq!(
            select_items(&data, Some(&items)),
            vec![("x/b.txt".to_string(), b"2".to_vec())]
        );
    }

    #[test]
    fn a_missing_sub_path_is_as_open_as_its_volume() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("scratch");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: "scratch".into(),
                mount_path: "/spill".into(),
                sub_path: Some("work/spill".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let vols: BTreeMap<String, PathBuf> = [("scratch".to_string(), base.clone())].into();
        let m = container_mounts(&c, &vols, Path::new("/p/term-c"));
        assert_eq!(m[0].source, base.join("work/spill"));
        for d in [base.join("work"), base.join("work/spill")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o777, "{}", d.display());
        }
    }

    #[test]
    fn mounts_include_termination_file() {
        let c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: "spec".into(),
                mount_path: "/etc/kiln".into(),
                read_only: Some(true),
                ..Default::default()
            }]),
            termination_message_path: Some("/tmp/msg".into()),
            ..Default::default()
        };
        let vols: BTreeMap<String, PathBuf> =
            [("spec".to_string(), PathBuf::from("/p/volumes/spec"))].into();
        let m = container_mounts(&c, &vols, Path::new("/p/term-c"));
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, "/etc/kiln");
        assert!(m[0].read_only);
        assert_eq!(m[1].target, "/tmp/msg");
        assert!(m[1].file);
    }
}
