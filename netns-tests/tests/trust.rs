//! meshproxy's trust boundary and its own limits, with the real binaries in throwaway
//! namespaces:
//!
//! - no self-loop: with `net.ipv6.flowlabel_reflect=1` a connection to `[pod]:4143` is
//!   refused at once instead of being forwarded to the proxy itself, again and again;
//! - an inbound original destination that is not an address of the pod is refused;
//! - inbound and outbound have separate connection and detection budgets;
//! - a direct mTLS client of port 4143 must say hello within `--handshake-timeout`, and
//!   holds an inbound detection permit until it does;
//! - forwarded connections have TCP keepalive on both sockets;
//! - start-up: the soft `RLIMIT_NOFILE` is raised to the hard limit (and a warning says
//!   when that is too low), a warning says when the proxy does not run as the proxy UID,
//!   and out-of-range durations are bad input (exit 2).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::mesh::{Mesh, INBOUND_PORT};
use netns_tests::{meshproxy_bin, Family, MeshProxy, Netns, Pods, Run, ACCEPT_TIMEOUT, PROXY_UID};

/// How long the proxy may take to record what a test waits for.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// A port not in the default opaque list: connections to it go through detection.
const DETECTED_PORT: u16 = 8080;

/// Applies meshinit's default rules in the pod and starts meshproxy there with `args`.
fn meshed<'a>(pods: &'a Pods, args: &[&str]) -> MeshProxy<'a> {
    pods.pod.meshinit(&["apply"]).expect_ok();
    pods.pod.start_meshproxy(args)
}

/// Connects from `ns` to `to`, sends a request, and returns how long it took the proxy to
/// close the connection without answering. Panics if it answers or stays open for 5 s.
#[track_caller]
fn closed_without_answer(ns: &Netns, to: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut client = ns
        .connect(to)
        .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", ns.name()));
    let _ = client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_closed(&mut client, to, Duration::from_secs(5));
    started.elapsed()
}

/// Waits until the other end closes `client` (EOF or reset) without sending anything.
#[track_caller]
fn wait_closed(client: &mut TcpStream, to: SocketAddr, timeout: Duration) {
    client
        .set_read_timeout(Some(timeout))
        .expect("set a read timeout");
    let mut buf = [0; 64];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{to}: the proxy answered {:?} on a connection it must refuse",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => {
            panic!("{to}: expected the proxy to close the connection within {timeout:?}, got {e}")
        }
    }
}

// ---------------------------------------------------------------------------------------
// No self-loops

#[test]
fn reflected_ipv6_flow_labels_do_not_make_the_proxy_connect_to_itself() {
    let pods = Pods::new("trust_flowlabel_self_loop");
    // The accepted socket takes the client's flow label, and SO_ORIGINAL_DST reports it
    // in sin6_flowinfo: the original destination differs from our own address only there.
    pods.pod
        .exec(&["sysctl", "-qw", "net.ipv6.flowlabel_reflect=1"])
        .expect_ok();
    let proxy = meshed(&pods, &["--max-connections=64"]);
    let to = SocketAddr::new(Family::V6.pod(), INBOUND_PORT);
    let took = closed_without_answer(&pods.peer, to);
    assert!(
        took < Duration::from_secs(1),
        "refused after {took:?}, not at once"
    );
    proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "no_original_dst")],
        1.0,
        METRICS_TIMEOUT,
    );
    // Give a loop, if there were one, time to fill the proxy.
    thread::sleep(Duration::from_millis(300));
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum("tcp_refused_total", &[]),
        1.0,
        "refused once\n{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_open_total", &[]),
        0.0,
        "never forwarded\n{metrics}"
    );
    assert_eq!(metrics.sum("tcp_open_connections", &[]), 0.0, "{metrics}");
}

#[test]
fn an_original_destination_that_is_another_listener_of_the_proxy_is_a_self_loop() {
    let pods = Pods::new("trust_other_listener");
    // The outbound listener on every address: the pod's own address, port 4140, is now
    // the proxy itself, and an inbound connection redirected from it must not go there.
    let proxy = meshed(&pods, &["--outbound-addr=0.0.0.0:4140,[::]:4140"]);
    let mut refused = 0.0;
    for family in Family::ALL {
        let to = SocketAddr::new(family.pod(), 4140);
        closed_without_answer(&pods.peer, to);
        refused += 1.0;
        proxy.wait_for_metric(
            "tcp_refused_total",
            &[("direction", "inbound"), ("reason", "self_loop")],
            refused,
            METRICS_TIMEOUT,
        );
    }
    // A burst of them within a second: counted, but logged at WARN once a second.
    let burst_start = Instant::now();
    for _ in 0..20 {
        closed_without_answer(&pods.peer, SocketAddr::new(Family::V4.pod(), 4140));
    }
    let burst = burst_start.elapsed();
    proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "self_loop")],
        refused + 20.0,
        METRICS_TIMEOUT,
    );
    let log = proxy.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("self_loop"))
        .count();
    // One for the first connection, at most one more per second of the burst.
    let allowed = 2 + burst.as_secs() as usize;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} self-loop warnings for 22 refusals in {burst:?}, expected 1 to {allowed}\n{log}"
    );
    let metrics = proxy.metrics();
    assert_eq!(metrics.sum("tcp_open_total", &[]), 0.0, "{metrics}");
}

// ---------------------------------------------------------------------------------------
// Foreign destinations

/// Installs, in the pod, a redirect to the inbound port of TCP to `daddr`:`port`, ahead
/// of meshinit's own chain (priority -110, so this redirect is the one that counts).
/// meshinit's rules may not redirect such packets; the proxy must not rely on it.
fn redirect_in_pod(pods: &Pods, daddr: Ipv4Addr, port: u16) {
    let rules = format!(
        "table ip trust_test {{\n\
         chain pre {{\n\
         type nat hook prerouting priority -110;\n\
         ip daddr {daddr} tcp dport {port} redirect to :4143\n\
         }}\n\
         }}\n"
    );
    let file = std::env::temp_dir().join(format!("{}-trust.nft", pods.pod.name()));
    std::fs::write(&file, rules).expect("write the rules");
    let applied = pods
        .pod
        .exec(&["nft", "-f", file.to_str().expect("a UTF-8 path")]);
    let _ = std::fs::remove_file(&file);
    applied.expect_ok();
}

#[test]
fn an_inbound_original_destination_that_is_not_the_pods_is_refused() {
    const FOREIGN: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);
    let pods = Pods::new("trust_foreign_destination");
    let proxy = meshed(&pods, &[]);
    redirect_in_pod(&pods, FOREIGN, DETECTED_PORT);
    // The peer sends its packets for that address to the pod.
    pods.peer
        .ip(&["route", "add", "198.18.7.7/32", "via", "198.18.0.1"]);

    let to = SocketAddr::new(IpAddr::V4(FOREIGN), DETECTED_PORT);
    closed_without_answer(&pods.peer, to);
    let metrics = proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "foreign_destination")],
        1.0,
        METRICS_TIMEOUT,
    );
    assert_eq!(
        metrics.sum("tcp_open_total", &[]),
        0.0,
        "never forwarded\n{metrics}"
    );
    assert!(proxy.log().contains("198.18.7.7:8080"), "{}", proxy.log());
}

/// A neighbour that routes `127.0.0.5` to the pod (it controls its own routing and
/// `route_localnet`) must not reach a service that listens on the pod's loopback.
#[test]
fn an_inbound_original_destination_on_loopback_is_refused() {
    const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
    let pods = Pods::new("trust_loopback_destination");
    let proxy = meshed(&pods, &[]);
    redirect_in_pod(&pods, LOOPBACK, DETECTED_PORT);
    // A service the pod keeps to itself.
    let private = pods.pod.listen(
        "loopback-only app",
        SocketAddr::new(IpAddr::V4(LOOPBACK), DETECTED_PORT),
    );
    // The peer: its own loopback rule after a rule sending 127.0.0.5 to the pod, and
    // martian (loopback) source addresses accepted back on its veth.
    for rule in [
        &[
            "rule",
            "add",
            "pref",
            "10",
            "to",
            "127.0.0.5",
            "lookup",
            "100",
        ][..],
        &[
            "route",
            "add",
            "127.0.0.5",
            "via",
            "198.18.0.1",
            "dev",
            "eth0",
            "table",
            "100",
        ],
        &["rule", "del", "pref", "0", "lookup", "local"],
        &["rule", "add", "pref", "50", "lookup", "local"],
    ] {
        pods.peer.ip(rule);
    }
    pods.peer
        .exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.route_localnet=1",
            "net.ipv4.conf.eth0.route_localnet=1",
        ])
        .expect_ok();

    let to = SocketAddr::new(IpAddr::V4(LOOPBACK), DETECTED_PORT);
    closed_without_answer(&pods.peer, to);
    let metrics = proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "loopback_destination")],
        1.0,
        METRICS_TIMEOUT,
    );
    assert_eq!(metrics.sum("tcp_open_total", &[]), 0.0, "{metrics}");
    if let Some(accepted) = private.accept_within(Duration::from_millis(300)) {
        panic!(
            "the loopback-only app got a connection from {}",
            accepted.peer
        );
    }
}

// ---------------------------------------------------------------------------------------
// Limits per direction

#[test]
fn silent_inbound_connections_filling_the_inbound_budgets_leave_outbound_working() {
    const CAP: usize = 4;
    let pods = Pods::new("trust_per_direction_limits");
    let proxy = meshed(&pods, &["--max-connections=4", "--max-detecting=4"]);
    let _app = pods
        .pod
        .listen("pod app", Family::V4.any_port(DETECTED_PORT));
    let to_pod = SocketAddr::new(Family::V4.pod(), DETECTED_PORT);
    // Silent clients: each holds an inbound connection and detection permit for the
    // whole detect timeout (10 s).
    let silent: Vec<TcpStream> = (0..CAP)
        .map(|_| pods.peer.connect(to_pod).expect("connect a silent client"))
        .collect();
    let deadline = Instant::now() + METRICS_TIMEOUT;
    // The next inbound one is over the cap: refused at once.
    loop {
        closed_without_answer(&pods.peer, to_pod);
        let refused = proxy
            .metrics()
            .sum("tcp_refused_total", &[("direction", "inbound")]);
        if refused >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the inbound cap was never reached"
        );
    }

    // Outbound from the pod still works: its own budgets are untouched.
    let server = pods
        .peer
        .listen("peer app", Family::V4.any_port(DETECTED_PORT));
    let to_peer = SocketAddr::new(Family::V4.peer(), DETECTED_PORT);
    let mut client = pods.pod.connect(to_peer).expect("connect outbound");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n")
        .unwrap();
    let mut accepted = server.accept_within(ACCEPT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "the outbound connection was not forwarded\n{}",
            proxy.metrics()
        )
    });
    accepted
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut request = [0; 16];
    accepted.stream.read_exact(&mut request).unwrap();
    assert_eq!(&request, b"GET / HTTP/1.1\r\n");
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum("tcp_refused_total", &[("direction", "outbound")]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("detect_results_total", &[("result", "http1")]),
        1.0,
        "{metrics}"
    );
    drop(silent);
}

#[test]
fn a_silent_direct_connection_to_the_inbound_port_is_closed_after_the_handshake_timeout() {
    let pods = Pods::new("trust_handshake_timeout");
    let mesh = Mesh::new("trust-handshake-timeout", &pods);
    let b = mesh.start_b(&pods, &["--handshake-timeout=1s", "--max-detecting=1"]);
    // The clients below play a peer proxy in pod A, which has no proxy of its own here:
    // without A's rules they reach B's port 4143 directly, as A's proxy would.
    pods.pod.meshinit(&["cleanup"]).expect_ok();
    let to = SocketAddr::new(Family::V4.peer(), INBOUND_PORT);
    let started = Instant::now();
    let mut silent = pods.pod.connect(to).expect("connect to B's inbound port");
    thread::sleep(Duration::from_millis(100));
    // It holds B's only inbound detection permit: a second direct client is refused at
    // once, not after the timeout.
    let took = closed_without_answer(&pods.pod, to);
    assert!(
        took < Duration::from_millis(900),
        "second client closed after {took:?}"
    );
    b.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "max_detecting")],
        1.0,
        METRICS_TIMEOUT,
    );
    // The silent one is closed once the handshake timeout is over.
    wait_closed(&mut silent, to, Duration::from_secs(5));
    let open_for = started.elapsed();
    assert!(
        open_for >= Duration::from_secs(1) && open_for < Duration::from_secs(3),
        "closed after {open_for:?}, expected just after the 1 s handshake timeout"
    );
    b.wait_for_metric(
        "tls_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "timeout")],
        1.0,
        METRICS_TIMEOUT,
    );
}

// ---------------------------------------------------------------------------------------
// Descriptors

#[test]
fn forwarded_connections_have_tcp_keepalive_on_both_sockets() {
    let pods = Pods::new("trust_keepalive");
    let _proxy = meshed(&pods, &[]);
    let server = pods
        .peer
        .listen("peer app", Family::V4.any_port(DETECTED_PORT));
    let to = SocketAddr::new(Family::V4.peer(), DETECTED_PORT);
    let mut client = pods.pod.connect(to).expect("connect outbound");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n")
        .unwrap();
    let _accepted = server
        .accept_within(ACCEPT_TIMEOUT)
        .expect("the connection was forwarded");
    // `ss -o` shows `timer:(keepalive,…)` on an established socket with SO_KEEPALIVE.
    let ss = pods
        .pod
        .exec(&["ss", "-tnoHp", "state", "established"])
        .expect_ok();
    let proxy_sockets: Vec<&str> = ss
        .stdout
        .lines()
        .filter(|line| line.contains("\"meshproxy\""))
        .collect();
    let accepted = proxy_sockets.iter().find(|l| l.contains("127.0.0.1:4140"));
    let upstream = proxy_sockets.iter().find(|l| l.contains("198.18.0.2:8080"));
    for (which, line) in [("accepted (client)", accepted), ("upstream", upstream)] {
        let line = line.unwrap_or_else(|| panic!("no {which} socket of meshproxy in\n{ss}"));
        assert!(
            line.contains("timer:(keepalive,"),
            "the {which} socket has no keepalive timer: {line}"
        );
    }
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit_with_a_warning_when_too_low() {
    let pods = Pods::new("trust_rlimit");
    let wrapper = ["prlimit", "--nofile=256:8192"];
    // The defaults need 2 x (16384 + 16384) descriptors, more than 8192: warned.
    let proxy = pods.pod.start_meshproxy_as(PROXY_UID, &wrapper, &[]);
    assert_eq!(open_files_limit(proxy.pid()), (8192, 8192));
    let log = proxy.log();
    assert!(
        log.contains("WARN") && log.contains("file descriptor limit"),
        "expected a warning about RLIMIT_NOFILE\n{log}"
    );
    drop(proxy);
    // 2 x (1000 + 1000) + a margin fits in 8192: no warning.
    let proxy = pods
        .pod
        .start_meshproxy_as(PROXY_UID, &wrapper, &["--max-connections=1000"]);
    assert_eq!(open_files_limit(proxy.pid()), (8192, 8192));
    let log = proxy.log();
    assert!(!log.contains("below what --max-connections needs"), "{log}");
}

/// The soft and hard "Max open files" of a process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open files limit in\n{limits}"));
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    let soft = numbers.next().expect("a soft limit");
    let hard = numbers.next().expect("a hard limit");
    (soft, hard)
}

// ---------------------------------------------------------------------------------------
// Misconfiguration and bad input

#[test]
fn running_as_another_uid_than_the_proxy_uid_is_warned_about() {
    const WARNING: &str = "not running as the proxy UID";
    let pods = Pods::new("trust_proxy_uid");
    let proxy = pods.pod.start_meshproxy_as(0, &[], &[]);
    let log = proxy.log();
    assert!(
        log.contains("WARN") && log.contains(WARNING),
        "as root:\n{log}"
    );
    drop(proxy);
    let proxy = pods.pod.start_meshproxy(&[]);
    assert!(
        !proxy.log().contains(WARNING),
        "as {PROXY_UID}:\n{}",
        proxy.log()
    );
    drop(proxy);
    // And as root when --proxy-uid says root is meant.
    let proxy = pods.pod.start_meshproxy_as(0, &[], &["--proxy-uid=0"]);
    assert!(!proxy.log().contains(WARNING), "{}", proxy.log());
}

#[test]
fn out_of_range_durations_are_bad_input_naming_value_and_source() {
    // In a namespace of its own: were a value accepted, the proxy would start and bind.
    let pods = Pods::new("trust_durations");
    for (args, env, names) in [
        (
            vec!["--detect-timeout=0s"],
            None,
            ["--detect-timeout", "0s"],
        ),
        (
            vec!["--handshake-timeout", "500000000000years"],
            None,
            ["--handshake-timeout", "500000000000years"],
        ),
        (
            vec![],
            Some(("MESHPROXY_SHUTDOWN_GRACE", "2days")),
            ["MESHPROXY_SHUTDOWN_GRACE", "2days"],
        ),
    ] {
        let mut cmd = pods.pod.command("timeout");
        cmd.arg("5").arg(meshproxy_bin()).args(&args);
        if let Some((key, value)) = env {
            cmd.env(key, value);
        }
        let run = Run::of(&mut cmd);
        assert_eq!(run.code, Some(2), "{args:?} {env:?}: exit 2\n{run}");
        for name in names {
            assert!(
                run.stderr.contains(name),
                "{args:?}: {name} not named\n{run}"
            );
        }
    }
}
