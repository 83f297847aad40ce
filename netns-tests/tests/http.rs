//! meshproxy speaks HTTP, through meshinit's real rules, between real clients and servers.
//!
//! Both namespaces are meshed in plaintext unless a test says otherwise: meshinit's default
//! rules and a meshproxy without identity in each. A client in the pod goes through the pod's
//! outbound proxy, then the peer's inbound proxy, to a server in the peer; so every request
//! is seen by one outbound and one inbound proxy, and both must count it.
//!
//! - HTTP/1.1: 1,000 requests from one `curl` on one keep-alive connection count 1,000 at
//!   each proxy, not 1 (also at an inbound proxy whose client is not meshed); pipelined
//!   requests from `h2load --h1` too; HTTP/1.0.
//! - Classification: nginx answering 200, 404 and 503 (over HTTP/1.1 and HTTP/2) gives
//!   `response_total` per `status_code` with `classification` success or failure; the
//!   request reaches nginx unchanged (Host, method, path, a custom header); HTTP/1 header
//!   names keep their case both ways, hop-by-hop headers stop at the first hop.
//! - HTTP/2 with prior knowledge: `h2load` multiplexing 1,000 requests over 2 connections to
//!   `nghttpd`, each request counted; 20 MiB through `nghttp`'s 64 KiB windows intact.
//! - gRPC with grpcio: `grpc_status="5"` and `classification="failure"` for NOT_FOUND, a
//!   bidirectional streaming call that only progresses if both directions flow.
//! - 100 MiB up (POST, with Content-Length and with chunked) and down are SHA-256 identical;
//!   a slow client and a slow server hold neither proxy's memory above 64 MiB (backpressure).
//! - WebSocket (websockets): echoes after the upgrade, counted as one request.
//! - `promtool check metrics` accepts `/metrics` after HTTP traffic, with the histogram; a
//!   client naming 3,000 authorities leaves the request label sets at their cap.
//! - Errors the proxy generates: 502 with `meshproxy-error` for a refused destination, 504
//!   for a connect that times out (SYNs dropped), 400 for a request that does not parse,
//!   each counted as a failure.
//! - The mTLS pair: 200 client connections making one request each share a handful of
//!   mTLS connections between the proxies; HTTP/1.1 (unchanged at nginx), gRPC statuses and
//!   streams, and a WebSocket cross the mTLS hop and are counted with `tls="true"`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use netns_tests::apps::{self, curl, h2load, h2load_requests, url, App};
use netns_tests::mesh::{Mesh, Scratch};
use netns_tests::{Family, MeshProxy, Metrics, Netns, Pods};

/// nginx, HTTP/1.1 (a port meshproxy detects: not in the opaque list).
const HTTP1: u16 = 8080;
/// nginx, HTTP/2 with prior knowledge (`listen … http2` without TLS).
const H2C: u16 = 8081;
/// nghttpd, HTTP/2 with prior knowledge.
const NGHTTPD: u16 = 8082;
/// The Python upload sink (http.server).
const SINK: u16 = 8090;
/// Nothing listens here.
const NOBODY: u16 = 8099;
/// The Python gRPC server (grpcio).
const GRPC: u16 = 50051;
/// The Python WebSocket echo server (websockets).
const WS: u16 = 8765;

const MIB: u64 = 1 << 20;
/// How long a proxy may take to count what a finished client saw.
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The set-up

/// The proxies a request passes: the pod's outbound one, then the peer's inbound one.
struct Pair<'p> {
    outbound: MeshProxy<'p>,
    inbound: MeshProxy<'p>,
}

/// meshinit's default rules and a plaintext meshproxy in both namespaces.
fn mesh_both(pods: &Pods) -> Pair<'_> {
    pods.pod.meshinit(&["apply"]).expect_ok();
    pods.peer.meshinit(&["apply"]).expect_ok();
    Pair {
        inbound: pods.peer.start_meshproxy(&[]),
        outbound: pods.pod.start_meshproxy(&[]),
    }
}

impl Pair<'_> {
    /// Waits until the samples of `name` for `target` with `labels` sum to `want` at both
    /// proxies (with `direction` outbound at the pod's, inbound at the peer's); returns both
    /// scrapes.
    #[track_caller]
    fn expect(
        &self,
        name: &str,
        target: SocketAddr,
        labels: &[(&str, &str)],
        want: f64,
    ) -> (Metrics, Metrics) {
        (
            expect(&self.outbound, "outbound", name, target, labels, want),
            expect(&self.inbound, "inbound", name, target, labels, want),
        )
    }
}

/// Waits until `name{direction, target_addr=target, labels…}` sums to `want` at `proxy`.
#[track_caller]
fn expect(
    proxy: &MeshProxy<'_>,
    direction: &str,
    name: &str,
    target: SocketAddr,
    labels: &[(&str, &str)],
    want: f64,
) -> Metrics {
    let target = target.to_string();
    let mut all = vec![("direction", direction), ("target_addr", target.as_str())];
    all.extend_from_slice(labels);
    proxy.wait_for_metric(name, &all, want, METRICS_TIMEOUT)
}

/// nginx's sites: HTTP/1.1 on [`HTTP1`] and HTTP/2 on [`H2C`], both families, serving the
/// files of `www`, with fixed answers on a few paths.
fn nginx(ns: &Netns, scratch: &Scratch) -> App {
    let www = scratch.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("small"), "a small file\n").unwrap();
    let locations = "\
        location = /ok { return 200 \"ok\\n\"; }\n\
        location = /fail { return 503 \"unavailable\\n\"; }\n\
        location = /missing { return 404 \"missing\\n\"; }\n\
        location = /echo { return 200 \"$http_host $request_method $request_uri $http_x_custom $server_protocol\\n\"; }\n\
        location / { }\n";
    let sites = format!(
        "server {{\n listen {HTTP1}; listen [::]:{HTTP1};\n root {www};\n client_max_body_size 200m;\n{locations}}}\n\
         server {{\n listen {H2C} http2; listen [::]:{H2C} http2;\n root {www};\n{locations}}}\n",
        www = www.display(),
    );
    apps::nginx(ns, scratch.path(), &sites, HTTP1)
}

/// The `%{http_code}` of each transfer of a curl run with `-w '%{http_code}\n' -o /dev/null`.
fn codes(run: &netns_tests::Run) -> Vec<&str> {
    run.stdout.lines().collect()
}

/// curl arguments fetching `path` from `to` `n` times, discarding the bodies.
fn repeat(to: SocketAddr, path: &str, n: usize) -> Vec<String> {
    let target = url(to, path);
    (0..n)
        .flat_map(|_| ["-o".to_string(), "/dev/null".to_string(), target.clone()])
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------
// HTTP/1

#[test]
fn http1_1000_requests_on_one_keep_alive_connection_count_1000_at_each_proxy() {
    const REQUESTS: usize = 1000;
    const PIPELINED: u64 = 200;
    let pods = Pods::new("http_keepalive");
    let scratch = Scratch::new("http_keepalive");
    let _nginx = nginx(&pods.peer, &scratch);
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), HTTP1);
        // One curl, 1,000 URLs: it reuses its connection for each (`-g`: the brackets of an
        // IPv6 address are not a glob).
        let mut args = vec!["-g", "-w", "%{num_connects} %{http_code}\n"];
        let urls = repeat(to, "/ok", REQUESTS);
        args.extend(strs(&urls));
        let run = curl(&pods.pod, &args).expect_ok();
        let lines = codes(&run);
        assert_eq!(lines.len(), REQUESTS, "{run}");
        let connects: u32 = lines
            .iter()
            .map(|l| l.split(' ').next().unwrap().parse::<u32>().unwrap())
            .sum();
        assert_eq!(connects, 1, "{to}: curl opened {connects} connections");
        assert!(lines.iter().all(|l| l.ends_with(" 200")), "{run}");

        // The client's one connection, as the outbound proxy saw it.
        expect(
            &pair.outbound,
            "outbound",
            "tcp_open_total",
            to,
            &[("protocol", "http1")],
            1.0,
        );
        // Each request counted, at both proxies.
        pair.expect("request_total", to, &[], REQUESTS as f64);
        pair.expect(
            "response_total",
            to,
            &[("status_code", "200"), ("classification", "success")],
            REQUESTS as f64,
        );

        // Pipelining: h2load sends up to 10 requests before reading the first answer.
        let run = h2load(
            &pods.pod,
            &["--h1", "-n", &PIPELINED.to_string(), "-c", "1", "-m", "10"],
            to,
            "/ok",
        );
        assert_eq!(h2load_requests(&run, "succeeded"), PIPELINED, "{run}");
        pair.expect("request_total", to, &[], REQUESTS as f64 + PIPELINED as f64);
        expect(
            &pair.outbound,
            "outbound",
            "tcp_open_total",
            to,
            &[("protocol", "http1")],
            2.0,
        );

        // HTTP/1.0 (no keep-alive unless asked for), reaching nginx as HTTP/1.0.
        let run = curl(&pods.pod, &["-g", "--http1.0", &url(to, "/echo")]).expect_ok();
        assert!(run.stdout.ends_with(" HTTP/1.0\n"), "{run}");
        pair.expect(
            "request_total",
            to,
            &[],
            REQUESTS as f64 + PIPELINED as f64 + 1.0,
        );
    }
}

#[test]
fn http1_1000_requests_from_an_unmeshed_client_count_1000_at_the_inbound_proxy() {
    const REQUESTS: usize = 1000;
    // Only the pod is meshed, and the server is there: the inbound proxy meets the
    // client's own keep-alive connection, not another proxy's.
    let pods = Pods::new("http_inbound_keepalive");
    let scratch = Scratch::new("http_inbound_keepalive");
    let _nginx = nginx(&pods.pod, &scratch);
    pods.pod.meshinit(&["apply"]).expect_ok();
    let inbound = pods.pod.start_meshproxy(&[]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.pod(), HTTP1);
        let mut args = vec!["-g", "-w", "%{num_connects} %{http_code}\n"];
        let urls = repeat(to, "/ok", REQUESTS);
        args.extend(strs(&urls));
        let run = curl(&pods.peer, &args).expect_ok();
        let lines = codes(&run);
        assert_eq!(lines.len(), REQUESTS, "{run}");
        assert!(lines.iter().all(|l| l.ends_with(" 200")), "{run}");
        expect(
            &inbound,
            "inbound",
            "tcp_open_total",
            to,
            &[("protocol", "http1")],
            1.0,
        );
        expect(
            &inbound,
            "inbound",
            "request_total",
            to,
            &[],
            REQUESTS as f64,
        );
        expect(
            &inbound,
            "inbound",
            "response_total",
            to,
            &[("status_code", "200"), ("classification", "success")],
            REQUESTS as f64,
        );
    }
}

#[test]
fn responses_are_classified_by_status_over_http1_and_http2_and_requests_arrive_unchanged() {
    let pods = Pods::new("http_classification");
    let scratch = Scratch::new("http_classification");
    let _nginx = nginx(&pods.peer, &scratch);
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        // HTTP/1.1: 10 x 200, 5 x 503, 3 x 404 on one connection.
        let to = SocketAddr::new(family.peer(), HTTP1);
        let mut urls = repeat(to, "/ok", 10);
        urls.extend(repeat(to, "/fail", 5));
        urls.extend(repeat(to, "/missing", 3));
        let mut args = vec!["-g", "-w", "%{http_code}\n"];
        args.extend(strs(&urls));
        let run = curl(&pods.pod, &args).expect_ok();
        let want: Vec<&str> = [["200"; 10].as_slice(), &["503"; 5], &["404"; 3]].concat();
        assert_eq!(codes(&run), want, "{run}");
        for (code, class, n) in [
            ("200", "success", 10.0),
            ("503", "failure", 5.0),
            ("404", "success", 3.0),
        ] {
            pair.expect(
                "response_total",
                to,
                &[("status_code", code), ("classification", class)],
                n,
            );
        }
        pair.expect("request_total", to, &[], 18.0);

        // The application does not notice: Host (with its case), method, path and query,
        // a custom header reach nginx as the client sent them.
        let run = curl(
            &pods.pod,
            &[
                "-g",
                "-X",
                "PATCH",
                "-H",
                "Host: Shop.Example:8080",
                "-H",
                "X-Custom: kept as is",
                &url(to, "/echo?a=1&b=%20"),
            ],
        )
        .expect_ok();
        assert_eq!(
            run.stdout, "Shop.Example:8080 PATCH /echo?a=1&b=%20 kept as is HTTP/1.1\n",
            "{run}"
        );

        // HTTP/2 with prior knowledge to nginx: 20 x 503 multiplexed on one connection.
        let to = SocketAddr::new(family.peer(), H2C);
        let run = h2load(&pods.pod, &["-n", "20", "-c", "1", "-m", "5"], to, "/fail");
        assert!(run.stdout.contains("20 5xx"), "{run}");
        pair.expect(
            "response_total",
            to,
            &[("status_code", "503"), ("classification", "failure")],
            20.0,
        );
        pair.expect("response_total", to, &[("classification", "success")], 0.0);
        expect(
            &pair.outbound,
            "outbound",
            "tcp_open_total",
            to,
            &[("protocol", "http2")],
            1.0,
        );
    }
}

#[test]
fn http1_header_name_case_is_kept_both_ways_and_hop_by_hop_headers_are_not_forwarded() {
    let pods = Pods::new("http_headers");
    let scratch = Scratch::new("http_headers");
    let _app = apps::python_server(
        &pods.peer,
        scratch.path(),
        "upload_sink.py",
        &[&SINK.to_string()],
        SINK,
    );
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), SINK);
        let run = curl(
            &pods.pod,
            &[
                "-g",
                "-i",
                "-H",
                "X-CamelCase-Header: kept",
                "-H",
                "x-lower: kept",
                // Hop-by-hop (RFC 9110 §7.6.1): the header `Connection` names, and
                // `Keep-Alive`, are for the next hop only.
                "-H",
                "Connection: keep-alive, X-Hop",
                "-H",
                "X-Hop: for the first hop only",
                "-H",
                "Keep-Alive: timeout=5",
                &url(to, "/headers"),
            ],
        )
        .expect_ok();
        let (head, body) = run.stdout.split_once("\r\n\r\n").unwrap_or(("", ""));
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{run}"
        );
        // The response's header name as the server wrote it.
        assert!(head.contains("\r\nX-MiXeD-Case: yes"), "{run}");
        // The request's header names as the client wrote them.
        assert!(body.contains("X-CamelCase-Header: kept\n"), "{run}");
        assert!(body.contains("x-lower: kept\n"), "{run}");
        assert!(!body.to_ascii_lowercase().contains("x-hop"), "{run}");
        assert!(
            !body.to_ascii_lowercase().contains("keep-alive: timeout"),
            "{run}"
        );
        pair.expect("request_total", to, &[], 1.0);
    }
}

#[test]
fn a_client_naming_3000_authorities_cannot_grow_the_request_label_sets_past_their_cap() {
    const AUTHORITIES: usize = 3000;
    /// docs/design.md: 512 request label sets, 2,048 response label sets.
    const MAX_REQUEST_SETS: usize = 512;
    const MAX_RESPONSE_SETS: usize = 2048;
    let pods = Pods::new("http_authority_cap");
    let scratch = Scratch::new("http_authority_cap");
    let _nginx = nginx(&pods.peer, &scratch);
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    let to = SocketAddr::new(Family::V4.peer(), HTTP1);

    // One connection, 3,000 pipelined requests, each with its own Host: what a client
    // (not a well-behaved one) may send. Written by one thread while this one reads.
    let stream = pods
        .pod
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..AUTHORITIES {
            let close = if i + 1 == AUTHORITIES {
                "Connection: close\r\n"
            } else {
                ""
            };
            write!(
                writer,
                "GET /ok HTTP/1.1\r\nHost: host-{i}.example\r\n{close}\r\n"
            )
            .unwrap();
        }
    });
    let mut responses = String::new();
    (&stream).read_to_string(&mut responses).unwrap();
    sender.join().unwrap();
    assert_eq!(
        responses.matches("HTTP/1.1 200 ").count(),
        AUTHORITIES,
        "not every request was answered"
    );

    // Every request is counted, most of them under the overflow label set.
    let metrics = outbound.wait_for_metric(
        "request_total",
        &[("direction", "outbound")],
        AUTHORITIES as f64,
        METRICS_TIMEOUT,
    );
    let request_sets = metrics.samples("request_total").count();
    let response_sets = metrics.samples("response_total").count();
    assert!(
        request_sets <= MAX_REQUEST_SETS + 1,
        "{request_sets} request_total series"
    );
    assert!(
        response_sets <= MAX_RESPONSE_SETS + 1,
        "{response_sets} response_total series"
    );
    assert!(
        metrics.sum(
            "request_total",
            &[("target_addr", "overflow"), ("authority", "overflow")]
        ) >= (AUTHORITIES - MAX_REQUEST_SETS) as f64,
        "the requests past the cap are not under the overflow labels\n{metrics}"
    );
    assert!(
        metrics.text.len() < 2 << 20,
        "/metrics is {} bytes",
        metrics.text.len()
    );
    promtool_check(&metrics.text);
}

// ---------------------------------------------------------------------------------------
// HTTP/2

#[test]
fn http2_prior_knowledge_multiplexed_requests_are_counted_one_by_one() {
    const REQUESTS: u64 = 1000;
    let pods = Pods::new("http_h2_multiplexed");
    let scratch = Scratch::new("http_h2_multiplexed");
    let docroot = scratch.join("h2");
    fs::create_dir_all(&docroot).unwrap();
    let content: String = (0..64)
        .map(|i| format!("line {i:04} of the file\n"))
        .collect();
    fs::write(docroot.join("hello"), &content).unwrap();
    // 20 MiB through 64 KiB flow-control windows: over 300 WINDOW_UPDATEs per hop.
    let big = docroot.join("big");
    netns_tests::Run::of(
        std::process::Command::new("head")
            .args(["-c", &(20 * MIB).to_string(), "/dev/urandom"])
            .stdout(fs::File::create(&big).unwrap()),
    )
    .expect_ok();
    let big_sha = sha256_file(&big);
    let _nghttpd = apps::nghttpd(&pods.peer, scratch.path(), &docroot, NGHTTPD);
    let pair = mesh_both(&pods);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), NGHTTPD);
        // 1,000 requests on 2 connections, up to 20 streams at once on each.
        let run = h2load(
            &pods.pod,
            &["-n", &REQUESTS.to_string(), "-c", "2", "-m", "20"],
            to,
            "/hello",
        );
        assert_eq!(h2load_requests(&run, "succeeded"), REQUESTS, "{run}");
        expect(
            &pair.outbound,
            "outbound",
            "tcp_open_total",
            to,
            &[("protocol", "http2")],
            2.0,
        );
        pair.expect("request_total", to, &[], REQUESTS as f64);
        pair.expect(
            "response_total",
            to,
            &[("status_code", "200"), ("classification", "success")],
            REQUESTS as f64,
        );

        // nghttp: the body as served.
        let run = netns_tests::Run::of(
            pods.pod
                .command("nghttp")
                .args(["--no-dep", &url(to, "/hello")]),
        )
        .expect_ok();
        assert_eq!(run.stdout, content, "{run}");
        pair.expect("request_total", to, &[], REQUESTS as f64 + 1.0);

        // Flow control: nghttp announces 64 KiB windows (`-w 16 -W 16`, 2^16 - 1 bytes) for
        // the stream and the connection, so the proxy may only send as the client reads.
        let run = netns_tests::Run::of(
            pods.pod
                .command("bash")
                .arg("-c")
                .arg(r#"set -o pipefail; nghttp -w 16 -W 16 --no-dep "$1" | sha256sum"#)
                .arg("bash")
                .arg(url(to, "/big")),
        )
        .expect_ok();
        assert_eq!(
            run.stdout.split_whitespace().next(),
            Some(big_sha.as_str()),
            "{run}"
        );
        pair.expect("request_total", to, &[], REQUESTS as f64 + 2.0);
    }
}

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
        let run =
            apps::python_client(&pods.pod, "grpc_echo.py", &["call", &to.to_string()]).expect_ok();
        let result: serde_json::Value =
            serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}\n{run}"));
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
        expect(
            &pair.outbound,
            "outbound",
            "tcp_open_total",
            to,
            &[("protocol", "http2")],
            1.0,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bodies

/// SHA-256 of `path` in hex, by `sha256sum`.
fn sha256_file(path: &Path) -> String {
    let run = netns_tests::Run::of(std::process::Command::new("sha256sum").arg(path)).expect_ok();
    run.stdout.split_whitespace().next().unwrap().to_string()
}

/// The peak resident memory (`VmHWM`) of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// A file of `size` random bytes in `scratch/www` (so nginx serves it as `/big`), and its
/// SHA-256.
fn random_file(scratch: &Scratch, size: u64) -> (std::path::PathBuf, String) {
    let big = scratch.join("www/big");
    netns_tests::Run::of(
        std::process::Command::new("head")
            .args(["-c", &size.to_string(), "/dev/urandom"])
            .stdout(fs::File::create(&big).unwrap()),
    )
    .expect_ok();
    let sha = sha256_file(&big);
    (big, sha)
}

#[test]
fn a_100_mib_upload_and_download_are_sha256_identical() {
    const SIZE: u64 = 100 * MIB;
    let pods = Pods::new("http_bulk");
    let scratch = Scratch::new("http_bulk");
    let _nginx = nginx(&pods.peer, &scratch);
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
        pair.expect(
            "response_total",
            to,
            &[("status_code", "200"), ("classification", "success")],
            1.0,
        );

        // Down: nginx serves the file, curl hashes what arrives.
        let to = SocketAddr::new(family.peer(), HTTP1);
        let run = netns_tests::Run::of(
            pods.pod
                .command("bash")
                .arg("-c")
                .arg(
                    r#"set -o pipefail; curl -sS -g --fail --noproxy '*' --max-time 120 "$1" | sha256sum"#,
                )
                .arg("bash")
                .arg(url(to, "/big")),
        )
        .expect_ok();
        let got = run.stdout.split_whitespace().next().unwrap_or("");
        assert_eq!(got, sha, "{family:?} download\n{run}");
        pair.expect(
            "response_total",
            to,
            &[("status_code", "200"), ("classification", "success")],
            1.0,
        );
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
    let _nginx = nginx(&pods.peer, &scratch);
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
    let run = netns_tests::Run::of(
        pods.pod
            .command("bash")
            .arg("-c")
            .arg(r#"set -o pipefail; curl -sS --fail --noproxy '*' --max-time 120 --limit-rate 50M "$1" | sha256sum"#)
            .arg("bash")
            .arg(url(to, "/big")),
    )
    .expect_ok();
    assert_eq!(
        run.stdout.split_whitespace().next(),
        Some(sha.as_str()),
        "{run}"
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
        let run = apps::python_client(&pods.pod, "ws_echo.py", &["call", &format!("ws://{to}/")])
            .expect_ok();
        let result: serde_json::Value =
            serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}\n{run}"));
        assert_eq!(result["status"], 101, "{run}");
        assert_eq!(result["echoed"], result["sent"], "{run}");
        assert!(result.get("mismatch_at").is_none(), "{run}");
        pair.expect("request_total", to, &[], 1.0);
        pair.expect(
            "response_total",
            to,
            &[("status_code", "101"), ("classification", "success")],
            1.0,
        );
    }
}

// ---------------------------------------------------------------------------------------
// promtool

/// `promtool check metrics` (Debian's prometheus package) must accept `text`.
#[track_caller]
fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (package prometheus): {e}"));
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Linkerd's latency buckets, in seconds (DESIGN.md).
const BUCKETS: [&str; 25] = [
    "0.001", "0.002", "0.003", "0.004", "0.005", "0.01", "0.02", "0.03", "0.04", "0.05", "0.1",
    "0.2", "0.3", "0.4", "0.5", "1", "2", "3", "4", "5", "10", "20", "30", "40", "50",
];

#[test]
fn promtool_accepts_the_metrics_after_http1_and_http2_traffic() {
    let pods = Pods::new("http_promtool");
    let scratch = Scratch::new("http_promtool");
    let _nginx = nginx(&pods.peer, &scratch);
    let pair = mesh_both(&pods);
    let h1 = SocketAddr::new(Family::V4.peer(), HTTP1);
    let h2 = SocketAddr::new(Family::V6.peer(), H2C);
    let mut urls = repeat(h1, "/ok", 3);
    urls.extend(repeat(h1, "/fail", 2));
    let mut args = vec!["-g", "-w", "%{http_code}\n"];
    args.extend(strs(&urls));
    curl(&pods.pod, &args).expect_ok();
    let run = h2load(&pods.pod, &["-n", "10", "-c", "1", "-m", "5"], h2, "/ok");
    assert_eq!(h2load_requests(&run, "succeeded"), 10, "{run}");

    for (target, n) in [(h1, 5.0), (h2, 10.0)] {
        pair.expect("request_total", target, &[], n);
        let scrapes = pair.expect("response_latency_seconds_count", target, &[], n);
        // Every request took well under 50 s: the last finite bucket holds them all (`le`
        // compared as a number: "50" and "50.0" are the same bound).
        for (metrics, direction) in [(scrapes.0, "outbound"), (scrapes.1, "inbound")] {
            let target = target.to_string();
            let in_last_bucket: f64 = metrics
                .samples("response_latency_seconds_bucket")
                .filter(|(labels, _)| {
                    let has = |k: &str, v: &str| labels.iter().any(|(lk, lv)| lk == k && lv == v);
                    has("direction", direction)
                        && has("target_addr", &target)
                        && labels
                            .iter()
                            .any(|(k, v)| k == "le" && v.parse::<f64>().ok() == Some(50.0))
                })
                .map(|(_, value)| value)
                .sum();
            assert_eq!(in_last_bucket, n, "{direction} {target}\n{metrics}");
        }
    }
    for proxy in [&pair.outbound, &pair.inbound] {
        let metrics = proxy.metrics();
        for family in ["request_total", "response_total"] {
            let name = family.trim_end_matches("_total");
            assert!(
                metrics.text.contains(&format!("# TYPE {name} counter\n"))
                    || metrics.text.contains(&format!("# TYPE {family} counter\n")),
                "no counter {family}\n{metrics}"
            );
        }
        assert!(
            metrics
                .text
                .contains("# TYPE response_latency_seconds histogram\n"),
            "{metrics}"
        );
        let les: Vec<String> = metrics
            .samples("response_latency_seconds_bucket")
            .filter_map(|(labels, _)| labels.into_iter().find(|(k, _)| k == "le").map(|l| l.1))
            .collect();
        for bucket in BUCKETS.iter().chain(&["+Inf"]) {
            assert!(
                les.iter()
                    .any(|le| le == bucket || le.parse::<f64>().ok() == bucket.parse().ok()),
                "no bucket le={bucket}\n{metrics}"
            );
        }
        promtool_check(&metrics.text);
    }
}

// ---------------------------------------------------------------------------------------
// Errors the proxy generates

/// `curl -i` (the response head and body), with its status code.
fn curl_head(ns: &Netns, to: SocketAddr, path: &str) -> (u16, String) {
    let run = curl(ns, &["-g", "-i", &url(to, path)]).expect_ok();
    let status = run
        .stdout
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line\n{run}"));
    (status, run.stdout)
}

/// The value of header `name` in a response head, case-insensitively.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .split("\r\n\r\n")
        .next()?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[test]
fn the_proxy_answers_502_with_meshproxy_error_for_a_refused_destination() {
    let pods = Pods::new("http_502");
    // First only the pod is meshed: its outbound proxy meets the refusal itself.
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), NOBODY);
        let (status, response) = curl_head(&pods.pod, to, "/x");
        assert_eq!(status, 502, "{to}\n{response}");
        assert_eq!(
            header(&response, "meshproxy-error"),
            Some("connection refused"),
            "{to}\n{response}"
        );
        expect(
            &outbound,
            "outbound",
            "response_total",
            to,
            &[("status_code", "502"), ("classification", "failure")],
            1.0,
        );
    }

    // Then the peer is meshed too: its inbound proxy meets the refusal, and the 502 it
    // makes comes back through the pod's outbound proxy unchanged; both count a failure.
    pods.peer.meshinit(&["apply"]).expect_ok();
    let inbound = pods.peer.start_meshproxy(&[]);
    let to = SocketAddr::new(Family::V4.peer(), NOBODY);
    let (status, response) = curl_head(&pods.pod, to, "/y");
    assert_eq!(status, 502, "{to}\n{response}");
    assert_eq!(
        header(&response, "meshproxy-error"),
        Some("connection refused"),
        "{to}\n{response}"
    );
    expect(
        &outbound,
        "outbound",
        "response_total",
        to,
        &[("status_code", "502"), ("classification", "failure")],
        2.0,
    );
    expect(
        &inbound,
        "inbound",
        "response_total",
        to,
        &[("status_code", "502"), ("classification", "failure")],
        1.0,
    );
}

#[test]
fn the_proxy_answers_504_with_meshproxy_error_when_the_connect_times_out() {
    /// Where the peer drops every SYN.
    const BLACKHOLE: u16 = 8098;
    let pods = Pods::new("http_504");
    pods.peer
        .exec(&["nft", "add table inet blackhole"])
        .expect_ok();
    pods.peer
        .exec(&[
            "nft",
            "add chain inet blackhole input { type filter hook input priority 0; }",
        ])
        .expect_ok();
    pods.peer
        .exec(&[
            "nft",
            &format!("add rule inet blackhole input tcp dport {BLACKHOLE} drop"),
        ])
        .expect_ok();
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&["--connect-timeout=300ms"]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), BLACKHOLE);
        let started = std::time::Instant::now();
        let (status, response) = curl_head(&pods.pod, to, "/x");
        let took = started.elapsed();
        assert_eq!(status, 504, "{to}\n{response}");
        assert_eq!(
            header(&response, "meshproxy-error"),
            Some("connect timeout"),
            "{to}\n{response}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{to}: the 504 took {took:?} with a 300 ms connect timeout"
        );
        expect(
            &outbound,
            "outbound",
            "response_total",
            to,
            &[("status_code", "504"), ("classification", "failure")],
            1.0,
        );
    }
}

#[test]
fn the_proxy_answers_400_with_meshproxy_error_for_a_request_that_does_not_parse() {
    let pods = Pods::new("http_400");
    let scratch = Scratch::new("http_400");
    let _nginx = nginx(&pods.peer, &scratch);
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    for family in Family::ALL {
        // A request line that detection takes for HTTP/1, then a header line without a
        // colon, which no HTTP parser accepts.
        let to = SocketAddr::new(family.peer(), HTTP1);
        let response = pods.pod.run(|| {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream
                .write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
                .unwrap();
            let mut response = Vec::new();
            // The proxy answers and closes; a proxy that hangs fails at the read timeout.
            let _ = stream.read_to_end(&mut response);
            String::from_utf8_lossy(&response).into_owned()
        });
        assert!(
            response.starts_with("HTTP/1.1 400 "),
            "{to}: expected 400 from the proxy\n{response}"
        );
        assert_eq!(
            header(&response, "meshproxy-error"),
            Some("bad request"),
            "{to}\n{response}"
        );
        expect(
            &outbound,
            "outbound",
            "response_total",
            to,
            &[("status_code", "400"), ("classification", "failure")],
            1.0,
        );
    }
}

// ---------------------------------------------------------------------------------------
// The mTLS pair

#[test]
fn over_mtls_200_client_connections_share_a_handful_of_proxy_connections() {
    const CLIENTS: u64 = 200;
    /// "A handful": the pool may race a few connections open at first, never one per client.
    const MAX_MTLS_CONNECTIONS: f64 = 5.0;
    let pods = Pods::new("http_mtls_pool");
    let mesh = Mesh::new("http_mtls_pool", &pods);
    let _nginx = nginx(&pods.peer, &mesh.scratch);
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
    expect(
        &a,
        "outbound",
        "tcp_open_total",
        to,
        &[("protocol", "http1")],
        CLIENTS as f64,
    );
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
    let _nginx = nginx(&pods.peer, &mesh.scratch);
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
    let run = curl(
        &pods.pod,
        &[
            "-X",
            "PATCH",
            "-H",
            "Host: Shop.Example:8080",
            "-H",
            "X-Custom: kept as is",
            &url(to, "/echo?a=1&b=%20"),
        ],
    )
    .expect_ok();
    assert_eq!(
        run.stdout, "Shop.Example:8080 PATCH /echo?a=1&b=%20 kept as is HTTP/1.1\n",
        "{run}"
    );
    let run = curl(
        &pods.pod,
        &["-w", "%{http_code}", "-o", "/dev/null", &url(to, "/fail")],
    )
    .expect_ok();
    assert_eq!(run.stdout, "503", "{run}");
    expect(&a, "outbound", "request_total", to, &tls, 2.0);
    expect(
        &a,
        "outbound",
        "response_total",
        to,
        &[
            ("status_code", "503"),
            ("classification", "failure"),
            ("tls", "true"),
        ],
        1.0,
    );
    b.wait_for_metric(
        "response_total",
        &[
            ("direction", "inbound"),
            ("status_code", "503"),
            ("classification", "failure"),
            ("tls", "true"),
        ],
        1.0,
        METRICS_TIMEOUT,
    );

    // gRPC: statuses in trailers and a bidirectional stream, across the mTLS hop.
    let to = SocketAddr::new(Family::V4.peer(), GRPC);
    let run =
        apps::python_client(&pods.pod, "grpc_echo.py", &["call", &to.to_string()]).expect_ok();
    let result: serde_json::Value =
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}\n{run}"));
    assert_eq!(result["echo"], "hello through the mesh", "{run}");
    assert_eq!(result["missing"]["code"], 5, "{run}");
    assert_eq!(result["chat"]["code"], 0, "{run}");
    assert_eq!(result["chat"]["echoed"], result["chat"]["sent"], "{run}");
    expect(
        &a,
        "outbound",
        "response_total",
        to,
        &[
            ("grpc_status", "5"),
            ("classification", "failure"),
            ("tls", "true"),
        ],
        1.0,
    );
    b.wait_for_metric(
        "response_total",
        &[
            ("direction", "inbound"),
            ("grpc_status", "5"),
            ("classification", "failure"),
            ("tls", "true"),
        ],
        1.0,
        METRICS_TIMEOUT,
    );

    // A WebSocket, upgraded across the mTLS hop.
    let to = SocketAddr::new(Family::V4.peer(), WS);
    let run =
        apps::python_client(&pods.pod, "ws_echo.py", &["call", &format!("ws://{to}/")]).expect_ok();
    let result: serde_json::Value =
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}\n{run}"));
    assert_eq!(result["status"], 101, "{run}");
    assert_eq!(result["echoed"], result["sent"], "{run}");
    expect(&a, "outbound", "request_total", to, &tls, 1.0);
}
