//! meshproxy speaks HTTP, through meshinit's real rules, with real applications: gRPC with
//! grpcio, a WebSocket with websockets, 100 MiB bodies with curl, nginx and Python's
//! http.server (`netns-tests/apps/`, run from the venv scripts/test.sh builds).
//!
//! Both namespaces are meshed in plaintext (`netns_tests::http::mesh_both`): every request
//! passes the pod's outbound proxy and the peer's inbound proxy, and both must count it.
//!
//! - gRPC: `grpc_status="5"` and `classification="failure"` for NOT_FOUND; a bidirectional
//!   streaming call that only progresses if both directions flow.
//! - 100 MiB up (POST, with Content-Length and `Expect: 100-continue`, and chunked) and down
//!   are SHA-256 identical; a slow client and a slow server hold neither proxy's memory
//!   above 64 MiB (backpressure).
//! - WebSocket: echoes after the upgrade, counted as one request; and over HTTP/2's
//!   extended CONNECT (RFC 8441, hypercorn), 2 MB each way.

use std::net::SocketAddr;

use netns_tests::apps::{self, curl, url};
use netns_tests::http::*;
use netns_tests::mesh::Scratch;
use netns_tests::{Family, Pods};

// ---------------------------------------------------------------------------------------
// gRPC

#[test]
fn grpc_not_found_is_a_failure_with_grpc_status_5_and_bidi_streaming_flows_both_ways() {
    let pods = Pods::new("http_grpc");
    let scratch = Scratch::new("http_grpc");
    let _server = apps::python_server(
        &pods.peer,
        scratch.path(),
        "grpc_echo.py",
        &["serve", &GRPC.to_string()],
        GRPC,
    );
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), GRPC);
        let (result, run) = python_call(&pods.pod, "grpc_echo.py", &["call", &to.to_string()]);
        assert_eq!(result["echo"], "hello through the mesh", "{run}");
        assert_eq!(result["missing"]["code"], 5, "{run}");
        assert_eq!(result["missing"]["details"], "no such thing", "{run}");
        let chat = &result["chat"];
        assert_eq!(chat["code"], 0, "{run}");
        assert_eq!(chat["echoed"], chat["sent"], "{run}");
        assert!(result.get("chat_mismatch_at").is_none(), "{run}");

        pair.expect("request_total", to, &[], 3.0);
        pair.expect(
            "response_total",
            to,
            &[("grpc_status", "5"), ("classification", "failure")],
            1.0,
        );
        pair.expect(
            "response_total",
            to,
            &[("grpc_status", "0"), ("classification", "success")],
            2.0,
        );
        expect_connections(&pair.outbound, "outbound", to, "http2", 1.0);
    }
}

// ---------------------------------------------------------------------------------------
// Bodies

#[test]
fn a_100_mib_upload_and_download_are_sha256_identical() {
    const SIZE: u64 = 100 * MIB;
    let pods = Pods::new("http_bulk");
    let scratch = Scratch::new("http_bulk");
    let _nginx = nginx_sites(&pods.peer, &scratch);
    let _sink = apps::python_server(
        &pods.peer,
        scratch.path(),
        "upload_sink.py",
        &[&SINK.to_string()],
        SINK,
    );
    let (big, sha) = random_file(&scratch, SIZE);
    let pair = mesh_both(&pods);
    let big_arg = format!("@{}", big.display());
    for family in Family::ALL {
        // Up: a POST of the file, with Content-Length (and, from curl, `Expect:
        // 100-continue`) for IPv4, chunked for IPv6. The sink answers with what it hashed.
        let to = SocketAddr::new(family.peer(), SINK);
        // `-v`: curl's trace shows the interim `100 Continue` it waited for (without one it
        // would send the body after 1 s anyway).
        let mut args = vec!["-g", "-v", "--fail", "--data-binary", &big_arg];
        if family == Family::V6 {
            args.extend(["-H", "Transfer-Encoding: chunked"]);
        }
        let target = url(to, "/upload");
        args.push(&target);
        let run = curl(&pods.pod, &args).expect_ok();
        assert_eq!(run.stdout, format!("{SIZE} {sha}\n"), "{family:?} upload");
        assert!(run.stderr.contains("> Expect: 100-continue"), "{run}");
        assert!(run.stderr.contains("< HTTP/1.1 100 Continue"), "{run}");
        pair.expect_responses(to, "200", "success", 1.0);

        // Down: nginx serves the file, curl hashes what arrives.
        let to = SocketAddr::new(family.peer(), HTTP1);
        assert_fetched_sha256(
            &pods.pod,
            r#"curl -sS -g --fail --noproxy '*' --max-time 120"#,
            &url(to, "/big"),
            &sha,
        );
        pair.expect_responses(to, "200", "success", 1.0);
    }
}

#[test]
fn a_slow_client_and_a_slow_server_hold_neither_proxy_above_64_mib_for_100_mib_bodies() {
    const SIZE: u64 = 100 * MIB;
    /// Well above a streaming proxy's resident memory (about 20 MiB in a debug build), well
    /// below a body held whole.
    const MAX_PEAK_MIB: u64 = 64;
    let pods = Pods::new("http_backpressure");
    let scratch = Scratch::new("http_backpressure");
    let _nginx = nginx_sites(&pods.peer, &scratch);
    let _sink = apps::python_server(
        &pods.peer,
        scratch.path(),
        "upload_sink.py",
        &[&SINK.to_string()],
        SINK,
    );
    let (big, sha) = random_file(&scratch, SIZE);
    let pair = mesh_both(&pods);
    let assert_peaks = |after: &str| {
        for (proxy, side) in [(&pair.outbound, "outbound"), (&pair.inbound, "inbound")] {
            let peak = peak_rss_mib(proxy.pid());
            assert!(
                peak < MAX_PEAK_MIB,
                "the {side} proxy's peak RSS is {peak} MiB after {after}: a body was held \
                 in memory instead of streamed with backpressure"
            );
        }
    };

    // Down, to a client reading at 50 MB/s (2 s) while nginx could send far faster.
    let to = SocketAddr::new(Family::V4.peer(), HTTP1);
    assert_fetched_sha256(
        &pods.pod,
        r#"curl -sS --fail --noproxy '*' --max-time 120 --limit-rate 50M"#,
        &url(to, "/big"),
        &sha,
    );
    assert_peaks("a 100 MiB download by a slow client");

    // Up, to a server reading at about 30 MB/s while curl could send far faster.
    let to = SocketAddr::new(Family::V4.peer(), SINK);
    let big_arg = format!("@{}", big.display());
    let run = curl(
        &pods.pod,
        &["--fail", "--data-binary", &big_arg, &url(to, "/slow")],
    )
    .expect_ok();
    assert_eq!(run.stdout, format!("{SIZE} {sha}\n"), "{run}");
    assert_peaks("a 100 MiB upload to a slow server");
}

// ---------------------------------------------------------------------------------------
// WebSocket

#[test]
fn a_websocket_echoes_after_the_upgrade_and_counts_as_one_request() {
    let pods = Pods::new("http_websocket");
    let scratch = Scratch::new("http_websocket");
    let _server = apps::python_server(
        &pods.peer,
        scratch.path(),
        "ws_echo.py",
        &["serve", &WS.to_string()],
        WS,
    );
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), WS);
        let (result, run) = python_call(&pods.pod, "ws_echo.py", &["call", &format!("ws://{to}/")]);
        assert_eq!(result["status"], 101, "{run}");
        assert_eq!(result["echoed"], result["sent"], "{run}");
        assert!(result.get("mismatch_at").is_none(), "{run}");
        pair.expect("request_total", to, &[], 1.0);
        pair.expect_responses(to, "101", "success", 1.0);
    }
}

/// RFC 8441: a WebSocket opened by an HTTP/2 extended `CONNECT` (`:protocol websocket`)
/// travels on the HTTP/2 connections like any request (the pod's proxy's pooled one to
/// the peer's proxy included), and its bytes flow both ways once the server answers 200.
#[test]
fn a_websocket_over_http2_extended_connect_echoes_and_counts_as_one_request() {
    let pods = Pods::new("http_ws_h2");
    let scratch = Scratch::new("http_ws_h2");
    let _server = apps::python_server(
        &pods.peer,
        scratch.path(),
        "ws_h2.py",
        &["serve", &WS_H2.to_string()],
        WS_H2,
    );
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), WS_H2);
        ws_h2_echo(&pods.pod, to);
        pair.expect("request_total", to, &[], 1.0);
        pair.expect_responses(to, "200", "success", 1.0);
    }
}
