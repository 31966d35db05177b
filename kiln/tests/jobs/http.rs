//! Inputs read over HTTP from a real server on this machine: a job reads a CSV through
//! executor processes (HEAD and range requests), and is refused, naming the input, the
//! redirect and the rule, when the server redirects it to the cloud metadata service. The
//! HTTP client itself refuses a host name that resolves to an address the policy refuses,
//! before any connection is made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_api::LocationPolicy;
use kiln_executor::egress::GuardedConnector;
use object_store::ObjectStoreExt;
use object_store::http::HttpBuilder;
use object_store::path::Path as StorePath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{run_job_with, runtime, shared, tail};

const TIMEOUT: Duration = Duration::from_secs(120);

const TABLE: &str = "k,v\na,1\nb,2\nc,3\nd,4\n";

/// What the server answers on a path.
#[derive(Clone)]
enum Reply {
    /// A file, served whole or by byte range.
    File(&'static [u8]),
    /// A `302 Found` to this URL.
    Redirect(String),
}

/// An HTTP/1.1 server on 127.0.0.1 answering GET and HEAD from a table of replies.
struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Server {
    async fn start(routes: HashMap<String, Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let routes = Arc::new(routes);
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(stream, routes.clone(), counted.clone()));
            }
        });
        Server { addr, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Serves one keep-alive connection's requests in turn.
async fn connection(
    mut stream: TcpStream,
    routes: Arc<HashMap<String, Reply>>,
    requests: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        requests.fetch_add(1, Ordering::SeqCst);
        let response = respond(&head, &routes);
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// The response to a request whose head (request line and headers) is `head`.
fn respond(head: &str, routes: &HashMap<String, Reply>) -> Vec<u8> {
    let mut lines = head.lines();
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let range = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().strip_prefix("bytes=").map(str::to_string))?
    });
    let (status, headers, body): (&str, String, &[u8]) = match routes.get(path) {
        None => ("404 Not Found", String::new(), b""),
        Some(Reply::Redirect(to)) => ("302 Found", format!("Location: {to}\r\n"), b""),
        Some(Reply::File(data)) => {
            let total = data.len();
            let file = "Last-Modified: Mon, 07 Dec 2026 00:00:00 GMT\r\nETag: \"1\"\r\n";
            match range.and_then(|r| byte_range(&r, total)) {
                Some((start, end)) => (
                    "206 Partial Content",
                    format!("{file}Content-Range: bytes {start}-{}/{total}\r\n", end - 1),
                    &data[start..end],
                ),
                None => ("200 OK", file.to_string(), data),
            }
        }
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body);
    }
    response
}

/// `start-end` (inclusive), `start-` or `-suffix` of a `total`-byte file, as `[start, end)`.
fn byte_range(range: &str, total: usize) -> Option<(usize, usize)> {
    let (start, end) = range.split_once('-')?;
    let (start, end) = match (start.parse::<usize>().ok(), end.parse::<usize>().ok()) {
        (Some(s), Some(e)) => (s, (e + 1).min(total)),
        (Some(s), None) => (s, total),
        (None, Some(suffix)) => (total.saturating_sub(suffix), total),
        (None, None) => return None,
    };
    (start < end).then_some((start, end))
}

/// An error with each of its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[test]
fn csv_over_http_is_read_and_a_redirect_to_the_metadata_service_is_refused() {
    let _machine = shared();
    let rt = runtime();
    let server = rt.block_on(Server::start(HashMap::from([
        ("/data/t.csv".to_string(), Reply::File(TABLE.as_bytes())),
        (
            "/moved.csv".to_string(),
            Reply::Redirect("http://169.254.169.254/latest/meta-data/t.csv".into()),
        ),
    ])));
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let job = |path: &str| {
        serde_yaml::to_value(serde_json::json!({
            "executors": {"count": 2},
            "inputs": [{"name": "t", "format": "csv", "uri": format!("http://{}{path}", server.addr)}],
            "steps": [{"name": "total", "sql": "SELECT count(*) AS n, sum(v) AS s FROM t"}],
            "output": {"uri": format!("{}/", out.display()), "format": "csv"},
        }))
        .expect("yaml")
    };

    let run = run_job_with(dir.path(), &job("/data/t.csv"), 2, &[], TIMEOUT);
    run.expect_success("a CSV read over HTTP");
    let written: String = std::fs::read_dir(&out)
        .expect("output dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .map(|p| std::fs::read_to_string(p).expect("read output"))
        .collect();
    assert_eq!(written.trim(), "n,s\n4,10", "the job's answer");
    assert!(server.requests() > 0);

    let run = run_job_with(
        dir.path(),
        &job("/moved.csv"),
        2,
        &["--in-process"],
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    assert!(!run.output.status.success(), "the redirect must be refused");
    for expected in [
        "input `t`",
        "is refused: the redirect to http://169.254.169.254/latest/meta-data/t.csv is refused",
        "link-local",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected}: {}",
            tail(&stderr, 8)
        );
    }
    assert!(!stderr.contains("panicked"), "{}", tail(&stderr, 8));
}

#[test]
fn a_host_name_is_checked_on_the_addresses_it_resolves_to() {
    let _machine = shared();
    let rt = runtime();
    rt.block_on(async {
        let server = Server::start(HashMap::from([(
            "/data/t.csv".to_string(),
            Reply::File(TABLE.as_bytes()),
        )]))
        .await;
        // `localhost` by name: only the resolver sees that it is the loopback network.
        let store = |policy: LocationPolicy| {
            HttpBuilder::new()
                .with_url(format!("http://localhost:{}/", server.addr.port()))
                .with_http_connector(GuardedConnector::new(policy))
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                .build()
                .expect("store")
        };
        let path = StorePath::from("data/t.csv");

        let refused = store(LocationPolicy::cluster())
            .head(&path)
            .await
            .expect_err("loopback is refused on a cluster");
        let message = chain(&refused);
        assert!(
            message.contains("`localhost` resolves to") && message.contains("loopback network"),
            "{message}"
        );
        assert_eq!(server.requests(), 0, "no request reached the server");

        let local = store(LocationPolicy::local());
        let meta = local.head(&path).await.expect("head");
        assert_eq!(meta.size, TABLE.len() as u64);
        let bytes = local.get_range(&path, 4..11).await.expect("range");
        assert_eq!(&bytes[..], &TABLE.as_bytes()[4..11]);
    });
}
