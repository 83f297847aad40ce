//! meshproxy speaks HTTP, through meshinit's real rules, between real clients and servers:
//! HTTP/1 and HTTP/2 counts, classification, headers, promtool and the errors the proxy
//! makes. (`http_apps.rs`: gRPC, WebSocket and large bodies; `http_mtls.rs`: the mTLS pair;
//! the shared set-up is `netns_tests::http`.)
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
//! - A Host with a quote, brace and backslash keeps `/metrics` parseable; a client naming
//!   3,000 authorities leaves the request label sets at their cap.
//! - HTTP/2 with prior knowledge: `h2load` multiplexing 1,000 requests over 2 connections to
//!   `nghttpd`, each request counted; 20 MiB through `nghttp`'s 64 KiB windows intact.
//! - `promtool check metrics` accepts `/metrics` after HTTP traffic, with the histogram.
//! - Errors the proxy generates: 502 with `meshproxy-error` for a refused destination, 504
//!   for a connect that times out (SYNs dropped), 400 for a request that does not parse,
//!   each counted as a failure.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netns_tests::apps::{self, curl, h2load, h2load_requests, url};
use netns_tests::http::*;
use netns_tests::mesh::Scratch;
use netns_tests::{Family, Pods};

/// Linkerd's latency buckets, in seconds (DESIGN.md).
const BUCKETS: [&str; 25] = [
    "0.001", "0.002", "0.003", "0.004", "0.005", "0.01", "0.02", "0.03", "0.04", "0.05", "0.1",
    "0.2", "0.3", "0.4", "0.5", "1", "2", "3", "4", "5", "10", "20", "30", "40", "50",
];

// ---------------------------------------------------------------------------------------
// HTTP/1

#[test]
fn http1_1000_requests_on_one_keep_alive_connection_count_1000_at_each_proxy() {
    const REQUESTS: usize = 1000;
    const PIPELINED: u64 = 200;
    let pods = Pods::new("http_keepalive");
    let scratch = Scratch::new("http_keepalive");
    let _nginx = nginx_sites(&pods.peer, &scratch);
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
        expect_connections(&pair.outbound, "outbound", to, "http1", 1.0);
        // Each request counted, at both proxies.
        pair.expect("request_total", to, &[], REQUESTS as f64);
        pair.expect_responses(to, "200", "success", REQUESTS as f64);

        // Pipelining: h2load sends up to 10 requests before reading the first answer.
        let run = h2load(
            &pods.pod,
            &["--h1", "-n", &PIPELINED.to_string(), "-c", "1", "-m", "10"],
            to,
            "/ok",
        );
        assert_eq!(h2load_requests(&run, "succeeded"), PIPELINED, "{run}");
        pair.expect("request_total", to, &[], REQUESTS as f64 + PIPELINED as f64);
        expect_connections(&pair.outbound, "outbound", to, "http1", 2.0);

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
    let _nginx = nginx_sites(&pods.pod, &scratch);
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
        expect_connections(&inbound, "inbound", to, "http1", 1.0);
        expect(
            &inbound,
            "inbound",
            "request_total",
            to,
            &[],
            REQUESTS as f64,
        );
        expect_responses(&inbound, "inbound", to, "200", "success", REQUESTS as f64);
    }
}

#[test]
fn responses_are_classified_by_status_over_http1_and_http2_and_requests_arrive_unchanged() {
    let pods = Pods::new("http_classification");
    let scratch = Scratch::new("http_classification");
    let _nginx = nginx_sites(&pods.peer, &scratch);
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
            pair.expect_responses(to, code, class, n);
        }
        pair.expect("request_total", to, &[], 18.0);

        // The application does not notice: Host (with its case), method, path and query,
        // a custom header reach nginx as the client sent them.
        assert_echo_unchanged(&pods.pod, to);

        // HTTP/2 with prior knowledge to nginx: 20 x 503 multiplexed on one connection.
        let to = SocketAddr::new(family.peer(), H2C);
        let run = h2load(&pods.pod, &["-n", "20", "-c", "1", "-m", "5"], to, "/fail");
        assert!(run.stdout.contains("20 5xx"), "{run}");
        pair.expect_responses(to, "503", "failure", 20.0);
        pair.expect("response_total", to, &[("classification", "success")], 0.0);
        expect_connections(&pair.outbound, "outbound", to, "http2", 1.0);
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
fn hostile_and_3000_distinct_authorities_keep_the_metrics_parseable_and_capped() {
    const AUTHORITIES: usize = 3000;
    /// docs/design.md: 512 request label sets, 2,048 response label sets.
    const MAX_REQUEST_SETS: usize = 512;
    const MAX_RESPONSE_SETS: usize = 2048;
    let pods = Pods::new("http_authority_cap");
    let scratch = Scratch::new("http_authority_cap");
    let _nginx = nginx_sites(&pods.peer, &scratch);
    pods.pod.meshinit(&["apply"]).expect_ok();
    let outbound = pods.pod.start_meshproxy(&[]);
    let to = SocketAddr::new(Family::V4.peer(), HTTP1);

    // First a Host that would break the text format if it were copied into a label as is
    // (label values are not escaped by every encoder): every later scrape must still parse.
    curl(
        &pods.pod,
        &["-o", "/dev/null", "-H", "Host: x\"} 1\\y", &url(to, "/ok")],
    )
    .expect_ok();
    let metrics = outbound.wait_for_metric(
        "request_total",
        &[("direction", "outbound")],
        1.0,
        METRICS_TIMEOUT,
    );
    promtool_check(&metrics.text);

    // One connection, 3,000 pipelined requests, each with its own Host: what a client
    // (not a well-behaved one) may send.
    let heads = (0..AUTHORITIES)
        .map(|i| format!("GET /ok HTTP/1.1\r\nHost: host-{i}.example\r\n"))
        .collect();
    let responses = pipelined(&pods.pod, to, heads);
    assert_eq!(
        responses.matches("HTTP/1.1 200 ").count(),
        AUTHORITIES,
        "not every request was answered"
    );

    // Every request is counted, most of them under the overflow label set.
    let metrics = outbound.wait_for_metric(
        "request_total",
        &[("direction", "outbound")],
        AUTHORITIES as f64 + 1.0,
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
        expect_connections(&pair.outbound, "outbound", to, "http2", 2.0);
        pair.expect("request_total", to, &[], REQUESTS as f64);
        pair.expect_responses(to, "200", "success", REQUESTS as f64);

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
        assert_fetched_sha256(
            &pods.pod,
            r#"nghttp -w 16 -W 16 --no-dep"#,
            &url(to, "/big"),
            &big_sha,
        );
        pair.expect("request_total", to, &[], REQUESTS as f64 + 2.0);
    }
}

// ---------------------------------------------------------------------------------------
// promtool

#[test]
fn promtool_accepts_the_metrics_after_http1_and_http2_traffic() {
    let pods = Pods::new("http_promtool");
    let scratch = Scratch::new("http_promtool");
    let _nginx = nginx_sites(&pods.peer, &scratch);
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
        expect_responses(&outbound, "outbound", to, "502", "failure", 1.0);
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
    expect_responses(&outbound, "outbound", to, "502", "failure", 2.0);
    expect_responses(&inbound, "inbound", to, "502", "failure", 1.0);
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
        expect_responses(&outbound, "outbound", to, "504", "failure", 1.0);
    }
}

#[test]
fn the_proxy_answers_400_with_meshproxy_error_for_a_request_that_does_not_parse() {
    let pods = Pods::new("http_400");
    let scratch = Scratch::new("http_400");
    let _nginx = nginx_sites(&pods.peer, &scratch);
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
        expect_responses(&outbound, "outbound", to, "400", "failure", 1.0);
    }
}
