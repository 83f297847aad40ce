//! HTTP helpers shared by the in-process proxy tests (included with `#[path]`, so it
//! is not a test target of its own): a proxy started on loopback, hyper servers and
//! clients, and `/metrics` samples.
#![allow(dead_code)] // each test file uses its own part of it

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshproxy::{BoundAddrs, Config, Proxy, ProxyArgs, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ServerBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ServerBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// A proxy serving in a task of its own.
pub struct Running {
    pub addrs: BoundAddrs,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    pub fn outbound(&self) -> SocketAddr {
        self.addrs.outbound[0]
    }

    pub fn inbound(&self) -> SocketAddr {
        self.addrs.inbound[0]
    }

    pub async fn metrics(&self) -> String {
        super::admin::get_metrics(self.addrs.admin).await
    }

    /// Shuts the proxy down (its grace period, then whatever is left is closed).
    pub async fn stop(self) {
        self.shutdown.send(()).expect("the proxy is still serving");
        self.task.await.unwrap().unwrap();
    }
}

/// Arguments binding every listener of a proxy to a free loopback port.
pub fn loopback_args() -> ProxyArgs {
    ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..ProxyArgs::default()
    }
}

/// Starts a proxy; `target` fixes every destination, `None` uses the real
/// `SO_ORIGINAL_DST` (on loopback: "not redirected", which the inbound listener
/// treats as a direct connection).
pub async fn start(args: ProxyArgs, target: Option<SocketAddr>) -> Running {
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = rx.await;
    };
    let task = match target {
        Some(target) => tokio::spawn(proxy.serve_with(move |_| Ok(target), shutdown)),
        None => tokio::spawn(proxy.serve(shutdown)),
    };
    Running {
        addrs,
        shutdown: tx,
        task,
    }
}

/// What [`serve`]'s counter counts.
#[derive(Clone, Copy, PartialEq)]
pub enum Count {
    Connections,
    Requests,
}

/// A hyper server (HTTP/1 with upgrades, or HTTP/2) answering with `handle`; counts
/// the connections it accepts or the requests it gets.
pub async fn serve<F, Fut>(count: Count, http2: bool, handle: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ServerBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = Arc::new(AtomicUsize::new(0));
    let counted = counter.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            if count == Count::Connections {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            let handle = handle.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    if count == Count::Requests {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(req).await) }
                });
                let io = TokioIo::new(stream);
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .preserve_header_case(true)
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    (addr, counter)
}

/// A body of `data`, then `trailers`.
pub fn with_trailers(data: impl Into<Bytes>, trailers: http::HeaderMap) -> ServerBody {
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(data.into())),
        Ok(Frame::trailers(trailers)),
    ];
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Asks for a WebSocket upgrade of `/chat` at `ws.test` on `stream`; the head of the
/// answer, which must be a `101`.
pub async fn upgrade_to_websocket(stream: &mut TcpStream) -> String {
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = String::from_utf8(read_until(stream, b"\r\n\r\n").await).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    head
}

pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ServerBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ServerBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Reads from `stream` until `until` appears in what was read (or EOF); panics after
/// 10 s without an answer.
pub async fn read_until(stream: &mut TcpStream, until: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// The value of the sample whose line starts with `prefix` (name and labels).
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix) && line[prefix.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

pub fn value(metrics: &str, prefix: &str) -> f64 {
    sample(metrics, prefix).unwrap_or_else(|| panic!("no sample {prefix} in:\n{metrics}"))
}

/// Asserts that the sample `family{labels}` of `metrics` is `expected`.
#[track_caller]
pub fn assert_counted(metrics: &str, family: &str, labels: &str, expected: f64) {
    assert_eq!(
        value(metrics, &format!("{family}{{{labels}}}")),
        expected,
        "{family}{{{labels}}}"
    );
}

/// The labels of outbound requests to `target` with `authority`, in plaintext.
pub fn outbound(target: SocketAddr, authority: &str) -> String {
    format!(r#"direction="outbound",target_addr="{target}",authority="{authority}",tls="false""#)
}

/// Asserts that `metrics` counts `expected` responses with the request's `labels`,
/// `status` and `classification`.
#[track_caller]
pub fn assert_responses(
    metrics: &str,
    labels: &str,
    status: u16,
    classification: &str,
    expected: f64,
) {
    let labels = format!(r#"{labels},status_code="{status}",classification="{classification}""#);
    assert_counted(metrics, "response_total", &labels, expected);
}

/// Scrapes `proxy` until it counts `expected` responses with the request's `labels`,
/// `status` and `classification` (a response is counted when its body ends, which may
/// be a moment after the client saw it end); panics after 10 s.
pub async fn wait_for_responses(
    proxy: &Running,
    labels: &str,
    status: u16,
    classification: &str,
    expected: f64,
) {
    let series = format!(
        r#"response_total{{{labels},status_code="{status}",classification="{classification}"}}"#
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&proxy.metrics().await, &series) != Some(expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never counted {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes each of `messages` to `stream` and reads it back (an echo at the far end);
/// panics after 10 s without it.
pub async fn assert_echoed(stream: &mut TcpStream, messages: &[&[u8]]) {
    for message in messages {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0; message.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, message);
    }
}
