//! A port scan of a meshed pod, from outside, does not grow meshproxy's `/metrics` (or its
//! memory) without bound: 20,000 distinct destination ports through meshinit's real
//! inbound redirect and the real `meshproxy` binary, then the size of `/metrics`, the
//! number of distinct `target_addr` values and the proxy's resident memory.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use netns_tests::{Family, MeshProxy, Netns, Pods};

const SCANNED: u16 = 20_000;
/// 10001..=30000: none is skipped by meshinit's defaults (4190, 4191) and nothing listens
/// on them in the pod, so every forwarded connection is refused by the pod's kernel.
const FIRST_PORT: u16 = 10_001;

/// The resident set size of the `meshproxy` process in `ns`, in KiB.
fn proxy_rss_kib(ns: &Netns) -> u64 {
    let inode = ns.inode();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let proc_dir = entry.path();
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        let in_ns = std::fs::metadata(proc_dir.join("ns/net")).is_ok_and(|m| m.ino() == inode);
        if comm.trim() == "meshproxy" && in_ns {
            let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no meshproxy process in {}", ns.name());
}

fn target_addrs(metrics: &str) -> BTreeSet<&str> {
    metrics
        .lines()
        .filter_map(|line| line.split("target_addr=\"").nth(1)?.split('"').next())
        .collect()
}

fn scrape(proxy: &MeshProxy<'_>) -> String {
    proxy.metrics().text
}

#[test]
fn a_20000_port_scan_leaves_metrics_under_2_mib() {
    let pods = Pods::new("metrics_port_scan");
    pods.pod.meshinit(&["apply"]).expect_ok();
    let proxy = pods.pod.start_meshproxy(&[]);
    let pod = Family::V4.pod();
    let before = scrape(&proxy);
    let rss_before = proxy_rss_kib(&pods.pod);

    // From the peer, one connection at a time (the fd limit here is 20,000): connect to
    // the next port, send a byte (detection forwards it as opaque), half-close, wait for
    // the proxy to close. The peer namespace's TIME_WAITs are its own.
    pods.peer.run(|| {
        for port in FIRST_PORT..FIRST_PORT + SCANNED {
            let to = SocketAddr::new(pod, port);
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect {to}: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            let _ = stream.write_all(b"x");
            let _ = stream.shutdown(Shutdown::Write);
            let _ = stream.read_to_end(&mut Vec::new());
        }
    });
    let after = proxy
        .wait_for_metric(
            "tcp_close_total",
            &[],
            f64::from(SCANNED),
            Duration::from_secs(60),
        )
        .text;
    let rss_after = proxy_rss_kib(&pods.pod);
    let targets = target_addrs(&after);
    eprintln!(
        "meshproxy after a {SCANNED}-port scan: /metrics {} -> {} bytes, {} distinct \
         target_addr, RSS {rss_before} -> {rss_after} KiB",
        before.len(),
        after.len(),
        targets.len()
    );
    assert!(after.len() < 2 << 20, "/metrics is {} bytes", after.len());
    // At most 2,048 label sets, plus the overflow one.
    assert!(
        targets.len() <= 2_049,
        "{} target_addr values",
        targets.len()
    );
    assert!(targets.contains("overflow"), "overflow not counted");
    let opened: f64 = after
        .lines()
        .filter(|l| l.starts_with("tcp_open_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(opened, f64::from(SCANNED), "every connection is counted");
}
