//! Each job's identity: a certificate authority made for the job alone, and a certificate
//! per role (driver, executor, operator) it signed. Every connection of a job, control and
//! blocks alike, is mutual TLS: the server presents its role's certificate, the client
//! its own, and each checks the other's against the job's authority, so a peer of another
//! job, or one with no certificate, is refused in the handshake. A certificate names its
//! role (`driver.kiln.internal`, ...): a client checks it reached the role it dialled, and a
//! server which roles may call which method.
use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::{Error, Result};

/// The CA certificate of the job (PEM), in its Secret and every process's environment.
pub const ENV_TLS_CA: &str = "KILN_TLS_CA";
/// The process's own certificate (PEM).
pub const ENV_TLS_CERT: &str = "KILN_TLS_CERT";
/// The process's private key (PEM).
pub const ENV_TLS_KEY: &str = "KILN_TLS_KEY";

/// What a process of a job is, as its certificate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The driver: serves the control service, takes executors over, fetches results.
    Driver,
    /// An executor: serves blocks, registers with and polls the driver, fetches peers' blocks.
    Executor,
    /// The operator: asks the driver for progress, tells it of losses and notices.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Driver, Role::Executor, Role::Operator];

    /// The role's name, as in Secret keys (`driver.crt`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Executor => "executor",
            Role::Operator => "operator",
        }
    }

    /// The DNS name its certificate carries, and a client checks the server for: peers are
    /// dialled by IP address, so the name says the role, not the host.
    pub fn dns_name(self) -> String {
        format!("{}.kiln.internal", self.as_str())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedCert {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl std::fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCert").finish_non_exhaustive()
    }
}

/// A job's authority and one certificate per role: made once per job, kept in its Secret
/// (or, for `kiln run`, in memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCredentials {
    /// The job's CA certificate (PEM). Its key is not kept: nothing more is ever signed.
    pub ca: String,
    /// Each role's certificate and key.
    pub roles: BTreeMap<Role, KeyedCert>,
}

fn tls_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |e| Error::Tls {
        what,
        message: e.to_string(),
    }
}

impl JobCredentials {
    /// A new authority for the job `job` (its name or uid: it names the certificates) and
    /// a certificate for each role.
    pub fn issue(job: &str) -> Result<Self> {
        let ca_key = KeyPair::generate().map_err(tls_error("generate the job's CA key"))?;
        let mut ca = CertificateParams::new(Vec::<String>::new())
            .map_err(tls_error("describe the job's CA"))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, format!("kiln job {job}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(tls_error("sign the job's CA"))?;
        let issuer = Issuer::new(ca, ca_key);
        let mut roles = BTreeMap::new();
        for role in Role::ALL {
            let key = KeyPair::generate().map_err(tls_error("generate a role's key"))?;
            let mut params = CertificateParams::new(vec![role.dns_name()])
                .map_err(tls_error("describe a role's certificate"))?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("kiln job {job} {role}"));
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            // Each process is a server to some peers and a client of others.
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params
                .signed_by(&key, &issuer)
                .map_err(tls_error("sign a role's certificate"))?;
            roles.insert(
                role,
                KeyedCert {
                    cert: cert.pem(),
                    key: key.serialize_pem(),
                },
            );
        }
        Ok(JobCredentials {
            ca: ca_cert.pem(),
            roles,
        })
    }

    /// What a process of `role` holds.
    pub fn identity(&self, role: Role) -> Option<TlsIdentity> {
        let own = self.roles.get(&role)?;
        Some(TlsIdentity {
            role,
            ca: self.ca.clone(),
            own: own.clone(),
        })
    }
}

/// What one process of a job holds: the job's CA certificate, and its own certificate and
/// key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsIdentity {
    /// The process's role.
    pub role: Role,
    /// The job's CA certificate (PEM).
    pub ca: String,
    /// The process's certificate and key.
    pub own: KeyedCert,
}

impl TlsIdentity {
    /// The identity in a process's environment ([`ENV_TLS_CA`], [`ENV_TLS_CERT`],
    /// [`ENV_TLS_KEY`]): None when none of them is set (a job without TLS), an error when
    /// only some are.
    pub fn from_env(role: Role) -> Result<Option<Self>> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var(ENV_TLS_CA), var(ENV_TLS_CERT), var(ENV_TLS_KEY)) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsIdentity {
                role,
                ca,
                own: KeyedCert { cert, key },
            })),
            _ => Err(Error::Tls {
                what: "read the process's identity",
                message: format!(
                    "{ENV_TLS_CA}, {ENV_TLS_CERT} and {ENV_TLS_KEY} must be set together"
                ),
            }),
        }
    }

    /// The environment that gives a child process this identity.
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            (ENV_TLS_CA, self.ca.clone()),
            (ENV_TLS_CERT, self.own.cert.clone()),
            (ENV_TLS_KEY, self.own.key.clone()),
        ]
    }

    /// A server's TLS: it presents this identity and requires a client certificate the
    /// job's CA signed.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.own.cert, &self.own.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// A client's TLS towards a server of role `peer`: it presents this identity, trusts
    /// only the job's CA, and checks the server's certificate names `peer`.
    pub fn client(&self, peer: Role) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.own.cert, &self.own.key))
            .domain_name(peer.dns_name())
    }
}

/// An endpoint for the service at `url` (`http://host:port`) of a peer of role `peer`: over
/// TLS, presenting `tls` and checking the peer's certificate, when the job has an identity
/// (the URL's scheme becomes `https`); plain otherwise.
pub fn endpoint(
    url: &str,
    tls: Option<&TlsIdentity>,
    peer: Role,
) -> Result<Endpoint, tonic::transport::Error> {
    match tls {
        None => Endpoint::from_shared(url.to_string()),
        Some(id) => {
            let url = match url.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => url.to_string(),
            };
            Endpoint::from_shared(url)?.tls_config(id.client(peer))
        }
    }
}

/// The role a peer's certificate (DER, already verified against the job's CA in the
/// handshake) names, if it names one.
pub fn role_of(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<Role> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    Role::ALL.into_iter().find(|role| {
        rustls_pki_types::ServerName::try_from(role.dns_name())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn each_role_gets_a_certificate_naming_it() {
        let creds = JobCredentials::issue("wc").unwrap();
        assert!(creds.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        for role in Role::ALL {
            let id = creds.identity(role).unwrap();
            assert_eq!(role_of(&der(&id.own.cert)), Some(role));
            assert!(id.own.key.contains("PRIVATE KEY"));
            assert!(
                !format!("{:?}", id.own).contains("PRIVATE"),
                "keys stay out of logs"
            );
        }
        // Another job's authority is another key: nothing is shared.
        let other = JobCredentials::issue("wc").unwrap();
        assert_ne!(other.ca, creds.ca);
        assert_eq!(role_of(&der(&creds.ca)), None, "the CA names no role");
    }
}
