//! The fault-injection endpoint: a tiny HTTP/1.1 server on the loopback.
//!
//! ```text
//! GET  /healthz                                      200 "ok"
//! GET  /nodes                                        200 [{name, capacityType, alive, pods}]
//! POST /nodes/{node}/kill                            the node dies: heartbeats stop, pods SIGKILLed
//! POST /nodes/{node}/restore                         a killed node comes back
//! POST /pods/{ns}/{pod}/kill[?signal=KILL&container=c]   signal a pod's process(es)
//! ```

use std::sync::Arc;

use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::process::parse_signal;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Health,
    Nodes,
    KillNode(String),
    RestoreNode(String),
    SignalPod {
        key: String,
        container: Option<String>,
        signal: Signal,
    },
}

/// Parses `METHOD PATH` into a command; Err is (status, message).
pub fn route(method: &str, target: &str) -> Result<Command, (u16, String)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["healthz"]) => Ok(Command::Health),
        ("GET", ["nodes"]) => Ok(Command::Nodes),
        ("POST", ["nodes", node, "kill"]) => Ok(Command::KillNode((*node).into())),
        ("POST", ["nodes", node, "restore"]) => Ok(Command::RestoreNode((*node).into())),
        ("POST", ["pods", ns, pod, "kill"]) => {
            let signal = match param("signal") {
                None => Signal::KILL,
                Some(s) => parse_signal(&s).ok_or((400, format!("unknown signal {s}")))?,
            };
            Ok(Command::SignalPod {
                key: format!("{ns}/{pod}"),
                container: param("container"),
                signal,
            })
        }
        _ => Err((404, format!("no route for {method} {path}"))),
    }
}

fn execute(agent: &Agent, cmd: Command) -> (u16, String) {
    let found = |ok: bool, what: String| {
        if ok {
            (200, "{\"ok\":true}".to_owned())
        } else {
            (404, format!("{{\"error\":\"{what} not found\"}}"))
        }
    };
    match cmd {
        Command::Health => (200, "ok".into()),
        Command::Nodes => (
            200,
            serde_json::to_string(&agent.report()).unwrap_or_default(),
        ),
        Command::KillNode(n) => found(agent.kill_node(&n), n),
        Command::RestoreNode(n) => found(agent.restore_node(&n), n),
        Command::SignalPod {
            key,
            container,
            signal,
        } => found(agent.signal_pod(&key, container, signal), key),
    }
}

async fn serve_one(agent: &Agent, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let (code, body) = match route(method, target) {
        Ok(cmd) => execute(agent, cmd),
        Err((code, msg)) => (
            code,
            format!("{{\"error\":{}}}", serde_json::Value::String(msg)),
        ),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the endpoint; the returned future serves it forever.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::BindControl {
            addr: addr.to_owned(),
            source,
        })
}

pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(&agent, stream).await {
                warn!(error = %e, "control request failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz"), Ok(Command::Health));
        assert_eq!(
            route("POST", "/nodes/spot-1/kill"),
            Ok(Command::KillNode("spot-1".into()))
        );
        assert_eq!(
            route("POST", "/nodes/spot-1/restore"),
            Ok(Command::RestoreNode("spot-1".into()))
        );
        assert_eq!(
            route("POST", "/pods/default/web-1/kill?signal=TERM&container=app"),
            Ok(Command::SignalPod {
                key: "default/web-1".into(),
                container: Some("app".into()),
                signal: Signal::TERM
            })
        );
        assert_eq!(
            route("POST", "/pods/ns/p/kill"),
            Ok(Command::SignalPod {
                key: "ns/p".into(),
                container: None,
                signal: Signal::KILL
            })
        );
        assert_eq!(route("GET", "/nodes/x/kill").unwrap_err().0, 404);
        assert_eq!(
            route("POST", "/pods/ns/p/kill?signal=HUP").unwrap_err().0,
            400
        );
    }
}
