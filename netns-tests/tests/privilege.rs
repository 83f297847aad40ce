//! Least privilege: meshinit needs CAP_NET_ADMIN (and CAP_NET_RAW for iptables-legacy)
//! and says which one is missing; meshproxy needs no capability at all.
//!
//! Capabilities are taken away with `setpriv` (util-linux): dropping a capability from
//! the bounding set removes it from what a root process gets at exec.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use netns_tests::{meshinit_bin, meshproxy_bin, Family, Netns, Pods, Run};

/// Runs meshinit in `ns` under `setpriv` with the given extra setpriv arguments.
fn meshinit_with(ns: &Netns, setpriv: &[&str], args: &[&str]) -> Run {
    let mut cmd = ns.command("setpriv");
    cmd.args(setpriv).arg(meshinit_bin()).args(args);
    Run::of(&mut cmd)
}

#[test]
fn meshinit_without_net_admin_names_it_and_changes_nothing() {
    let pods = Pods::new("privilege_no_net_admin");
    pods.pod
        .meshinit(&["apply", "--outbound-ports-to-ignore", "5555"])
        .expect_ok();
    let before = pods.pod.ruleset();
    for args in [
        &["apply", "--outbound-ports-to-ignore", "6666"][..],
        &["cleanup"][..],
        &["check"][..],
    ] {
        let run = meshinit_with(
            &pods.pod,
            &["--inh-caps=-all", "--bounding-set=-net_admin"],
            args,
        )
        .expect_code(1);
        assert!(run.stderr.contains("CAP_NET_ADMIN"), "{run}");
        assert_eq!(pods.pod.ruleset(), before, "{args:?} changed the ruleset");
    }
}

#[test]
fn iptables_legacy_needs_net_raw_and_the_netlink_backends_do_not() {
    let pods = Pods::new("privilege_net_raw");
    let only_net_admin = ["--inh-caps=-all", "--bounding-set=-all,+net_admin"];
    let run = meshinit_with(
        &pods.pod,
        &only_net_admin,
        &["apply", "--backend", "iptables-legacy"],
    )
    .expect_code(1);
    assert!(run.stderr.contains("CAP_NET_RAW"), "{run}");
    assert!(!run.stderr.contains("CAP_NET_ADMIN"), "{run}");
    // Exactly CAP_NET_ADMIN is enough for nft and for iptables-nft (both netlink), and
    // the rules really are installed.
    meshinit_with(&pods.pod, &only_net_admin, &["apply", "--backend", "nft"]).expect_ok();
    assert!(pods.pod.ruleset().contains("table inet meshinit"));
    meshinit_with(
        &pods.pod,
        &only_net_admin,
        &["apply", "--backend", "iptables-nft"],
    )
    .expect_ok();
    let save = pods
        .pod
        .exec(&["iptables-nft-save", "-t", "nat"])
        .expect_ok();
    assert!(save.stdout.contains("-j MESHINIT_OUTPUT"), "{save}");
    // CAP_NET_ADMIN + CAP_NET_RAW is enough for iptables-legacy.
    meshinit_with(
        &pods.pod,
        &["--inh-caps=-all", "--bounding-set=-all,+net_admin,+net_raw"],
        &["apply", "--backend", "iptables-legacy"],
    )
    .expect_ok();
    let save = pods
        .pod
        .exec(&["iptables-legacy-save", "-t", "nat"])
        .expect_ok();
    assert!(save.stdout.contains("-j MESHINIT_OUTPUT"), "{save}");
}

/// Reads one `CapXxx:` line of `/proc/PID/status` as a number.
fn cap_set(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"));
    u64::from_str_radix(line[name.len()..].trim(), 16).expect("hex capability set")
}

#[test]
fn meshproxy_forwards_with_an_empty_capability_set() {
    let pods = Pods::new("privilege_proxy_no_caps");
    pods.pod.meshinit(&["apply"]).expect_ok();
    let server = pods.peer.listen("peer app", Family::V4.any_port(5432));

    // uid 2102, no capability in any set, and no way to regain one.
    let mut cmd = pods.pod.command("setpriv");
    cmd.args([
        "--reuid=2102",
        "--regid=2102",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ])
    .arg(meshproxy_bin())
    .args(["--admin-addr", "127.0.0.1:4191"]);
    let proxy = pods.pod.spawn(cmd);
    let pid = proxy.pid();

    // Ready once its listeners are bound, as an unprivileged process.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = pods.pod.exec(&[
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "http://127.0.0.1:4191/ready",
        ]);
        if ready.success() {
            break;
        }
        assert!(Instant::now() < deadline, "meshproxy never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    for set in ["CapEff:", "CapPrm:", "CapInh:", "CapBnd:", "CapAmb:"] {
        assert_eq!(cap_set(pid, set), 0, "{set} of meshproxy is not empty");
    }

    // And it does its job: an outbound connection is forwarded to the peer.
    let peer = Family::V4.peer();
    let client = pods.pod.run(move || {
        let mut stream = TcpStream::connect_timeout(&(peer, 5432).into(), Duration::from_secs(5))?;
        stream.write_all(b"ping")?;
        Ok::<_, std::io::Error>(stream)
    });
    let mut client = client.expect("connect through the proxy");
    let mut accepted = server
        .accept_within(Duration::from_secs(5))
        .expect("the peer got no connection through the unprivileged proxy");
    let mut got = [0u8; 4];
    accepted
        .stream
        .read_exact(&mut got)
        .expect("read at the peer");
    assert_eq!(&got, b"ping");
    accepted
        .stream
        .write_all(b"pong")
        .expect("write at the peer");
    client.read_exact(&mut got).expect("read at the client");
    assert_eq!(&got, b"pong");
    // The peer saw the pod's address: it went out of the pod, through the proxy.
    assert_eq!(accepted.peer.ip(), Family::V4.pod());
}
