//! HTTP between meshed proxies through meshinit's real rules, counted from the outside:
//! pod A's outbound proxy carries the requests of many client connections (real curl,
//! HTTP/1.1, HTTP/1.0 and HTTP/2) to nginx in pod B over pooled mTLS HTTP/2 connections,
//! one per destination port, which `ss` in A's namespace counts; tcpdump on A's veth sees
//! only TLS between the pods. A WebSocket over HTTP/2 (RFC 8441's extended CONNECT) takes
//! the same pooled connection.

use std::net::SocketAddr;

use netns_tests::apps::{self, curl, url};
use netns_tests::http::*;
use netns_tests::mesh::{contains, Capture, Mesh, INBOUND_PORT, TRANSPORT_ALPN};
use netns_tests::{Family, Pods};

/// Client connections per port: each curl process opens its own.
const CLIENTS: usize = 25;

/// The established TCP connections from pod A to B's inbound proxy port, by `ss`.
fn mtls_connections(pods: &Pods) -> Vec<String> {
    let run = pods
        .pod
        .exec(&[
            "ss",
            "-tnH",
            "state",
            "established",
            &format!("( dport = :{INBOUND_PORT} )"),
        ])
        .expect_ok();
    run.stdout.lines().map(str::to_string).collect()
}

#[test]
fn many_curl_connections_cross_in_ciphertext_over_at_most_two_mtls_connections() {
    let pods = Pods::new("mesh_http_pool");
    let mesh = Mesh::new("mesh_http_pool", &pods);
    let _nginx = nginx_sites(&pods.peer, &mesh.scratch);
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    let secret = format!("SECRET-HEADER-{nonce}");
    let capture = Capture::start(&pods.pod, mesh.scratch.join("mesh_http.pcap"));

    let h1 = SocketAddr::new(Family::V4.peer(), HTTP1);
    let h2c = SocketAddr::new(Family::V4.peer(), H2C);
    let custom = format!("X-Custom: {secret}");
    // Each curl process is a new client connection to A's outbound proxy; nginx echoes
    // Host, method, target, X-Custom and the protocol it was spoken to in.
    for (to, version, server_protocol) in [
        (h1, "--http1.1", "HTTP/1.1"),
        (h1, "--http1.0", "HTTP/1.0"),
        (h2c, "--http2-prior-knowledge", "HTTP/2.0"),
    ] {
        for i in 0..CLIENTS {
            let run = curl(
                &pods.pod,
                &[
                    version,
                    "-H",
                    "Host: Shop.Example:8080",
                    "-H",
                    &custom,
                    &url(to, &format!("/echo?client={i}")),
                ],
            )
            .expect_ok();
            assert_eq!(
                run.stdout,
                format!("Shop.Example:8080 GET /echo?client={i} {secret} {server_protocol}\n"),
                "{run}"
            );
        }
    }
    let wire = capture.stop();

    // One pooled connection per destination (address and port), whatever the number of
    // clients and their HTTP version; HTTP/1.0 and HTTP/1.1 share port 8080's.
    let connections = mtls_connections(&pods);
    assert!(
        (1..=2).contains(&connections.len()),
        "{} connections to B's proxy for {} client connections:\n{}",
        connections.len(),
        3 * CLIENTS,
        connections.join("\n")
    );
    let inbound = [("direction", "inbound")];
    let metrics = b.wait_for_metric(
        "request_total",
        &inbound,
        (3 * CLIENTS) as f64,
        METRICS_TIMEOUT,
    );
    let accepted = metrics.sum(
        "tcp_open_total",
        &[("direction", "inbound"), ("tls", "true")],
    );
    assert!(
        (1.0..=2.0).contains(&accepted),
        "B's proxy accepted {accepted} mTLS connections\n{metrics}"
    );
    expect(
        &a,
        "outbound",
        "request_total",
        h1,
        &[("tls", "true")],
        (2 * CLIENTS) as f64,
    );

    // Between the pods: a TLS handshake offering the transport ALPN, then TLS records;
    // no request, header value or response in the clear.
    assert!(
        contains(&wire, TRANSPORT_ALPN.as_bytes()),
        "no mTLS handshake"
    );
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS application data"
    );
    for plaintext in [
        secret.as_bytes(),
        b"GET /echo",
        b"Shop.Example",
        b"l5d-orig-proto",
    ] {
        assert!(
            !contains(&wire, plaintext),
            "{} crossed the veth in plaintext",
            String::from_utf8_lossy(plaintext)
        );
    }
}

/// RFC 8441: a WebSocket opened by an HTTP/2 extended `CONNECT` from pod A crosses the
/// pooled mTLS HTTP/2 connection to B's proxy like any HTTP/2 request, and its bytes flow
/// both ways: counted with `tls="true"` on both sides.
#[test]
fn a_websocket_over_http2_crosses_the_pooled_mtls_connection() {
    let pods = Pods::new("mesh_ws_h2");
    let mesh = Mesh::new("mesh_ws_h2", &pods);
    let _server = apps::python_server(
        &pods.peer,
        mesh.scratch.path(),
        "ws_h2.py",
        &["serve", &WS_H2.to_string()],
        WS_H2,
    );
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    for (i, family) in Family::ALL.into_iter().enumerate() {
        let to = SocketAddr::new(family.peer(), WS_H2);
        ws_h2_echo(&pods.pod, to);
        let tls = [("tls", "true")];
        expect(&a, "outbound", "request_total", to, &tls, 1.0);
        b.wait_for_metric(
            "request_total",
            &[("direction", "inbound"), ("tls", "true")],
            (i + 1) as f64,
            METRICS_TIMEOUT,
        );
    }
}
