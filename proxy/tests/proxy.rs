//! In-process tests of the whole proxy on loopback: listeners, detection, forwarding,
//! metrics, caps and shutdown. The destination is given explicitly (`serve_with`),
//! since no redirect rules exist here; the netns tests cover `SO_ORIGINAL_DST`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use meshproxy::{BoundAddrs, Config, Proxy, ProxyArgs, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct Running {
    addrs: BoundAddrs,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    fn outbound(&self) -> SocketAddr {
        self.addrs.outbound[0]
    }

    fn inbound(&self) -> SocketAddr {
        self.addrs.inbound[0]
    }

    async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Loopback listeners on ephemeral ports, plus `tweak`'s settings.
fn args(tweak: impl FnOnce(&mut ProxyArgs)) -> ProxyArgs {
    let mut args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..ProxyArgs::default()
    };
    tweak(&mut args);
    args
}

/// Starts a proxy that sends every connection to `target`.
async fn start(args: ProxyArgs, target: SocketAddr) -> Running {
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = rx.await;
    };
    let task = tokio::spawn(proxy.serve_with(move |_| Ok(target), shutdown));
    Running {
        addrs,
        shutdown: Some(tx),
        task,
    }
}

/// A target that first writes `greeting` (if any), then echoes until EOF and
/// half-closes.
async fn echo_server(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                stream.write_all(greeting).await?;
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                std::io::Result::Ok(())
            });
        }
    });
    addr
}

/// Sends `request`, half-closes, and returns everything the other end sent back.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    response
}

/// GET `path` from the admin server: (status line, body).
async fn get(admin: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Polls /metrics until `series` equals `want`: closes are recorded when the
/// proxy's connection task ends, a moment after the client has seen EOF.
async fn wait_for_sample(admin: SocketAddr, series: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(admin, "/metrics").await;
        if sample(&metrics, series) == Some(want) {
            return metrics;
        }
        if std::time::Instant::now() > deadline {
            panic!("{series} never became {want}; metrics:\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn labels(direction: &str, target: SocketAddr, protocol: &str) -> String {
    format!("{{direction=\"{direction}\",target_addr=\"{target}\",protocol=\"{protocol}\",tls=\"false\"}}")
}

/// A tiny HTTP/1 server: answers every request head it reads with `200 OK` and body
/// `ok`, keeping the connection open.
async fn http1_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0; 4096];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return std::io::Result::Ok(());
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await?;
                    }
                }
            });
        }
    });
    addr
}

/// HTTP connections are proxied request by request (see tests/http.rs); underneath,
/// the client's connection keeps its TCP metrics, labelled with the protocol.
#[tokio::test]
async fn http1_and_http2_are_labelled_and_their_bytes_counted() {
    let target = http1_server().await;
    let proxy = start(args(|_| {}), target).await;

    let http1 = b"GET /hello HTTP/1.1\r\nHost: example\r\n\r\n".repeat(3);
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".repeat(3);
    assert_eq!(
        String::from_utf8(exchange(proxy.outbound(), &http1).await).unwrap(),
        String::from_utf8(answer.clone()).unwrap()
    );
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame, answered
    // by the proxy's own SETTINGS (HTTP/2 is terminated and re-originated).
    let mut http2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    http2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let settings = exchange(proxy.inbound(), &http2).await;
    assert_eq!(
        settings.get(3),
        Some(&4),
        "a SETTINGS frame first: {settings:?}"
    );

    let out = labels("outbound", target, "http1");
    let inb = labels("inbound", target, "http2");
    let close = |l: &str| format!("tcp_close_total{}", l.replace("}", ",errno=\"\"}"));
    let m = wait_for_sample(proxy.addrs.admin, &close(&out), 1.0).await;
    let m2 = wait_for_sample(proxy.addrs.admin, &close(&inb), 1.0).await;
    for (m, l, read, written) in [
        (&m, &out, http1.len(), answer.len()),
        (&m2, &inb, http2.len(), settings.len()),
    ] {
        assert_eq!(sample(m, &format!("tcp_open_total{l}")), Some(1.0), "{m}");
        assert_eq!(
            sample(m, &format!("tcp_open_connections{l}")),
            Some(0.0),
            "{m}"
        );
        assert_eq!(
            sample(m, &format!("tcp_read_bytes_total{l}")),
            Some(read as f64),
            "{m}"
        );
        assert_eq!(
            sample(m, &format!("tcp_write_bytes_total{l}")),
            Some(written as f64),
            "{m}"
        );
    }
    assert_eq!(
        sample(&m2, "detect_results_total{result=\"http1\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m2, "detect_results_total{result=\"http2\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&m2, "detect_duration_seconds_count"), Some(2.0));
    proxy.stop().await;
}

#[tokio::test]
async fn opaque_bytes_and_connect_errors_are_counted() {
    let target = echo_server(b"").await;
    let proxy = start(args(|_| {}), target).await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(exchange(proxy.outbound(), &payload).await, payload);
    let l = labels("outbound", target, "opaque");
    let m = wait_for_sample(
        proxy.addrs.admin,
        &format!("tcp_write_bytes_total{l}"),
        payload.len() as f64,
    )
    .await;
    assert_eq!(
        sample(&m, &format!("tcp_read_bytes_total{l}")),
        Some(200_000.0)
    );
    assert_eq!(
        sample(&m, "detect_results_total{result=\"opaque\"}"),
        Some(1.0)
    );
    proxy.stop().await;

    // A destination nobody listens on: counted as opened and closed with its errno.
    // The port stays bound (not listening) for the whole test: freed, it could be
    // taken by another test, or be the very port the proxy's connect picks as its
    // source (a loopback self-connect, which succeeds).
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = refusing.local_addr().unwrap();
    let proxy = start(args(|_| {}), closed).await;
    assert!(exchange(proxy.outbound(), b"hello").await.is_empty());
    let l = labels("outbound", closed, "opaque").replace("}", ",errno=\"ECONNREFUSED\"}");
    wait_for_sample(proxy.addrs.admin, &format!("tcp_close_total{l}"), 1.0).await;
    proxy.stop().await;
}

/// The time from connecting through the proxy to reading the target's greeting.
async fn time_to_greeting(proxy: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut greeting = [0; 11];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 hello\r\n");
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn server_speaks_first_is_delayed_by_detection_but_not_on_opaque_ports() {
    let target = echo_server(b"220 hello\r\n").await;

    // Not opaque: the client waits for the greeting, the proxy waits for the client,
    // until detection times out and fails open.
    let proxy = start(args(|a| a.detect_timeout = Some("1s".into())), target).await;
    let waited = time_to_greeting(proxy.outbound()).await;
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    assert_eq!(
        sample(&m, "detect_results_total{result=\"timeout\"}"),
        Some(1.0),
        "{m}"
    );
    proxy.stop().await;

    // Opaque: no detection, the greeting arrives at once.
    let opaque = args(|a| {
        a.detect_timeout = Some("1s".into());
        a.opaque_ports = Some(target.port().to_string());
    });
    let proxy = start(opaque, target).await;
    let waited = time_to_greeting(proxy.outbound()).await;
    // Half the 1 s detect timeout: "at once", with room for a loaded CI machine.
    assert!(waited < Duration::from_millis(500), "{waited:?}");
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    assert_eq!(
        sample(&m, "detect_duration_seconds_count"),
        Some(0.0),
        "{m}"
    );
    proxy.stop().await;
}

/// A client whose first bytes cannot begin any detected protocol (64 bytes of one
/// letter: no HTTP method is that long) is forwarded at once, not after the detect
/// timeout, though it waits for an answer before sending more.
#[tokio::test(start_paused = true)]
async fn a_client_that_is_no_protocol_is_forwarded_without_waiting() {
    let target = echo_server(b"").await;
    let proxy = start(args(|a| a.detect_timeout = Some("10s".into())), target).await;
    let started = Instant::now();
    let mut client = TcpStream::connect(proxy.outbound()).await.unwrap();
    client.write_all(&[b'a'; 64]).await.unwrap();
    let mut echoed = [0; 64];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, [b'a'; 64]);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    assert_eq!(
        sample(&m, "detect_results_total{result=\"opaque\"}"),
        Some(1.0),
        "{m}"
    );
    drop(client);
    proxy.stop().await;
}

#[tokio::test(start_paused = true)]
async fn silent_clients_beyond_the_detection_cap_are_closed_at_once() {
    let target = echo_server(b"").await;
    let proxy = start(args(|a| a.max_detecting = Some("1".into())), target).await;
    let _silent = TcpStream::connect(proxy.outbound()).await.unwrap();
    // Lets the proxy take the first connection into detection.
    tokio::time::sleep(Duration::from_millis(10)).await;

    let started = Instant::now();
    let mut second = TcpStream::connect(proxy.outbound()).await.unwrap();
    let mut buf = [0; 1];
    let n = second.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without forwarding");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not after the detect timeout"
    );
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    let refused = "tcp_refused_total{direction=\"outbound\",reason=\"max_detecting\"}";
    assert_eq!(sample(&m, refused), Some(1.0), "{m}");
    proxy.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let target = echo_server(b"").await;
    let proxy = start(args(|a| a.max_connections = Some("1".into())), target).await;
    let _first = TcpStream::connect(proxy.inbound()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;

    let mut second = TcpStream::connect(proxy.inbound()).await.unwrap();
    let n = second.read(&mut [0; 1]).await.unwrap_or(0);
    assert_eq!(n, 0);
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    let refused = "tcp_refused_total{direction=\"inbound\",reason=\"max_connections\"}";
    assert_eq!(sample(&m, refused), Some(1.0), "{m}");
    proxy.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_closes_at_once_is_counted_not_forwarded() {
    let target = echo_server(b"").await;
    let proxy = start(args(|_| {}), target).await;
    assert!(exchange(proxy.outbound(), b"").await.is_empty());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    assert_eq!(
        sample(&m, "detect_results_total{result=\"eof\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        !m.contains("tcp_open_total{"),
        "nothing was forwarded:\n{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connections_that_were_not_redirected_are_refused() {
    // The real SO_ORIGINAL_DST path, without redirect rules: nothing is redirected.
    let config = Config::from_sources(&args(|_| {}), &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async {
        let _ = rx.await;
    }));

    let mut stream = TcpStream::connect(addrs.outbound[0]).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(
        rest.is_empty(),
        "nothing may come back from a refused connection"
    );
    let refused = "tcp_refused_total{direction=\"outbound\",reason=\"no_original_dst\"}";
    let m = wait_for_sample(addrs.admin, refused, 1.0).await;
    assert!(!m.contains("tcp_open_total{"), "never forwarded:\n{m}");

    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn admin_endpoints() {
    let target = echo_server(b"").await;
    let proxy = start(args(|_| {}), target).await;
    assert_eq!(get(proxy.addrs.admin, "/live").await.0, "HTTP/1.1 200 OK");
    assert_eq!(get(proxy.addrs.admin, "/ready").await.0, "HTTP/1.1 200 OK");
    let (status, body) = get(proxy.addrs.admin, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(!body.contains("# EOF"), "Prometheus text, not OpenMetrics");
    for name in [
        "# TYPE tcp_open_total counter",
        "# TYPE tcp_close_total counter",
        "# TYPE tcp_open_connections gauge",
        "# TYPE tcp_read_bytes_total counter",
        "# TYPE tcp_write_bytes_total counter",
        "# TYPE detect_results_total counter",
        "# TYPE detect_duration_seconds histogram",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    assert_eq!(
        get(proxy.addrs.admin, "/other").await.0,
        "HTTP/1.1 404 Not Found"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_drains_open_connections() {
    let target = echo_server(b"").await;
    let proxy = start(args(|a| a.shutdown_grace = Some("30s".into())), target).await;
    let outbound = proxy.outbound();
    let mut open = TcpStream::connect(outbound).await.unwrap();
    open.write_all(b"\0opaque  bytes\r\n\r\n").await.unwrap();
    let mut echoed = [0; 18];
    open.read_exact(&mut echoed).await.unwrap();

    let Running {
        mut shutdown, task, ..
    } = proxy;
    shutdown.take().unwrap().send(()).unwrap();
    // New connections are refused once the listeners are closed...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(outbound).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...while the open one keeps working, and the server waits for it.
    open.write_all(b"still here").await.unwrap();
    let mut echoed = [0; 10];
    open.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");
    assert!(!task.is_finished());
    drop(open);
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_connections_still_open_after_the_grace_period() {
    let target = echo_server(b"").await;
    let proxy = start(args(|a| a.shutdown_grace = Some("5s".into())), target).await;
    let mut open = TcpStream::connect(proxy.outbound()).await.unwrap();
    open.write_all(b"\0opaque  bytes\r\n\r\n").await.unwrap();
    open.read_exact(&mut [0; 18]).await.unwrap();

    let started = Instant::now();
    proxy.stop().await;
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "the connection was closed");
}

fn promtool_check(metrics: &str) -> anyhow::Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "promtool is required for this test and was not found; \
             install it with `apt-get install prometheus` (Debian)",
        )?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{metrics}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let target = http1_server().await;
    let proxy = start(args(|_| {}), target).await;
    // Fill every family with samples first: HTTP (request, response and latency
    // families) and TLS.
    exchange(proxy.outbound(), b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    exchange(proxy.inbound(), b"\x16\x03\x01\x00\x01\x02").await;
    let l = labels("outbound", target, "http1").replace("}", ",errno=\"\"}");
    let m = wait_for_sample(proxy.addrs.admin, &format!("tcp_close_total{l}"), 1.0).await;
    for family in [
        "# TYPE request_total counter",
        "# TYPE response_total counter",
        "# TYPE response_latency_seconds histogram",
    ] {
        assert!(m.contains(family), "{family} missing:\n{m}");
    }
    assert!(m.contains("response_latency_seconds_bucket{"), "{m}");
    promtool_check(&m).unwrap();
    proxy.stop().await;
}

/// The standard process metrics, with values that describe this process (the proxy
/// runs inside the test process here).
#[tokio::test]
async fn process_metrics_describe_the_process() {
    let target = echo_server(b"").await;
    let proxy = start(args(|_| {}), target).await;
    let (_, m) = get(proxy.addrs.admin, "/metrics").await;
    let value = |name: &str| sample(&m, name).unwrap_or_else(|| panic!("{name} missing:\n{m}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "{started} vs {now}"
    );
    // May still be 0 (counted in 10 ms ticks) this early in a test process.
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let rss = value("process_resident_memory_bytes");
    assert!(
        rss > 1e6 && rss <= value("process_virtual_memory_bytes"),
        "{rss}"
    );
    // The listeners alone are open descriptors.
    let fds = value("process_open_fds");
    let max = value("process_max_fds");
    assert!(fds >= 3.0 && fds < max, "{fds} / {max}");
    for kind in [
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_open_fds gauge",
    ] {
        assert!(m.contains(kind), "{kind} missing:\n{m}");
    }
    promtool_check(&m).unwrap();
    proxy.stop().await;
}

/// `--connect-timeout` bounds the connect of an opaque (TCP) connection too: a
/// destination that drops SYNs closes the client after it, counted as `ETIMEDOUT`,
/// instead of holding it for the kernel's two minutes.
#[tokio::test]
async fn a_tcp_connect_gives_up_after_the_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let target = socket.local_addr().unwrap().as_socket().unwrap();
    let mut filling = Vec::new();
    while let Ok(stream) = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
    {
        filling.push(stream);
        assert!(
            filling.len() < 16,
            "the accept queue of {target} never filled"
        );
    }
    let proxy = start(args(|a| a.connect_timeout = Some("300ms".into())), target).await;
    let started = std::time::Instant::now();
    let closed = exchange(proxy.outbound(), b"\0opaque bytes").await;
    assert!(closed.is_empty());
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let l = labels("outbound", target, "opaque").replace("}", ",errno=\"ETIMEDOUT\"}");
    wait_for_sample(proxy.addrs.admin, &format!("tcp_close_total{l}"), 1.0).await;
    proxy.stop().await;
}
