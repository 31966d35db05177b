//! Where a job's HTTP inputs and outputs may connect, checked when the connection is made.
//!
//! The spec's check ([`LocationPolicy::check`]) sees a URI as written: a host name that
//! resolves to the metadata service, or a server that redirects there, passes it. So the
//! HTTP client of a job's stores resolves names itself, drops the addresses the policy
//! refuses (and fails, naming the host, the address and the rule, when none is left), and
//! follows a redirect only to a URL the policy allows. The check is made at each connection,
//! so a DNS answer that changes between the spec's check and the read gains nothing.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::LocationPolicy;
use object_store::client::{HttpClient, HttpConnector};
use object_store::{ClientConfigKey, ClientOptions};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use crate::Error;

/// Redirects followed before a request fails (reqwest's and browsers' usual limit).
const MAX_REDIRECTS: usize = 10;

/// How long a connection may take to open (object_store's default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request may take, body included (object_store's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the HTTP clients of a job's stores: resolution and redirects held to `policy`.
#[derive(Clone, Copy, Debug)]
pub struct GuardedConnector {
    policy: LocationPolicy,
}

impl GuardedConnector {
    /// A connector whose clients reach only what `policy` allows.
    pub fn new(policy: LocationPolicy) -> Self {
        Self { policy }
    }

    /// The client itself (the store's options say only whether plain HTTP is allowed).
    fn client(&self, allow_http: bool) -> reqwest::Result<reqwest::Client> {
        let policy = self.policy;
        let redirects = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match policy.check_url(attempt.url()) {
                Some(why) => {
                    let to = attempt.url().to_string();
                    attempt.error(Error::RefusedRedirect { to, reason: why })
                }
                None => attempt.follow(),
            }
        });
        reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver {
                policy: self.policy,
            }))
            .redirect(redirects)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Compression would change the lengths object_store reads from the headers.
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .http1_only()
            .https_only(!allow_http)
            .build()
    }
}

impl HttpConnector for GuardedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let client = self
            .client(allow_http)
            .map_err(|e| object_store::Error::Generic {
                store: "HTTP",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}

/// Resolves a host name with the system's resolver and keeps the addresses `policy` allows.
#[derive(Debug)]
struct GuardedResolver {
    policy: LocationPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve(self.policy, name))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn resolve(policy: LocationPolicy, name: Name) -> Result<Addrs, BoxError> {
    let host = name.as_str();
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    let (allowed, refused) = screen(&policy, host, found);
    match refused {
        Some(refused) if allowed.is_empty() => Err(refused.into()),
        _ => Ok(Box::new(allowed.into_iter())),
    }
}

/// The addresses of `host` that `policy` allows, and the refusal of the first it does not.
fn screen(
    policy: &LocationPolicy,
    host: &str,
    found: Vec<SocketAddr>,
) -> (Vec<SocketAddr>, Option<Error>) {
    let mut refused = None;
    let allowed = found
        .into_iter()
        .filter(|addr| match policy.check_address(addr.ip()) {
            Some(reason) => {
                refused.get_or_insert_with(|| Error::RefusedAddress {
                    host: host.to_string(),
                    address: addr.ip(),
                    reason,
                });
                false
            }
            None => true,
        })
        .collect();
    (allowed, refused)
}

#[cfg(test)]
#[path = "egress_tests.rs"]
mod tests;
