//! The names of a job's children and the pure builders of its ConfigMap, Secret and Service.
//! Every builder is a function of the ComputeJob (and, for the Secret, the token the
//! reconciler read or made); the reconciler applies the result with server-side apply.
use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kiln_api::ComputeJob;
use kiln_api::crd::{LABEL_JOB, LABEL_ROLE, ROLE_DRIVER};
use kiln_api::launch::DRIVER_PORT;
use kiln_api::tls::{JobCredentials, KeyedCert, Role, TlsIdentity};
use kube::{Resource, ResourceExt};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kiln-operator";
/// Key of the job spec in the spec ConfigMap.
pub const SPEC_KEY: &str = "job.yaml";
/// Key of the token in the token Secret.
pub const TOKEN_KEY: &str = "token";

/// `<job>-spec`: the ConfigMap holding the job spec the driver runs.
pub fn spec_config_map_name(job: &str) -> String {
    format!("{job}-spec")
}

/// `<job>-token`: the Secret holding the driver<->executor token.
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-token")
}

/// `<job>-driver`: the driver pod and its headless Service.
pub fn driver_name(job: &str) -> String {
    format!("{job}-driver")
}

/// `<job>-exec-<n>`: executor pod number `n`; a replacement gets the next unused number.
pub fn executor_name(job: &str, n: u32) -> String {
    format!("{job}-exec-{n}")
}

/// The number in an executor pod's name, if it is one of `job`'s.
pub fn executor_index(job: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(job)?.strip_prefix("-exec-")?.parse().ok()
}

/// The controller owner reference every child carries, so it is garbage-collected with the
/// job and its events wake the job's reconcile.
pub fn owner_reference(job: &ComputeJob) -> OwnerReference {
    job.controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: kiln_api::GROUP.to_string() + "/" + kiln_api::VERSION,
            kind: kiln_api::KIND.into(),
            name: job.name_any(),
            uid: job.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// Metadata of a child: name, namespace, owner and the job label (plus `extra` labels).
pub fn child_meta(job: &ComputeJob, name: String, extra: &[(&str, &str)]) -> ObjectMeta {
    let mut labels = BTreeMap::from([(LABEL_JOB.to_string(), job.name_any())]);
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner_reference(job)]),
        ..Default::default()
    }
}

/// The ConfigMap with the job spec the driver reads (the operator-only fields removed).
pub fn spec_config_map(job: &ComputeJob) -> ConfigMap {
    let yaml = serde_yaml::to_string(&job.spec.for_engine()).expect("a job spec serializes");
    ConfigMap {
        metadata: child_meta(job, spec_config_map_name(&job.name_any()), &[]),
        data: Some(BTreeMap::from([(SPEC_KEY.to_string(), yaml)])),
        ..Default::default()
    }
}

/// Key of the job's CA certificate in the token Secret.
pub const CA_KEY: &str = "ca.crt";

/// Key of a role's certificate in the token Secret (`driver.crt`).
pub fn cert_key(role: Role) -> String {
    format!("{role}.crt")
}

/// Key of a role's private key in the token Secret (`driver.key`).
pub fn private_key_key(role: Role) -> String {
    format!("{role}.key")
}

/// What a job's Secret holds: the token its processes present, and the job's TLS
/// credentials (absent for a job made before Kiln spoke TLS: it keeps plain connections).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSecret {
    /// The per-job token.
    pub token: String,
    /// The job's CA and a certificate per role.
    pub credentials: Option<JobCredentials>,
}

impl JobSecret {
    /// A new job's: a fresh token and fresh credentials, named after `job`.
    pub fn new(job: &str) -> Result<Self, kiln_api::Error> {
        Ok(JobSecret {
            token: new_token(),
            credentials: Some(JobCredentials::issue(job)?),
        })
    }

    /// What an existing Secret's `data` holds: None without a token; credentials only when
    /// every key of them is there.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Option<Self> {
        let text = |key: &str| {
            data.get(key)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .filter(|t| !t.is_empty())
        };
        let token = text(TOKEN_KEY)?;
        let credentials = (|| {
            let mut roles = BTreeMap::new();
            for role in Role::ALL {
                let cert = text(&cert_key(role))?;
                let key = text(&private_key_key(role))?;
                roles.insert(role, KeyedCert { cert, key });
            }
            Some(JobCredentials {
                ca: text(CA_KEY)?,
                roles,
            })
        })();
        Some(JobSecret { token, credentials })
    }

    /// The Secret's `data`.
    fn data(&self) -> BTreeMap<String, ByteString> {
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        let mut data = BTreeMap::from([(TOKEN_KEY.to_string(), bytes(&self.token))]);
        if let Some(c) = &self.credentials {
            data.insert(CA_KEY.into(), bytes(&c.ca));
            for (role, own) in &c.roles {
                data.insert(cert_key(*role), bytes(&own.cert));
                data.insert(private_key_key(*role), bytes(&own.key));
            }
        }
        data
    }

    /// The operator's identity towards the job's driver (None: plain connections).
    pub fn operator_tls(&self) -> Option<TlsIdentity> {
        self.credentials.as_ref()?.identity(Role::Operator)
    }
}

/// The Secret with the job's token and TLS credentials: the driver accepts only executors
/// that present the token, and every connection of the job is mutual TLS under its CA.
pub fn token_secret(job: &ComputeJob, secret: &JobSecret) -> Secret {
    Secret {
        metadata: child_meta(job, token_secret_name(&job.name_any()), &[]),
        type_: Some("Opaque".into()),
        data: Some(secret.data()),
        ..Default::default()
    }
}

/// The headless Service in front of the driver pod.
pub fn driver_service(job: &ComputeJob) -> Service {
    let name = job.name_any();
    Service {
        metadata: child_meta(job, driver_name(&name), &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([
                (LABEL_JOB.to_string(), name),
                (LABEL_ROLE.to_string(), ROLE_DRIVER.to_string()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("control".into()),
                port: DRIVER_PORT.into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::job;

    #[test]
    fn names_are_deterministic() {
        assert_eq!(driver_name("wc"), "wc-driver");
        assert_eq!(executor_name("wc", 7), "wc-exec-7");
        assert_eq!(executor_index("wc", "wc-exec-7"), Some(7));
        assert_eq!(executor_index("wc", "wc-exec-x"), None);
        assert_eq!(executor_index("wc", "wcx-exec-1"), None);
    }

    #[test]
    fn children_are_owned_and_labelled() {
        let j = job("wc");
        let cm = spec_config_map(&j);
        let spec: kiln_api::JobSpec =
            kiln_api::parse_job(&cm.data.as_ref().unwrap()[SPEC_KEY]).unwrap();
        assert_eq!(spec, j.spec.for_engine());
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ComputeJob", Some(true))
        );
        let svc = driver_service(&j);
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(svc.metadata.name.as_deref(), Some("wc-driver"));
        let plain = JobSecret {
            token: "abc".into(),
            credentials: None,
        };
        let secret = token_secret(&j, &plain);
        let data = secret.data.unwrap();
        assert_eq!(data[TOKEN_KEY].0, b"abc");
        assert_eq!(
            data.len(),
            1,
            "a job made before TLS keeps plain connections"
        );
        assert_eq!(JobSecret::from_data(&data), Some(plain));
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 64);
    }

    #[test]
    fn a_new_jobs_secret_holds_its_credentials_and_reads_back() {
        let fresh = JobSecret::new("wc").unwrap();
        let data = token_secret(&job("wc"), &fresh).data.unwrap();
        for key in [
            "token",
            "ca.crt",
            "driver.crt",
            "driver.key",
            "executor.crt",
            "executor.key",
            "operator.crt",
            "operator.key",
        ] {
            assert!(data.contains_key(key), "{key}");
        }
        assert_eq!(JobSecret::from_data(&data), Some(fresh.clone()));
        assert_eq!(fresh.operator_tls().unwrap().role, Role::Operator);
        // A Secret missing a key of the credentials keeps the token, not half an identity.
        let mut partial = data.clone();
        partial.remove("executor.key");
        let read = JobSecret::from_data(&partial).unwrap();
        assert_eq!((read.token, read.credentials), (fresh.token, None));
        assert_eq!(JobSecret::from_data(&BTreeMap::new()), None);
    }
}
