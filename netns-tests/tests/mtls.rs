//! Mutual TLS between two real meshproxies (issue 5), with meshinit's real rules in both
//! pods: pod A is [`Pods::pod`] (198.18.0.1, fd00:18::1, `a.default.mesh.local`), pod B is
//! [`Pods::peer`] (198.18.0.2, fd00:18::2, `b.default.mesh.local`). Certificates are made at
//! test time by `meshproxy identity`, in a scratch directory removed with the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use netns_tests::mesh::{
    contains, first_pem_block, redis_cli, s_client, start_redis, transport_header, Capture, DevCa,
    Mesh, INBOUND_PORT, PEER_ID, POD_ID, TRANSPORT_ALPN,
};
use netns_tests::{Family, MeshProxy, Pods, ACCEPT_TIMEOUT};

/// No stall anywhere on the path: 6379 is opaque on both proxies, so neither waits for
/// bytes to detect a protocol (a stall would show as the 10 s detect timeout). The bound
/// includes starting `redis-cli` through `ip netns exec` and a first mTLS handshake in
/// a debug build, on a 2-core CI machine running other tests at the same time (571 ms
/// was seen there), so it is far from the stall but not tight.
const NO_DELAY: Duration = Duration::from_secs(2);

/// How long a counter may take to show what a client just saw.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

fn target(family: Family, port: u16) -> String {
    SocketAddr::new(family.peer(), port).to_string()
}

/// `redis-cli ARGS…` from pod A to pod B's address, which must succeed within
/// [`NO_DELAY`] and print `want`.
#[track_caller]
fn redis_from_a(
    pods: &Pods,
    family: Family,
    args: &[&str],
    want: &str,
    proxies: [&MeshProxy<'_>; 2],
) {
    let started = Instant::now();
    let run = redis_cli(&pods.pod, family.peer(), args);
    let took = started.elapsed();
    let logs = || format!("{}\n{}", proxies[0].report(), proxies[1].report());
    assert!(
        run.success() && run.stdout.trim() == want,
        "expected {want:?}\n{run}\n{}",
        logs()
    );
    assert!(
        took < NO_DELAY,
        "`{}` took {took:?}\n{}",
        run.command,
        logs()
    );
}

fn redis_through_mtls(family: Family, test_name: &str) {
    let pods = Pods::new(test_name);
    let mesh = Mesh::new(test_name, &pods);
    let _redis = start_redis(&pods.peer, mesh.scratch.path());
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);

    redis_from_a(&pods, family, &["SET", "k", "v"], "OK", [&a, &b]);
    redis_from_a(&pods, family, &["GET", "k"], "v", [&a, &b]);

    let redis = target(family, 6379);
    a.wait_for_metric(
        "tcp_open_total",
        &[
            ("direction", "outbound"),
            ("target_addr", &redis),
            ("protocol", "opaque"),
            ("tls", "true"),
            ("server_id", PEER_ID),
        ],
        2.0,
        METRIC_TIMEOUT,
    );
    b.wait_for_metric(
        "tcp_open_total",
        &[
            ("direction", "inbound"),
            ("target_addr", &redis),
            ("protocol", "opaque"),
            ("tls", "true"),
            ("client_id", POD_ID),
        ],
        2.0,
        METRIC_TIMEOUT,
    );
    // And nothing went around the mesh in plaintext.
    for proxy in [&a, &b] {
        let metrics = proxy.metrics();
        assert_eq!(
            metrics.sum("tcp_open_total", &[("tls", "false")]),
            0.0,
            "a plaintext hop\n{metrics}"
        );
        assert_eq!(
            metrics.sum("tls_handshake_failures_total", &[]),
            0.0,
            "{metrics}"
        );
    }
}

#[test]
fn redis_cli_reaches_redis_server_in_the_other_pod_through_mtls_ipv4() {
    redis_through_mtls(Family::V4, "mtls-redis-v4");
}

#[test]
fn redis_cli_reaches_redis_server_in_the_other_pod_through_mtls_ipv6() {
    redis_through_mtls(Family::V6, "mtls-redis-v6");
}

/// Captures the veth while pod A sets `value` in pod B's Redis, and returns the capture.
fn capture_set(
    pods: &Pods,
    mesh: &Mesh,
    name: &str,
    value: &str,
    proxies: [&MeshProxy<'_>; 2],
) -> Vec<u8> {
    let capture = Capture::start(&pods.pod, mesh.scratch.join(name));
    redis_from_a(pods, Family::V4, &["SET", "secret", value], "OK", proxies);
    redis_from_a(pods, Family::V4, &["GET", "secret"], value, proxies);
    capture.stop()
}

#[test]
fn the_payload_never_crosses_the_veth_in_plaintext() {
    let pods = Pods::new("mtls-capture");
    let mesh = Mesh::new("mtls-capture", &pods);
    let _redis = start_redis(&pods.peer, mesh.scratch.path());
    let b = mesh.start_b(&pods, &[]);
    // Unique per run, so it cannot be in the capture by accident.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    let preamble = b"transport.l5d.io/v1\r\n\r\n";

    let meshed = format!("SECRET-PAYLOAD-{nonce}-meshed");
    let wire = {
        let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
        capture_set(&pods, &mesh, "meshed.pcap", &meshed, [&a, &b])
    };
    // A TLS 1.3 ClientHello offering our ALPN (the ALPN list is in the clear), and TLS
    // application data records: the capture saw the mTLS hop.
    assert!(
        contains(&wire, TRANSPORT_ALPN.as_bytes()),
        "no ClientHello with our ALPN in the capture"
    );
    assert!(
        contains(&wire, &[0x16, 0x03, 0x01]),
        "no TLS handshake record in the capture"
    );
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS application data in the capture"
    );
    assert!(
        !contains(&wire, meshed.as_bytes()),
        "the payload {meshed} crossed the veth in plaintext"
    );
    assert!(
        !contains(&wire, b"SECRET-PAYLOAD"),
        "part of the payload crossed the veth in plaintext"
    );
    assert!(
        !contains(&wire, preamble),
        "the transport header crossed the veth in plaintext"
    );
    assert!(
        !contains(&wire, b"$6\r\nsecret"),
        "the Redis command crossed the veth in plaintext"
    );

    // Control: the same exchange with A not meshing B (no --mesh-peers) is plaintext, and
    // the same capture sees it: the check above can fail.
    let plain = format!("SECRET-PAYLOAD-{nonce}-plain");
    let wire = {
        let a = mesh.start_a(&pods, None, &[]);
        capture_set(&pods, &mesh, "plain.pcap", &plain, [&a, &b])
    };
    assert!(
        contains(&wire, plain.as_bytes()),
        "the capture missed the plaintext payload: it proves nothing"
    );
    assert!(
        !contains(&wire, TRANSPORT_ALPN.as_bytes()),
        "mTLS without --mesh-peers"
    );
}

#[test]
fn clients_without_a_certificate_of_the_mesh_are_refused_on_4143_and_counted() {
    const APP_PORT: u16 = 7777;
    let pods = Pods::new("mtls-refusals");
    let mesh = Mesh::new("mtls-refusals", &pods);
    let b = mesh.start_b(&pods, &[]);
    // The application the transport header names: it must see only the trusted client.
    let app = pods.peer.listen("pod B app", Family::V4.any_port(APP_PORT));
    let header = mesh.scratch.join("header.bin");
    std::fs::write(&header, transport_header(APP_PORT)).expect("write the header");
    let to = SocketAddr::new(Family::V4.peer(), INBOUND_PORT);
    let other_ca = DevCa::new(mesh.scratch.join("other-ca"));
    // Same name as A, wrong CA.
    let impostor = other_ca.issue(POD_ID, &mesh.scratch.join("impostor"));

    // Control: the same client with A's certificate reaches the application.
    let run = s_client(&pods.pod, to, Some(&mesh.a), &mesh.ca.anchors, &header);
    assert!(
        app.accept_within(ACCEPT_TIMEOUT).is_some(),
        "a client with A's certificate and the header did not reach the app\n{run}\n{}",
        b.report()
    );
    b.wait_for_metric(
        "tcp_open_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("client_id", POD_ID),
        ],
        1.0,
        METRIC_TIMEOUT,
    );

    for (client, reason) in [(None, "no_client_cert"), (Some(&impostor), "untrusted")] {
        let run = s_client(&pods.pod, to, client, &mesh.ca.anchors, &header);
        b.wait_for_metric(
            "tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", reason)],
            1.0,
            METRIC_TIMEOUT,
        );
        if let Some(accepted) = app.accept_within(Duration::from_millis(300)) {
            panic!(
                "{reason}: the app got a connection from {}\n{run}\n{}",
                accepted.peer,
                b.report()
            );
        }
    }
    let metrics = b.metrics();
    assert_eq!(
        metrics.sum("tls_handshake_failures_total", &[]),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_open_total", &[("direction", "inbound")]),
        1.0,
        "only the trusted client may be forwarded\n{metrics}"
    );
}

/// The certificate B's proxy presents on 4143 to a client with A's certificate.
#[track_caller]
fn presented_by_b(pods: &Pods, mesh: &Mesh, proxy: &MeshProxy<'_>) -> String {
    let input = mesh.scratch.join("ping.bin");
    let mut bytes = transport_header(6379);
    bytes.extend_from_slice(b"PING\r\n");
    std::fs::write(&input, bytes).expect("write the input");
    let to = SocketAddr::new(Family::V4.peer(), INBOUND_PORT);
    let run = s_client(&pods.pod, to, Some(&mesh.a), &mesh.ca.anchors, &input);
    assert!(
        run.stdout.contains("Verify return code: 0 (ok)"),
        "B's certificate does not verify against the CA\n{run}\n{}",
        proxy.report()
    );
    first_pem_block(&run.stdout)
        .unwrap_or_else(|| panic!("no server certificate printed\n{run}\n{}", proxy.report()))
}

/// `PING` on an open connection to Redis: `+PONG`.
#[track_caller]
fn ping(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set a read timeout");
    stream.write_all(b"PING\r\n").expect("send PING");
    let mut reply = [0u8; 7];
    stream
        .read_exact(&mut reply)
        .expect("read the reply to PING");
    assert_eq!(&reply, b"+PONG\r\n");
}

#[test]
fn a_certificate_rotated_on_disk_is_used_by_new_connections_and_open_ones_survive() {
    let pods = Pods::new("mtls-rotation");
    let mesh = Mesh::new("mtls-rotation", &pods);
    let _redis = start_redis(&pods.peer, mesh.scratch.path());
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let redis = SocketAddr::new(Family::V4.peer(), 6379);

    // Opened before the rotation, through both proxies (root in A is redirected).
    let mut held = pods
        .pod
        .connect(redis)
        .expect("connect to Redis through the mesh");
    ping(&mut held);
    let old = mesh.b.cert_pem();
    assert_eq!(
        presented_by_b(&pods, &mesh, &b),
        old,
        "B presents another certificate than its file"
    );

    // The rotation: a new certificate and key for the same identity, renamed into place.
    let rotated = mesh.ca.issue(PEER_ID, &mesh.scratch.join("b"));
    let new = rotated.cert_pem();
    assert_ne!(
        new, old,
        "`identity issue` wrote the same certificate again"
    );

    assert_eq!(
        presented_by_b(&pods, &mesh, &b),
        new,
        "a new connection still gets the old certificate\n{}",
        b.report()
    );
    // A new connection through the mesh (A verifies the new certificate)…
    redis_from_a(&pods, Family::V4, &["PING"], "PONG", [&a, &b]);
    // …and the one opened before still works.
    ping(&mut held);
    a.wait_for_metric(
        "tcp_open_total",
        &[
            ("direction", "outbound"),
            ("tls", "true"),
            ("server_id", PEER_ID),
        ],
        2.0,
        METRIC_TIMEOUT,
    );
}
