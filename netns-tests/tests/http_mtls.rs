//! HTTP between meshed proxies, through meshinit's real rules: pod A and pod B with
//! identities from a throwaway CA (`netns_tests::mesh::Mesh`), so a request from A to B
//! crosses A's outbound proxy, mTLS, and B's inbound proxy.
//!
//! - 200 client connections making one request each share a handful of mTLS connections
//!   between the proxies (HTTP multiplexed over pooled HTTP/2 between them).
//! - HTTP/1.1 reaches nginx unchanged, gRPC statuses and a bidirectional stream and a
//!   WebSocket cross the mTLS hop, counted with `tls="true"` (for an outbound request, as in
//!   Linkerd and in the TCP metrics: the hop to the destination is mTLS).

use std::net::SocketAddr;

use netns_tests::apps::{self, curl, h2load, h2load_requests, url};
use netns_tests::http::*;
use netns_tests::mesh::{Mesh, PEER_ID, POD_ID};
use netns_tests::{Family, MeshProxy, Pods, Run};

#[test]
fn over_mtls_200_client_connections_share_a_handful_of_proxy_connections() {
    const CLIENTS: u64 = 200;
    /// "A handful": the pool may race a few connections open at first, never one per client.
    const MAX_MTLS_CONNECTIONS: f64 = 5.0;
    let pods = Pods::new("http_mtls_pool");
    let mesh = Mesh::new("http_mtls_pool", &pods);
    let _nginx = nginx_sites(&pods.peer, &mesh.scratch);
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let to = SocketAddr::new(Family::V4.peer(), HTTP1);

    // 200 HTTP/1.1 connections at once, one request each.
    let clients = CLIENTS.to_string();
    let run = h2load(
        &pods.pod,
        &["--h1", "-n", &clients, "-c", &clients],
        to,
        "/ok",
    );
    assert_eq!(h2load_requests(&run, "succeeded"), CLIENTS, "{run}");

    expect(&a, "outbound", "request_total", to, &[], CLIENTS as f64);
    expect_connections(&a, "outbound", to, "http1", CLIENTS as f64);
    // B's inbound proxy: which address it labels a request that came over mTLS with is
    // its own business; it has no other inbound traffic.
    let inbound = [("direction", "inbound")];
    let metrics = b.wait_for_metric("request_total", &inbound, CLIENTS as f64, METRICS_TIMEOUT);
    b.wait_for_metric(
        "response_total",
        &[
            ("direction", "inbound"),
            ("status_code", "200"),
            ("classification", "success"),
            ("tls", "true"),
        ],
        CLIENTS as f64,
        METRICS_TIMEOUT,
    );
    // The mTLS connections B's inbound proxy accepted from A's.
    let mtls = metrics.sum(
        "tcp_open_total",
        &[("direction", "inbound"), ("tls", "true")],
    );
    assert!(
        (1.0..=MAX_MTLS_CONNECTIONS).contains(&mtls),
        "{mtls} mTLS connections between the proxies for {CLIENTS} client connections\n{metrics}"
    );
}

#[test]
fn over_mtls_http1_grpc_and_websocket_reach_the_application_unchanged_and_are_counted() {
    let pods = Pods::new("http_mtls_apps");
    let mesh = Mesh::new("http_mtls_apps", &pods);
    let _nginx = nginx_sites(&pods.peer, &mesh.scratch);
    let _grpc = apps::python_server(
        &pods.peer,
        mesh.scratch.path(),
        "grpc_echo.py",
        &["serve", &GRPC.to_string()],
        GRPC,
    );
    let _ws = apps::python_server(
        &pods.peer,
        mesh.scratch.path(),
        "ws_echo.py",
        &["serve", &WS.to_string()],
        WS,
    );
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let tls = [("tls", "true")];

    // HTTP/1.1, carried between the proxies however they like, reaches nginx as the
    // client sent it: Host with its case, method, path and query, a custom header, the
    // protocol version.
    let to = SocketAddr::new(Family::V4.peer(), HTTP1);
    assert_echo_unchanged(&pods.pod, to);
    let run = curl(
        &pods.pod,
        &["-w", "%{http_code}", "-o", "/dev/null", &url(to, "/fail")],
    )
    .expect_ok();
    assert_eq!(run.stdout, "503", "{run}");
    expect(&a, "outbound", "request_total", to, &tls, 2.0);
    expect_one_mtls_failure(&a, &b, to, ("status_code", "503"));

    // gRPC: statuses in trailers and a bidirectional stream, across the mTLS hop.
    let to = SocketAddr::new(Family::V4.peer(), GRPC);
    let (result, run) = python_call(&pods.pod, "grpc_echo.py", &["call", &to.to_string()]);
    assert_eq!(result["echo"], "hello through the mesh", "{run}");
    assert_eq!(result["missing"]["code"], 5, "{run}");
    assert_eq!(result["chat"]["code"], 0, "{run}");
    assert_eq!(result["chat"]["echoed"], result["chat"]["sent"], "{run}");
    expect_one_mtls_failure(&a, &b, to, ("grpc_status", "5"));

    // A WebSocket, upgraded across the mTLS hop.
    let to = SocketAddr::new(Family::V4.peer(), WS);
    let (result, run) = python_call(&pods.pod, "ws_echo.py", &["call", &format!("ws://{to}/")]);
    assert_eq!(result["status"], 101, "{run}");
    assert_eq!(result["echoed"], result["sent"], "{run}");
    expect(&a, "outbound", "request_total", to, &tls, 1.0);
}

/// Waits until `a` (outbound, to `to`) and `b` (inbound) each count one response over
/// mTLS with `label`, classified as a failure.
#[track_caller]
fn expect_one_mtls_failure(
    a: &MeshProxy<'_>,
    b: &MeshProxy<'_>,
    to: SocketAddr,
    label: (&str, &str),
) {
    let labels = [label, ("classification", "failure"), ("tls", "true")];
    expect(a, "outbound", "response_total", to, &labels, 1.0);
    let mut inbound = vec![("direction", "inbound")];
    inbound.extend_from_slice(&labels);
    b.wait_for_metric("response_total", &inbound, 1.0, METRICS_TIMEOUT);
}

/// A WebSocket to a mesh peer crosses on a connection of its own (session protocol
/// HTTP/1): B's inbound proxy serves it as HTTP/1, so it counts the request with A's
/// identity and the 101, like A's outbound proxy does with B's, and then carries the
/// upgraded bytes both ways (1 MiB messages echoed unchanged).
#[test]
fn a_websocket_to_a_mesh_peer_is_counted_with_its_101_by_both_proxies() {
    let pods = Pods::new("http_mtls_ws");
    let mesh = Mesh::new("http_mtls_ws", &pods);
    let _ws = apps::python_server(
        &pods.peer,
        mesh.scratch.path(),
        "ws_echo.py",
        &["serve", &WS.to_string()],
        WS,
    );
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let to = SocketAddr::new(Family::V4.peer(), WS);
    for _ in 0..2 {
        let (result, run) = python_call(&pods.pod, "ws_echo.py", &["call", &format!("ws://{to}/")]);
        assert_eq!(result["status"], 101, "{run}");
        assert_eq!(result["echoed"], result["sent"], "{run}");
    }
    let switched = [
        ("status_code", "101"),
        ("classification", "success"),
        ("tls", "true"),
    ];
    let mut outbound = vec![("server_id", PEER_ID)];
    outbound.extend_from_slice(&switched);
    expect(&a, "outbound", "response_total", to, &outbound, 2.0);
    let mut inbound = vec![("direction", "inbound"), ("client_id", POD_ID)];
    let metrics = b.wait_for_metric("request_total", &inbound, 2.0, METRICS_TIMEOUT);
    inbound.extend_from_slice(&switched);
    b.wait_for_metric("response_total", &inbound, 2.0, METRICS_TIMEOUT);
    // Each WebSocket had its own mTLS connection, which B labels with the session's
    // protocol.
    assert_eq!(
        metrics.sum(
            "tcp_open_total",
            &[
                ("direction", "inbound"),
                ("protocol", "http1"),
                ("tls", "true"),
                ("client_id", POD_ID)
            ]
        ),
        2.0,
        "{metrics}"
    );
}

/// A `CONNECT` to a mesh peer (curl through tinyproxy in pod B) crosses on a connection
/// of its own like an upgrade: B's inbound proxy serves it as HTTP/1, counts the request
/// and its 200 with A's identity, and then carries the tunnel, through which curl fetches
/// a file from B's nginx.
#[test]
fn a_connect_tunnel_to_a_mesh_peer_is_counted_by_both_proxies() {
    const PROXY: u16 = 3128;
    let pods = Pods::new("http_mtls_connect");
    let mesh = Mesh::new("http_mtls_connect", &pods);
    let _nginx = nginx_sites(&pods.peer, &mesh.scratch);
    let _tinyproxy = apps::tinyproxy(&pods.peer, mesh.scratch.path(), PROXY);
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let to = SocketAddr::new(Family::V4.peer(), PROXY);
    // `-p`: CONNECT to tinyproxy, then the GET through the tunnel, to nginx on B's
    // loopback (where tinyproxy connects).
    let run = Run::of(pods.pod.command("curl").args([
        "-sS",
        "--max-time",
        "60",
        "-p",
        "-x",
        &url(to, ""),
        &format!("http://127.0.0.1:{HTTP1}/small"),
    ]));
    assert!(run.success(), "{run}");
    assert_eq!(run.stdout, "a small file\n", "{run}");
    let established = [
        ("status_code", "200"),
        ("classification", "success"),
        ("tls", "true"),
    ];
    let mut outbound = vec![("server_id", PEER_ID)];
    outbound.extend_from_slice(&established);
    expect(
        &a,
        "outbound",
        "request_total",
        to,
        &[("server_id", PEER_ID)],
        1.0,
    );
    expect(&a, "outbound", "response_total", to, &outbound, 1.0);
    let mut inbound = vec![("direction", "inbound"), ("client_id", POD_ID)];
    b.wait_for_metric("request_total", &inbound, 1.0, METRICS_TIMEOUT);
    inbound.extend_from_slice(&established);
    b.wait_for_metric("response_total", &inbound, 1.0, METRICS_TIMEOUT);
}
