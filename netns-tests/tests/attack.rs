//! meshproxy's HTTP paths from the attacker's side: what an unauthenticated client (or a
//! mesh peer with a valid certificate, or a hostile destination) can send is bounded in
//! memory, time, descriptors and metric series, and the proxy still serves a normal request
//! afterwards. Each test names the bound it proves; docs/attacks.md lists them all.
//!
//! The victim is mostly the peer's inbound proxy (meshinit's default rules, meshproxy in
//! plaintext, nginx behind it), attacked from the pod, which is not meshed: "plaintext
//! HTTP from anywhere". Two tests attack the same HTTP/2 server elsewhere: as a mesh peer
//! with a valid certificate over mTLS, and as an application through the pod's outbound
//! proxy. The HTTP/2 attacks are raw frames from `apps/h2_attack.py` (hyperframe and hpack,
//! from the test venv); the HTTP/1 ones are raw sockets.
//!
//! - HTTP/2: rapid reset, MadeYouReset, CONTINUATION flood, a 1 MB header list, 600 and 2,000 streams,
//!   PING and SETTINGS floods, an idle connection, 400 streams never read, a stream and
//!   a WebSocket tunnel whose window stays shut.
//! - HTTP/1: a trickled head (first and kept-alive), endless header lines, bad chunk sizes
//!   and extensions, a million pipelined requests never read, bodies framed two ways
//!   (request smuggling), a client cut by the write timeout.
//! - Metric series: a destination answering 3,200 status and gRPC status pairs.
//! - Descriptors: 300 idle admin connections.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use netns_tests::apps::{self, curl, url};
use netns_tests::http::*;
use netns_tests::mesh::{Mesh, Scratch};
use netns_tests::{Family, MeshProxy, Netns, Pods};
use serde_json::Value;

/// HTTP/2's ENHANCE_YOUR_CALM and REFUSED_STREAM error codes.
const ENHANCE_YOUR_CALM: u64 = 0xb;
const REFUSED_STREAM: &str = "7";
const CANCEL: u64 = 0x8;

/// The victim: the peer's inbound proxy (started by [`Victim::proxy`]) with nginx behind
/// it.
struct Victim {
    pods: Pods,
    scratch: Scratch,
    _nginx: apps::App,
}

impl Victim {
    fn new(name: &str) -> Victim {
        let pods = Pods::new(name);
        let scratch = Scratch::new(name);
        let nginx = nginx_sites(&pods.peer, &scratch);
        pods.peer.meshinit(&["apply"]).expect_ok();
        Victim {
            pods,
            scratch,
            _nginx: nginx,
        }
    }

    fn proxy(&self, extra: &[&str]) -> MeshProxy<'_> {
        self.pods.peer.start_meshproxy(extra)
    }

    /// A file of `bytes` bytes that nginx serves at `/name`.
    fn file(&self, name: &str, bytes: usize) {
        fs::write(self.scratch.join("www").join(name), vec![b'x'; bytes]).unwrap();
    }

    /// Runs `h2_attack.py MODE` against nginx's HTTP/2 port through the proxy; its report.
    fn h2(&self, mode: &str, args: &[&str]) -> Value {
        h2_attack(&self.pods.pod, mode, to(H2C), args)
    }

    /// A normal request gets nginx's answer through the proxy: it still serves.
    #[track_caller]
    fn still_serves(&self) {
        for (flag, port) in [("--http1.1", HTTP1), ("--http2-prior-knowledge", H2C)] {
            let run = curl(
                &self.pods.pod,
                &[
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    flag,
                    &url(to(port), "/ok"),
                ],
            );
            assert_eq!(run.stdout, "200", "{flag} after the attack\n{run}");
        }
    }
}

/// nginx's `port` on the peer's IPv4 address (redirected to the inbound proxy).
fn to(port: u16) -> SocketAddr {
    SocketAddr::new(Family::V4.peer(), port)
}

fn h2_attack(ns: &Netns, mode: &str, to: SocketAddr, args: &[&str]) -> Value {
    let port = to.port().to_string();
    let host = to.ip().to_string();
    let mut all = vec![mode, host.as_str(), port.as_str()];
    all.extend_from_slice(args);
    let run = apps::python_client(ns, "h2_attack.py", &all).expect_ok();
    let report: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("h2_attack.py {mode}: {e}\n{run}"));
    eprintln!("h2_attack.py {mode}: {report}");
    report
}

/// The resident set size of `proxy`, in KiB.
fn rss_kib(proxy: &MeshProxy<'_>) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The descriptors `proxy` holds open.
fn open_fds(proxy: &MeshProxy<'_>) -> usize {
    fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .count()
}

// ---------------------------------------------------------------------------------------
// HTTP/2

#[test]
fn h2_rapid_reset_is_answered_with_a_goaway() {
    const PAIRS: u64 = 20_000;
    let victim = Victim::new("atk_rapid_reset");
    let proxy = victim.proxy(&[]);
    let report = victim.h2("rapid-reset", &["--count", &PAIRS.to_string()]);
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    assert_eq!(report["closed"], true, "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent < PAIRS, "all {PAIRS} pairs were taken: {report}");
    // The reset streams were dropped before their requests went anywhere.
    let requests = proxy.metrics().sum("request_total", &[]);
    assert!(
        requests < sent as f64,
        "{requests} requests proxied of {sent}"
    );
    victim.still_serves();
}

/// MadeYouReset (CVE-2025-8671): the client makes the server reset its streams (a body
/// longer than its `content-length`), so the requests were taken up but the client's
/// own resets count nothing. The proxy's resets are bounded like the client's:
/// past `MAX_ERROR_RESETS` (1,024) the connection gets a GOAWAY.
#[test]
fn h2_made_you_reset_is_answered_with_a_goaway() {
    const STREAMS: u64 = 20_000;
    /// HTTP/2's PROTOCOL_ERROR.
    const PROTOCOL_ERROR: &str = "1";
    let victim = Victim::new("atk_made_reset");
    let proxy = victim.proxy(&[]);
    let report = victim.h2("made-you-reset", &["--count", &STREAMS.to_string()]);
    // The GOAWAY may be lost: the proxy closes with the client's frames unread, and the
    // reset that sends can overtake it. The connection's end is not.
    assert_eq!(report["closed"], true, "{report}");
    if !report["goaway"].is_null() {
        assert_eq!(
            report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
            "{report}"
        );
    }
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent < STREAMS, "all {STREAMS} streams were taken: {report}");
    let resets = report["resets"][PROTOCOL_ERROR].as_u64().unwrap_or(0);
    assert!(
        (1..=1100).contains(&resets),
        "{resets} streams reset by the proxy: {report}"
    );
    let requests = proxy.metrics().sum("request_total", &[]);
    assert!(requests <= 1100.0, "{requests} requests proxied of {sent}");
    victim.still_serves();
}

#[test]
fn h2_continuation_flood_is_cut_after_a_few_frames() {
    const FRAMES: u64 = 100_000;
    let victim = Victim::new("atk_continuation");
    let _proxy = victim.proxy(&[]);
    let report = victim.h2("continuation", &["--count", &FRAMES.to_string()]);
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    assert_eq!(
        report["goaway"]["debug"], "too_many_continuations",
        "{report}"
    );
    // Sent in batches of 100 until the GOAWAY was seen: one or two batches.
    assert!(report["sent"].as_u64().unwrap() <= 1000, "{report}");
    victim.still_serves();
}

#[test]
fn h2_header_list_over_64_kib_is_refused() {
    let victim = Victim::new("atk_big_headers");
    let proxy = victim.proxy(&[]);
    let report = victim.h2("big-headers", &["--size", "1000000"]);
    let big = &report["big"];
    // A block this far past the limit is not even decoded: the connection is closed.
    assert_eq!(big["closed"], true, "{report}");
    assert!(big["statuses"].get("200").is_none(), "{report}");
    assert_eq!(proxy.metrics().sum("request_total", &[]), 0.0);
    victim.still_serves();
}

#[test]
fn h2_streams_past_the_limit_are_refused() {
    /// `MAX_CONCURRENT_STREAMS` in proxy/src/http/server.rs.
    const LIMIT: u64 = 512;
    const STREAMS: u64 = 600;
    let victim = Victim::new("atk_streams");
    // A response larger than the client's 64 KiB window, which it never opens: each
    // stream stays open.
    victim.file("big", 1 << 20);
    let _proxy = victim.proxy(&[]);
    let streams = STREAMS.to_string();
    let report = victim.h2(
        "streams",
        &["--count", &streams, "--path", "/big", "--hold", "2"],
    );
    assert_eq!(report["max_concurrent_streams"], LIMIT, "{report}");
    assert_eq!(
        report["resets"][REFUSED_STREAM],
        STREAMS - LIMIT,
        "the streams past {LIMIT} are refused: {report}"
    );
    // Refusing costs the proxy a reset each: past `MAX_ERROR_RESETS` (1,024) of them
    // the client is told to calm down.
    let report = victim.h2(
        "streams",
        &["--count", "2000", "--path", "/big", "--hold", "2"],
    );
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    victim.still_serves();
}

#[test]
fn h2_an_idle_connection_is_closed_at_the_header_read_timeout() {
    const TIMEOUT: f64 = 2.0;
    let victim = Victim::new("atk_h2_idle");
    victim.file("big", 1 << 20);
    let _proxy = victim.proxy(&["--http-header-read-timeout", "2s"]);
    // One request, then nothing: a GOAWAY (NO_ERROR) once idle for the timeout. The
    // client does not answer the PING that h2's graceful close waits for, so the proxy
    // drops the connection one more timeout later.
    let report = victim.h2("idle", &["--path", "/ok", "--hold", "8"]);
    assert_eq!(report["statuses"]["200"], 1, "{report}");
    assert_eq!(report["goaway"]["error_code"], 0, "{report}");
    assert_eq!(report["closed"], true, "{report}");
    let goaway = report["goaway_after_response"].as_f64().unwrap();
    assert!(
        (TIMEOUT - 0.3..TIMEOUT + 1.5).contains(&goaway),
        "GOAWAY {goaway} s after the response: {report}"
    );
    let closed = report["closed_after_response"].as_f64().unwrap();
    assert!(
        (2.0 * TIMEOUT - 0.3..2.0 * TIMEOUT + 2.0).contains(&closed),
        "closed {closed} s after the response: {report}"
    );
    // A request in flight for twice the timeout (a response the client does not read)
    // keeps the connection.
    let report = victim.h2(
        "streams",
        &["--count", "1", "--path", "/big", "--hold", "4"],
    );
    assert_eq!(report["goaway"], Value::Null, "{report}");
    assert_eq!(report["closed"], false, "{report}");
    victim.still_serves();
}

#[test]
fn h2_ping_and_settings_floods_are_read_no_faster_than_answered() {
    const FRAMES: u64 = 2_000_000;
    /// The kernel's socket buffers hold a few MB of frames; the proxy must not.
    const MAX_GROWTH_KIB: u64 = 8 << 10;
    let victim = Victim::new("atk_ping_flood");
    let proxy = victim.proxy(&[]);
    let before = rss_kib(&proxy);
    for mode in ["ping-flood", "settings-flood"] {
        let report = victim.h2(mode, &["--count", &FRAMES.to_string()]);
        assert_eq!(report["blocked"], true, "{mode}: {report}");
        assert!(report["written"].as_u64().unwrap() < FRAMES, "{report}");
        let rss = rss_kib(&proxy);
        assert!(
            rss < before + MAX_GROWTH_KIB,
            "{mode}: resident memory {before} KiB -> {rss} KiB"
        );
    }
    victim.still_serves();
}

#[test]
fn h2_a_client_that_never_reads_holds_bounded_memory() {
    /// Per client; two clients (see `no_read_peak_rss`).
    const STREAMS: u64 = 200;
    /// nginx serves 128 streams of each of the proxy's two connections to it at a time,
    /// so 256 responses fill their buffers: times `MAX_SEND_BUFFER` (64 KiB) 16 MiB, plus
    /// the upstream connections' 5 MiB windows and the read buffers the frames' bytes
    /// keep alive: 27 to 47 MiB measured. With hyper's default 400 KiB per stream (main
    /// before this bound), 145 to 148 MiB.
    const MAX_GROWTH_KIB: u64 = 64 << 10;
    let victim = Victim::new("atk_no_read");
    victim.file("big", 4 << 20);
    let proxy = victim.proxy(&[]);
    let (before, peak) = no_read_peak_rss(&victim.pods.pod, &proxy, STREAMS);
    assert!(
        peak < before + MAX_GROWTH_KIB,
        "resident memory {before} KiB -> {peak} KiB with {STREAMS} unread streams"
    );
    // The attack did work: the responses filled the proxy's buffers (else the bound
    // above would prove nothing).
    assert!(
        peak > before + (4 << 10),
        "resident memory {before} KiB -> {peak} KiB: the responses were not buffered"
    );
    victim.still_serves();
}

/// The same client as above, whose requests fill the proxy's buffers and who then reads
/// nothing, is cut once a write to it has waited `--http-write-timeout`: the proxy ends
/// the connection (and frees its buffers) instead of holding it as long as the client
/// likes. Without the timeout the connection stays open: the client drains what the
/// proxy sends and waits.
#[test]
fn h2_a_client_that_stops_reading_is_closed_at_the_write_timeout() {
    let victim = Victim::new("atk_write_to");
    victim.file("big", 4 << 20);
    let _proxy = victim.proxy(&["--http-write-timeout", "2s"]);
    let report = victim.h2(
        "no-read",
        &[
            "--count",
            "50",
            "--path",
            "/big",
            "--hold",
            "4",
            "--then-drain",
            "10",
        ],
    );
    assert_eq!(report["opened"], 50, "{report}");
    assert_eq!(
        report["ended"], true,
        "still open 14 s after the requests: {report}"
    );
    // Cut before the client started reading again: a few MB were left in the sockets'
    // buffers, far from the 200 MiB of the 50 responses.
    assert!(report["drained"].as_u64().unwrap() < 64 << 20, "{report}");
    victim.still_serves();
}

/// A client that reads its socket but never opens one stream's flow-control window got
/// nothing on that stream, and no write to its socket ever waited: it held the stream,
/// its buffers and its request to the destination for as long as it liked. Now the
/// stream is reset (`CANCEL`) once its response has waited `--http-write-timeout` for the
/// window, counted as a failed response, and the connection serves the next request. A
/// client that opens the window slowly keeps its stream.
#[test]
fn h2_a_stream_whose_window_stays_shut_is_reset_at_the_write_timeout() {
    const TIMEOUT: f64 = 2.0;
    let victim = Victim::new("atk_no_window");
    victim.file("big", 4 << 20);
    let proxy = victim.proxy(&["--http-write-timeout", "2s"]);
    let report = victim.h2("no-window", &["--path", "/big", "--hold", "6"]);
    let stalled = &report["stalled"];
    assert_eq!(stalled["status"], "200", "{report}");
    assert_eq!(stalled["bytes"], 0, "the window was shut: {report}");
    assert_eq!(
        stalled["reset_code"], CANCEL,
        "not reset 6 s after its response's head: {report}"
    );
    let after = stalled["reset_after"].as_f64().unwrap();
    assert!(
        (TIMEOUT - 0.3..TIMEOUT + 2.0).contains(&after),
        "reset {after} s after the response's head: {report}"
    );
    assert_eq!(report["closed"], false, "{report}");
    assert_eq!(report["goaway"], Value::Null, "{report}");
    assert_eq!(report["next_status"], "200", "{report}");
    let metrics = proxy.metrics();
    let failed = metrics.sum(
        "response_total",
        &[("status_code", "200"), ("classification", "failure")],
    );
    assert_eq!(
        failed, 1.0,
        "the reset response is a failure\n{}",
        metrics.text
    );

    // 16 KiB every half second (nginx's DATA frames are 8 KiB): the stream goes on.
    let report = victim.h2(
        "no-window",
        &[
            "--path", "/big", "--hold", "6", "--grant", "16384", "--every", "0.5",
        ],
    );
    let stalled = &report["stalled"];
    assert_eq!(stalled["reset_code"], Value::Null, "{report}");
    assert!(
        stalled["bytes"].as_u64().unwrap() >= 8 * 16384,
        "the granted bytes came: {report}"
    );
    assert_eq!(report["next_status"], "200", "{report}");
    victim.still_serves();
}

/// The same for a WebSocket over HTTP/2 (RFC 8441's extended CONNECT): once tunnelled,
/// the proxy writes the server's bytes into the client's stream, which waits for the
/// stream's window, not for the socket. A client that opens no window held the tunnel,
/// its buffers and the server's connection for as long as it liked; now the stream is
/// reset once a write to it has waited `--http-write-timeout`.
#[test]
fn h2_a_tunnel_whose_window_stays_shut_is_reset_at_the_write_timeout() {
    const TIMEOUT: f64 = 2.0;
    let victim = Victim::new("atk_tunnel");
    let _server = apps::python_server(
        &victim.pods.peer,
        victim.scratch.path(),
        "ws_h2.py",
        &["serve", &WS_H2.to_string()],
        WS_H2,
    );
    let _proxy = victim.proxy(&["--http-write-timeout", "2s"]);
    let to = to(WS_H2);
    let (host, port) = (to.ip().to_string(), to.port().to_string());
    // 256 KiB echoed into a window of 0.
    let args = ["stall", &host, &port, "--size", "262144", "--hold", "8"];
    let (report, run) = python_call(&victim.pods.pod, "ws_h2.py", &args);
    assert_eq!(report["status"], "200", "{run}");
    assert_eq!(report["received"], 0, "{run}");
    assert_eq!(
        report["reset_code"], CANCEL,
        "not reset 8 s after the message: {run}"
    );
    let after = report["reset_after"].as_f64().unwrap();
    assert!(
        (TIMEOUT - 0.3..TIMEOUT + 2.5).contains(&after),
        "reset {after} s after the message: {run}"
    );
    assert_eq!(report["closed"], false, "{run}");
    victim.still_serves();
}

/// Runs `h2_attack.py no-read` twice at once from `ns`, each with `streams` GETs of
/// `/big` from nginx's HTTP/2 port, one over IPv4 and one over IPv6 (two upstream
/// connections: nginx serves 128 streams of each at a time), for 5 s, sampling `proxy`'s
/// resident memory: before, and its peak, in KiB.
fn no_read_peak_rss(ns: &Netns, proxy: &MeshProxy<'_>, streams: u64) -> (u64, u64) {
    let before = rss_kib(proxy);
    let streams = streams.to_string();
    let h2c = H2C.to_string();
    let clients: Vec<_> = Family::ALL
        .map(|family| {
            let to = SocketAddr::new(family.peer(), H2C);
            let mut cmd = ns.command(apps::python());
            cmd.arg(apps::script("h2_attack.py")).args([
                "no-read",
                &family.peer().to_string(),
                &h2c,
                "--authority",
                &to.to_string(),
                "--count",
                &streams,
                "--path",
                "/big",
                "--hold",
                "6",
            ]);
            ns.spawn(cmd)
        })
        .into();
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        peak = peak.max(rss_kib(proxy));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(clients);
    eprintln!("resident memory {before} KiB -> peak {peak} KiB with 2 x {streams} unread streams");
    (before, peak)
}

#[test]
fn a_hostile_mesh_peer_gets_the_same_http2_bounds() {
    let pods = Pods::new("atk_mesh_peer");
    let mesh = Mesh::new("atk_mesh_peer", &pods);
    let _nginx = nginx_sites(&pods.peer, &mesh.scratch);
    fs::write(mesh.scratch.join("www").join("big"), vec![b'x'; 1 << 20]).unwrap();
    let b = mesh.start_b(&pods, &[]);
    // Pod A's own certificate, valid, used by a client that is not A's proxy: it runs as
    // the proxy uid so that A's rules let it out directly to B's inbound port.
    let inbound = SocketAddr::new(Family::V4.peer(), 4143);
    let attack = |mode: &str, args: &[&str]| -> Value {
        let h2c = H2C.to_string();
        let mut all = vec![
            "--tls",
            path(&mesh.a.cert),
            path(&mesh.a.key),
            path(&mesh.ca.anchors),
            &mesh.b.name,
            "--transport-port",
            &h2c,
        ];
        all.extend_from_slice(args);
        let mut cmd = pods.pod.command("setpriv");
        cmd.args(["--reuid=2102", "--regid=2102", "--clear-groups"])
            .arg(apps::python())
            .arg(apps::script("h2_attack.py"))
            .args([mode, &inbound.ip().to_string(), &inbound.port().to_string()])
            .args(&all);
        let run = netns_tests::Run::of(&mut cmd).expect_ok();
        let report: Value = serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("h2_attack.py {mode}: {e}\n{run}"));
        eprintln!("h2_attack.py {mode} over mTLS: {report}");
        report
    };
    let report = attack("rapid-reset", &["--count", "20000"]);
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    let report = attack(
        "streams",
        &["--count", "600", "--path", "/big", "--hold", "2"],
    );
    assert_eq!(report["max_concurrent_streams"], 512, "{report}");
    assert_eq!(report["resets"][REFUSED_STREAM], 88, "{report}");
    let report = attack("continuation", &["--count", "100000"]);
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    // B counted the attacker as A, over mTLS: the identity is real, the intent is not.
    let metrics = b.metrics();
    assert!(
        metrics.sum(
            "tcp_open_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("protocol", "http2")
            ]
        ) >= 3.0,
        "{metrics}"
    );
    // And B still serves A's requests, from a plain client through A's proxy.
    let _a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let run = curl(
        &pods.pod,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
            &url(to(H2C), "/ok"),
        ],
    );
    assert_eq!(run.stdout, "200", "{run}");
}

#[test]
fn the_outbound_listener_gets_the_same_http2_bounds() {
    // An application in the pod is the attacker: the pod's outbound proxy is the
    // victim, nginx in the peer (not meshed) the destination.
    let pods = Pods::new("atk_outbound");
    let scratch = Scratch::new("atk_outbound");
    let _nginx = nginx_sites(&pods.peer, &scratch);
    fs::write(scratch.join("www").join("big"), vec![b'x'; 4 << 20]).unwrap();
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    let report = h2_attack(&pods.pod, "rapid-reset", to(H2C), &["--count", "20000"]);
    assert_eq!(
        report["goaway"]["error_code"], ENHANCE_YOUR_CALM,
        "{report}"
    );
    let report = h2_attack(
        &pods.pod,
        "streams",
        to(H2C),
        &["--count", "600", "--path", "/big", "--hold", "1"],
    );
    assert_eq!(report["resets"][REFUSED_STREAM], 88, "{report}");
    let (before, peak) = no_read_peak_rss(&pods.pod, &outbound, 200);
    assert!(peak < before + (64 << 10), "{before} KiB -> {peak} KiB");
    // Counted as outbound HTTP/2 connections, and the pod's requests still go out.
    let metrics = outbound.metrics();
    assert!(
        metrics.sum(
            "tcp_open_total",
            &[("direction", "outbound"), ("protocol", "http2")]
        ) >= 3.0,
        "{metrics}"
    );
    let run = curl(
        &pods.pod,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
            &url(to(H2C), "/ok"),
        ],
    );
    assert_eq!(run.stdout, "200", "{run}");
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------
// HTTP/1

/// A connection from the pod to nginx's HTTP/1 port (through the victim's proxy).
fn connect_http1(victim: &Victim) -> TcpStream {
    let stream = victim
        .pods
        .pod
        .run(|| TcpStream::connect_timeout(&to(HTTP1), Duration::from_secs(2)).unwrap());
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads one response head and its `Content-Length` body from `stream`; its status line.
fn read_response(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let mut byte = [0; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed mid-head");
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    head.lines().next().unwrap_or_default().to_string()
}

/// Sends `line` every 100 ms until the proxy closes the connection; how long that took.
fn trickle_until_closed(stream: &mut TcpStream, line: &[u8], limit: Duration) -> Duration {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            // An answer (the proxy's 408, if any) is fine; the close is what counts.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return started.elapsed(),
        }
        if stream.write_all(line).is_err() {
            return started.elapsed();
        }
    }
    panic!("the connection is still open after {limit:?}");
}

#[test]
fn http1_a_trickled_head_is_closed_at_the_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let victim = Victim::new("atk_slowloris");
    let _proxy = victim.proxy(&["--http-header-read-timeout", "2s"]);
    let limit = TIMEOUT * 3;

    // The first request of a connection: its request line, then a header line every
    // 100 ms, forever.
    let mut stream = connect_http1(&victim);
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let took = trickle_until_closed(&mut stream, b"X-Slow: 1\r\n", limit);
    assert!(
        took >= TIMEOUT - Duration::from_millis(300),
        "closed after {took:?}"
    );

    // A later request of a kept-alive connection, parsed by hyper.
    let mut stream = connect_http1(&victim);
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream), "HTTP/1.1 200 OK");
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let took = trickle_until_closed(&mut stream, b"X-Slow: 1\r\n", limit);
    assert!(
        took >= TIMEOUT - Duration::from_millis(300),
        "closed after {took:?}"
    );
    victim.still_serves();
}

/// Writes `start`, then header lines without end until the proxy closes the connection;
/// how many bytes were written and what the proxy answered.
fn endless_headers(mut stream: TcpStream, start: &'static [u8]) -> (usize, String) {
    const MAX: usize = 64 << 20;
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let writer = std::thread::spawn(move || {
        let mut written = 0;
        if stream.write_all(start).is_err() {
            return written;
        }
        let mut i = 0u64;
        while written < MAX {
            let line = format!("X-Endless-{i}: {}\r\n", "v".repeat(64));
            if stream.write_all(line.as_bytes()).is_err() {
                break;
            }
            written += line.len();
            i += 1;
        }
        written
    });
    let mut answer = Vec::new();
    let _ = reader.read_to_end(&mut answer);
    let written = writer.join().unwrap();
    (written, String::from_utf8_lossy(&answer).to_string())
}

#[test]
fn http1_endless_header_lines_are_cut_at_64_kib() {
    /// What the kernel's buffers can take on top of the proxy's 64 KiB.
    const MAX_WRITTEN: usize = 16 << 20;
    let victim = Victim::new("atk_endless_headers");
    let _proxy = victim.proxy(&[]);

    // The first head, checked by the proxy itself.
    let stream = connect_http1(&victim);
    let (written, answer) = endless_headers(stream, b"GET /ok HTTP/1.1\r\nHost: a\r\n");
    assert!(written < MAX_WRITTEN, "{written} bytes of headers taken");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );

    // A later head of a kept-alive connection, parsed by hyper.
    let mut stream = connect_http1(&victim);
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream), "HTTP/1.1 200 OK");
    let (written, answer) = endless_headers(stream, b"GET /ok HTTP/1.1\r\nHost: a\r\n");
    assert!(written < MAX_WRITTEN, "{written} bytes of headers taken");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    victim.still_serves();
}

#[test]
fn http1_bad_chunk_sizes_close_the_connection() {
    let victim = Victim::new("atk_chunk_size");
    let _proxy = victim.proxy(&[]);
    let head = "POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let attacks = [
        // A chunk size over 64 bits.
        format!("{head}{}\r\n", "f".repeat(40)),
        // A chunk extension without end (hyper allows 16 KiB).
        format!("{head}1;{}", "e".repeat(1 << 20)),
    ];
    for attack in attacks {
        let mut stream = connect_http1(&victim);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        // The proxy may close before all of it is written.
        let _ = stream.write_all(attack.as_bytes());
        let mut answer = Vec::new();
        let closed = loop {
            let mut buf = [0; 4096];
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(
            closed,
            "still open after {:?}: {}",
            started.elapsed(),
            &attack[..80]
        );
    }
    victim.still_serves();
}

/// A client cut by the write timeout is reset, not closed. Closed with the bytes the
/// client never took, the proxy's socket stayed behind as an orphan (FIN-WAIT-1, its send
/// buffer full), probing a client that takes nothing for minutes: kernel memory the
/// attacker kept after the proxy let go.
#[test]
fn http1_a_client_cut_at_the_write_timeout_is_reset_and_leaves_no_orphan() {
    let victim = Victim::new("atk_orphan");
    victim.file("big", 64 << 20);
    let _proxy = victim.proxy(&["--http-write-timeout", "1s"]);
    let mut stream = connect_http1(&victim);
    let client = stream.local_addr().unwrap().to_string();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: victim\r\n\r\n")
        .unwrap();
    // The proxy fills the sockets' buffers, waits a second, and cuts.
    std::thread::sleep(Duration::from_secs(4));
    let sockets = victim.pods.peer.exec(&["ss", "-tanH"]).expect_ok().stdout;
    let left: Vec<&str> = sockets
        .lines()
        .filter(|line| line.split_whitespace().any(|field| field == client))
        .collect();
    assert!(
        left.is_empty(),
        "the proxy's socket to {client} is still there:\n{}",
        left.join("\n")
    );
    // What the client had received is still its to read; then the reset.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0; 1 << 16];
    let mut got = 0;
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got += n,
            Err(error) => break Some(error.kind()),
        }
    };
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "after {got} bytes"
    );
    assert!(got > 0 && got < 64 << 20, "{got} bytes");
    victim.still_serves();
}

#[test]
fn http1_pipelined_requests_never_read_back_hold_bounded_memory() {
    const REQUESTS: usize = 1_000_000;
    const MAX_GROWTH_KIB: u64 = 16 << 10;
    let victim = Victim::new("atk_pipelined");
    victim.file("big", 1 << 20);
    let proxy = victim.proxy(&[]);
    let before = rss_kib(&proxy);
    let mut stream = connect_http1(&victim);
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // A million requests for a 1 MiB file, written and never read: the writes must
    // stop (nobody takes them) long before the last one.
    let request = b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n";
    let batch = request.repeat(1000);
    let mut written = 0;
    while written < REQUESTS {
        if stream.write_all(&batch).is_err() {
            break;
        }
        written += 1000;
    }
    let rss = rss_kib(&proxy);
    assert!(written < REQUESTS, "all {REQUESTS} requests were taken");
    assert!(
        rss < before + MAX_GROWTH_KIB,
        "resident memory {before} KiB -> {rss} KiB"
    );
    eprintln!("{written} requests written before the writes blocked; rss {before} -> {rss} KiB");
    stream.shutdown(Shutdown::Both).unwrap();
    victim.still_serves();
}

// ---------------------------------------------------------------------------------------
// Metric series

#[test]
fn hostile_status_codes_and_grpc_statuses_keep_the_response_series_capped() {
    /// proxy/src/http/metrics.rs: `MAX_RESPONSE_LABEL_SETS`, `MAX_OVERFLOW_RESPONSE_SETS`.
    const MAX_RESPONSE_SETS: usize = 2048;
    const MAX_OVERFLOW_SETS: usize = 256;
    /// Distinct (status, gRPC status) pairs: more than the caps.
    const DISTINCT: usize = 3000;
    /// Then gRPC statuses gRPC does not define.
    const INVENTED: usize = 200;
    const HOSTILE: u16 = 8091;
    let pods = Pods::new("atk_status_codes");
    let scratch = Scratch::new("atk_status_codes");
    let _hostile = apps::python_server(
        &pods.peer,
        scratch.path(),
        "upload_sink.py",
        &[&HOSTILE.to_string()],
        HOSTILE,
    );
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    let to = SocketAddr::new(Family::V4.peer(), HOSTILE);

    let paths: Vec<String> = (0..DISTINCT)
        .map(|i| format!("/status/{}/{}", 200 + i % 800, (i / 800) % 17))
        .chain((0..INVENTED).map(|i| format!("/status/200/{}", 1_000_000 + i)))
        .collect();
    let total = paths.len();
    let heads = paths
        .iter()
        .map(|path| format!("GET {path} HTTP/1.1\r\nHost: h\r\n"))
        .collect();
    let responses = pipelined(&pods.pod, to, heads);
    // Every body is empty: each status line starts a response.
    assert_eq!(
        responses.matches("HTTP/1.1 ").count(),
        total,
        "not every request was answered"
    );

    let metrics = outbound.wait_for_metric(
        "response_total",
        &[("direction", "outbound")],
        total as f64,
        METRICS_TIMEOUT,
    );
    let sets = metrics.samples("response_total").count();
    assert!(
        sets <= MAX_RESPONSE_SETS + MAX_OVERFLOW_SETS + 2,
        "{sets} response_total series"
    );
    assert!(
        metrics.text.contains("status_code=\"overflow\""),
        "no response counted under the overflow status"
    );
    for line in metrics
        .text
        .lines()
        .filter(|l| l.contains("grpc_status=\""))
    {
        let code: u32 = line
            .split("grpc_status=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(code <= 16, "a gRPC status gRPC does not define: {line}");
    }
    promtool_check(&metrics.text);
}

// ---------------------------------------------------------------------------------------
// Descriptors

#[test]
fn idle_admin_connections_are_capped_and_time_out() {
    /// proxy/src/admin.rs: `MAX_CONNECTIONS` active, each `HEAD_TIMEOUT` (2 s) at most.
    const MAX_ACTIVE: usize = 64;
    const IDLE: usize = 300;
    let victim = Victim::new("atk_admin_idle");
    let proxy = victim.proxy(&[]);
    let before = open_fds(&proxy);
    let admin = SocketAddr::new(Family::V4.peer(), 4191);
    let idle: Vec<TcpStream> = victim.pods.pod.run(|| {
        (0..IDLE)
            .map(|_| TcpStream::connect_timeout(&admin, Duration::from_secs(2)).unwrap())
            .collect()
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = open_fds(&proxy);
    assert!(
        during <= before + MAX_ACTIVE,
        "{before} descriptors before, {during} with {IDLE} idle admin connections"
    );
    // Within the head timeout (and a scheduling margin), every slot is free again.
    let started = Instant::now();
    while open_fds(&proxy) > before {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{} descriptors, {before} before",
            open_fds(&proxy)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = proxy.get("/ready").unwrap();
    assert_eq!(status, 200);
    drop(idle);
    victim.still_serves();
}

/// Request smuggling: a body framed two ways (`Content-Length` and `Transfer-Encoding`),
/// or by two lengths, forwarded as it came, lets the destination find a request inside
/// another's body that the proxy never saw (nor counted, nor routed). Each request the
/// destination gets must be framed one way only, complete, with nothing after it; two
/// different lengths are refused (400) and forwarded nowhere.
#[test]
fn http1_requests_framed_two_ways_reach_the_destination_framed_one_way() {
    const PROBE: u16 = 8097;
    let victim = Victim::new("atk_smuggle");
    let log = victim.scratch.join("framing.jsonl");
    let _probe = apps::python_server(
        &victim.pods.peer,
        victim.scratch.path(),
        "framing_probe.py",
        &[&PROBE.to_string(), path(&log)],
        PROBE,
    );
    let _proxy = victim.proxy(&[]);
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases = [
        // The length covers a request that the chunked body (empty) does not.
        format!(
            "POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
            5 + hidden.len()
        ),
        // The chunk covers a request that the length (4) does not.
        format!(
            "POST /te-cl HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
            hidden.len()
        ),
        // Two lengths.
        format!(
            "POST /cl-cl HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\
             Content-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
    ];
    let mut answers = Vec::new();
    for case in &cases {
        let mut stream = victim
            .pods
            .pod
            .run(|| TcpStream::connect_timeout(&to(PROBE), Duration::from_secs(2)).unwrap());
        stream.write_all(case.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        answers.push(read_response(&mut stream));
    }
    assert!(answers[2].starts_with("HTTP/1.1 400"), "{answers:?}");
    // The probe writes its line once the proxy has closed the connection.
    std::thread::sleep(Duration::from_secs(3));
    let seen = fs::read_to_string(&log).unwrap_or_default();
    eprintln!("answers {answers:?}\nthe destination saw:\n{seen}");
    let requests: Vec<Value> = seen
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for request in &requests {
        let lengths = request["content_length"].as_array().unwrap().len();
        let encodings = request["transfer_encoding"].as_array().unwrap().len();
        assert!(
            lengths + encodings <= 1,
            "framed more than one way: {request}\n{seen}"
        );
        assert_eq!(request["complete"], true, "{request}\n{seen}");
        assert_eq!(
            request["leftover"], 0,
            "bytes after the body: {request}\n{seen}"
        );
    }
    let lines: Vec<&str> = requests
        .iter()
        .map(|r| r["request_line"].as_str().unwrap())
        .collect();
    assert!(lines.contains(&"POST /cl-te HTTP/1.1"), "{seen}");
    assert!(lines.contains(&"POST /te-cl HTTP/1.1"), "{seen}");
    assert!(!lines.iter().any(|l| l.contains("/cl-cl")), "{seen}");
    victim.still_serves();
}
