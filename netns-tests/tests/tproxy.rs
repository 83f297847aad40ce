//! `meshinit --mode tproxy` with `meshproxy --inbound-transparent`: inbound connections
//! are handed to the proxy by TPROXY, and the proxy connects to the application from the
//! client's address, so the application sees the real client. Every backend applies the
//! mode (`for_each_backend!`), and every traffic case runs for IPv4 and IPv6.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::fault::{self, FaultyTools};
use netns_tests::mesh::{Mesh, Scratch};
use netns_tests::transfer::{receive, send, Exchange};
use netns_tests::{
    for_each_backend, meshproxy_bin, Accepted, Backend, Family, Listener, MeshProxy, Netns, Pods,
    Run, Spawned, ACCEPT_TIMEOUT, PROXY_UID,
};

const MIB: u64 = 1 << 20;
/// The bulk transfer of the issue: 100 MiB in each direction.
const BULK: u64 = 100 * MIB;
/// A detected (not opaque) application port.
const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies `--mode tproxy` (plus `flags`) with `backend` in the pod and starts the
/// transparent proxy there.
fn transparent<'a>(pods: &'a Pods, backend: Backend, flags: &[&str]) -> MeshProxy<'a> {
    let args = [&["apply", "--mode", "tproxy"], flags].concat();
    pods.pod.meshinit_on(backend, &args).expect_ok();
    pods.pod.start_meshproxy_transparent(&[])
}

#[track_caller]
fn connect(ns: &Netns, to: SocketAddr) -> TcpStream {
    let stream = ns
        .connect(to)
        .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", ns.name()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

#[track_caller]
fn accept(server: &Listener) -> Accepted {
    let accepted = server.accept_within(ACCEPT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{}: no connection within {ACCEPT_TIMEOUT:?}",
            server.label()
        )
    });
    accepted.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    accepted.stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    accepted
}

/// One request and one reply through the proxy; returns the peer address the
/// application saw.
#[track_caller]
fn ping(client_ns: &Netns, server: &Listener, to: SocketAddr) -> SocketAddr {
    let mut client = connect(client_ns, to);
    client.write_all(b"ping\n").expect("client write");
    let mut accepted = accept(server);
    let mut got = [0; 5];
    accepted.stream.read_exact(&mut got).expect("app read");
    assert_eq!(&got, b"ping\n");
    accepted.stream.write_all(b"pong\n").expect("app write");
    let mut back = [0; 5];
    client
        .read_exact(&mut back)
        .expect("client read: the reply must come back");
    assert_eq!(&back, b"pong\n");
    accepted.peer
}

/// `up` bytes client -> app and `down` bytes app -> client at once, each hashed.
fn exchange(client: TcpStream, server: &Listener, up: u64, down: u64) -> (Exchange, SocketAddr) {
    thread::scope(|scope| {
        let mut client_writer = client.try_clone().expect("clone");
        let up_sent = scope.spawn(move || {
            let sent = send(&mut client_writer, 1, up).expect("client send");
            client_writer
                .shutdown(Shutdown::Write)
                .expect("client shutdown");
            sent
        });
        let mut client_reader = client;
        let down_received =
            scope.spawn(move || receive(&mut client_reader).expect("client receive"));
        let accepted = accept(server);
        let saw = accepted.peer;
        let mut server_reader = accepted.stream.try_clone().expect("clone");
        let up_received = scope.spawn(move || receive(&mut server_reader).expect("app receive"));
        let mut server_writer = accepted.stream;
        let down_sent = send(&mut server_writer, 2, down).expect("app send");
        server_writer
            .shutdown(Shutdown::Write)
            .expect("app shutdown");
        (
            Exchange {
                up_sent: up_sent.join().unwrap(),
                up_received: up_received.join().unwrap(),
                down_sent,
                down_received: down_received.join().unwrap(),
            },
            saw,
        )
    })
}

/// `ip rule` and every routing table, both families: what meshinit's policy routing changes.
fn routing(ns: &Netns) -> String {
    let mut out = String::new();
    for args in [
        &["-4", "rule"][..],
        &["-6", "rule"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        out.push_str(&format!(
            "## ip {}\n{}",
            args.join(" "),
            ns.ip(args).expect_ok().stdout
        ));
    }
    out
}

fn the_application_sees_the_clients_address_through_the_transparent_proxy(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_client_address"));
    let proxy = transparent(&pods, backend, &[]);
    for family in Family::ALL {
        let server = pods.pod.listen("pod app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.pod(), APP_PORT);
        let saw = ping(&pods.peer, &server, to);
        assert_eq!(
            saw.ip(),
            family.peer(),
            "{to}: the application sees the client's address"
        );
    }
    let metrics = proxy.wait_for_metric(
        "tcp_close_total",
        &[("direction", "inbound")],
        2.0,
        Duration::from_secs(5),
    );
    for family in Family::ALL {
        let target = SocketAddr::new(family.pod(), APP_PORT).to_string();
        assert_eq!(
            metrics.sum(
                "tcp_open_total",
                &[("direction", "inbound"), ("target_addr", &target)]
            ),
            1.0,
            "{target}: counted under its original destination"
        );
    }
}

fn transparent_100_mib_each_way_arrive_intact(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_bulk"));
    let _proxy = transparent(&pods, backend, &[]);
    for family in Family::ALL {
        let server = pods.pod.listen("pod app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.pod(), APP_PORT);
        let (exchange, saw) = exchange(connect(&pods.peer, to), &server, BULK, BULK);
        exchange.assert_intact(&format!("peer -> {to} through the transparent proxy"));
        assert_eq!(
            saw.ip(),
            family.peer(),
            "{to}: the application sees the client's address"
        );
    }
}

/// A connection from `client_ns` to `to` fails and `app` never sees it: refused with a
/// reset by nft's rule, dropped by iptables' TPROXY target (the connect times out).
#[track_caller]
fn assert_refused(
    client_ns: &Netns,
    to: SocketAddr,
    app: &Listener,
    backend: Backend,
    context: &str,
) {
    match client_ns.connect(to) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(_) if backend.is_iptables() => {}
        other => panic!("{context}: {to} must be refused, got {other:?}"),
    }
    assert!(
        app.try_accept().is_none(),
        "{context}: {to} reached the application around the proxy"
    );
}

/// Without a proxy listening, every intercepted connection is refused (TPROXY found no
/// socket), so whatever reaches the application did so around the proxy: the skip ports,
/// the skip subnets and the ports outside `--ports-to-redirect`, exactly as in redirect
/// mode.
fn exemptions_bypass_the_proxy_and_intercepted_ports_are_refused_while_it_is_down(
    backend: Backend,
) {
    let pods = Pods::new(&backend.test_name("tproxy_exemptions"));
    let cases: [(&[&str], &[u16], &[u16]); 3] = [
        (&[], &[4190, 4191], &[8080, 4189, 4192]),
        (
            &["--inbound-ports-to-ignore=7000,7100-7200"],
            &[7000, 7150, 7200],
            &[7001, 8080, 4190],
        ),
        (
            &["--ports-to-redirect=8080,9000-9001"],
            &[8081, 9002, 80],
            &[8080, 9000, 9001],
        ),
    ];
    for (flags, bypass, intercepted) in cases {
        let args = [&["apply", "--mode", "tproxy"], flags].concat();
        pods.pod.meshinit_on(backend, &args).expect_ok();
        for family in Family::ALL {
            for &port in bypass {
                let app = pods.pod.listen("pod app", family.any_port(port));
                let to = SocketAddr::new(family.pod(), port);
                let saw = ping(&pods.peer, &app, to);
                assert_eq!(saw.ip(), family.peer(), "{flags:?}: {to}");
            }
            for &port in intercepted {
                let app = pods.pod.listen("pod app", family.any_port(port));
                let to = SocketAddr::new(family.pod(), port);
                assert_refused(&pods.peer, to, &app, backend, &format!("{flags:?}"));
            }
        }
    }
    // Skip subnets: the peer's own subnet is exempt, so even port 8080 reaches the app.
    let subnets = format!(
        "--inbound-subnets-to-ignore={},{}",
        Family::V4.subnet(),
        Family::V6.subnet()
    );
    pods.pod
        .meshinit_on(backend, &["apply", "--mode", "tproxy", &subnets])
        .expect_ok();
    for family in Family::ALL {
        let app = pods.pod.listen("pod app", family.any_port(8080));
        ping(&pods.peer, &app, SocketAddr::new(family.pod(), 8080));
    }
}

/// The pod's own connections (over lo) are never intercepted, as in redirect mode, and
/// outbound redirection works unchanged.
fn local_and_outbound_traffic_are_as_in_redirect_mode(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_local_outbound"));
    let proxy = transparent(&pods, backend, &[]);
    for family in Family::ALL {
        let app = pods.pod.listen("pod app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.pod(), APP_PORT);
        let saw = ping(&pods.pod, &app, to);
        assert_eq!(
            saw.ip(),
            family.pod(),
            "{to} from the pod itself goes straight to the app"
        );
        let remote = pods.peer.listen("peer app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.peer(), APP_PORT);
        let saw = ping(&pods.pod, &remote, to);
        assert_eq!(saw.ip(), family.pod(), "outbound {to} through the proxy");
    }
    let metrics = proxy.wait_for_metric(
        "tcp_close_total",
        &[("direction", "outbound")],
        2.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        metrics.sum("tcp_open_total", &[("direction", "inbound")]),
        0.0
    );
}

/// The trust boundary holds for TPROXY'd connections too: a connection to the proxy's
/// own inbound port is refused as a self-loop (no identity), and a destination that is
/// not the pod's, handed over by a TPROXY rule that is not meshinit's, is refused as
/// foreign instead of relayed.
#[test]
fn the_trust_boundary_holds_in_transparent_mode() {
    let pods = Pods::new("tproxy_trust");
    let proxy = transparent(&pods, Backend::Nft, &[]);
    for family in Family::ALL {
        assert_closed(&pods.peer, SocketAddr::new(family.pod(), 4143));
    }
    proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "self_loop")],
        2.0,
        Duration::from_secs(5),
    );
    // Someone else's rule intercepting traffic for an address that is not the pod's
    // (with our mark, so our policy routing delivers it locally).
    pods.pod
        .exec(&[
            "nft",
            "add table inet other; add chain inet other pre { type filter hook prerouting priority -300; }; \
             add rule inet other pre ip daddr 198.51.100.7 meta l4proto tcp tproxy ip to :4143 meta mark set 0x4d49 accept; \
             add rule inet other pre ip6 daddr fd00:99::7 meta l4proto tcp tproxy ip6 to :4143 meta mark set 0x4d49 accept",
        ])
        .expect_ok();
    pods.pod
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect_ok();
    pods.peer
        .ip(&["route", "add", "198.51.100.0/24", "via", "198.18.0.1"])
        .expect_ok();
    pods.peer
        .ip(&["-6", "route", "add", "fd00:99::/64", "via", "fd00:18::1"])
        .expect_ok();
    for foreign in ["198.51.100.7:8080", "[fd00:99::7]:8080"] {
        assert_closed(&pods.peer, foreign.parse().unwrap());
    }
    proxy.wait_for_metric(
        "tcp_refused_total",
        &[("direction", "inbound"), ("reason", "foreign_destination")],
        2.0,
        Duration::from_secs(5),
    );
}

/// Connects and expects the proxy to close the connection without a byte.
#[track_caller]
fn assert_closed(ns: &Netns, to: SocketAddr) {
    let mut stream = connect(ns, to);
    let _ = stream.write_all(b"hello\n");
    let mut buf = [0; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("{to}: expected the proxy to close the connection, got {other:?}"),
    }
}

/// Debian's PostgreSQL, in the pod, on every address, port 5432, trusting every client
/// (the test is about addresses, not passwords). Started as `postgres`; killed on Drop.
fn start_postgres(ns: &Netns, dir: &Path) -> Spawned {
    let bin = Path::new("/usr/lib/postgresql")
        .read_dir()
        .expect("PostgreSQL is installed (scripts/test.sh installs package postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .find(|p| p.join("postgres").exists())
        .expect("a PostgreSQL server binary");
    let data = dir.join("data");
    std::fs::create_dir_all(dir).unwrap();
    Run::of(
        std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir),
    )
    .expect_ok();
    let as_postgres = |program: &Path| {
        let mut cmd = ns.command("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        cmd
    };
    Run::of(
        as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data),
    )
    .expect_ok();
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
    )
    .unwrap();
    let mut cmd = as_postgres(&bin.join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=*", "-p", "5432", "-c", "fsync=off"])
        .arg("-k")
        .arg(dir);
    let mut server = ns.spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = Run::of(ns.command("psql").args([
            "-h",
            dir.to_str().unwrap(),
            "-U",
            "postgres",
            "-Atc",
            "select 1",
        ]));
        if ready.success() {
            return server;
        }
        if !server.is_running() || Instant::now() > deadline {
            panic!("PostgreSQL did not start\n{ready}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `select inet_client_addr()` from `ns` to PostgreSQL at `host`.
fn inet_client_addr(ns: &Netns, host: std::net::IpAddr) -> String {
    let run = Run::of(ns.command("psql").args([
        "-h",
        &host.to_string(),
        "-U",
        "postgres",
        "-Atc",
        "select inet_client_addr()",
    ]))
    .expect_ok();
    run.stdout.trim().to_string()
}

#[test]
fn postgresql_sees_the_clients_address_in_tproxy_mode() {
    let pods = Pods::new("tproxy_postgres");
    let scratch = Scratch::new("tproxy_postgres");
    let _postgres = start_postgres(&pods.pod, &scratch.join("pg"));
    let proxy = transparent(&pods, Backend::Nft, &[]);
    for family in Family::ALL {
        assert_eq!(
            inet_client_addr(&pods.peer, family.pod()),
            family.peer().to_string(),
            "PostgreSQL's inet_client_addr() through the transparent proxy"
        );
    }
    proxy.wait_for_metric(
        "tcp_open_total",
        &[("direction", "inbound"), ("protocol", "opaque")],
        2.0,
        Duration::from_secs(5),
    );
}

fn through_the_mtls_pair_the_application_sees_the_client_pods_address(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_mtls"));
    let mesh = Mesh::new(&backend.test_name("tproxy_mtls"), &pods);
    // B (the peer namespace) in tproxy mode, A (the pod) in the default redirect mode.
    pods.peer
        .meshinit_on(backend, &["apply", "--mode", "tproxy"])
        .expect_ok();
    let _a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let b = mesh.start_b_transparent(&pods, &[]);
    for family in Family::ALL {
        let server = pods.peer.listen("B app", family.any_port(APP_PORT));
        let to = SocketAddr::new(family.peer(), APP_PORT);
        let (exchange, saw) = exchange(connect(&pods.pod, to), &server, 4 * MIB, 4 * MIB);
        exchange.assert_intact(&format!("A -> {to} over mTLS"));
        assert_eq!(
            saw.ip(),
            family.pod(),
            "{to}: B's application sees A's address"
        );
    }
    b.wait_for_metric(
        "tcp_open_total",
        &[("direction", "inbound"), ("tls", "true")],
        2.0,
        Duration::from_secs(5),
    );
}

fn check_detects_a_deleted_ip_rule_repair_restores_it_and_cleanup_restores_routing(
    backend: Backend,
) {
    let pods = Pods::new(&backend.test_name("tproxy_check_repair"));
    // Rules and routes that are not ours, next to ours: never touched.
    pods.pod
        .ip(&[
            "rule", "add", "priority", "4143", "fwmark", "7", "lookup", "99",
        ])
        .expect_ok();
    pods.pod
        .ip(&[
            "route", "add", "local", "default", "dev", "lo", "table", "4142",
        ])
        .expect_ok();
    let before = routing(&pods.pod);
    let tproxy = ["--mode", "tproxy"];
    let meshinit = |args: &[&str]| pods.pod.meshinit_on(backend, &[args, &tproxy].concat());
    meshinit(&["apply"]).expect_ok();
    let applied = routing(&pods.pod);
    for needle in [
        "4143:\tfrom all fwmark 0x4d49 lookup 4143",
        "local default dev lo table 4143",
    ] {
        assert!(applied.contains(needle), "{needle:?} missing:\n{applied}");
    }
    meshinit(&["check"]).expect_ok();

    pods.pod
        .ip(&["-4", "rule", "del", "priority", "4143", "fwmark", "0x4d49"])
        .expect_ok();
    let drift = meshinit(&["check"]).expect_code(1);
    assert!(
        drift
            .stdout
            .contains("ip rule (IPv4) priority 4143 fwmark 0x4d49 lookup 4143: missing"),
        "{drift}"
    );
    meshinit(&["check", "--repair"]).expect_ok();
    meshinit(&["check"]).expect_ok();
    assert_eq!(
        routing(&pods.pod),
        applied,
        "repair restores exactly what apply installed"
    );

    // An altered route of ours is drift too, and repaired.
    pods.pod
        .ip(&[
            "-6", "route", "del", "local", "default", "dev", "lo", "table", "4143",
        ])
        .expect_ok();
    pods.pod
        .ip(&[
            "-6",
            "route",
            "add",
            "unreachable",
            "default",
            "table",
            "4143",
        ])
        .expect_ok();
    let drift = meshinit(&["check"]).expect_code(1);
    assert!(
        drift.stdout.contains("ip route (IPv6)") && drift.stdout.contains("altered"),
        "{drift}"
    );
    meshinit(&["check", "--repair"]).expect_ok();
    assert_eq!(routing(&pods.pod), applied);

    pods.pod.meshinit_on(backend, &["cleanup"]).expect_ok();
    assert_eq!(
        routing(&pods.pod),
        before,
        "cleanup leaves ip rule and every table as before"
    );
    assert!(!pods
        .pod
        .exec(&["nft", "list", "tables"])
        .expect_ok()
        .stdout
        .contains("meshinit"));
}

fn switching_back_to_redirect_mode_removes_the_policy_routing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_switch_back"));
    let before = routing(&pods.pod);
    pods.pod
        .meshinit_on(backend, &["apply", "--mode", "tproxy"])
        .expect_ok();
    assert_ne!(routing(&pods.pod), before);
    let drift = pods.pod.meshinit_on(backend, &["check"]).expect_code(1);
    assert!(
        drift.stdout.contains("ip rule (IPv4)") && drift.stdout.contains("not expected"),
        "{drift}"
    );
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    assert_eq!(routing(&pods.pod), before);
    pods.pod.meshinit_on(backend, &["check"]).expect_ok();
}

fn a_failure_after_the_routes_are_added_leaves_nothing_behind(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_fault"));
    // Once with nothing installed, once over redirect-mode rules that must survive.
    for earlier in [None, Some(["apply"])] {
        if let Some(args) = earlier {
            pods.pod.meshinit_on(backend, &args).expect_ok();
        }
        let before = (routing(&pods.pod), pods.pod.firewall());
        // Named per backend: the three variants run at once in one process, and a
        // shared directory is removed by whichever finishes first.
        let faulty = FaultyTools::new(&backend.test_name("tproxy_fault"), &["nft"], fault::FAILS);
        let run = faulty.meshinit(
            &pods.pod,
            &["apply", "--mode", "tproxy", "--backend", "nft"],
        );
        let run = run.expect_code(1);
        assert!(run.stderr.contains("injected failure"), "{run}");
        assert_eq!(
            (routing(&pods.pod), pods.pod.firewall()),
            before,
            "the routes added before nft failed are taken back"
        );
    }
}

/// Settings that cannot work are bad input: exit 2, naming the value, nothing changed.
fn bad_tproxy_settings_change_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("tproxy_bad_input"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    let before = (routing(&pods.pod), pods.pod.firewall());
    for (flag, value) in [
        ("--tproxy-table", "254"),
        ("--tproxy-rule-priority", "0"),
        ("--tproxy-mark", "0"),
        ("--mode", "transparent"),
    ] {
        let mode: &[&str] = if flag == "--mode" {
            &[]
        } else {
            &["--mode", "tproxy"]
        };
        let run = pods
            .pod
            .meshinit_on(backend, &[&["apply", flag, value], mode].concat())
            .expect_code(2);
        assert!(
            run.stderr.contains(flag) && run.stderr.contains(value),
            "{run}"
        );
        assert_eq!(
            (routing(&pods.pod), pods.pod.firewall()),
            before,
            "{flag} {value}"
        );
    }
}

#[test]
fn the_transparent_proxy_without_cap_net_admin_fails_at_start_naming_it() {
    let pods = Pods::new("tproxy_no_cap");
    let uid = format!("--reuid={PROXY_UID}");
    let gid = format!("--regid={PROXY_UID}");
    let run = pods.pod.exec(&[
        "setpriv",
        &uid,
        &gid,
        "--clear-groups",
        meshproxy_bin().to_str().unwrap(),
        "--inbound-transparent",
    ]);
    assert!(!run.success(), "{run}");
    assert!(run.stderr.contains("CAP_NET_ADMIN"), "{run}");
}

for_each_backend!(
    the_application_sees_the_clients_address_through_the_transparent_proxy,
    transparent_100_mib_each_way_arrive_intact,
    exemptions_bypass_the_proxy_and_intercepted_ports_are_refused_while_it_is_down,
    local_and_outbound_traffic_are_as_in_redirect_mode,
    through_the_mtls_pair_the_application_sees_the_client_pods_address,
    check_detects_a_deleted_ip_rule_repair_restores_it_and_cleanup_restores_routing,
    switching_back_to_redirect_mode_removes_the_policy_routing,
    a_failure_after_the_routes_are_added_leaves_nothing_behind,
    bad_tproxy_settings_change_nothing,
);
