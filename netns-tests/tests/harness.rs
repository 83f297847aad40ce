//! Self-tests of the harness: namespaces come and go, the veth joins exactly the two of them,
//! and nothing outlives a test.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;

use netns_tests::{landed_on, Family, Pods};

/// Every namespace of this process, as `ip netns list` shows them.
fn namespaces_named(base: &str) -> Vec<String> {
    let run =
        netns_tests::Run::of(std::process::Command::new("ip").args(["netns", "list"])).expect_ok();
    run.stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(base))
        .map(str::to_string)
        .collect()
}

#[test]
fn pods_are_created_and_removed_on_drop() {
    let pods = Pods::new("pods_are_created_and_removed_on_drop");
    let names = [pods.pod.name().to_string(), pods.peer.name().to_string()];
    assert_ne!(names[0], names[1]);
    for name in &names {
        assert!(
            Path::new("/var/run/netns").join(name).exists(),
            "{name} exists"
        );
    }
    let base = names[0].trim_end_matches("-pod").to_string();
    assert_eq!(namespaces_named(&base).len(), 2);

    drop(pods);
    assert!(
        namespaces_named(&base).is_empty(),
        "namespaces left: {:?}",
        namespaces_named(&base)
    );
}

#[test]
fn pod_and_peer_talk_over_the_veth_in_both_families() {
    let pods = Pods::new("pod_and_peer_talk_over_the_veth");
    for family in Family::ALL {
        for (from, to, to_addr) in [
            (&pods.pod, &pods.peer, family.peer()),
            (&pods.peer, &pods.pod, family.pod()),
        ] {
            let listener = to.listen("server", family.any_port(7000));
            let mut client = from
                .connect(SocketAddr::new(to_addr, 7000))
                .unwrap_or_else(|e| panic!("{family:?} {} -> {}: {e}", from.name(), to.name()));
            let (_, mut accepted) = landed_on(&[&listener]);
            client.write_all(b"ping").unwrap();
            let mut buf = [0; 4];
            accepted.stream.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            assert_eq!(accepted.local, SocketAddr::new(to_addr, 7000));
        }
    }
}

#[test]
fn the_namespaces_hold_only_lo_and_the_veth() {
    let pods = Pods::new("the_namespaces_hold_only_lo_and_the_veth");
    for ns in [&pods.pod, &pods.peer] {
        let links = ns.ip(&["-o", "link", "show"]).stdout;
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap())
            .collect();
        assert_eq!(names, ["lo", "eth0"], "{links}");
        // No default route: the pair is not connected to anything else.
        let routes = ns.ip(&["route", "show", "default"]).stdout;
        assert!(routes.trim().is_empty(), "{routes}");
    }
}

#[test]
fn run_enters_the_namespace_on_its_own_thread_only() {
    let pods = Pods::new("run_enters_the_namespace");
    let here = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let inside = pods.pod.run(|| {
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    });
    assert_eq!(inside, pods.pod.inode());
    assert_ne!(inside, here);
    let after = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_eq!(after, here, "the calling thread must not move");
}

#[test]
fn spawned_processes_die_with_their_guard_and_with_the_namespace() {
    let pods = Pods::new("spawned_processes_die");
    let guarded = pods.pod.spawn_sleeper();
    let guarded_pid = guarded.pid();
    drop(guarded);
    assert!(
        !Path::new(&format!("/proc/{guarded_pid}")).exists(),
        "guard killed and reaped it"
    );

    // A process that the test forgot, and one started by a child (not ours to reap): both
    // must be gone once the namespace is dropped.
    let forgotten = pods.peer.spawn_sleeper();
    let forgotten_pid = forgotten.pid();
    std::mem::forget(forgotten);
    let mut cmd = pods.peer.command("sh");
    cmd.args(["-c", "sleep 600 >/dev/null 2>&1 & echo $!"]);
    let grandchild: u32 = netns_tests::Run::of(&mut cmd)
        .expect_ok()
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{grandchild}")).exists());

    drop(pods);
    for pid in [forgotten_pid, grandchild] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let alive = status
            .lines()
            .any(|l| l.starts_with("State:") && !l.contains("zombie"));
        assert!(!alive, "pid {pid} survived its namespace: {status}");
    }
}

#[test]
fn connect_as_runs_the_probe_as_that_user() {
    let pods = Pods::new("connect_as_runs_the_probe");
    for family in Family::ALL {
        let listener = pods.peer.listen("peer app", family.any_port(7001));
        pods.pod
            .connect_as(SocketAddr::new(family.peer(), 7001), 2102, 2102)
            .expect_ok();
        let (_, accepted) = landed_on(&[&listener]);
        assert_eq!(accepted.peer.ip(), family.pod());
        let refused = pods
            .pod
            .connect_as(SocketAddr::new(family.peer(), 7002), 2102, 2102);
        assert_eq!(refused.code, Some(1), "{refused}");
    }
}
