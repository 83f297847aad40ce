//! meshproxy behind meshinit's real rules: the `meshinit` binary installs the redirects in
//! the pod, the `meshproxy` binary runs there as the proxy uid, and real sockets in the pod
//! and the peer talk through it.
//!
//! - Bulk data: 100 MiB each way, concurrently, with SHA-256 equal on both ends and
//!   half-close honoured, outbound (pod client -> peer server) and inbound (peer client ->
//!   pod server bound to the pod address or to the wildcard).
//! - Detection: a server-speaks-first server waits for the detect timeout on a detected
//!   port and not on an opaque one; HTTP/1 and HTTP/2 are labelled as such.
//! - Metrics: byte counters equal the bytes sent; a connection to the proxy port that was
//!   not redirected is refused, never forwarded to the proxy itself.
//!
//! Every case runs for IPv4 and IPv6.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::http::promtool_check;
use netns_tests::transfer::{receive, send, Exchange, Pattern};
use netns_tests::{Accepted, Family, Listener, MeshProxy, Netns, Pods, ACCEPT_TIMEOUT};

const MIB: u64 = 1 << 20;
/// The bulk transfer of the issue: 100 MiB in each direction.
const BULK: u64 = 100 * MIB;
/// A port not in meshproxy's default opaque list: connections to it go through detection.
const DETECTED_PORT: u16 = 8080;
/// A port in meshproxy's default opaque list (PostgreSQL): forwarded without detection.
const OPAQUE_PORT: u16 = 5432;
/// The longest any single read or write may block. A stalled proxy fails the test instead
/// of hanging it; 100 MiB through the proxy takes about a second.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the proxy may take to record a connection's close after both ends closed.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies meshinit's default rules in the pod and starts meshproxy there with `args`.
fn meshed<'a>(pods: &'a Pods, args: &[&str]) -> MeshProxy<'a> {
    pods.pod.meshinit(&["apply"]).expect_ok();
    pods.pod.start_meshproxy(args)
}

// ---------------------------------------------------------------------------------------
// Bulk data, both ways, half-close

#[test]
fn outbound_100_mib_each_way_arrive_intact_and_half_close_is_honoured() {
    let pods = Pods::new("proxy_outbound_bulk");
    let proxy = meshed(&pods, &[]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), DETECTED_PORT);
        let server = pods.peer.listen("peer app", family.any_port(DETECTED_PORT));
        let client = connect(&pods.pod, to);
        let (exchange, server_saw) = exchange(client, &server, BULK, BULK);
        exchange.assert_intact(&format!("pod -> {to} through the outbound proxy"));
        assert_eq!(
            server_saw.ip(),
            family.pod(),
            "the proxy connects from the pod's address"
        );
        assert_forwarded(&proxy, "outbound", to, BULK, BULK);
    }
}

#[test]
fn inbound_100_mib_each_way_arrive_intact_and_half_close_is_honoured() {
    let pods = Pods::new("proxy_inbound_bulk");
    let proxy = meshed(&pods, &[]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.pod(), DETECTED_PORT);
        // An application bound to the pod's address, then one bound to the wildcard: the
        // proxy connects to the original destination, which both accept.
        let mut forwarded = 0;
        for (bind, size) in [(family.pod(), BULK), (family.any(), 8 * MIB)] {
            let server = pods
                .pod
                .listen("pod app", SocketAddr::new(bind, DETECTED_PORT));
            let client = connect(&pods.peer, to);
            let (exchange, _) = exchange(client, &server, size, size);
            exchange.assert_intact(&format!(
                "peer -> {to} through the inbound proxy, app bound to {bind}"
            ));
            forwarded += 1;
            let target = to.to_string();
            let labels = [("direction", "inbound"), ("target_addr", target.as_str())];
            proxy.wait_for_metric(
                "tcp_close_total",
                &labels,
                forwarded as f64,
                METRICS_TIMEOUT,
            );
            drop(server);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Detection

#[test]
fn server_speaks_first_waits_for_the_detect_timeout_except_on_opaque_ports() {
    const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
    const MYSQL: u16 = 3306;
    let pods = Pods::new("proxy_server_speaks_first");
    let proxy = meshed(&pods, &["--detect-timeout=1s", "--opaque-ports=3306"]);
    for family in Family::ALL {
        // A detected port: the proxy waits for the client's first bytes, which never come
        // (the client waits for the greeting), so it connects only at the timeout.
        let to = SocketAddr::new(family.peer(), DETECTED_PORT);
        let timing = server_speaks_first(&pods, family, DETECTED_PORT);
        assert!(
            timing.accepted >= DETECT_TIMEOUT,
            "{to}: the server accepted {:?} after the client connected, before the detect \
             timeout ({DETECT_TIMEOUT:?}): the proxy did not wait for detection",
            timing.accepted,
        );
        assert!(
            timing.greeting >= DETECT_TIMEOUT && timing.client_byte >= DETECT_TIMEOUT,
            "{to}: {timing:?}, expected both after the detect timeout {DETECT_TIMEOUT:?}"
        );
        assert!(
            timing.greeting < DETECT_TIMEOUT + Duration::from_secs(2),
            "{to}: the greeting took {:?}, far past the detect timeout",
            timing.greeting
        );
        let metrics = proxy.wait_for_metric(
            "tcp_close_total",
            &[("target_addr", &to.to_string()), ("protocol", "opaque")],
            1.0,
            METRICS_TIMEOUT,
        );
        // Failing open is counted.
        let timeouts = match family {
            Family::V4 => 1.0,
            Family::V6 => 2.0,
        };
        assert_eq!(
            metrics.sum("detect_results_total", &[("result", "timeout")]),
            timeouts,
            "{to}: detect timeouts\n{metrics}"
        );

        // An opaque port: forwarded at once, so the greeting comes at once.
        let to = SocketAddr::new(family.peer(), MYSQL);
        let detected_before = proxy.metrics().sum("detect_results_total", &[]);
        let timing = server_speaks_first(&pods, family, MYSQL);
        // Well under the 1 s timeout, with room for a loaded 2-core CI machine.
        assert!(
            timing.greeting < Duration::from_millis(700),
            "{to} is opaque: the greeting took {:?}, expected it at once",
            timing.greeting,
        );
        let metrics = proxy.wait_for_metric(
            "tcp_close_total",
            &[("target_addr", &to.to_string()), ("protocol", "opaque")],
            1.0,
            METRICS_TIMEOUT,
        );
        assert_eq!(
            metrics.sum("detect_results_total", &[]),
            detected_before,
            "{to} is opaque: no detection at all\n{metrics}"
        );
    }
}

#[test]
fn http1_and_http2_prior_knowledge_are_labelled_in_metrics() {
    const HTTP2_PORT: u16 = 8081;
    let pods = Pods::new("proxy_http_labels");
    let proxy = meshed(&pods, &[]);
    for family in Family::ALL {
        // HTTP/1: a hand-written request to a tiny responder in the peer.
        let to = SocketAddr::new(family.peer(), DETECTED_PORT);
        let server = pods
            .peer
            .listen("peer http/1", family.any_port(DETECTED_PORT));
        let responder = thread::scope(|scope| {
            let responder = scope.spawn(|| http1_responder(&server));
            let mut client = connect(&pods.pod, to);
            let request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            client
                .write_all(request.as_bytes())
                .expect("send the request");
            let response = read_to_end(&mut client).expect("read the response");
            let response = String::from_utf8_lossy(&response).into_owned();
            assert!(
                response.starts_with("HTTP/1.1 200 OK\r\n") && response.ends_with("\r\n\r\nok"),
                "{to}: response {response:?}",
            );
            responder.join().expect("the responder")
        });
        assert_eq!(
            responder, "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "{to}: the request reached the server unchanged"
        );
        let target = to.to_string();
        let labels = [("direction", "outbound"), ("target_addr", target.as_str())];
        let metrics = proxy.wait_for_metric("tcp_close_total", &labels, 1.0, METRICS_TIMEOUT);
        assert_eq!(
            metrics.sum(
                "tcp_open_total",
                &[labels[0], labels[1], ("protocol", "http1")]
            ),
            1.0,
            "{to} is labelled http1\n{metrics}"
        );

        // HTTP/2 with prior knowledge: the connection preface and an empty SETTINGS frame.
        // HTTP/2 is proxied request by request, so the proxy itself answers with its
        // SETTINGS; without a request it never connects to the server.
        let to = SocketAddr::new(family.peer(), HTTP2_PORT);
        let _server = pods.peer.listen("peer http/2", family.any_port(HTTP2_PORT));
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&SETTINGS);
        let mut client = connect(&pods.pod, to);
        client.write_all(&hello).expect("send the preface");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let answer = read_to_end(&mut client).expect("read the proxy's SETTINGS");
        assert_eq!(
            answer.get(3),
            Some(&SETTINGS[3]),
            "{to}: a SETTINGS frame first: {answer:?}"
        );
        let target = to.to_string();
        let labels = [("direction", "outbound"), ("target_addr", target.as_str())];
        let metrics = proxy.wait_for_metric("tcp_close_total", &labels, 1.0, METRICS_TIMEOUT);
        assert_eq!(
            metrics.sum(
                "tcp_open_total",
                &[labels[0], labels[1], ("protocol", "http2")]
            ),
            1.0,
            "{to} is labelled http2\n{metrics}"
        );
    }
    let metrics = proxy.metrics();
    for result in ["http1", "http2"] {
        assert_eq!(
            metrics.sum("detect_results_total", &[("result", result)]),
            2.0,
            "detect_results_total{{result={result:?}}}: one per family\n{metrics}"
        );
    }
    // The scrape after real traffic, with every label set, is valid Prometheus text.
    promtool_check(&metrics.text);
}

/// An empty HTTP/2 SETTINGS frame: length 0, type 4, no flags, stream 0.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

// ---------------------------------------------------------------------------------------
// Byte counters, refusals

#[test]
fn byte_counters_equal_the_bytes_sent_each_way() {
    // Odd sizes, different each way, so a count of the wrong side or a lost chunk shows.
    const UP: u64 = 3 * MIB + 1234;
    const DOWN: u64 = 5 * MIB + 4321;
    let pods = Pods::new("proxy_byte_counters");
    let proxy = meshed(&pods, &[]);
    for family in Family::ALL {
        // Outbound, on a detected port (the bytes read during detection count too) and on
        // an opaque one.
        for port in [DETECTED_PORT, OPAQUE_PORT] {
            let to = SocketAddr::new(family.peer(), port);
            let server = pods.peer.listen("peer app", family.any_port(port));
            let client = connect(&pods.pod, to);
            exchange(client, &server, UP, DOWN)
                .0
                .assert_intact(&format!("pod -> {to}"));
            assert_forwarded(&proxy, "outbound", to, UP, DOWN);
        }
        // Inbound: the client is the peer, the proxy reads from it and writes to it.
        let to = SocketAddr::new(family.pod(), DETECTED_PORT);
        let server = pods.pod.listen("pod app", family.any_port(DETECTED_PORT));
        let client = connect(&pods.peer, to);
        exchange(client, &server, UP, DOWN)
            .0
            .assert_intact(&format!("peer -> {to}"));
        assert_forwarded(&proxy, "inbound", to, UP, DOWN);
    }
}

#[test]
fn a_connection_to_the_proxy_port_that_was_not_redirected_is_refused() {
    let pods = Pods::new("proxy_not_redirected_is_refused");
    let proxy = meshed(&pods, &[]);
    let outbound_listeners: [SocketAddr; 2] = [
        "127.0.0.1:4140".parse().unwrap(),
        "[::1]:4140".parse().unwrap(),
    ];
    // From the pod as root, to the outbound listener itself: loopback is exempt from the
    // redirect, so this connection has no original destination but the proxy's own port.
    let mut refused = 0.0;
    for to in outbound_listeners {
        assert_closed_without_forwarding(&pods.pod, to);
        refused += 1.0;
        proxy.wait_for_metric(
            "tcp_refused_total",
            &[("direction", "outbound"), ("reason", "no_original_dst")],
            refused,
            METRICS_TIMEOUT,
        );
    }
    // From the peer, to the inbound port: redirected to the port it was going to anyway.
    let mut refused = 0.0;
    for family in Family::ALL {
        let to = SocketAddr::new(family.pod(), 4143);
        assert_closed_without_forwarding(&pods.peer, to);
        refused += 1.0;
        proxy.wait_for_metric(
            "tcp_refused_total",
            &[("direction", "inbound"), ("reason", "no_original_dst")],
            refused,
            METRICS_TIMEOUT,
        );
    }
    // Refused once each, and nothing was forwarded: no loop into the proxy itself.
    let metrics = proxy.metrics();
    assert_eq!(metrics.sum("tcp_refused_total", &[]), 4.0, "{metrics}");
    assert_eq!(metrics.sum("tcp_open_total", &[]), 0.0, "{metrics}");
}

/// Connects from `ns` to `to`, a proxy listener, and asserts that the proxy closes the
/// connection without answering, even though the client sent something.
#[track_caller]
fn assert_closed_without_forwarding(ns: &Netns, to: SocketAddr) {
    let mut client = ns
        .connect(to)
        .unwrap_or_else(|e| panic!("connect to the proxy at {to}: {e}",));
    // The proxy may already have closed: a write can fail, the read below decides.
    let _ = client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    let mut buf = [0; 64];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{to}: the proxy answered {:?} on a connection that was not redirected",
            String::from_utf8_lossy(&buf[..n]),
        ),
        Err(e) => panic!("{to}: expected the proxy to close the connection, got {e}",),
    }
}

/// Waits until the connection to `to` is recorded as closed, then asserts that it was
/// forwarded once, cleanly, and that the proxy read `read` bytes from the client and wrote
/// `written` to it. Only one connection to `to` may have been made.
#[track_caller]
fn assert_forwarded(
    proxy: &MeshProxy<'_>,
    direction: &str,
    to: SocketAddr,
    read: u64,
    written: u64,
) {
    let target = to.to_string();
    let labels = [("direction", direction), ("target_addr", target.as_str())];
    let metrics = proxy.wait_for_metric("tcp_close_total", &labels, 1.0, METRICS_TIMEOUT);
    let close = [labels[0], labels[1], ("errno", "")];
    assert_eq!(
        metrics.sum("tcp_close_total", &close),
        1.0,
        "{direction} {to}: closed cleanly\n{metrics}"
    );
    assert_eq!(metrics.sum("tcp_open_total", &labels), 1.0, "{metrics}");
    assert_eq!(
        metrics.sum("tcp_open_connections", &labels),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_read_bytes_total", &labels),
        read as f64,
        "{direction} {to}: tcp_read_bytes_total, the bytes the client sent\n{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_write_bytes_total", &labels),
        written as f64,
        "{direction} {to}: tcp_write_bytes_total, the bytes the client received\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Helpers: clients, servers, transfers

/// Connects from `ns` to `to`, with [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
fn connect(ns: &Netns, to: SocketAddr) -> TcpStream {
    let stream = ns
        .connect(to)
        .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", ns.name()));
    set_timeouts(&stream);
    stream
}

/// Waits for a connection on `server`, with [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
fn accept(server: &Listener) -> Accepted {
    let accepted = server.accept_within(ACCEPT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{}: no connection within {ACCEPT_TIMEOUT:?}",
            server.label()
        )
    });
    set_timeouts(&accepted.stream);
    accepted
}

fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
}

fn read_to_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Serves one HTTP/1 request on `server` with `200 OK` and body `ok`, then closes; returns
/// the request head as the server received it.
fn http1_responder(server: &Listener) -> String {
    let mut stream = accept(server).stream;
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("read the request");
        assert_ne!(
            n, 0,
            "the client closed before the end of its request: {head:?}"
        );
        head.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .expect("write the response");
    String::from_utf8_lossy(&head).into_owned()
}

/// When each step of a server-speaks-first exchange happened, from the client's connect.
#[derive(Debug)]
struct Timing {
    /// The server accepted (the proxy connected to it).
    accepted: Duration,
    /// The client received the server's greeting.
    greeting: Duration,
    /// The server received the client's first byte, sent after the greeting.
    client_byte: Duration,
}

/// A server in the peer on `port` that greets first; a client in the pod that connects,
/// waits for the greeting, then answers one byte.
fn server_speaks_first(pods: &Pods, family: Family, port: u16) -> Timing {
    const GREETING: &[u8] = b"220 peer ESMTP ready\r\n";
    let to = SocketAddr::new(family.peer(), port);
    let server = pods.peer.listen("peer greeter", family.any_port(port));
    let start = Instant::now();
    thread::scope(|scope| {
        let greeter = scope.spawn(|| {
            // Past the detect timeout: the proxy connects only after it.
            let mut stream = server
                .accept_within(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{to}: the proxy never connected"))
                .stream;
            let accepted = start.elapsed();
            set_timeouts(&stream);
            stream.write_all(GREETING).expect("write the greeting");
            let mut byte = [0; 1];
            stream
                .read_exact(&mut byte)
                .expect("read the client's byte");
            (accepted, start.elapsed())
        });
        let mut client = connect(&pods.pod, to);
        let mut greeting = vec![0; GREETING.len()];
        client.read_exact(&mut greeting).expect("read the greeting");
        let greeted = start.elapsed();
        assert_eq!(greeting, GREETING, "{to}: the greeting");
        client.write_all(b"x").expect("answer the greeting");
        let (accepted, client_byte) = greeter.join().expect("the greeter");
        Timing {
            accepted,
            greeting: greeted,
            client_byte,
        }
    })
}

/// Sends `up` pseudo-random bytes from `client` to the server that `server` accepts, and
/// `down` bytes back, concurrently, and proves half-close on the way:
///
/// - the client shuts down its write side once it has sent everything, and reads on;
/// - the server sends half of its bytes, then waits until it has read the client's EOF
///   (the FIN went through while the other direction stayed open), then sends the rest
///   and closes, which the client must all receive.
///
/// The client starts sending before the server accepts: on a detected port the proxy
/// connects only once it has seen the client's first bytes.
fn exchange(client: TcpStream, server: &Listener, up: u64, down: u64) -> (Exchange, SocketAddr) {
    thread::scope(|scope| {
        let mut client_writer = client.try_clone().expect("clone the client stream");
        let client_sends = scope.spawn(move || {
            let sent = send(&mut client_writer, 1, up).unwrap_or_else(|e| fail("client send", e));
            client_writer
                .shutdown(Shutdown::Write)
                .unwrap_or_else(|e| fail("client shutdown(write)", e));
            sent
        });
        let mut client_reader = client;
        let client_receives = scope.spawn(move || {
            receive(&mut client_reader).unwrap_or_else(|e| fail("client receive", e))
        });

        let accepted = accept(server);
        let server_saw = accepted.peer;
        let mut server_reader = accepted
            .stream
            .try_clone()
            .expect("clone the server stream");
        let (eof_tx, eof_rx) = mpsc::channel();
        let server_receives = scope.spawn(move || {
            let received =
                receive(&mut server_reader).unwrap_or_else(|e| fail("server receive", e));
            let _ = eof_tx.send(());
            received
        });
        let mut server_writer = accepted.stream;
        let down_sent = {
            let mut bytes = Pattern::new(2);
            let first = down / 2;
            bytes
                .send(&mut server_writer, first)
                .unwrap_or_else(|e| fail("server send (first half)", e));
            if eof_rx.recv_timeout(IO_TIMEOUT).is_err() {
                fail(
                    "server",
                    io::Error::other("no EOF from the client: its FIN was not forwarded"),
                );
            }
            bytes
                .send(&mut server_writer, down - first)
                .unwrap_or_else(|e| fail("server send (after the client's EOF)", e));
            server_writer
                .shutdown(Shutdown::Write)
                .unwrap_or_else(|e| fail("server shutdown(write)", e));
            bytes.finish()
        };

        let exchange = Exchange {
            up_sent: client_sends.join().expect("client sender"),
            up_received: server_receives.join().expect("server receiver"),
            down_sent,
            down_received: client_receives.join().expect("client receiver"),
        };
        (exchange, server_saw)
    })
}

/// Panics with what failed (the proxy's log follows when it is dropped).
fn fail(side: &str, e: io::Error) -> ! {
    panic!("{side}: {e}");
}
