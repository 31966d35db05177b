//! The guard in front of a job's services when they speak TLS: a call whose connection
//! carries no certificate of the job's authority never gets this far (the handshake
//! refuses it); one whose certificate names a role the method does not admit is refused
//! here, before any handler runs.
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use kiln_api::tls::{Role, TlsIdentity, role_of};
use tonic::Status;
use tonic::transport::Server;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::layer::util::{Identity, Stack};

/// Which roles may call a gRPC method, by its path (`/kiln.v1.Driver/Register`).
pub type Policy = fn(&str) -> &'static [Role];

/// Puts a [`RoleGuard`] with `policy` in front of a server's services.
#[derive(Clone, Copy)]
pub struct RoleGuardLayer {
    policy: Policy,
    enforce: bool,
}

impl RoleGuardLayer {
    /// A layer admitting each method's callers by `policy`; when not `enforce`d (a job
    /// without TLS), it admits every call.
    pub fn new(policy: Policy, enforce: bool) -> Self {
        RoleGuardLayer { policy, enforce }
    }
}

impl<S> tower::Layer<S> for RoleGuardLayer {
    type Service = RoleGuard<S>;

    fn layer(&self, inner: S) -> RoleGuard<S> {
        RoleGuard {
            inner,
            policy: self.policy,
            enforce: self.enforce,
        }
    }
}

/// Refuses a call whose peer certificate names a role its method does not admit.
#[derive(Clone)]
pub struct RoleGuard<S> {
    inner: S,
    policy: Policy,
    enforce: bool,
}

/// The role of the peer that sent `request`, as its certificate names it.
fn peer_role<B>(request: &http::Request<B>) -> Result<Role, Status> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .ok_or_else(|| Status::unauthenticated("no client certificate of this job"))?;
    certs
        .first()
        .and_then(role_of)
        .ok_or_else(|| Status::permission_denied("the client certificate names no role"))
}

/// Whether `request` may reach its method under `policy`.
fn admit<B>(request: &http::Request<B>, policy: Policy) -> Result<(), Status> {
    let role = peer_role(request)?;
    let method = request.uri().path();
    if policy(method).contains(&role) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a {role} may not call {method}"
        )))
    }
}

impl<S, B> tower::Service<http::Request<B>> for RoleGuard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let admitted = if self.enforce {
            admit(&request, self.policy)
        } else {
            Ok(())
        };
        match admitted {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => {
                tracing::warn!(method = request.uri().path(), %status, "call refused");
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

/// A server for a job's service (`what`, for errors): over mutual TLS with the process's
/// identity `tls` when the job has one, each call admitted by `policy`; plain otherwise.
pub fn guarded_server(
    tls: Option<&TlsIdentity>,
    policy: Policy,
    what: &'static str,
) -> crate::Result<Server<Stack<RoleGuardLayer, Identity>>> {
    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server())
            .map_err(|source| crate::Error::Serve { what, source })?;
    }
    Ok(builder.layer(RoleGuardLayer::new(policy, tls.is_some())))
}

/// Who may call the driver: executors register, poll and report; the operator asks for
/// progress and tells of losses and notices.
pub fn driver_policy(method: &str) -> &'static [Role] {
    match method.rsplit('/').next().unwrap_or_default() {
        "JobStatus" | "ExecutorLost" | "Decommission" => &[Role::Operator],
        _ => &[Role::Executor],
    }
}

/// Who may call an executor's block service: drivers (a replacement takes it over, a
/// driver reads results) and other executors (shuffle reads, copies off a draining one).
pub fn executor_policy(_method: &str) -> &'static [Role] {
    &[Role::Driver, Role::Executor]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_only_reads_progress_and_reports_losses() {
        for m in ["JobStatus", "ExecutorLost", "Decommission"] {
            assert_eq!(
                driver_policy(&format!("/kiln.v1.Driver/{m}")),
                &[Role::Operator]
            );
        }
        assert_eq!(driver_policy("/kiln.v1.Driver/Register"), &[Role::Executor]);
        assert!(
            !executor_policy("/arrow.flight.protocol.FlightService/DoGet")
                .contains(&Role::Operator)
        );
    }

    #[test]
    fn a_call_without_a_certificate_is_refused() {
        let request = http::Request::builder()
            .uri("/kiln.v1.Driver/PollTasks")
            .body(())
            .unwrap();
        let refused = admit(&request, driver_policy).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
}
