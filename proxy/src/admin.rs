//! The admin server: `/metrics` for Prometheus, `/ready` and `/live` for the kubelet.
//!
//! A tiny hand-written HTTP/1.0-style responder (one request per connection, then
//! close) is enough for scrapes and probes and keeps an HTTP stack out of the proxy.
//!
//! The admin port is reachable by anything that can reach the pod, so it is built to
//! not let its clients hurt the proxy or each other:
//!
//! - Encoding `/metrics` walks every label set, milliseconds of CPU for a large output.
//!   It runs on tokio's blocking pool (`spawn_blocking`), never on the async workers
//!   that forward connections, and at most one encode runs at a time: scrapes that
//!   arrive while one is running wait for it to finish, then share the output of one
//!   encode that started after they arrived (never an older one).
//! - At most [`MAX_CONNECTIONS`] admin connections are served at once; more are closed
//!   as soon as they are accepted, so a flood costs the proxy no memory or task.
//! - A client must send its request head within [`HEAD_TIMEOUT`] and take the response
//!   within [`RESPONSE_TIMEOUT`], so a slow client (slowloris) holds a slot for a
//!   bounded time: with every slot held by clients that send nothing, a retrying
//!   scrape gets through at most [`HEAD_TIMEOUT`] later; with every slot held by
//!   clients that ask and then read slowly, at most `HEAD_TIMEOUT + RESPONSE_TIMEOUT`.
//!   (An attacker who keeps reopening slots as they free up can keep a scraper out;
//!   the admin port should only be reachable by Prometheus and the kubelet.)

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::metrics::Metrics;

/// The largest request head we read; probes and scrapes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections served at once. Prometheus scrapes one at a time per target, and
/// the kubelet probes with one or two; 64 leaves room for several Prometheus replicas
/// and curious humans, while bounding the memory (an 8 KiB buffer, and a share of one
/// encoded output) a flood can take.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request head. Probes and scrapes send it in one
/// packet at once; a client still sending after 2 s is stalling, not slow.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing a response may take: 2 MiB of metrics to a slow but honest
/// scraper. Prometheus' default scrape timeout is 10 s too.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Serves admin requests on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    let admin = Arc::new(Admin {
        scrapes: Scrapes::new(metrics),
        ready,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "admin accept failed");
                // Out of file descriptors, most likely: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Dropped here: closed at once, before reading anything.
            debug!(
                limit = MAX_CONNECTIONS,
                "too many admin connections, closing a new one"
            );
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = admin.respond(stream).await {
                debug!(%error, "admin request failed");
            }
        });
    }
}

struct Admin {
    scrapes: Scrapes,
    ready: Arc<AtomicBool>,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Text {
        status: &'static str,
        body: &'static str,
    },
}

impl Admin {
    async fn respond(&self, mut stream: TcpStream) -> io::Result<()> {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(error),
            Err(_elapsed) => {
                debug!("admin client sent no request in time");
                return Ok(());
            }
        };
        let (status, content_type, body): (_, _, Arc<str>) = match route(&head, &self.ready) {
            Route::Metrics => match self.scrapes.encoded().await {
                Some(text) => ("200 OK", PROMETHEUS, text),
                None => (
                    "500 Internal Server Error",
                    TEXT,
                    "encoding the metrics failed\n".into(),
                ),
            },
            Route::Text { status, body } => (status, TEXT, body.into()),
        };
        let response_head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let write = async {
            stream.write_all(response_head.as_bytes()).await?;
            if !head.starts_with("HEAD ") {
                stream.write_all(body.as_bytes()).await?;
            }
            stream.shutdown().await
        };
        match tokio::time::timeout(RESPONSE_TIMEOUT, write).await {
            Ok(result) => result,
            Err(_elapsed) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin client did not take the response in time",
            )),
        }
    }
}

/// `/metrics` output, encoded off the async workers, one encode at a time.
struct Scrapes {
    metrics: Arc<Metrics>,
    /// The last output and when its encode started. Held while encoding, so it is
    /// also what makes encodes one at a time.
    last: Mutex<Option<(Instant, Arc<str>)>>,
}

impl Scrapes {
    fn new(metrics: Arc<Metrics>) -> Scrapes {
        Scrapes {
            metrics,
            last: Mutex::new(None),
        }
    }

    /// The metrics as of some moment after this call: the output of an encode that
    /// started after it, shared with the other scrapes that waited for it. `None` if
    /// the encode panicked (a bug, answered with a 500 instead of taking the server
    /// down).
    async fn encoded(&self) -> Option<Arc<str>> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, text)) = &*last {
            if *started >= asked {
                return Some(text.clone());
            }
        }
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let text: Arc<str> = tokio::task::spawn_blocking(move || metrics.encode())
            .await
            .ok()?
            .into();
        *last = Some((started, text.clone()));
        Some(text)
    }
}

/// Reads until the end of the request head. `None` if the client closed first or
/// sent more than `MAX_REQUEST` bytes without ending it.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = vec![0; MAX_REQUEST];
    let mut len = 0;
    // `len < buf.len()` here, and `read` returns at most the slice's length, so
    // `len <= buf.len()` after it: both slices below are in bounds.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let head = &buf[..len];
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(head).into_owned()));
        }
    }
    Ok(None)
}

/// What a request head asks for.
fn route(head: &str, ready: &AtomicBool) -> Route {
    let text = |status, body| Route::Text { status, body };
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return text("405 Method Not Allowed", "only GET and HEAD\n");
    }
    match path {
        "/metrics" => Route::Metrics,
        // Ready once every listener is bound, and no longer once draining: the
        // kubelet then stops sending new connections our way.
        "/ready" if ready.load(Ordering::Acquire) => text("200 OK", "ready\n"),
        "/ready" => text("503 Service Unavailable", "not ready\n"),
        // Live as long as the process can answer.
        "/live" => text("200 OK", "live\n"),
        _ => text("404 Not Found", "try /metrics, /ready or /live\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ready = AtomicBool::new(false);
        let get = |path: &str| match route(&format!("GET {path} HTTP/1.1\r\n\r\n"), &ready) {
            Route::Metrics => "metrics",
            Route::Text { status, .. } => status,
        };
        assert_eq!(get("/ready"), "503 Service Unavailable");
        ready.store(true, Ordering::Release);
        assert_eq!(get("/ready"), "200 OK");
        assert_eq!(get("/live"), "200 OK");
        assert_eq!(get("/metrics?x=1"), "metrics");
        assert_eq!(get("/nope"), "404 Not Found");
        let post = route("POST /metrics HTTP/1.1\r\n\r\n", &ready);
        assert!(matches!(post, Route::Text { status, .. } if status == "405 Method Not Allowed"));
    }

    #[tokio::test]
    async fn concurrent_scrapes_share_one_fresh_encode() {
        let metrics = Arc::new(Metrics::new());
        // Enough label sets that an encode takes milliseconds: every scrape below asks
        // (within microseconds) while the first encode is still running.
        for n in 0..2000u32 {
            let target = std::net::SocketAddr::from(([198, 19, (n >> 8) as u8, n as u8], 80));
            drop(metrics.open(
                crate::metrics::Direction::Inbound,
                target,
                crate::detect::Protocol::Opaque,
                None,
            ));
        }
        let scrapes = Arc::new(Scrapes::new(metrics.clone()));
        let first = scrapes.encoded().await.unwrap();
        // A connection opened after the first scrape is in every later one.
        drop(metrics.open(
            crate::metrics::Direction::Inbound,
            "198.18.0.1:80".parse().unwrap(),
            crate::detect::Protocol::Opaque,
            None,
        ));
        let waiting: Vec<_> = (0..16)
            .map(|_| {
                let scrapes = scrapes.clone();
                tokio::spawn(async move { scrapes.encoded().await.unwrap() })
            })
            .collect();
        let mut outputs = Vec::new();
        for task in waiting {
            outputs.push(task.await.unwrap());
        }
        assert!(!first.contains("198.18.0.1:80"));
        for output in &outputs {
            assert!(
                output.contains("198.18.0.1:80"),
                "a stale output was shared"
            );
        }
        // The first to come encodes; the 15 others asked while it was encoding, so
        // they wait (one encode at a time) and share the one next encode, which
        // started after they asked: two encodes for 16 scrapes.
        let mut distinct: Vec<&Arc<str>> = Vec::new();
        for output in &outputs {
            if !distinct.iter().any(|d| Arc::ptr_eq(d, output)) {
                distinct.push(output);
            }
        }
        assert_eq!(distinct.len(), 2);
    }
}
