//! In-process tests of HTTP between meshed proxies on loopback: an outbound proxy `a`
//! whose mesh peers file points 127.0.0.1 at identity `b`, sending every connection to
//! an application server; an inbound proxy `b`, served with the real `SO_ORIGINAL_DST`
//! lookup so that a's connections to its inbound port are direct ones, as in a pod.
//! Requests travel from a to b over mTLS as HTTP/2, HTTP/1 ones marked
//! `l5d-orig-proto`. Certificates are made at test time by the dev CA helpers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use meshproxy::{IdentityFiles, ProxyArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/admin.rs"]
mod admin;
#[path = "support/pki.rs"]
mod pki;
#[path = "support/http.rs"]
mod support;

use pki::{identity_args as args, Pki};
use support::{
    full, h1_client, h2_client, sample, start, with_trailers, BoxError, Count, Running, ServerBody,
};

const A: &str = "a.default.mesh.local";
const B: &str = "b.default.mesh.local";

/// The inbound proxy `b` (proving `b_identity`) and the outbound proxy `a`, which
/// expects `B` at 127.0.0.1 and sends every connection to `app`.
async fn mesh(pki: &Pki, app: SocketAddr, b_identity: &str) -> (Running, Running) {
    let b = start(args(&pki.issue(b_identity)), None).await;
    let mut a_args = args(&pki.issue(A));
    a_args.mesh_peers = Some(pki.peers(B).display().to_string());
    a_args.peer_inbound_port = Some(b.addrs.inbound[0].port().to_string());
    let a = start(a_args, Some(app)).await;
    (a, b)
}

/// A hyper application server (HTTP/1 with upgrades, or HTTP/2) answering with
/// `handle`; counts the requests it gets.
async fn app<F, Fut>(http2: bool, handle: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ServerBody>> + Send + 'static,
{
    support::serve(Count::Requests, http2, handle).await
}

/// Answers `<version> <Host> <method> <path> <body>` and the trailer `x-echo: done`
/// when the client asked for trailers.
async fn echo(req: Request<Incoming>) -> Response<ServerBody> {
    let head = format!(
        "{:?} {} {} {}",
        req.version(),
        req.headers()
            .get("host")
            .map_or("-", |h| h.to_str().unwrap()),
        req.method(),
        req.uri(),
    );
    let wants_trailers = req
        .headers()
        .get("te")
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let text = format!("{head} {}", String::from_utf8_lossy(&body));
    let mut frames = vec![Ok::<_, BoxError>(Frame::data(Bytes::from(text)))];
    if wants_trailers {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", "done".parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers)));
    }
    let mut response = Response::builder();
    if wants_trailers {
        // hyper's HTTP/1 encoder sends only the trailers the head announces.
        response = response.header("trailer", "x-echo");
    }
    response
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}

/// The sum of the samples of `name` whose labels include all of `labels`.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes `proxy` until `sum(name, labels)` is `want` (responses are recorded when
/// their body ends, a moment after the client has it).
async fn wait_for(proxy: &Running, name: &str, labels: &[&str], want: f64) -> String {
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = proxy.metrics().await;
        if sum(&metrics, name, labels) == want {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} {labels:?} never reached {want}\n{metrics}");
}

/// mTLS connections b's inbound proxy accepted.
fn mtls_accepted(b_metrics: &str) -> f64 {
    sum(
        b_metrics,
        "tcp_open_total",
        &[r#"direction="inbound""#, r#"tls="true""#],
    )
}

/// One HTTP/1.1 connection to `a`, one POST with `TE: trailers`: the response's
/// status, body and `x-echo` trailer.
async fn one_request(a: SocketAddr, i: usize) -> (StatusCode, String, Option<String>) {
    let mut sender = h1_client(a).await;
    let request = Request::post(format!("/item/{i}?q={i}"))
        .header("Host", format!("svc-{i}.example:8080"))
        .header("TE", "trailers")
        .body(full(format!("body {i}")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let collected = response.into_body().collect().await.unwrap();
    let trailer = collected
        .trailers()
        .and_then(|t| t.get("x-echo"))
        .map(|v| v.to_str().unwrap().to_string());
    let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    (status, body, trailer)
}

#[tokio::test]
async fn two_hundred_http1_clients_share_a_handful_of_mtls_connections() {
    const CLIENTS: usize = 200;
    let pki = Pki::new("pool");
    let (app_addr, app_requests) = app(false, echo).await;
    let (a, b) = mesh(&pki, app_addr, B).await;
    let outbound = a.addrs.outbound[0];

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(one_request(outbound, i)))
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (status, body, trailer) = client.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{i}: {body}");
        // The application got the HTTP/1.1 request the client sent: Host, method,
        // origin-form path and query, body; and the client its trailer.
        assert_eq!(
            body,
            format!("HTTP/1.1 svc-{i}.example:8080 POST /item/{i}?q={i} body {i}")
        );
        assert_eq!(trailer.as_deref(), Some("done"), "{i}");
    }
    assert_eq!(app_requests.load(Ordering::SeqCst), CLIENTS);

    let b_metrics = wait_for(
        &b,
        "response_total",
        &[
            r#"direction="inbound""#,
            r#"tls="true""#,
            &format!(r#"client_id="{A}""#),
            r#"status_code="200""#,
            r#"classification="success""#,
        ],
        CLIENTS as f64,
    )
    .await;
    // Exactly one: the first request opens it, the others wait for it (pool's slot).
    let connections = mtls_accepted(&b_metrics);
    assert!(
        connections == 1.0,
        "{connections} mTLS connections for {CLIENTS} client connections\n{b_metrics}"
    );
    let a_metrics = wait_for(
        &a,
        "response_total",
        &[
            r#"direction="outbound""#,
            r#"tls="true""#,
            &format!(r#"server_id="{B}""#),
            r#"status_code="200""#,
        ],
        CLIENTS as f64,
    )
    .await;
    assert_eq!(
        sum(
            &a_metrics,
            "tcp_open_total",
            &[
                r#"direction="outbound""#,
                r#"protocol="http1""#,
                r#"tls="true""#
            ]
        ),
        CLIENTS as f64,
        "{a_metrics}"
    );

    // A new client connection later costs no handshake: the pooled connection is used.
    let (status, _, _) = one_request(outbound, 1000).await;
    assert_eq!(status, StatusCode::OK);
    let b_metrics = wait_for(
        &b,
        "request_total",
        &[r#"direction="inbound""#],
        CLIENTS as f64 + 1.0,
    )
    .await;
    assert_eq!(mtls_accepted(&b_metrics), connections, "{b_metrics}");
}

/// Reads from `stream` until `until` has been read, or panics after 10 s.
async fn read_until(stream: &mut TcpStream, until: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("timed out")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// A hand-written HTTP/1 application: sends back the request head it received as its
/// body, so the test sees the exact bytes the application got.
async fn head_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let version = if head.starts_with(b"GET / HTTP/1.0") {
                        "HTTP/1.0"
                    } else {
                        "HTTP/1.1"
                    };
                    let response = format!(
                        "{version} 200 OK\r\nContent-Length: {}\r\nX-App-Header: Kept\r\n\r\n",
                        head.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.write_all(&head).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn http1_over_the_http2_hop_reaches_the_application_as_http1() {
    let pki = Pki::new("h1");
    let app_addr = head_echo().await;
    let (a, b) = mesh(&pki, app_addr, B).await;
    let mut client = TcpStream::connect(a.addrs.outbound[0]).await.unwrap();
    client
        .write_all(
            b"GET /p?q=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\nX-Custom: Value As Is\r\n\
              Content-Type: text/plain\r\n\r\n",
        )
        .await
        .unwrap();
    let response = String::from_utf8(read_until(&mut client, b"GET /p?q=1").await).unwrap();
    let mut rest = [0u8; 4096];
    let tail = tokio::time::timeout(Duration::from_millis(300), client.read(&mut rest)).await;
    let response = match tail {
        Ok(Ok(n)) => response + &String::from_utf8_lossy(&rest[..n]),
        _ => response,
    };
    // The client gets an HTTP/1.1 response, its header names as HTTP/1 writes them.
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("\r\nX-App-Header: Kept\r\n"),
        "{response}"
    );
    assert!(
        !response.to_ascii_lowercase().contains("l5d-orig-proto"),
        "{response}"
    );
    // The application got an origin-form HTTP/1.1 request, Host and values unchanged,
    // the names in the case the client wrote them, and no mark of the trip.
    let (_, app_head) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        app_head.starts_with("GET /p?q=1 HTTP/1.1\r\n"),
        "{app_head}"
    );
    assert!(
        app_head.contains("\r\nHost: Shop.Example:8080\r\n"),
        "{app_head}"
    );
    assert!(
        app_head.contains("\r\nX-Custom: Value As Is\r\n"),
        "{app_head}"
    );
    assert!(
        app_head.contains("\r\nContent-Type: text/plain\r\n"),
        "{app_head}"
    );
    assert!(
        !app_head.to_ascii_lowercase().contains("l5d-orig-proto"),
        "{app_head}"
    );

    // HTTP/1.0 stays HTTP/1.0 at both ends.
    let mut client = TcpStream::connect(a.addrs.outbound[0]).await.unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
    assert!(
        response.contains("\r\n\r\nGET / HTTP/1.0\r\n"),
        "{response}"
    );
    let b_metrics = wait_for(&b, "request_total", &[r#"direction="inbound""#], 2.0).await;
    assert_eq!(mtls_accepted(&b_metrics), 1.0, "{b_metrics}");
}

/// A gRPC-like HTTP/2 application: streams the request body back, then the trailers
/// `grpc-status: 5`, `grpc-message: not found`.
async fn grpc_like(req: Request<Incoming>) -> Response<ServerBody> {
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "5".parse().unwrap());
    trailers.insert("grpc-message", "not found".parse().unwrap());
    Response::builder()
        .header("content-type", "application/grpc")
        .body(with_trailers(body, trailers))
        .unwrap()
}

#[tokio::test]
async fn http2_trailers_and_grpc_statuses_cross_the_mesh() {
    let pki = Pki::new("h2");
    let (app_addr, _) = app(true, grpc_like).await;
    let (a, b) = mesh(&pki, app_addr, B).await;
    let mut sender = h2_client(a.addrs.outbound[0]).await;
    for i in 0..3 {
        let request = Request::post(format!("http://grpc.test/pkg.Svc/Get{i}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(format!("message {i}")))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "5");
        assert_eq!(trailers["grpc-message"], "not found");
        assert_eq!(collected.to_bytes(), format!("message {i}"));
    }
    wait_for(
        &a,
        "response_total",
        &[
            r#"direction="outbound""#,
            r#"tls="true""#,
            r#"grpc_status="5""#,
            r#"classification="failure""#,
        ],
        3.0,
    )
    .await;
    let b_metrics = wait_for(
        &b,
        "response_total",
        &[
            r#"direction="inbound""#,
            r#"tls="true""#,
            &format!(r#"client_id="{A}""#),
            r#"grpc_status="5""#,
        ],
        3.0,
    )
    .await;
    assert_eq!(mtls_accepted(&b_metrics), 1.0, "{b_metrics}");
}

async fn upgrading(mut req: Request<Incoming>) -> Response<ServerBody> {
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let mut io = TokioIo::new(upgrade.await.unwrap());
        let mut buf = [0u8; 1024];
        loop {
            let n = io.read(&mut buf).await.unwrap_or(0);
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .body(full(""))
        .unwrap()
}

#[tokio::test]
async fn an_http1_upgrade_to_a_peer_takes_a_dedicated_mtls_connection_and_echoes() {
    let pki = Pki::new("upgrade");
    let (app_addr, _) = app(false, upgrading).await;
    let (a, b) = mesh(&pki, app_addr, B).await;
    let mut client = TcpStream::connect(a.addrs.outbound[0]).await.unwrap();
    support::upgrade_to_websocket(&mut client).await;
    support::assert_echoed(&mut client, &[b"\x81\x05hello", b"opaque bytes, both ways"]).await;
    let a_metrics = a.metrics().await;
    assert_eq!(
        sample(
            &a_metrics,
            &format!(
                r#"request_total{{direction="outbound",target_addr="{app_addr}",authority="ws.test",tls="true",server_id="{B}"}}"#
            )
        ),
        Some(1.0),
        "{a_metrics}"
    );
    // b forwarded the dedicated connection (session protocol HTTP/1) as bytes.
    let b_metrics = b.metrics().await;
    assert_eq!(
        sum(
            &b_metrics,
            "tcp_open_total",
            &[
                r#"direction="inbound""#,
                r#"tls="true""#,
                r#"protocol="http1""#
            ]
        ),
        1.0,
        "{b_metrics}"
    );
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_gets_no_request_and_the_client_a_502() {
    let pki = Pki::new("wrong-id");
    let (app_addr, app_requests) = app(false, echo).await;
    // The proxy at 127.0.0.1 proves "attacker", not the `B` a expects there.
    let (a, b) = mesh(&pki, app_addr, "attacker.default.mesh.local").await;
    let (status, body, _) = one_request(a.addrs.outbound[0], 1).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body, "peer handshake failed\n");
    // Nothing reached the impostor's application, and the impostor served no request.
    assert_eq!(app_requests.load(Ordering::SeqCst), 0);
    let b_metrics = b.metrics().await;
    assert_eq!(
        sum(&b_metrics, "request_total", &[r#"direction="inbound""#]),
        0.0,
        "{b_metrics}"
    );
    wait_for(
        &a,
        "tls_handshake_failures_total",
        &[r#"direction="outbound""#, r#"reason="wrong_identity""#],
        1.0,
    )
    .await;
    wait_for(
        &a,
        "response_total",
        &[
            r#"direction="outbound""#,
            r#"status_code="502""#,
            r#"classification="failure""#,
        ],
        1.0,
    )
    .await;
}

/// Echoes, except `/hang`, which never answers.
async fn echo_or_hang(req: Request<Incoming>) -> Response<ServerBody> {
    if req.uri().path() == "/hang" {
        std::future::pending::<()>().await;
    }
    echo(req).await
}

#[tokio::test]
async fn a_broken_pooled_connection_fails_its_requests_with_502_and_is_replaced() {
    let pki = Pki::new("broken");
    let (app_addr, _) = app(false, echo_or_hang).await;
    let b_args = |inbound: String| ProxyArgs {
        inbound_addr: Some(inbound),
        shutdown_grace: Some("100ms".into()),
        ..args(&pki.issue(B))
    };
    let b = start(b_args("127.0.0.1:0".into()), None).await;
    let b_inbound = b.addrs.inbound[0];
    let mut a_args = args(&pki.issue(A));
    a_args.mesh_peers = Some(pki.peers(B).display().to_string());
    a_args.peer_inbound_port = Some(b_inbound.port().to_string());
    let a = start(a_args, Some(app_addr)).await;
    let outbound = a.addrs.outbound[0];
    let (status, _, _) = one_request(outbound, 1).await;
    assert_eq!(status, StatusCode::OK);

    // A request in flight on the pooled connection when b goes away.
    let hanging = tokio::spawn(async move {
        let mut sender = h1_client(outbound).await;
        let request = Request::get("/hang")
            .header("Host", "hang.example")
            .body(full(""))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let cause = response.headers().get("meshproxy-error").cloned();
        (response.status(), cause)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.stop().await;
    let (status, cause) = tokio::time::timeout(Duration::from_secs(10), hanging)
        .await
        .expect("the request in flight was answered")
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(cause.unwrap(), "upstream closed");

    // b is back on the same port: the next request opens a new pooled connection.
    let b = start(b_args(b_inbound.to_string()), None).await;
    let (status, body, _) = one_request(outbound, 2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let b_metrics = wait_for(&b, "request_total", &[r#"direction="inbound""#], 1.0).await;
    assert_eq!(mtls_accepted(&b_metrics), 1.0, "{b_metrics}");
}

/// A TLS client config presenting `identity`, offering the transport ALPN.
fn peer_client_config(identity: &IdentityFiles) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&identity.trust_anchors).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&identity.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&identity.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(meshproxy::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"transport.l5d.io/v1".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn a_peer_that_opens_an_http2_session_and_stays_silent_is_closed_after_the_handshake_timeout()
{
    let pki = Pki::new("silent");
    let (app_addr, _) = app(true, echo).await;
    let b = start(
        ProxyArgs {
            handshake_timeout: Some("1s".into()),
            ..args(&pki.issue(B))
        },
        None,
    )
    .await;
    // A proxy with a valid identity: handshake, transport header (HTTP/2), then nothing.
    let tcp = TcpStream::connect(b.addrs.inbound[0]).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(B.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(peer_client_config(&pki.issue(A)))
        .connect(name, tcp)
        .await
        .unwrap();
    let header =
        meshproxy::TransportHeader::new(app_addr.port(), Some(meshproxy::SessionProtocol::Http2));
    tls.write_all(&header.encode()).await.unwrap();
    tls.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}, expected the 1 s handshake timeout"
    );
    wait_for(
        &b,
        "tls_handshake_failures_total",
        &[r#"direction="inbound""#, r#"reason="timeout""#],
        1.0,
    )
    .await;
}
