//! In-process tests of request-level HTTP proxying: a hyper (or hand-written) client
//! talks to the proxy's listener on loopback, the proxy forwards to a hyper (or
//! hand-written) server given as the destination, and `/metrics` is scraped from the
//! admin server. No redirect rules here: the netns tests cover those.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use meshproxy::{Config, Proxy, ProxyArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

#[path = "support/admin.rs"]
mod admin;
#[path = "support/http.rs"]
mod support;

use support::{
    assert_counted, assert_responses, full, h1_client, h2_client, outbound, read_until, start,
    with_trailers, BoxError, Count, Running, ServerBody,
};

/// A proxy on loopback that sends every connection to `target`.
async fn proxy_to(target: SocketAddr, tweak: impl FnOnce(&mut ProxyArgs)) -> Running {
    let mut args = support::loopback_args();
    tweak(&mut args);
    start(args, Some(target)).await
}

/// The response to `GET path` with `Host: host` on `client`.
async fn get(
    client: &mut hyper::client::conn::http1::SendRequest<ServerBody>,
    host: &str,
    path: &str,
) -> Response<Incoming> {
    let request = Request::get(path)
        .header("host", host)
        .body(full(""))
        .unwrap();
    client.send_request(request).await.unwrap()
}

/// Sends `request` on a new connection to the proxy's outbound listener and reads until
/// the proxy closes it; `closes` says why it should (the test fails after 10 s).
async fn answer_then_close(proxy: &Running, request: &[u8], closes: &str) -> String {
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut response))
        .await
        .expect(closes)
        .unwrap();
    String::from_utf8(response).unwrap()
}

/// A hyper server (HTTP/1 with upgrades, or HTTP/2) answering with `handle`; counts
/// the connections it accepts.
async fn server<F, Fut>(http2: bool, handle: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ServerBody>> + Send + 'static,
{
    support::serve(Count::Connections, http2, handle).await
}

#[tokio::test]
async fn a_thousand_requests_on_one_keep_alive_connection_are_a_thousand_requests() {
    let (target, accepted) = server(false, |_req| async { Response::new(full("ok")) }).await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    for _ in 0..1000 {
        let response = get(&mut client, "web.test", "/hello").await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    let m = proxy.metrics().await;
    let labels = outbound(target, "web.test");
    assert_counted(&m, "request_total", &labels, 1000.0);
    assert_responses(&m, &labels, 200, "success", 1000.0);
    assert_counted(&m, "response_latency_seconds_count", &labels, 1000.0);
    // The TCP metrics of the client's connection are still there, labelled http1.
    let conn =
        format!(r#"direction="outbound",target_addr="{target}",protocol="http1",tls="false""#);
    assert_counted(&m, "tcp_open_total", &conn, 1.0);
    // One pooled connection to the destination carried all of them.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_503_is_a_failure() {
    let (target, _) = server(false, |_req| async {
        let mut response = Response::new(full("busy"));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    let response = get(&mut client, "busy.test", "/").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The application's own error passes unchanged: no proxy header.
    assert!(!response.headers().contains_key("meshproxy-error"));
    response.into_body().collect().await.unwrap();
    let m = proxy.metrics().await;
    let labels = outbound(target, "busy.test");
    assert_responses(&m, &labels, 503, "failure", 1.0);
}

/// A gRPC-shaped exchange over HTTP/2: the request streams frames and trailers, the
/// response streams back and ends with `grpc-status: 5` in its trailers.
#[tokio::test]
async fn grpc_status_in_trailers_is_a_labelled_failure_and_trailers_pass() {
    let (target, _) = server(true, |req: Request<Incoming>| async move {
        assert_eq!(req.headers()["te"], "trailers");
        let collected = req.into_body().collect().await.unwrap();
        let request_trailers = collected.trailers().cloned().unwrap_or_default();
        let echoed = collected.to_bytes();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", "not found".parse().unwrap());
        if let Some(value) = request_trailers.get("x-request-trailer") {
            trailers.insert("x-echoed-trailer", value.clone());
        }
        let body = with_trailers(echoed, trailers);
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h2_client(proxy.outbound()).await;
    let mut request_trailers = HeaderMap::new();
    request_trailers.insert("x-request-trailer", "sent".parse().unwrap());
    let request = Request::post("http://grpc.test/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(with_trailers(
            Bytes::from_static(b"\0\0\0\0\x05hello"),
            request_trailers,
        ))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "not found");
    assert_eq!(trailers["x-echoed-trailer"], "sent");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");

    let m = proxy.metrics().await;
    let labels = outbound(target, "grpc.test");
    assert_counted(
        &m,
        "response_total",
        &format!(r#"{labels},status_code="200",classification="failure",grpc_status="5""#),
        1.0,
    );
    let conn =
        format!(r#"direction="outbound",target_addr="{target}",protocol="http2",tls="false""#);
    assert_counted(&m, "tcp_open_total", &conn, 1.0);
}

/// Many concurrent streams on one client connection are served concurrently, over one
/// connection to the destination.
#[tokio::test]
async fn http2_streams_are_multiplexed_over_one_connection() {
    let (target, accepted) = server(true, |req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Response::new(full(req.uri().path().to_string()))
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let client = h2_client(proxy.outbound()).await;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let request = Request::get(format!("http://mux.test/{n}"))
                .body(full(""))
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("/{n}"));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // 50 × 300 ms one after the other would take 15 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let m = proxy.metrics().await;
    assert_counted(&m, "request_total", &outbound(target, "mux.test"), 50.0);
}

#[tokio::test]
async fn a_refused_connect_is_a_502_with_the_cause() {
    // A port nobody listens on, kept bound so that nothing else (not even the proxy's
    // own connect, as its source port) can take it meanwhile.
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = refusing.local_addr().unwrap();
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    let response = get(&mut client, "gone.test", "/").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["meshproxy-error"], "connection refused");
    response.into_body().collect().await.unwrap();
    let m = proxy.metrics().await;
    let labels = outbound(target, "gone.test");
    assert_responses(&m, &labels, 502, "failure", 1.0);
}

/// Inbound requests are labelled without `authority`.
#[tokio::test]
async fn inbound_requests_have_no_authority_label() {
    let (target, _) = server(false, |_req| async { Response::new(full("in")) }).await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.inbound()).await;
    let response = get(&mut client, "in.test", "/").await;
    response.into_body().collect().await.unwrap();
    let m = proxy.metrics().await;
    let labels = format!(r#"direction="inbound",target_addr="{target}",tls="false""#);
    assert_counted(&m, "request_total", &labels, 1.0);
}

/// What a hand-written HTTP/1 server received: the head of each request.
async fn raw_server(
    response: &'static [u8],
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_until(&mut stream, b"\r\n\r\n").await;
                let _ = tx.send(head);
                let _ = stream.write_all(response).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn header_case_and_end_to_end_headers_pass_and_hop_by_hop_ones_do_not() {
    let (target, mut heads) = raw_server(
        b"HTTP/1.1 200 OK\r\nX-Mixed-Case: Yes\r\nKeep-Alive: timeout=5\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client
        .write_all(
            b"GET http://Case.Test/path?q=1 HTTP/1.1\r\nHost: Case.Test\r\nX-Custom-Header: Value\r\n\
              Connection: keep-alive, X-Hop\r\nX-Hop: drop me\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Connection: keep-alive\r\nTE: trailers, deflate\r\n\r\n",
        )
        .await
        .unwrap();
    let response = read_until(&mut client, b"ok").await;
    let response = String::from_utf8(response).unwrap();
    let head = String::from_utf8(heads.recv().await.unwrap()).unwrap();

    // The request target (absolute form), Host and names' case are unchanged.
    assert!(
        head.starts_with("GET http://Case.Test/path?q=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nHost: Case.Test\r\n"), "{head}");
    assert!(head.contains("\r\nX-Custom-Header: Value\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "connection: keep-alive",
    ] {
        assert!(!lower.contains(hop), "{hop} forwarded:\n{head}");
    }
    assert!(lower.contains("\r\nte: trailers\r\n"), "{head}");
    assert!(!lower.contains("deflate"), "{head}");

    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("\r\nX-Mixed-Case: Yes\r\n"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(!lower.contains("x-resp-hop"), "{response}");
    assert!(!lower.contains("timeout=5"), "{response}");
    // Nothing added: the server sent no `Date`, so the client gets none.
    assert!(!lower.contains("\r\ndate:"), "{response}");
}

#[tokio::test]
async fn a_request_that_does_not_parse_is_a_400_with_the_cause() {
    let (target, accepted) = server(false, |_req| async { Response::new(full("")) }).await;
    let proxy = proxy_to(target, |_| {}).await;
    // A request line detection accepts, then a header line without a colon.
    let response = answer_then_close(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: bad.test\r\nNo colon here\r\n\r\n",
        "the proxy answers and closes",
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{response}"
    );
    assert!(
        response.contains("\r\nmeshproxy-error: bad request\r\n"),
        "{response}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing was forwarded");
    let m = proxy.metrics().await;
    let labels = outbound(target, "");
    assert_counted(&m, "request_total", &labels, 1.0);
    assert_responses(&m, &labels, 400, "failure", 1.0);
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect
/// to it hangs until the connector gives up. The streams keep the queue full.
fn unresponsive_listener() -> (SocketAddr, socket2::Socket, Vec<std::net::TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut filling = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => filling.push(stream),
            Err(_) => return (addr, socket, filling),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn a_connect_timeout_is_a_504_with_the_cause() {
    let (target, _listener, _filling) = unresponsive_listener();
    let proxy = proxy_to(target, |a| a.connect_timeout = Some("300ms".into())).await;
    let mut client = h1_client(proxy.outbound()).await;
    let started = std::time::Instant::now();
    let response = get(&mut client, "slow.test", "/").await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.headers()["meshproxy-error"], "connect timeout");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let m = proxy.metrics().await;
    let labels = outbound(target, "slow.test");
    assert_responses(&m, &labels, 504, "failure", 1.0);
}

#[tokio::test]
async fn expect_100_continue_gets_its_100_before_the_body_is_sent() {
    let (target, _) = server(false, |req: Request<Incoming>| async move {
        assert_eq!(req.headers()["expect"], "100-continue");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(format!("got {}", body.len())))
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: c.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut client, b"\r\n\r\n").await;
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"hello").await.unwrap();
    let response = String::from_utf8(read_until(&mut client, b"got 5").await).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[tokio::test]
async fn http_1_0_stays_1_0_and_the_connection_closes_after_the_response() {
    let (target, mut heads) = raw_server(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let proxy = proxy_to(target, |_| {}).await;
    let response = answer_then_close(
        &proxy,
        b"GET /old HTTP/1.0\r\nHost: old.test\r\n\r\n",
        "closed after the response",
    )
    .await;
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
    assert!(response.starts_with("HTTP/1."), "{response}");
    let head = String::from_utf8(heads.recv().await.unwrap()).unwrap();
    assert!(head.starts_with("GET /old HTTP/1.0\r\n"), "{head}");
    assert!(head.contains("\r\nHost: old.test\r\n"), "{head}");
}

#[tokio::test]
async fn a_servers_connection_close_closes_the_clients_connection() {
    let (target, _) =
        raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
    let proxy = proxy_to(target, |_| {}).await;
    let response = answer_then_close(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: close.test\r\n\r\n",
        "closed after the response",
    )
    .await;
    assert!(response.contains("\r\nConnection: close\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (target, _) = server(false, |req: Request<Incoming>| async move {
        Response::new(full(format!("[{}]", req.uri().path())))
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    let mut requests = Vec::new();
    for n in 0..3 {
        requests.extend_from_slice(format!("GET /{n} HTTP/1.1\r\nHost: p.test\r\n\r\n").as_bytes());
    }
    client.write_all(&requests).await.unwrap();
    let responses = String::from_utf8(read_until(&mut client, b"[/2]").await).unwrap();
    let order: Vec<usize> = ["[/0]", "[/1]", "[/2]"]
        .iter()
        .map(|p| {
            responses
                .find(p)
                .unwrap_or_else(|| panic!("{p} missing: {responses}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{responses}");
    let m = proxy.metrics().await;
    assert_counted(&m, "request_total", &outbound(target, "p.test"), 3.0);
}

/// 128 MiB chunked upload to a server that does not read for a while: the client can
/// only get a bounded part of it into the proxy (socket buffers and hyper's), then the
/// whole of it arrives, byte for byte.
#[tokio::test]
async fn a_chunked_upload_streams_with_backpressure() {
    const TOTAL: usize = 128 << 20;
    const CHUNK: usize = 64 << 10;
    let release = Arc::new(tokio::sync::Notify::new());
    let (target, _) = server(false, {
        let release = release.clone();
        move |req: Request<Incoming>| {
            let release = release.clone();
            async move {
                assert!(req.headers().get("content-length").is_none());
                release.notified().await;
                let mut body = req.into_body();
                let (mut len, mut sum) = (0usize, 0u64);
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        len += data.len();
                        sum = data
                            .iter()
                            .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
                    }
                }
                Response::new(full(format!("{len} {sum}")))
            }
        }
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let produced = Arc::new(AtomicUsize::new(0));
    let chunks = {
        let produced = produced.clone();
        futures_util::stream::iter((0..TOTAL / CHUNK).map(move |n| {
            produced.fetch_add(CHUNK, Ordering::SeqCst);
            let chunk: Vec<u8> = (0..CHUNK).map(|i| ((n * 7 + i) % 251) as u8).collect();
            Ok::<_, BoxError>(Frame::data(Bytes::from(chunk)))
        }))
    };
    let mut client = h1_client(proxy.outbound()).await;
    let request = Request::post("/upload")
        .header("host", "up.test")
        .body(StreamBody::new(chunks).boxed())
        .unwrap();
    let sending = tokio::spawn(async move {
        let response = client.send_request(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled_at = produced.load(Ordering::SeqCst);
    assert!(
        stalled_at < 48 << 20,
        "{stalled_at} bytes taken while the server read nothing: the body is buffered"
    );
    release.notify_one();
    let answer = sending.await.unwrap();
    let expected_sum = (0..TOTAL / CHUNK)
        .flat_map(|n| (0..CHUNK).map(move |i| ((n * 7 + i) % 251) as u8))
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(b)));
    assert_eq!(answer, format!("{TOTAL} {expected_sum}"));
}

/// The same the other way: a 128 MiB response to a client that does not read.
#[tokio::test]
async fn a_large_response_streams_with_backpressure() {
    const TOTAL: usize = 128 << 20;
    const CHUNK: usize = 64 << 10;
    let produced = Arc::new(AtomicUsize::new(0));
    let (target, _) = server(false, {
        let produced = produced.clone();
        move |_req| {
            let produced = produced.clone();
            async move {
                let chunks = futures_util::stream::iter((0..TOTAL / CHUNK).map(move |_| {
                    produced.fetch_add(CHUNK, Ordering::SeqCst);
                    Ok::<_, BoxError>(Frame::data(Bytes::from(vec![7u8; CHUNK])))
                }));
                Response::new(StreamBody::new(chunks).boxed())
            }
        }
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    let response = get(&mut client, "down.test", "/download").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled_at = produced.load(Ordering::SeqCst);
    assert!(
        stalled_at < 48 << 20,
        "{stalled_at} bytes produced while the client read nothing: the body is buffered"
    );
    let mut body = response.into_body();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(data.iter().all(|b| *b == 7));
            len += data.len();
        }
    }
    assert_eq!(len, TOTAL);
}

/// An upstream handler that accepts upgrades (101) and `CONNECT` (200), then echoes.
async fn upgrading_handler(mut req: Request<Incoming>) -> Response<ServerBody> {
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = upgrade.await.unwrap();
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0u8; 1024];
        loop {
            let n = io.read(&mut buf).await.unwrap_or(0);
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    if req.method() == http::Method::CONNECT {
        return Response::new(full(""));
    }
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .body(full(""))
        .unwrap()
}

#[tokio::test]
async fn an_upgraded_connection_echoes_and_is_one_request() {
    let (target, _) = server(false, upgrading_handler).await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    let head = support::upgrade_to_websocket(&mut client).await;
    // (hyper's server in the test writes header names in lower case.)
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    support::assert_echoed(&mut client, &[b"\x81\x05hello", b"opaque bytes, both ways"]).await;
    let m = proxy.metrics().await;
    let labels = outbound(target, "ws.test");
    assert_counted(&m, "request_total", &labels, 1.0);
    assert_responses(&m, &labels, 101, "success", 1.0);
}

#[tokio::test]
async fn a_connect_tunnel_carries_opaque_bytes() {
    let (target, _) = server(false, upgrading_handler).await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client
        .write_all(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n\r\n")
        .await
        .unwrap();
    let head = String::from_utf8(read_until(&mut client, b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    client
        .write_all(b"\x16\x03\x01 tls-ish bytes")
        .await
        .unwrap();
    let mut echoed = [0u8; 17];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"\x16\x03\x01 tls-ish bytes");
    let m = proxy.metrics().await;
    let labels = outbound(target, "tunnel.test:443");
    assert_counted(&m, "request_total", &labels, 1.0);
}

/// A response whose body the destination cuts short is a failure, whatever its status.
#[tokio::test]
async fn a_body_cut_short_is_a_failure() {
    let (target, _) = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    let response = get(&mut client, "cut.test", "/").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.into_body().collect().await.is_err(),
        "the client sees the body end in an error, not a clean end"
    );
    let labels = outbound(target, "cut.test");
    support::wait_for_responses(&proxy, &labels, 200, "failure", 1.0).await;
}

/// A client that stops reading a large response is cut once a write to it has waited
/// `--http-write-timeout`, its response counted as a failure; a client that reads the
/// same response slowly, for longer than the timeout in all, gets all of it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout_and_a_slow_one_is_not() {
    const TOTAL: usize = 32 << 20;
    const CHUNK: usize = 64 << 10;
    let (target, _) = server(false, |_req| async {
        let chunks = futures_util::stream::iter(
            (0..TOTAL / CHUNK)
                .map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![7u8; CHUNK])))),
        );
        let mut response = Response::new(StreamBody::new(chunks).boxed());
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, TOTAL.into());
        response
    })
    .await;
    let proxy = proxy_to(target, |a| a.http_write_timeout = Some("1s".into())).await;

    // Asks, reads nothing for three timeouts, then finds part of the body and the end.
    let mut stalled = TcpStream::connect(proxy.outbound()).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: stalled.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let mut buf = vec![0; CHUNK];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        // The end may be a reset: the proxy closed with bytes the client never took.
        while let Ok(n @ 1..) = stalled.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "still open after 13 s, {} bytes read",
        got.len()
    );
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{:?}",
        &got[..got.len().min(64)]
    );
    assert!(
        got.len() < TOTAL,
        "all of the body arrived: the client was not cut"
    );
    support::wait_for_responses(
        &proxy,
        &outbound(target, "stalled.test"),
        200,
        "failure",
        1.0,
    )
    .await;

    // Reads 64 KiB every 5 ms: about 2.6 s in all, never 1 s without taking a byte.
    let mut slow = TcpStream::connect(proxy.outbound()).await.unwrap();
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut body = 0;
    while body < TOTAL {
        let n = slow.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "cut after {body} bytes of the body");
        if head.ends_with(b"\r\n\r\n") {
            body += n;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body += head.len() - end - 4;
                head.truncate(end + 4);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(body, TOTAL);
    support::wait_for_responses(&proxy, &outbound(target, "slow.test"), 200, "success", 1.0).await;
}

/// HTTP/2 `CONNECT` (a tunnel over one stream of a multiplexed connection): opaque
/// bytes both ways, while the connection keeps serving other streams.
#[tokio::test]
async fn an_http2_connect_tunnel_carries_opaque_bytes() {
    let (target, _) = server(true, |req: Request<Incoming>| async move {
        if req.method() == http::Method::CONNECT {
            return upgrading_handler(req).await;
        }
        Response::new(full("plain"))
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h2_client(proxy.outbound()).await;
    let request = Request::connect("tunnel.test:443").body(full("")).unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // An HTTP/2 client's tunnel is the response's stream.
    let mut tunnel = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    tunnel.write_all(b"over h2").await.unwrap();
    let mut echoed = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"over h2");
    // Another stream of the same connection still works.
    let request = Request::get("http://tunnel.test/").body(full("")).unwrap();
    let response = client.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"plain");
}

/// On shutdown, HTTP connections finish the requests in flight and then close, so an
/// idle kept-alive client does not hold the drain for the whole grace period.
#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_then_closes_http_connections() {
    let (target, _) = server(false, |req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Response::new(full("done"))
    })
    .await;
    let args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        shutdown_grace: Some("30s".into()),
        ..ProxyArgs::default()
    };
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let outbound = proxy.local_addrs().outbound[0];
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve_with(move |_| Ok(target), async {
        let _ = stopped.await;
    }));

    // An idle kept-alive client, and one with a request in flight.
    let mut idle = h1_client(outbound).await;
    let request = Request::get("/")
        .header("host", "a.test")
        .body(full(""))
        .unwrap();
    let response = idle.send_request(request).await.unwrap();
    response.into_body().collect().await.unwrap();
    let mut busy = h1_client(outbound).await;
    let request = Request::get("/slow")
        .header("host", "a.test")
        .body(full(""))
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let response = busy.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (body, busy)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = std::time::Instant::now();
    stop.send(()).unwrap();
    let (body, busy) = in_flight.await.unwrap();
    assert_eq!(&body[..], b"done", "the request in flight was answered");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("drained long before the 30 s grace period")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // Both client connections were closed by the proxy.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !(idle.is_closed() && busy.is_closed()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the clients' connections are closed");
}

/// A later request of a kept-alive connection that does not parse gets hyper's own
/// 400 (the proxy checks only the first head), and is still counted as a failure.
#[tokio::test]
async fn a_later_request_that_does_not_parse_is_counted_as_a_failure() {
    let (target, _) = server(false, |_req| async { Response::new(full("ok")) }).await;
    let proxy = proxy_to(target, |_| {}).await;
    let response = answer_then_close(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: later.test\r\n\r\nGET / HTTP/1.1\r\nNo colon\r\n\r\n",
        "the proxy answers and closes",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("HTTP/1.1 400 Bad Request\r\n"),
        "{response}"
    );
    let labels = outbound(target, "");
    support::wait_for_responses(&proxy, &labels, 400, "failure", 1.0).await;
}

/// `authority` is whatever a client writes: a `Host` that would break the text format
/// (label values are not escaped) is labelled `invalid`, and the scrape stays valid.
#[tokio::test]
async fn a_hostile_host_header_keeps_the_metrics_valid() {
    let (target, _) = server(false, |_req| async { Response::new(full("ok")) }).await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\"} 1\\\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, b"ok").await;
    let m = proxy.metrics().await;
    assert_counted(&m, "request_total", &outbound(target, "invalid"), 1.0);
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is needed for this test");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{m}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// HTTP/1 chunked trailers pass both ways (the client's `TE: trailers` is kept, so
/// the server may send them).
#[tokio::test]
async fn http1_trailers_pass_both_ways() {
    let (target, _) = server(false, |req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let echoed = collected
            .trailers()
            .and_then(|t| t.get("x-checksum").cloned())
            .expect("the request's trailer arrived");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echoed", echoed);
        // HTTP/1 senders (hyper too) send only the trailers `Trailer` declares.
        Response::builder()
            .header("trailer", "x-echoed")
            .body(with_trailers(collected.to_bytes(), trailers))
            .unwrap()
    })
    .await;
    let proxy = proxy_to(target, |_| {}).await;
    let mut client = h1_client(proxy.outbound()).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let request = Request::post("/t")
        .header("host", "trailers.test")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .body(with_trailers(Bytes::from_static(b"payload"), trailers))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("the response's trailers");
    assert_eq!(trailers["x-echoed"], "abc123");
    assert_eq!(&collected.to_bytes()[..], b"payload");
}

/// A client that stalls in the middle of a request head (or keeps a connection idle)
/// is closed after the header read timeout, a minute, instead of holding the
/// connection forever. (Paused clock: tokio jumps to the timeout once all is idle.)
#[tokio::test(start_paused = true)]
async fn a_stalled_request_head_and_an_idle_connection_are_closed_after_a_minute() {
    let (target, _) = server(false, |_req| async { Response::new(full("ok")) }).await;
    let proxy = proxy_to(target, |_| {}).await;

    // The request line (detected as HTTP/1), then nothing.
    let mut stalled = TcpStream::connect(proxy.outbound()).await.unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(60) && waited < Duration::from_secs(70),
        "{waited:?}"
    );

    // A kept-alive connection after its first request, idle.
    let mut idle = TcpStream::connect(proxy.outbound()).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: idle.test\r\n\r\n")
        .await
        .unwrap();
    // No `read_until`: its own 10 s timeout would be the first timer the paused
    // clock jumps to.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"ok") {
        let n = idle.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "closed before the answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
