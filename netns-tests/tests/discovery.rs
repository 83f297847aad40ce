//! `--discovery` (issue 13): outbound connections to a service address balanced over real
//! Redis servers, with meshinit's real rules in the pod. The pod ([`Pods::pod`]) dials the
//! service address 198.18.100.10:6379 (fd00:100::10 for IPv6), which exists nowhere: only a
//! route towards the peer, so that the kernel lets the connection out to meshinit's
//! redirect. The endpoints are Redis servers in the peer namespace, each holding its own
//! name under the key `backend`, so every reply says where the connection landed.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::http::promtool_check;
use netns_tests::mesh::{contains, Capture, Mesh, Scratch, PEER_ID, POD_ID};
use netns_tests::{MeshProxy, Netns, Pods, Run, Spawned};

const SERVICE_V4: &str = "198.18.100.10:6379";
const SERVICE_V6: &str = "[fd00:100::10]:6379";

/// How long a counter may take to show what a client just saw.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

/// A change of the file is in force for new connections within this (the contract).
const SHIFT_DEADLINE: Duration = Duration::from_secs(1);

fn service_v4() -> SocketAddr {
    SERVICE_V4.parse().expect("an address")
}

/// Routes the service networks from the pod towards the peer, so that connections to
/// them leave through meshinit's outbound redirect.
fn route_services(pods: &Pods) {
    pods.pod
        .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.2"])
        .expect_ok();
    pods.pod
        .ip(&["-6", "route", "add", "fd00:100::/64", "via", "fd00:18::2"])
        .expect_ok();
}

/// `redis-server` on `port` of every address of `ns`, holding `backend = name`. Killed on
/// `Drop` of the guard.
fn start_redis(ns: &Netns, dir: &Path, port: u16, name: &str) -> Spawned {
    let dir = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&dir).expect("a redis directory");
    let mut cmd = ns.command("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "0.0.0.0", "::"])
        .args(["--protected-mode", "no", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir);
    let mut redis = ns.spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Over loopback, which meshinit's rules (when any) exempt.
        let set = Run::of(
            ns.command("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["SET", "backend", name]),
        );
        if set.success() && set.stdout.trim() == "OK" {
            return redis;
        }
        if !redis.is_running() || Instant::now() > deadline {
            panic!("`{}` is not answering\n{set}", redis.command());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `GET backend` over a new connection from the pod to `to` (in-process, RESP): the name
/// of the Redis server that answered.
fn get_backend(pods: &Pods, to: SocketAddr) -> io::Result<String> {
    let mut stream = pods.pod.connect(to)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"*2\r\n$3\r\nGET\r\n$7\r\nbackend\r\n")?;
    // A bulk string: `$N\r\n<N bytes>\r\n`.
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        // A socket read with SO_RCVTIMEO is never restarted after a signal handler ran
        // (signal(7)); another test's child process exiting (SIGCHLD) can do that.
        let n = match stream.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&reply)),
            ));
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.strip_prefix('$') {
            let mut parts = rest.split("\r\n");
            if let (Some(_len), Some(value), Some(_)) = (parts.next(), parts.next(), parts.next()) {
                return Ok(value.to_string());
            }
        } else if text.ends_with("\r\n") {
            return Err(io::Error::other(format!("unexpected reply {text:?}")));
        }
    }
}

/// Writes a discovery file the way a node agent should: a new file renamed over the old.
fn write_discovery(path: &Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).expect("write the discovery file");
    std::fs::rename(&staged, path).expect("rename the discovery file");
}

/// The service with backends `a` (Redis on 6379) and `b` (Redis on 6380) weighted so.
fn two_backends(a: i64, b: i64) -> String {
    format!(
        r#"
[[service]]
name = "redis"
addrs = ["{SERVICE_V4}", "{SERVICE_V6}"]
protocol = "opaque"
[[service.backend]]
name = "a"
weight = {a}
endpoints = [ {{ addr = "198.18.0.2:6379" }} ]
[[service.backend]]
name = "b"
weight = {b}
endpoints = [ {{ addr = "198.18.0.2:6380" }} ]
"#
    )
}

struct Setup {
    scratch: Scratch,
    _redis: [Spawned; 2],
}

/// meshinit's rules in the pod, the service routes, and Redis `a` and `b` in the peer.
fn setup(test_name: &str, pods: &Pods) -> Setup {
    let scratch = Scratch::new(test_name);
    pods.pod.meshinit(&[]).expect_ok();
    route_services(pods);
    let redis = [
        start_redis(&pods.peer, scratch.path(), 6379, "a"),
        start_redis(&pods.peer, scratch.path(), 6380, "b"),
    ];
    Setup {
        scratch,
        _redis: redis,
    }
}

fn start_proxy<'p>(pods: &'p Pods, discovery: &Path) -> MeshProxy<'p> {
    let path = discovery.to_str().expect("a UTF-8 path");
    pods.pod.start_meshproxy(&["--discovery", path])
}

/// 1,000 connections to a 50/50 service land 40–60% on each backend, over IPv4 and IPv6
/// service addresses alike; every one is answered, and the metrics carry the service and
/// backend.
#[test]
fn a_fifty_fifty_split_of_1000_connections_lands_40_to_60_percent_on_each() {
    let pods = Pods::new("disc-split");
    let setup = setup("disc-split", &pods);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &two_backends(50, 50));
    let proxy = start_proxy(&pods, &file);

    let mut on_a = 0;
    for i in 0..1000 {
        let to = if i % 10 == 0 {
            SERVICE_V6.parse().expect("an address")
        } else {
            service_v4()
        };
        match get_backend(&pods, to) {
            Ok(name) if name == "a" => on_a += 1,
            Ok(name) if name == "b" => {}
            other => panic!("connection {i} to {to}: {other:?}\n{}", proxy.report()),
        }
    }
    assert!((400..=600).contains(&on_a), "{on_a} of 1000 on a");
    let metrics = proxy.wait_for_metric(
        "tcp_open_total",
        &[("direction", "outbound"), ("dst_service", "redis")],
        1000.0,
        METRIC_TIMEOUT,
    );
    let a = metrics.sum(
        "tcp_open_total",
        &[
            ("dst_service", "redis"),
            ("dst_backend", "a"),
            ("target_addr", SERVICE_V4),
        ],
    ) + metrics.sum(
        "tcp_open_total",
        &[
            ("dst_service", "redis"),
            ("dst_backend", "a"),
            ("target_addr", SERVICE_V6),
        ],
    );
    assert_eq!(a, f64::from(on_a), "{metrics}");
    assert_eq!(
        metrics.sum(
            "balancer_endpoints",
            &[("service", "redis"), ("state", "ready")]
        ),
        2.0,
        "{metrics}"
    );
    // The new families and labels are valid Prometheus text.
    promtool_check(&metrics.text);
}

/// Opaque from discovery: a service with `protocol = "opaque"` on a port that is NOT an
/// opaque port is connected at once, so a server-speaks-first client (which sends nothing
/// until the server greets it) is not held for the detect timeout.
#[test]
fn an_opaque_service_skips_detection_on_a_port_that_is_not_opaque() {
    let pods = Pods::new("disc-opaque");
    let setup = setup("disc-opaque", &pods);
    let file = setup.scratch.join("discovery.toml");
    // The service is on port 7000 (not an opaque port); the endpoint is a listener that
    // greets first.
    write_discovery(
        &file,
        r#"
[[service]]
name = "greeter"
addrs = ["198.18.100.10:7000"]
protocol = "opaque"
[[service.backend]]
name = "g"
weight = 1
endpoints = [ { addr = "198.18.0.2:7001" } ]
"#,
    );
    let listener = pods
        .peer
        .listen("greeter", "198.18.0.2:7001".parse().expect("an address"));
    let proxy = start_proxy(&pods, &file);
    let started = Instant::now();
    let _client = pods
        .pod
        .connect("198.18.100.10:7000".parse().expect("an address"))
        .expect("connect to the service");
    let accepted = listener.accept_within(Duration::from_secs(3));
    assert!(
        accepted.is_some(),
        "the endpoint saw no connection within 3 s (detection held it?)\n{}",
        proxy.report()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Rewriting the file shifts new connections from `a` to `b` within 1 s, and no client
/// sees a failure; then an invalid version is logged, counted and ignored; then all-zero
/// weights refuse new connections, counted.
#[test]
fn a_weight_shift_takes_effect_within_1s_without_a_failed_connection() {
    let pods = Pods::new("disc-shift");
    let setup = setup("disc-shift", &pods);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(&file, &two_backends(100, 0));
    let proxy = start_proxy(&pods, &file);

    // Clients run in a loop on another thread while the file changes.
    let (results, shifted_at) = thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut results = Vec::new();
            let until = Instant::now() + Duration::from_millis(2500);
            while Instant::now() < until {
                let started = Instant::now();
                results.push((started, get_backend(&pods, service_v4())));
            }
            results
        });
        thread::sleep(Duration::from_millis(700));
        let shifted_at = Instant::now();
        write_discovery(&file, &two_backends(0, 100));
        (client.join().expect("the client thread"), shifted_at)
    });
    let failures: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failures.is_empty(), "{failures:?}\n{}", proxy.report());
    let name = |r: &io::Result<String>| match r {
        Ok(name) => name.clone(),
        Err(_) => String::new(),
    };
    for (started, result) in &results {
        if *started < shifted_at {
            assert_eq!(name(result), "a", "before the shift");
        } else if *started > shifted_at + SHIFT_DEADLINE {
            assert_eq!(
                name(result),
                "b",
                "{:?} after the shift",
                *started - shifted_at
            );
        }
    }
    let late = results
        .iter()
        .filter(|(s, _)| *s > shifted_at + SHIFT_DEADLINE)
        .count();
    assert!(late >= 10, "only {late} connections after the deadline");
    proxy.wait_for_metric(
        "discovery_updates_total",
        &[("result", "ok")],
        2.0,
        METRIC_TIMEOUT,
    );

    // An invalid version: counted, logged, and `b` stays in force.
    write_discovery(&file, &two_backends(-1, 100));
    proxy.wait_for_metric(
        "discovery_updates_total",
        &[("result", "invalid")],
        1.0,
        METRIC_TIMEOUT,
    );
    assert!(proxy.log().contains("weight -1"), "{}", proxy.log());
    for _ in 0..20 {
        assert_eq!(get_backend(&pods, service_v4()).expect("still served"), "b");
    }

    // All-zero weights: new connections are refused (closed), and counted.
    write_discovery(&file, &two_backends(0, 0));
    proxy.wait_for_metric(
        "discovery_updates_total",
        &[("result", "ok")],
        3.0,
        METRIC_TIMEOUT,
    );
    let refused = get_backend(&pods, service_v4());
    assert!(refused.is_err(), "{refused:?}");
    proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "outbound"), ("reason", "no_backend")],
        1.0,
        METRIC_TIMEOUT,
    );
}

/// One endpoint of the backend refuses connections (nothing listens on 6390): every
/// client is still answered, by the other endpoint, and the refusing one is set aside.
#[test]
fn an_endpoint_that_refuses_connections_costs_no_client_a_failure() {
    let pods = Pods::new("disc-refuse");
    let setup = setup("disc-refuse", &pods);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(
        &file,
        &format!(
            r#"
[[service]]
name = "redis"
addrs = ["{SERVICE_V4}"]
protocol = "opaque"
[[service.backend]]
name = "a"
weight = 1
endpoints = [ {{ addr = "198.18.0.2:6390" }}, {{ addr = "198.18.0.2:6379" }} ]
"#
        ),
    );
    let proxy = start_proxy(&pods, &file);
    for i in 0..200 {
        match get_backend(&pods, service_v4()) {
            Ok(name) if name == "a" => {}
            other => panic!("connection {i}: {other:?}\n{}", proxy.report()),
        }
    }
    proxy.wait_for_metric(
        "balancer_endpoints",
        &[("service", "redis"), ("backend", "a"), ("state", "failed")],
        1.0,
        METRIC_TIMEOUT,
    );
    // No connection closed with an error.
    let metrics = proxy.metrics();
    let closed_ok = metrics.sum(
        "tcp_close_total",
        &[("dst_service", "redis"), ("errno", "")],
    );
    let closed = metrics.sum("tcp_close_total", &[("dst_service", "redis")]);
    assert_eq!(closed, closed_ok, "{metrics}");
}

/// Backend `a`'s only endpoint refuses connections (nothing listens on 6390): a connection
/// given to `a` moves on to backend `b` instead of failing, so every client is answered
/// (by `b`), and the connections are counted under the backend that served them.
#[test]
fn a_backend_whose_endpoints_all_refuse_hands_its_connections_to_another_backend() {
    let pods = Pods::new("disc-refuse-backend");
    let setup = setup("disc-refuse-backend", &pods);
    let file = setup.scratch.join("discovery.toml");
    write_discovery(
        &file,
        &two_backends(50, 50).replace("198.18.0.2:6379", "198.18.0.2:6390"),
    );
    let proxy = start_proxy(&pods, &file);
    for i in 0..100 {
        match get_backend(&pods, service_v4()) {
            Ok(name) if name == "b" => {}
            other => panic!("connection {i}: {other:?}\n{}", proxy.report()),
        }
    }
    let metrics = proxy.wait_for_metric(
        "tcp_close_total",
        &[("dst_service", "redis"), ("dst_backend", "b")],
        100.0,
        METRIC_TIMEOUT,
    );
    let closed = metrics.sum("tcp_close_total", &[("dst_service", "redis")]);
    let closed_ok = metrics.sum(
        "tcp_close_total",
        &[("dst_service", "redis"), ("errno", "")],
    );
    assert_eq!((closed, closed_ok), (100.0, 100.0), "{metrics}");
}

/// An endpoint with an `identity` is reached over mTLS through its proxy, with no
/// `--mesh-peers` at all: the value never crosses the veth in plaintext, and both proxies
/// count the mTLS hop with the other's identity.
#[test]
fn an_endpoint_with_an_identity_is_reached_over_mtls() {
    let pods = Pods::new("disc-mtls");
    let mesh = Mesh::new("disc-mtls", &pods);
    route_services(&pods);
    let _redis = start_redis(&pods.peer, mesh.scratch.path(), 6379, "secret-backend-b");
    let file = mesh.scratch.join("discovery.toml");
    write_discovery(
        &file,
        &format!(
            r#"
[[service]]
name = "redis"
addrs = ["{SERVICE_V4}"]
[[service.backend]]
name = "b"
weight = 1
endpoints = [ {{ addr = "198.18.0.2:6379", identity = "{PEER_ID}" }} ]
"#
        ),
    );
    let b = mesh.start_b(&pods, &[]);
    let path = file.to_str().expect("a UTF-8 path");
    // No mesh peers: only discovery says that this endpoint is meshed.
    let a = mesh.start_a(&pods, None, &["--discovery", path]);

    let capture = Capture::start(&pods.pod, mesh.scratch.join("wire.pcap"));
    let got = get_backend(&pods, service_v4());
    let wire = capture.stop();
    assert_eq!(
        got.as_ref().map(String::as_str).ok(),
        Some("secret-backend-b"),
        "{got:?}\n{}\n{}",
        a.report(),
        b.report()
    );
    assert!(!wire.is_empty());
    assert!(
        !contains(&wire, b"secret-backend-b"),
        "the value crossed in plaintext"
    );
    assert!(
        contains(&wire, b"transport.l5d.io/v1"),
        "no ALPN offered: not our mTLS"
    );
    a.wait_for_metric(
        "tcp_open_total",
        &[
            ("direction", "outbound"),
            ("target_addr", SERVICE_V4),
            ("dst_service", "redis"),
            ("dst_backend", "b"),
            ("tls", "true"),
            ("server_id", PEER_ID),
        ],
        1.0,
        METRIC_TIMEOUT,
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
}
