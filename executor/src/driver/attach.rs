//! Taking over the executors an earlier driver of the job left behind: each is asked, with
//! a Flight `attach` action, to follow this driver; the job starts once those that agreed
//! have registered (listing the outputs they hold), or after a short wait.
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::service::Shared;
use crate::Error;
use crate::shuffle::{AttachRequest, send_attach};

/// How long a replacement driver waits for the executors it attached to register.
const REGISTER_WAIT: Duration = Duration::from_secs(10);
/// How long an executor that cannot be reached yet is asked again: its pod may run while
/// its process is still starting.
const ATTACH_PATIENCE: Duration = Duration::from_secs(5);

/// The address this host reaches `peer` from: a connected UDP socket's local address (no
/// packet is sent). A driver bound to every interface learns which of its addresses an
/// executor can dial back.
fn local_ip_towards(peer: &str) -> Option<IpAddr> {
    let peer: SocketAddr = peer.parse().ok()?;
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(peer).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Asks the executors at `addresses` to follow this driver (listening on `bound`), then
/// waits until every one that agreed has registered. Returns how many registered.
pub(super) async fn attach_executors(
    shared: &Shared,
    bound: SocketAddr,
    addresses: &[String],
    token: &str,
) -> usize {
    let asks = addresses.iter().map(|address| async move {
        let host = if bound.ip().is_unspecified() {
            local_ip_towards(address).unwrap_or(bound.ip())
        } else {
            bound.ip()
        };
        let request = AttachRequest {
            driver: format!("http://{}", SocketAddr::new(host, bound.port())),
            epoch: shared.epoch,
            token: token.to_string(),
        };
        let started = Instant::now();
        loop {
            match send_attach(address, &request, shared.tls.as_ref()).await {
                Ok(()) => {
                    tracing::info!(executor = %address, driver = %request.driver, "executor agreed to follow this driver");
                    return Some(address.clone());
                }
                // Not listening yet: a process still starting.
                Err(Error::Connect { .. }) if started.elapsed() < ATTACH_PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(executor = %address, error = %e, "could not take the executor over; what it held is recomputed");
                    return None;
                }
            }
        }
    });
    let agreed: Vec<String> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let registered =
        |core: &super::core::DriverCore| agreed.iter().filter(|a| core.serves_at(a)).count();
    let all = tokio::time::timeout(
        REGISTER_WAIT,
        shared.wait_for(Duration::from_millis(200), |core| {
            (registered(core) == agreed.len()).then_some(())
        }),
    )
    .await;
    let n = shared.read(registered);
    if all.is_err() {
        tracing::warn!(
            registered = n,
            agreed = agreed.len(),
            "not every executor taken over registered in time"
        );
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_towards_loopback_is_loopback() {
        assert_eq!(
            local_ip_towards("127.0.0.1:7078"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(local_ip_towards("not an address"), None);
    }
}
