//! The admin server: `/metrics` for Prometheus, `/ready` and `/live` for the kubelet.
//!
//! A tiny hand-written HTTP/1.1 responder is enough for scrapes and probes and keeps an
//! HTTP stack out of the proxy. It keeps connections alive (Prometheus scrapes one
//! target over one connection; through the mesh each new connection would cost an mTLS
//! handshake) and gzips `/metrics` for a client that sends `Accept-Encoding: gzip`, as
//! Prometheus does: 2 MiB of text become a few hundred KiB on the wire.
//!
//! The admin port is reachable by anything that can reach the pod, so it is built to
//! not let its clients hurt the proxy or each other:
//!
//! - Encoding `/metrics` walks every label set, milliseconds of CPU for a large output,
//!   and gzip costs about as much again. Both run on tokio's blocking pool
//!   (`spawn_blocking`), never on the async workers that forward connections. At most
//!   one encode runs at a time: scrapes that arrive while one is running wait for it to
//!   finish, then share the output of one encode that started after they arrived
//!   (never an older one); the gzip of one output is made once and shared too.
//! - At most [`MAX_CONNECTIONS`] admin connections are *active* (reading a request or
//!   writing a response) at once; a new connection past that is closed as soon as it is
//!   accepted, so a flood costs the proxy no memory or task.
//! - A client must send its request head within [`HEAD_TIMEOUT`] of connecting (or of
//!   its first byte, on a kept-alive connection) and take the response within
//!   [`RESPONSE_TIMEOUT`], so a slow client (slowloris) holds an active slot for a
//!   bounded time: with every slot held by clients that send nothing, a retrying
//!   scrape gets through at most [`HEAD_TIMEOUT`] later; with every slot held by
//!   clients that ask and then read slowly, at most `HEAD_TIMEOUT + RESPONSE_TIMEOUT`.
//!   (An attacker who keeps reopening slots as they free up can keep a scraper out;
//!   the admin port should only be reachable by Prometheus and the kubelet.)
//! - A kept-alive connection waiting for its next request holds no active slot and no
//!   buffer, only one of [`MAX_IDLE`] idle places, for at most [`IDLE_TIMEOUT`]. When
//!   they are all taken a response says `Connection: close` and the connection ends,
//!   so idle clients cannot take the active slots either.

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
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
/// Kept-alive connections waiting for their next request. Each costs a socket and a
/// small task; past this, responses close their connection.
pub const MAX_IDLE: usize = 64;
/// How long a kept-alive connection may wait for its next request: longer than
/// Prometheus' default scrape interval (1 m), so a scraper keeps its connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
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
        active: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        idle: Arc::new(Semaphore::new(MAX_IDLE)),
    });
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
        let Ok(slot) = admin.active.clone().try_acquire_owned() else {
            // Dropped here: closed at once, before reading anything.
            debug!(
                limit = MAX_CONNECTIONS,
                "too many admin connections, closing a new one"
            );
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(error) = admin.serve_connection(stream, slot).await {
                debug!(%error, "admin request failed");
            }
        });
    }
}

struct Admin {
    scrapes: Scrapes,
    ready: Arc<AtomicBool>,
    /// Connections reading a request or writing a response.
    active: Arc<Semaphore>,
    /// Kept-alive connections waiting for their next request.
    idle: Arc<Semaphore>,
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

/// A request head, as far as the admin server cares.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    /// The request line and headers, up to the blank line.
    head: String,
    /// `HEAD`: the response has no body.
    head_only: bool,
    /// The client may send another request on this connection: HTTP/1.1 without
    /// `Connection: close`.
    keep_alive: bool,
    /// `Accept-Encoding` lists gzip (with a non-zero q-value).
    gzip: bool,
}

impl Request {
    fn parse(head: String) -> Request {
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or("");
        let mut keep_alive = request_line.ends_with(" HTTP/1.1");
        let mut gzip = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            let tokens = || value.split(',').map(str::trim);
            if name.eq_ignore_ascii_case("connection") {
                if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
                    keep_alive = false;
                }
            } else if name.eq_ignore_ascii_case("accept-encoding") {
                gzip |= tokens().any(accepts_gzip);
            }
        }
        Request {
            head_only: request_line.starts_with("HEAD "),
            keep_alive,
            gzip,
            head,
        }
    }
}

/// Whether one `Accept-Encoding` element (`gzip`, `gzip;q=0.5`, `*`) accepts gzip.
fn accepts_gzip(element: &str) -> bool {
    let mut parts = element.split(';').map(str::trim);
    let coding = parts.next().unwrap_or("");
    if !coding.eq_ignore_ascii_case("gzip") && coding != "*" {
        return false;
    }
    // `q=0` means "not acceptable".
    parts
        .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
        .all(|q| q.parse::<f32>().is_ok_and(|q| q > 0.0))
}

/// A response body: static text, or one scrape's output shared by its waiters.
enum Body {
    Static(&'static str),
    Shared(Arc<[u8]>),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(text) => text.as_bytes(),
            Body::Shared(bytes) => bytes,
        }
    }
}

impl Admin {
    /// Serves requests on one connection until it is closed, times out, asks to close,
    /// or no idle place is free. `slot` is the active slot taken at accept.
    async fn serve_connection(
        &self,
        mut stream: TcpStream,
        slot: OwnedSemaphorePermit,
    ) -> io::Result<()> {
        let mut slot = Some(slot);
        // Bytes read past the end of a request head: the start of the next request
        // (pipelining). At most `MAX_REQUEST`.
        let mut pending = Vec::new();
        loop {
            let head = match tokio::time::timeout(
                HEAD_TIMEOUT,
                read_head(&mut stream, &mut pending),
            )
            .await
            {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(error)) => return Err(error),
                Err(_elapsed) => {
                    debug!("admin client sent no request in time");
                    return Ok(());
                }
            };
            let request = Request::parse(head);
            // Keep the connection only when an idle place is free for it.
            let idle = if request.keep_alive {
                self.idle.clone().try_acquire_owned().ok()
            } else {
                None
            };
            self.respond(&mut stream, &request, idle.is_some()).await?;
            let Some(_idle) = idle else {
                return stream.shutdown().await;
            };
            if pending.is_empty() {
                // Wait for the next request without holding an active slot.
                drop(slot.take());
                match tokio::time::timeout(IDLE_TIMEOUT, stream.readable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(error),
                    Err(_elapsed) => return Ok(()),
                }
                match self.active.clone().try_acquire_owned() {
                    Ok(permit) => slot = Some(permit),
                    // Every active slot is taken: close, as for a new connection.
                    Err(_) => return Ok(()),
                }
            }
        }
    }

    async fn respond(
        &self,
        stream: &mut TcpStream,
        request: &Request,
        keep_alive: bool,
    ) -> io::Result<()> {
        let mut encoding = "";
        let (status, content_type, body) = match route(&request.head, &self.ready) {
            Route::Metrics => match self.scrapes.encoded(request.gzip).await {
                Some(bytes) => {
                    if request.gzip {
                        encoding = "Content-Encoding: gzip\r\n";
                    }
                    ("200 OK", PROMETHEUS, Body::Shared(bytes))
                }
                None => (
                    "500 Internal Server Error",
                    TEXT,
                    Body::Static("encoding the metrics failed\n"),
                ),
            },
            Route::Text { status, body } => (status, TEXT, Body::Static(body)),
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let body = body.bytes();
        let response_head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{encoding}Vary: Accept-Encoding\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
            body.len()
        );
        let write = async {
            stream.write_all(response_head.as_bytes()).await?;
            if !request.head_only {
                stream.write_all(body).await?;
            }
            stream.flush().await
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
    last: Mutex<Option<(Instant, Arc<Scrape>)>>,
}

/// One encode's output, and its gzip once a client asked for it.
struct Scrape {
    text: Arc<[u8]>,
    gzip: OnceLock<Option<Arc<[u8]>>>,
}

impl Scrape {
    /// The gzip of the text, made once (on the blocking pool) and then shared. `None`
    /// if compressing failed, which writing to a `Vec` does not.
    fn gzip(&self) -> Option<Arc<[u8]>> {
        self.gzip
            .get_or_init(|| {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(&self.text).ok()?;
                Some(encoder.finish().ok()?.into())
            })
            .clone()
    }
}

impl Scrapes {
    fn new(metrics: Arc<Metrics>) -> Scrapes {
        Scrapes {
            metrics,
            last: Mutex::new(None),
        }
    }

    /// The metrics as of some moment after this call (gzipped if `gzip`): the output
    /// of an encode that started after it, shared with the other scrapes that waited
    /// for it. `None` if the encode panicked (a bug, answered with a 500 instead of
    /// taking the server down).
    async fn encoded(&self, gzip: bool) -> Option<Arc<[u8]>> {
        let scrape = self.scrape().await?;
        if !gzip {
            return Some(scrape.text.clone());
        }
        tokio::task::spawn_blocking(move || scrape.gzip())
            .await
            .ok()?
    }

    async fn scrape(&self) -> Option<Arc<Scrape>> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, scrape)) = &*last {
            if *started >= asked {
                return Some(scrape.clone());
            }
        }
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let text = tokio::task::spawn_blocking(move || metrics.encode())
            .await
            .ok()?;
        let scrape = Arc::new(Scrape {
            text: text.into_bytes().into(),
            gzip: OnceLock::new(),
        });
        *last = Some((started, scrape.clone()));
        Some(scrape)
    }
}

/// Reads until the end of a request head, starting with the bytes in `pending` (left
/// over from the previous request); leaves whatever follows the head in `pending`.
/// `None` if the client closed first or sent more than `MAX_REQUEST` bytes without
/// ending the head.
async fn read_head(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Option<String>> {
    let mut buf = vec![0; MAX_REQUEST];
    let mut len = pending.len().min(MAX_REQUEST);
    buf[..len].copy_from_slice(&pending[..len]);
    pending.clear();
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            pending.extend_from_slice(&buf[end..len]);
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if len == buf.len() {
            return Ok(None);
        }
        // `len < buf.len()` here, and `read` returns at most the slice's length, so
        // `len <= buf.len()` after it: every slice above is in bounds.
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
    }
}

/// Where the head in `buf` ends (just past its blank line), if it does.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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

    #[test]
    fn requests_keep_alive_and_ask_for_gzip() {
        let parse = |head: &str| Request::parse(head.to_string());
        let r = parse("GET /metrics HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n");
        assert!(r.keep_alive && r.gzip && !r.head_only);
        // Prometheus' own header.
        let r = parse("GET /metrics HTTP/1.1\r\naccept-encoding: gzip,  deflate\r\n\r\n");
        assert!(r.gzip);
        let r = parse(
            "GET /metrics HTTP/1.1\r\nConnection: Close\r\nAccept-Encoding: identity\r\n\r\n",
        );
        assert!(!r.keep_alive && !r.gzip);
        let r = parse("HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive && r.head_only);
        assert!(accepts_gzip("gzip;q=0.5") && accepts_gzip("*") && accepts_gzip("GZIP"));
        assert!(!accepts_gzip("gzip;q=0") && !accepts_gzip("gzip;q=x") && !accepts_gzip("br"));
    }

    #[test]
    fn a_head_ends_at_its_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nGET /x"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nGET /x\r\n\r\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[tokio::test]
    async fn concurrent_scrapes_share_one_fresh_encode() {
        let metrics = Arc::new(Metrics::new());
        // Enough label sets that an encode takes milliseconds: every scrape below asks
        // (within microseconds) while the first encode is still running.
        for n in 0..2000u32 {
            let target = std::net::SocketAddr::from(([198, 19, (n >> 8) as u8, n as u8], 80));
            drop(metrics.open(
                crate::route::Direction::Inbound,
                target,
                crate::detect::Protocol::Opaque,
                None,
            ));
        }
        let scrapes = Arc::new(Scrapes::new(metrics.clone()));
        let first = scrapes.encoded(false).await.unwrap();
        // A connection opened after the first scrape is in every later one.
        drop(metrics.open(
            crate::route::Direction::Inbound,
            "198.18.0.1:80".parse().unwrap(),
            crate::detect::Protocol::Opaque,
            None,
        ));
        let waiting: Vec<_> = (0..16)
            .map(|_| {
                let scrapes = scrapes.clone();
                tokio::spawn(async move { scrapes.scrape().await.unwrap() })
            })
            .collect();
        let mut outputs = Vec::new();
        for task in waiting {
            outputs.push(task.await.unwrap());
        }
        let has = |bytes: &[u8]| String::from_utf8_lossy(bytes).contains("198.18.0.1:80");
        assert!(!has(&first));
        for output in &outputs {
            assert!(has(&output.text), "a stale output was shared");
        }
        // The first to come encodes; the 15 others asked while it was encoding, so
        // they wait (one encode at a time) and share the one next encode, which
        // started after they asked: two encodes for 16 scrapes.
        let mut distinct: Vec<&Arc<Scrape>> = Vec::new();
        for output in &outputs {
            if !distinct.iter().any(|d| Arc::ptr_eq(d, output)) {
                distinct.push(output);
            }
        }
        assert_eq!(distinct.len(), 2);
    }
}
