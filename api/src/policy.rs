//! Where a job may read and write. A job's inputs and output are its author's to choose,
//! but not the pod's own secrets (its token and service account live in files and in
//! `/proc/self/environ`) nor the cloud's metadata service (which hands out the node's
//! credentials): those are refused before anything runs, naming the field and the rule.
//!
//! The check here is on the URI as a URL parser reads it (so `http://2852039166/` is
//! 169.254.169.254, as the HTTP client would read it too); the driver checks local paths
//! again once resolved (relative paths, `..` and symbolic links followed), with
//! [`check_path`], and the engine's HTTP client checks every address a host name resolves
//! to and every redirect at connect time, with [`LocationPolicy::check_address`] and
//! [`LocationPolicy::check_url`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::{Host, Url};

use crate::{FieldError, JobSpec};

/// Local paths no job may read or write: the kernel's views of processes and devices
/// (`/proc/self/environ` holds the job's token), the operator's mount of the job's own
/// files, and where Kubernetes mounts service-account tokens and secrets.
pub const DENIED_PATHS: [&str; 6] = [
    "/proc",
    "/sys",
    "/dev",
    "/etc/kiln",
    "/var/run/secrets",
    "/run/secrets",
];

/// Host names of cloud metadata services (their addresses are link-local, refused too).
const METADATA_HOSTS: [&str; 4] = [
    "metadata.google.internal",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Why loopback is refused on a cluster.
const LOOPBACK: &str = "on the loopback network, which on a cluster is the pod itself";

/// Where a job's inputs and output may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocationPolicy {
    /// Whether hosts on the loopback network (`localhost`, 127.0.0.0/8, `::1`) may be
    /// read: yes on one's own machine (`kiln run`), no on a cluster, where loopback is the
    /// pod itself and its sidecars.
    pub allow_loopback: bool,
    /// Whether local paths may be relative: yes with `kiln run` (relative to the job file),
    /// never on a cluster, where one would name whatever is at that place in the driver's
    /// and executors' working directories. Not one of the operator's settings.
    #[serde(skip)]
    pub allow_relative_paths: bool,
}

impl Default for LocationPolicy {
    fn default() -> Self {
        Self::cluster()
    }
}

impl LocationPolicy {
    /// The operator's default: loopback refused.
    pub fn cluster() -> Self {
        Self {
            allow_loopback: false,
            allow_relative_paths: false,
        }
    }

    /// A job's pods', as the operator's policy (its `allowLoopback`) lets them connect.
    pub fn pods(allow_loopback: bool) -> Self {
        Self {
            allow_loopback,
            ..Self::cluster()
        }
    }

    /// `kiln run`'s: the machine is the user's own, its loopback services too.
    pub fn local() -> Self {
        Self {
            allow_loopback: true,
            allow_relative_paths: true,
        }
    }

    /// Why `uri` may not be read or written, if it may not.
    pub fn check(&self, uri: &str) -> Option<String> {
        let uri = uri.trim();
        let Some((scheme, rest)) = uri.split_once("://") else {
            let path = Path::new(uri);
            if path.is_relative() && !self.allow_relative_paths {
                return Some(
                    "a relative path names no place on a cluster: use an absolute path (on a \
                     volume the pods mount) or a URL"
                        .into(),
                );
            }
            return check_path(path);
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                let path = rest.split(['?', '#']).next().unwrap_or_default();
                check_path(Path::new(path.trim_start_matches("localhost")))
            }
            "http" | "https" | "s3" => match Url::parse(uri) {
                Ok(url) => self.check_url(&url),
                Err(e) => Some(format!("is not a valid URL: {e}")),
            },
            other => Some(format!(
                "scheme `{other}` is not allowed (use a path, file://, http(s):// or s3://)"
            )),
        }
    }

    /// Why the host of `url` may not be reached, if it may not: for an input's URI, and
    /// for each redirect the HTTP client is sent on.
    pub fn check_url(&self, url: &Url) -> Option<String> {
        let name = url.host_str().unwrap_or_default();
        let why = match url.host() {
            None => Some("names no host".to_string()),
            Some(Host::Ipv4(v4)) => self.check_address(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.check_address(IpAddr::V6(v6)),
            Some(Host::Domain(domain)) => self.check_name(domain),
        };
        why.map(|why| format!("`{name}` is {why}"))
    }

    fn check_name(&self, name: &str) -> Option<String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Some("no host name".into());
        }
        if METADATA_HOSTS.contains(&name.as_str()) {
            return Some("a cloud metadata service".into());
        }
        let loopback = name == "localhost" || name.ends_with(".localhost");
        (loopback && !self.allow_loopback).then(|| LOOPBACK.to_string())
    }

    /// Why `ip` may not be connected to, if it may not: checked on every address a job's
    /// host names resolve to, when the connection is made.
    pub fn check_address(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if let Some(why) = denied_address(ip) {
            return Some(why.to_string());
        }
        (ip.is_loopback() && !self.allow_loopback).then(|| LOOPBACK.to_string())
    }

    /// Every refused location of `spec`, each naming its field.
    pub fn validate(&self, spec: &JobSpec) -> Vec<FieldError> {
        let inputs = spec
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| (format!("inputs[{i}].uri"), &input.uri));
        let output = spec
            .output
            .iter()
            .map(|o| ("output.uri".to_string(), &o.uri));
        inputs
            .chain(output)
            .filter_map(|(field, uri)| {
                self.check(uri).map(|why| FieldError {
                    field,
                    message: format!("`{uri}` is refused: {why}"),
                })
            })
            .collect()
    }
}

/// Why a local path may not be read or written, if it may not: under one of
/// [`DENIED_PATHS`] once `.` and `..` are taken out.
pub fn check_path(path: &Path) -> Option<String> {
    let normal = normalize(path);
    DENIED_PATHS
        .iter()
        .find(|denied| normal.starts_with(denied))
        .map(|denied| format!("local paths under {denied} are refused"))
}

/// `path` with `.` and `..` resolved lexically (a relative path stays relative).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Addresses refused whatever the policy: link-local (every cloud's metadata service
/// answers on 169.254.169.254), the unspecified address, and the metadata services that
/// live elsewhere (AWS over IPv6, Alibaba).
fn denied_address(ip: IpAddr) -> Option<&'static str> {
    const AWS_V6_METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local (the cloud metadata service)"),
        IpAddr::V4(v4) if v4 == ALIBABA_METADATA => Some("a cloud metadata service"),
        IpAddr::V6(v6) if v6 == AWS_V6_METADATA => Some("a cloud metadata service"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("link-local (the cloud metadata service)")
        }
        ip if ip.is_unspecified() => Some("the unspecified address"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_metadata_are_refused_and_data_is_not() {
        let cluster = LocationPolicy::cluster();
        for refused in [
            "/proc/self/environ",
            "file:///proc/self/environ",
            "/data/../proc/1/environ",
            "/sys/kernel",
            "/etc/kiln/job.yaml",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.170.2/v2/credentials",
            "http://[fd00:ec2::254]/latest/",
            "http://[::ffff:169.254.169.254]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://100.100.100.200/latest/meta-data/",
            "http://user@169.254.169.254:80/x",
            "http://2852039166/latest/meta-data/",
            "http://0xa9fea9fe/",
            "http://169.254.43518/",
            "HTTP://METADATA.GOOGLE.INTERNAL./",
            "http://[::ffff:a9fe:a9fe]/",
            "http://2130706433/",
            "http://a.localhost./",
            "http://0.0.0.0:8080/x",
            "http://localhost:9000/data/",
            "http://127.0.0.2/data/",
            "https://[::1]/data/",
            "gopher://example.com/",
            "data/in/",
            "./in.csv",
            "../shared/in.csv",
        ] {
            assert!(
                cluster.check(refused).is_some(),
                "{refused} must be refused"
            );
        }
        for allowed in [
            "/data/tpch/lineitem.parquet",
            "/data/in/",
            "file:///data/in/",
            "s3://bucket/prefix/",
            "https://example.com/data.csv",
            "http://10.0.0.5:9000/data/",
            "/procurement/2024.csv",
        ] {
            assert_eq!(cluster.check(allowed), None, "{allowed}");
        }
        let local = LocationPolicy::local();
        assert_eq!(local.check("http://localhost:9000/data/"), None);
        assert_eq!(local.check("data/tpch/lineitem.parquet"), None);
        assert!(local.check("http://169.254.169.254/").is_some());
        assert!(local.check("/proc/self/environ").is_some());
        assert_eq!(local.check("http://2130706433/"), None);
    }

    #[test]
    fn addresses_are_checked_as_the_client_connects() {
        let cluster = LocationPolicy::cluster();
        let local = LocationPolicy::local();
        for ip in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "0.0.0.0",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(cluster.check_address(ip).is_some(), "{ip}");
            assert!(local.check_address(ip).is_some(), "{ip}");
        }
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(cluster.check_address(ip).is_some(), "{ip}");
            assert_eq!(local.check_address(ip), None, "{ip}");
        }
        for ip in ["10.0.0.5", "93.184.216.34", "2001:db8::1"] {
            assert_eq!(cluster.check_address(ip.parse().unwrap()), None, "{ip}");
        }
        let redirect = Url::parse("http://169.254.169.254/latest/").unwrap();
        assert_eq!(
            local.check_url(&redirect).as_deref(),
            Some("`169.254.169.254` is link-local (the cloud metadata service)")
        );
    }
}
