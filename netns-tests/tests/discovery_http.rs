//! `--discovery`, per request (issue 13): HTTP requests to a service address are balanced
//! one by one, so many requests on ONE keep-alive client connection are spread over the
//! endpoints: a backend by weight, then an endpoint by power-of-two-choices over its
//! peak-EWMA latency. The pod dials 198.18.100.10:8080, which exists nowhere (a route
//! towards the peer lets it out to meshinit's redirect); the endpoints are Python
//! `http.server`s in the peer namespace, each answering its own name, one of them 20 ms
//! late.
//!
//! The request metrics name what really happened: the service of a 503 `no backend` or a
//! 400, the backend that answered a request retried after refused connects (or the one
//! tried last), `tls="true"` and `server_id` for an endpoint reached over mTLS; and every
//! refused connect, and every connect that worked, reaches the endpoint's failure record.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::mesh::{contains, Capture, DevCa, Mesh, Scratch, PEER_ID, POD_ID};
use netns_tests::{MeshProxy, Netns, Pods, Run, Spawned};

const SERVICE: &str = "198.18.100.10:8080";

/// How long a counter may take to show what a client just saw.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

/// A change of the file is in force for new requests within this (the contract).
const SHIFT_DEADLINE: Duration = Duration::from_secs(1);

/// An HTTP/1.1 server (keep-alive) answering every GET with `name\n` after `delay_ms`.
const SERVER: &str = r#"
import sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
name, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(delay)
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"#;

fn service() -> SocketAddr {
    SERVICE.parse().expect("an address")
}

/// `python3` serving `name` on `port` of every IPv4 address of `ns`, answering after
/// `delay_ms`. Killed on `Drop` of the guard.
fn start_http(ns: &Netns, port: u16, name: &str, delay_ms: u32) -> Spawned {
    let mut cmd = ns.command("python3");
    cmd.args(["-c", SERVER, name, &port.to_string(), &delay_ms.to_string()]);
    let mut server = ns.spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("http://127.0.0.1:{port}/");
    loop {
        // Over loopback, which meshinit's rules (when any) exempt.
        let get = Run::of(ns.command("curl").args(["-s", "--max-time", "2", &url]));
        if get.success() && get.stdout.trim() == name {
            return server;
        }
        if !server.is_running() || Instant::now() > deadline {
            panic!("`{}` is not answering\n{get}", server.command());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a discovery file the way a node agent should: a new file renamed over the old.
fn write_discovery(path: &Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).expect("write the discovery file");
    std::fs::rename(&staged, path).expect("rename the discovery file");
}

/// The service `web` over backends `a` and `b`, each of the endpoints given (ports of the
/// peer), weighted so.
fn web(backends: &[(&str, i64, &[u16])]) -> String {
    let mut text =
        format!("[[service]]\nname = \"web\"\naddrs = [\"{SERVICE}\"]\nprotocol = \"http1\"\n");
    for (name, weight, ports) in backends {
        let endpoints: Vec<String> = ports
            .iter()
            .map(|p| format!("{{ addr = \"198.18.0.2:{p}\" }}"))
            .collect();
        text += &format!(
            "[[service.backend]]\nname = \"{name}\"\nweight = {weight}\nendpoints = [ {} ]\n",
            endpoints.join(", ")
        );
    }
    text
}

struct Setup {
    scratch: Scratch,
    _servers: Vec<Spawned>,
}

/// meshinit's rules in the pod, the service route, and one HTTP server per
/// `(port, name, delay_ms)` in the peer.
fn setup(test_name: &str, pods: &Pods, servers: &[(u16, &str, u32)]) -> Setup {
    let scratch = Scratch::new(test_name);
    pods.pod.meshinit(&[]).expect_ok();
    pods.pod
        .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.2"])
        .expect_ok();
    let servers = servers
        .iter()
        .map(|(port, name, delay)| start_http(&pods.peer, *port, name, *delay))
        .collect();
    Setup {
        scratch,
        _servers: servers,
    }
}

fn start_proxy<'p>(pods: &'p Pods, discovery: &Path) -> MeshProxy<'p> {
    let path = discovery.to_str().expect("a UTF-8 path");
    pods.pod.start_meshproxy(&["--discovery", path])
}

/// `curl` in the pod: `count` GETs of the service, one after another on one keep-alive
/// connection (URL globbing reuses the connection). Returns each response's body line and
/// the number of connections curl opened.
fn curl_many(pods: &Pods, count: usize) -> (Vec<String>, u64) {
    let url = format!("http://{SERVICE}/[1-{count}]");
    let run = Run::of(pods.pod.command("curl").args([
        "-sS",
        "--fail",
        "--max-time",
        "60",
        "-w",
        "connects=%{num_connects}\\n",
        &url,
    ]));
    assert!(run.success(), "{run}");
    let mut names = Vec::new();
    let mut connects = 0;
    for line in run.stdout.lines() {
        match line.strip_prefix("connects=") {
            Some(n) => connects += n.parse::<u64>().expect("a number of connects"),
            None => names.push(line.to_string()),
        }
    }
    assert_eq!(names.len(), count, "{run}");
    (names, connects)
}

/// One HTTP/1.1 keep-alive client connection, in-process (so that each request's time is
/// known exactly).
struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A response: its status, headers (lower-case names) and body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl KeepAlive {
    fn connect(pods: &Pods) -> KeepAlive {
        let stream = pods.pod.connect(service()).expect("connect to the service");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a read timeout");
        KeepAlive {
            reader: BufReader::new(stream.try_clone().expect("a second handle")),
            writer: stream,
        }
    }

    fn get(&mut self) -> io::Result<Response> {
        self.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")?;
        let mut status_line = String::new();
        read_line(&mut self.reader, &mut status_line)?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            read_line(&mut self.reader, &mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no content-length in {headers:?}")))?;
        let mut body = vec![0; length];
        read_exact(&mut self.reader, &mut body)?;
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        })
    }
}

/// A line, retrying reads interrupted by a signal (SO_RCVTIMEO reads are never restarted;
/// another test's child exiting can interrupt one); EOF is an error.
fn read_line(reader: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<()> {
    loop {
        match reader.read_line(line) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn read_exact(reader: &mut BufReader<TcpStream>, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match reader.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Of two endpoints of one backend, one 20 ms slower, the faster gets most of 300
/// requests sent one after another on ONE keep-alive connection (curl), and both get
/// some: the choice is made per request, by latency. The request metrics carry the
/// service and backend.
#[test]
fn of_two_http_endpoints_the_one_20ms_slower_gets_few_requests_of_one_connection() {
    let pods = Pods::new("dh-ewma");
    let setup = setup("dh-ewma", &pods, &[(8081, "fast", 0), (8082, "slow", 20)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8081, 8082])]));
    let proxy = start_proxy(&pods, &file);

    let (names, connects) = curl_many(&pods, 300);
    assert_eq!(connects, 1, "curl opened {connects} connections");
    let fast = names.iter().filter(|n| *n == "fast").count();
    let slow = names.iter().filter(|n| *n == "slow").count();
    assert_eq!(fast + slow, 300, "{names:?}");
    assert!(
        fast >= 210,
        "only {fast} of 300 on the fast endpoint\n{}",
        proxy.report()
    );
    assert!(
        slow >= 1,
        "the slow endpoint got nothing: per connection, not per request?"
    );

    let metrics = proxy.wait_for_metric(
        "response_total",
        &[
            ("direction", "outbound"),
            ("dst_service", "web"),
            ("dst_backend", "a"),
        ],
        300.0,
        METRIC_TIMEOUT,
    );
    assert_eq!(
        metrics.sum(
            "response_total",
            &[("dst_service", "web"), ("classification", "success")]
        ),
        300.0,
        "{metrics}"
    );
    // One client connection for all of it.
    assert_eq!(
        metrics.sum(
            "tcp_open_total",
            &[("direction", "outbound"), ("target_addr", SERVICE)]
        ),
        1.0,
        "{metrics}"
    );
}

/// Two backends of one endpoint each: rewriting the file from 100/0 to 0/100 moves the
/// requests of ONE open keep-alive connection from `a` to `b` within 1 s, with no failed
/// request; then all-zero weights answer 503 with `meshproxy-error`, on the same
/// connection.
#[test]
fn a_weight_shift_moves_the_requests_of_one_keep_alive_connection_within_1s() {
    let pods = Pods::new("dh-shift");
    let setup = setup("dh-shift", &pods, &[(8081, "a", 0), (8082, "b", 0)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 100, &[8081]), ("b", 0, &[8082])]));
    let proxy = start_proxy(&pods, &file);

    let mut client = KeepAlive::connect(&pods);
    let mut results = Vec::new();
    let start = Instant::now();
    let mut shifted_at = None;
    while start.elapsed() < Duration::from_millis(2500) {
        if shifted_at.is_none() && start.elapsed() > Duration::from_millis(700) {
            write_discovery(&file, &web(&[("a", 0, &[8081]), ("b", 100, &[8082])]));
            shifted_at = Some(Instant::now());
        }
        let sent = Instant::now();
        let response = client.get();
        let ok = matches!(&response, Ok(r) if r.status == 200);
        assert!(
            ok,
            "request {}: {response:?}\n{}",
            results.len(),
            proxy.report()
        );
        results.push((sent, response.map(|r| r.body).unwrap_or_default()));
    }
    let shifted_at = shifted_at.expect("the file was rewritten");
    for (sent, name) in &results {
        if *sent < shifted_at {
            assert_eq!(name, "a", "before the shift");
        } else if *sent > shifted_at + SHIFT_DEADLINE {
            assert_eq!(name, "b", "{:?} after the shift", *sent - shifted_at);
        }
    }
    let late = results
        .iter()
        .filter(|(s, _)| *s > shifted_at + SHIFT_DEADLINE)
        .count();
    assert!(late >= 10, "only {late} requests after the deadline");
    let took = results
        .iter()
        .find(|(s, n)| *s > shifted_at && n == "b")
        .map(|(s, _)| *s - shifted_at);
    println!("first request on b {took:?} after the file changed");

    // All-zero weights: 503 from the proxy itself, named, on the same connection.
    write_discovery(&file, &web(&[("a", 0, &[8081]), ("b", 0, &[8082])]));
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let response = client.get().expect("an answer");
        if response.status != 200 || Instant::now() > deadline {
            break response;
        }
    };
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.headers.iter().any(|(n, _)| n == "meshproxy-error"),
        "{refused:?}"
    );
    proxy.wait_for_metric(
        "response_total",
        &[("target_addr", SERVICE), ("status_code", "503")],
        1.0,
        METRIC_TIMEOUT,
    );
}

/// Two endpoints answering equally fast and ten clients each sending requests on one
/// keep-alive connection at once: requests in flight raise an endpoint's cost, so both
/// endpoints serve a fair share of every connection.
#[test]
fn concurrent_keep_alive_connections_spread_over_equal_endpoints() {
    let pods = Pods::new("dh-spread");
    let setup = setup("dh-spread", &pods, &[(8081, "one", 5), (8082, "two", 5)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8081, 8082])]));
    let proxy = start_proxy(&pods, &file);
    let per_connection: Vec<(usize, usize)> = thread::scope(|scope| {
        let clients: Vec<_> = (0..10)
            .map(|_| {
                scope.spawn(|| {
                    let mut client = KeepAlive::connect(&pods);
                    let mut counts = (0, 0);
                    for _ in 0..60 {
                        match client.get() {
                            Ok(r) if r.status == 200 && r.body == "one" => counts.0 += 1,
                            Ok(r) if r.status == 200 && r.body == "two" => counts.1 += 1,
                            other => panic!("{other:?}"),
                        }
                    }
                    counts
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("a client"))
            .collect()
    });
    let one: usize = per_connection.iter().map(|c| c.0).sum();
    let two: usize = per_connection.iter().map(|c| c.1).sum();
    assert!(
        (180..=420).contains(&one) && one + two == 600,
        "{one} on one, {two} on two: {per_connection:?}\n{}",
        proxy.report()
    );
    // Most connections reached both endpoints.
    let both = per_connection.iter().filter(|c| c.0 > 0 && c.1 > 0).count();
    assert!(both >= 8, "{per_connection:?}");
}

/// `nghttpd` (nghttp2-server) serving h2c on `port` of every address of `ns`, a file
/// `name` that holds `name`. Killed on `Drop` of the guard.
fn start_h2c(ns: &Netns, dir: &Path, port: u16, name: &str) -> Spawned {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("a document root");
    std::fs::write(root.join("name"), format!("{name}\n")).expect("write the page");
    let mut cmd = ns.command("nghttpd");
    cmd.args(["--no-tls", "-d"])
        .arg(&root)
        .arg(port.to_string());
    let mut server = ns.spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("http://127.0.0.1:{port}/name");
    loop {
        let get = Run::of(ns.command("curl").args([
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "2",
            &url,
        ]));
        if get.success() && get.stdout.trim() == name {
            return server;
        }
        if !server.is_running() || Instant::now() > deadline {
            panic!("`{}` is not answering\n{get}", server.command());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// HTTP/2 too: 400 requests on ONE h2c connection (h2load, one connection, one stream
/// at a time) to a service of two backends weighted 50/50, one nghttpd endpoint each:
/// each backend serves 40–60% of them, counted by the proxy's request metrics, so the
/// weights apply per request over the proxy's HTTP/2 connections to each endpoint.
#[test]
fn the_requests_of_one_http2_connection_are_balanced_one_by_one() {
    let pods = Pods::new("dh-h2");
    let setup = setup("dh-h2", &pods, &[]);
    let _servers = [
        start_h2c(&pods.peer, setup.scratch.path(), 8081, "one"),
        start_h2c(&pods.peer, setup.scratch.path(), 8082, "two"),
    ];
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 50, &[8081]), ("b", 50, &[8082])]));
    let proxy = start_proxy(&pods, &file);
    let url = format!("http://{SERVICE}/name");
    let run = Run::of(
        pods.pod
            .command("h2load")
            .args(["-n", "400", "-c", "1", "-m", "1", &url]),
    );
    assert!(run.success(), "{run}\n{}", proxy.report());
    assert!(
        run.stdout.contains("400 succeeded, 0 failed, 0 errored"),
        "{run}"
    );
    let metrics = proxy.wait_for_metric(
        "response_total",
        &[("dst_service", "web"), ("classification", "success")],
        400.0,
        METRIC_TIMEOUT,
    );
    let on_a = metrics.sum(
        "response_total",
        &[("dst_backend", "a"), ("status_code", "200")],
    );
    assert!(
        (160.0..=240.0).contains(&on_a),
        "{on_a} of 400 on a\n{metrics}"
    );
    assert_eq!(
        metrics.sum(
            "tcp_open_total",
            &[("target_addr", SERVICE), ("protocol", "http2")]
        ),
        1.0,
        "{metrics}"
    );
}

/// One of two endpoints refuses connections (nothing listens on 8090): a request whose
/// connect is refused was not sent, so it is tried on the other endpoint, and no client
/// request fails; the refusing endpoint's failure also weighs as a 1 s response in its
/// estimate, so it is hardly picked again. Then a backend whose only endpoint refuses
/// hands its requests to the other backend, again without a failed request.
#[test]
fn a_refusing_http_endpoint_or_backend_costs_no_request_a_failure() {
    let pods = Pods::new("dh-refuse");
    let setup = setup("dh-refuse", &pods, &[(8081, "a", 0), (8082, "b", 0)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8090, 8081])]));
    let proxy = start_proxy(&pods, &file);
    let mut client = KeepAlive::connect(&pods);
    for i in 0..200 {
        let response = client.get();
        assert!(
            matches!(&response, Ok(r) if r.status == 200 && r.body == "a"),
            "request {i}: {response:?}\n{}",
            proxy.report()
        );
    }
    // Backend a's only endpoint refuses; b serves.
    write_discovery(&file, &web(&[("a", 50, &[8090]), ("b", 50, &[8082])]));
    thread::sleep(SHIFT_DEADLINE);
    for i in 0..200 {
        let response = client.get();
        assert!(
            matches!(&response, Ok(r) if r.status == 200 && r.body == "b"),
            "request {i} after the change: {response:?}\n{}",
            proxy.report()
        );
    }
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum(
            "response_total",
            &[("target_addr", SERVICE), ("status_code", "502")]
        ),
        0.0,
        "{metrics}"
    );
}

/// An endpoint with an `identity` is a mesh peer per request too: 50 requests on one
/// keep-alive connection to the service go over pod A's pooled mTLS HTTP/2 connection to
/// pod B's proxy (no `--mesh-peers`: only the discovery file says so), the answer never
/// crosses the veth in plaintext, and B's inbound proxy counts them with A's identity.
#[test]
fn an_endpoint_with_an_identity_gets_its_requests_over_mtls() {
    let pods = Pods::new("dh-mtls");
    let mesh = Mesh::new("dh-mtls", &pods);
    pods.pod
        .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.2"])
        .expect_ok();
    let _server = start_http(&pods.peer, 8081, "secret-endpoint-b", 0);
    let file = mesh.scratch.join("discovery.toml");
    write_discovery(
        &file,
        &web(&[("b", 1, &[8081])]).replace(
            r#"{ addr = "198.18.0.2:8081" }"#,
            &format!(r#"{{ addr = "198.18.0.2:8081", identity = "{PEER_ID}" }}"#),
        ),
    );
    let b = mesh.start_b(&pods, &[]);
    let path = file.to_str().expect("a UTF-8 path");
    let a = mesh.start_a(&pods, None, &["--discovery", path]);

    let capture = Capture::start(&pods.pod, mesh.scratch.join("wire.pcap"));
    let mut client = KeepAlive::connect(&pods);
    for i in 0..50 {
        let response = client.get();
        assert!(
            matches!(&response, Ok(r) if r.status == 200 && r.body == "secret-endpoint-b"),
            "request {i}: {response:?}\n{}\n{}",
            a.report(),
            b.report()
        );
    }
    drop(client);
    let wire = capture.stop();
    assert!(!wire.is_empty());
    assert!(
        !contains(&wire, b"secret-endpoint-b"),
        "the answer crossed in plaintext"
    );
    a.wait_for_metric(
        "response_total",
        &[
            ("direction", "outbound"),
            ("dst_service", "web"),
            ("dst_backend", "b"),
            ("status_code", "200"),
        ],
        50.0,
        METRIC_TIMEOUT,
    );
    b.wait_for_metric(
        "request_total",
        &[("direction", "inbound"), ("client_id", POD_ID)],
        50.0,
        METRIC_TIMEOUT,
    );
    // The hop to the endpoint is our mTLS: the requests say so, as a mesh peer's do.
    let metrics = a.metrics();
    let mtls = [
        ("dst_backend", "b"),
        ("tls", "true"),
        ("server_id", PEER_ID),
    ];
    for name in [
        "request_total",
        "response_total",
        "response_latency_seconds_count",
    ] {
        assert_eq!(metrics.sum(name, &mtls), 50.0, "{name}\n{metrics}");
    }
}

/// The samples of `name` for service `web`, as `backend -> value`, for a failure message.
fn per_backend(metrics: &netns_tests::Metrics, name: &str) -> Vec<(String, f64)> {
    metrics
        .samples(name)
        .filter(|(labels, _)| labels.iter().any(|(k, v)| k == "dst_service" && v == "web"))
        .map(|(labels, value)| {
            let backend = labels
                .iter()
                .find(|(k, _)| k == "dst_backend")
                .map_or("(none)".to_string(), |(_, v)| v.clone());
            (backend, value)
        })
        .collect()
}

/// Every weight 0: the proxy answers 503 `meshproxy-error: no backend` itself, and the
/// request is counted under its service (`dst_service="web"`, an empty `dst_backend`),
/// so a graph of errors per service shows it.
#[test]
fn a_503_no_backend_is_counted_under_its_service() {
    let pods = Pods::new("dh-nobackend");
    let setup = setup("dh-nobackend", &pods, &[(8081, "a", 0)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 0, &[8081])]));
    let proxy = start_proxy(&pods, &file);
    let mut client = KeepAlive::connect(&pods);
    for _ in 0..3 {
        let response = client.get().expect("an answer");
        assert_eq!(response.status, 503, "{response:?}");
        assert!(
            response
                .headers
                .contains(&("meshproxy-error".to_string(), "no backend".to_string())),
            "{response:?}"
        );
    }
    let service = [("dst_service", "web"), ("dst_backend", "")];
    let metrics = proxy.wait_for_metric(
        "response_total",
        &[
            ("dst_service", "web"),
            ("dst_backend", ""),
            ("status_code", "503"),
            ("classification", "failure"),
        ],
        3.0,
        METRIC_TIMEOUT,
    );
    assert_eq!(metrics.sum("request_total", &service), 3.0, "{metrics}");
    assert_eq!(
        metrics.sum("response_latency_seconds_count", &service),
        3.0,
        "{metrics}"
    );
    // Nothing of it is counted without the service.
    assert_eq!(
        metrics.sum("request_total", &[("target_addr", SERVICE)]),
        3.0,
        "{metrics}"
    );
}

/// Backend a's only endpoint refuses; b serves. A request first picked on a is retried on
/// b, and its metrics (request, response, latency) name b, the backend that answered:
/// nothing is counted under a, though a was tried (it is set aside after three refusals).
#[test]
fn a_request_retried_on_another_backend_is_counted_under_the_backend_that_answered() {
    const REQUESTS: usize = 40;
    let pods = Pods::new("dh-relabel");
    let setup = setup("dh-relabel", &pods, &[(8082, "b", 0)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 50, &[8090]), ("b", 50, &[8082])]));
    let proxy = start_proxy(&pods, &file);
    let metrics = all_answered_by_b_with_a_set_aside(&pods, &proxy, REQUESTS);
    for name in ["request_total", "response_latency_seconds_count"] {
        let b = metrics.sum(name, &[("dst_service", "web"), ("dst_backend", "b")]);
        assert_eq!(
            b,
            REQUESTS as f64,
            "{name}: {:?}",
            per_backend(&metrics, name)
        );
        let a = metrics.sum(name, &[("dst_service", "web"), ("dst_backend", "a")]);
        assert_eq!(a, 0.0, "{name}: {:?}", per_backend(&metrics, name));
    }
}

/// Both backends' only endpoints refuse: the request tries both (the second is the only
/// one left), is answered 502, and is counted under the backend tried LAST, which the
/// proxy's log line of the answer names by its endpoint.
#[test]
fn a_request_every_attempt_of_which_fails_is_counted_under_the_backend_tried_last() {
    let pods = Pods::new("dh-lasttried");
    let setup = setup("dh-lasttried", &pods, &[]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8090]), ("b", 1, &[8091])]));
    let proxy = start_proxy(&pods, &file);
    let mut client = KeepAlive::connect(&pods);
    let response = client.get().expect("an answer");
    assert_eq!(response.status, 502, "{response:?}");
    assert!(
        response.headers.contains(&(
            "meshproxy-error".to_string(),
            "connection refused".to_string()
        )),
        "{response:?}"
    );
    let metrics = proxy.wait_for_metric(
        "response_total",
        &[("dst_service", "web"), ("status_code", "502")],
        1.0,
        METRIC_TIMEOUT,
    );
    let log = proxy.log();
    let last = match (
        log.contains("198.18.0.2:8090 refused the connection"),
        log.contains("198.18.0.2:8091 refused the connection"),
    ) {
        (true, false) => "a",
        (false, true) => "b",
        other => panic!("expected one answer naming one endpoint, got {other:?}\n{log}"),
    };
    for name in ["request_total", "response_total"] {
        assert_eq!(
            metrics.sum(name, &[("dst_service", "web"), ("dst_backend", last)]),
            1.0,
            "{name} under {last}, the backend tried last: {:?}",
            per_backend(&metrics, name)
        );
    }
}

/// Three endpoints, all refusing: each request tries all three, and every refusal counts
/// toward setting its endpoint aside, the last attempt's too. Three requests are three
/// failures in a row for each: all three are set aside.
#[test]
fn every_refused_attempt_of_a_request_counts_toward_setting_its_endpoint_aside() {
    let pods = Pods::new("dh-setaside");
    let setup = setup("dh-setaside", &pods, &[]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8090, 8091, 8092])]));
    let proxy = start_proxy(&pods, &file);
    let mut client = KeepAlive::connect(&pods);
    for i in 0..3 {
        let response = client.get().expect("an answer");
        assert_eq!(response.status, 502, "request {i}: {response:?}");
    }
    // Set aside for 10 s: read at once.
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum(
            "balancer_endpoints",
            &[("service", "web"), ("backend", "a"), ("state", "failed")]
        ),
        3.0,
        "{metrics}"
    );
}

/// A service whose backend a is a mesh peer (an endpoint with an identity) whose proxy
/// refuses, and whose backend b is a plain endpoint: a request first picked on a is
/// carried again for b's plain hop (an HTTP/1 request undone from the HTTP/2 it was
/// prepared as) and answered by b, instead of answered 502 because b is reached another
/// way.
#[test]
fn a_request_refused_by_a_mesh_endpoint_is_retried_on_a_plain_one() {
    const REQUESTS: usize = 40;
    let pods = Pods::new("dh-mixed");
    let setup = setup("dh-mixed", &pods, &[(8082, "b", 0)]);
    let ca = DevCa::new(setup.scratch.join("ca"));
    let identity = ca.issue(POD_ID, &setup.scratch.join("a"));
    let file = setup.scratch.join("discovery.toml");
    // No proxy listens at 198.18.0.2:4143: a's connects are refused.
    write_discovery(
        &file,
        &web(&[("a", 50, &[8090]), ("b", 50, &[8082])]).replace(
            r#"{ addr = "198.18.0.2:8090" }"#,
            &format!(r#"{{ addr = "198.18.0.2:8090", identity = "{PEER_ID}" }}"#),
        ),
    );
    let arg = |path: &Path| path.to_str().expect("a UTF-8 path").to_string();
    let args = [
        "--identity-cert".to_string(),
        arg(&identity.cert),
        "--identity-key".to_string(),
        arg(&identity.key),
        "--trust-anchors".to_string(),
        arg(&ca.anchors),
        "--discovery".to_string(),
        arg(&file),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = pods.pod.start_meshproxy(&args);
    let metrics = all_answered_by_b_with_a_set_aside(&pods, &proxy, REQUESTS);
    // b is reached in plaintext: its requests say so, whatever the first pick was.
    assert_eq!(
        metrics.sum("request_total", &[("dst_backend", "b"), ("tls", "false")]),
        REQUESTS as f64,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("request_total", &[("server_id", PEER_ID)]),
        0.0,
        "{metrics}"
    );
}

/// A first request head that does not parse, on a connection to the service: the proxy
/// answers 400 `bad request` itself, and counts it under the service (an empty
/// `dst_backend`: it reached none), like the other answers it gives for the service.
#[test]
fn a_400_bad_request_on_a_balanced_connection_is_counted_under_its_service() {
    let pods = Pods::new("dh-badhead");
    let setup = setup("dh-badhead", &pods, &[(8081, "a", 0)]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8081])]));
    let proxy = start_proxy(&pods, &file);
    let response = pods.pod.run(|| {
        let mut stream = TcpStream::connect_timeout(&service(), Duration::from_secs(2))
            .expect("connect to the service");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("a read timeout");
        // A request line that detection takes for HTTP/1, then a header line without
        // a colon, which no HTTP parser accepts.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nthis is not a header\r\n\r\n")
            .expect("send");
        let mut response = Vec::new();
        // The proxy answers and closes.
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    });
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert!(
        response.contains("meshproxy-error: bad request"),
        "{response}"
    );
    let metrics = proxy.wait_for_metric(
        "response_total",
        &[
            ("dst_service", "web"),
            ("dst_backend", ""),
            ("status_code", "400"),
            ("classification", "failure"),
        ],
        1.0,
        METRIC_TIMEOUT,
    );
    assert_eq!(
        metrics.sum("request_total", &[("dst_service", "web")]),
        1.0,
        "{metrics}"
    );
}

/// A client that goes away while its request's connects are still being tried (three
/// endpoints that never answer a SYN, 1 s each): curl over HTTP/2 gives up after 0.5 s and
/// closes, which resets the stream, and the proxy drops the request. It was received, so
/// it is counted, once, under the service; no response is, since none was sent.
#[test]
fn a_request_whose_client_leaves_during_its_connects_is_counted_once() {
    let pods = Pods::new("dh-leaves");
    let setup = setup("dh-leaves", &pods, &[]);
    let file = setup.scratch.join("discovery.toml");
    // 198.18.100.0/24 is routed to the peer, which forwards nothing: SYNs vanish.
    let silent = [20, 21, 22].map(|n| format!("{{ addr = \"198.18.100.{n}:80\" }}"));
    write_discovery(
        &file,
        &web(&[("a", 1, &[8090])]).replace(r#"{ addr = "198.18.0.2:8090" }"#, &silent.join(", ")),
    );
    let proxy = start_proxy(&pods, &file);
    let run = Run::of(pods.pod.command("curl").args([
        "-sS",
        "--http2-prior-knowledge",
        "--max-time",
        "0.5",
        &format!("http://{SERVICE}/"),
    ]));
    assert!(!run.success(), "nothing can answer: {run}");
    let web = [("dst_service", "web")];
    proxy.wait_for_metric("request_total", &web, 1.0, METRIC_TIMEOUT);
    // Past the three connect timeouts: still one request, and no response.
    thread::sleep(Duration::from_secs(4));
    let metrics = proxy.metrics();
    assert_eq!(metrics.sum("request_total", &web), 1.0, "{metrics}");
    assert_eq!(metrics.sum("response_total", &web), 0.0, "{metrics}");
}

/// "Three consecutive connect failures set an endpoint aside", as for TCP: an endpoint
/// refuses twice, then accepts and answers 500 (a failed response, but a connect that
/// worked), then refuses once more. That is one failure in a row, not three: the endpoint
/// stays ready.
#[test]
fn a_connect_that_works_clears_the_failure_record_even_when_the_answer_is_500() {
    /// The endpoint, answering 500 to everything while it runs.
    const FAILING: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"#;
    let pods = Pods::new("dh-record");
    let setup = setup("dh-record", &pods, &[]);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &web(&[("a", 1, &[8083])]));
    let proxy = start_proxy(&pods, &file);
    let set_aside = |metrics: &netns_tests::Metrics| {
        metrics.sum(
            "balancer_endpoints",
            &[("service", "web"), ("backend", "a"), ("state", "failed")],
        )
    };
    // Each request on a connection of its own: no pooled connection outlives a step.
    let get = |want: u16| {
        let mut client = KeepAlive::connect(&pods);
        let response = client.get().expect("an answer");
        assert_eq!(response.status, want, "{response:?}\n{}", proxy.report());
    };
    get(502);
    get(502);
    let mut server = pods.peer.command("python3");
    server.args(["-c", FAILING, "8083"]);
    let mut server = pods.peer.spawn(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Run::of(
        pods.peer
            .command("curl")
            .args(["-s", "http://127.0.0.1:8083/"]),
    )
    .success()
    {
        assert!(
            server.is_running() && Instant::now() < deadline,
            "no 500 server"
        );
        thread::sleep(Duration::from_millis(20));
    }
    get(500);
    drop(server);
    get(502);
    let metrics = proxy.metrics();
    assert_eq!(set_aside(&metrics), 0.0, "{metrics}");
    // Two more refusals are three in a row: now it is set aside.
    get(502);
    get(502);
    let metrics = proxy.metrics();
    assert_eq!(set_aside(&metrics), 1.0, "{metrics}");
}

/// Sends `requests` GETs on one kept-alive connection to the service whose backend a
/// refuses: each must be answered 200 by b, and a must end set aside (its three
/// refusals). Returns the metrics once b's responses are all counted.
fn all_answered_by_b_with_a_set_aside(
    pods: &Pods,
    proxy: &MeshProxy,
    requests: usize,
) -> netns_tests::Metrics {
    let mut client = KeepAlive::connect(pods);
    for i in 0..requests {
        let response = client.get();
        assert!(
            matches!(&response, Ok(r) if r.status == 200 && r.body == "b"),
            "request {i}: {response:?}"
        );
    }
    let metrics = proxy.wait_for_metric(
        "response_total",
        &[
            ("dst_service", "web"),
            ("dst_backend", "b"),
            ("status_code", "200"),
        ],
        requests as f64,
        METRIC_TIMEOUT,
    );
    // a was picked first at least once: its three refusals set it aside.
    assert_eq!(
        metrics.sum(
            "balancer_endpoints",
            &[("service", "web"), ("backend", "a"), ("state", "failed")]
        ),
        1.0,
        "{metrics}"
    );
    metrics
}
