//! A port scan through the inbound proxy must not grow `/metrics` without bound.
//!
//! In-process on loopback: the real proxy (listeners, detection, forwarding, metrics,
//! admin server), with each accepted connection sent to the next of 20,000 distinct
//! destination ports, as `SO_ORIGINAL_DST` would for a scan of the pod. Alone in its
//! test binary so the resident memory it reports is the proxy's and this client's.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshproxy::{Config, Proxy, ProxyArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

#[path = "support/admin.rs"]
mod admin_support;
use admin_support::get_metrics;

const SCANNED: u16 = 20_000;
/// Destination ports 10001..=30000 on loopback: below the ephemeral range, so no test
/// listener of another process is hit; nothing listens there, so each is refused.
const FIRST_PORT: u16 = 10_001;

/// The sum of every sample of `name` (all label sets).
fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn target_addrs(metrics: &str) -> BTreeSet<&str> {
    metrics
        .lines()
        .filter_map(|line| line.split("target_addr=\"").nth(1)?.split('"').next())
        .collect()
}

/// This process' resident set size, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20000_port_scan_leaves_metrics_under_2_mib() {
    let args = ProxyArgs {
        inbound_addr: Some("127.0.0.1:0".into()),
        outbound_addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        ..ProxyArgs::default()
    };
    let config = Config::from_sources(&args, &HashMap::new(), None).unwrap();
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.local_addrs();
    let next = Arc::new(AtomicU16::new(FIRST_PORT));
    let destination = move |_: &TcpStream| {
        let port = next.fetch_add(1, Ordering::Relaxed);
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve_with(destination, async {
        let _ = stopped.await;
    }));

    let before = get_metrics(addrs.admin).await;
    let rss_before = rss_kib();
    // One connection at a time (the fd limit here is 20,000): connect, send a byte
    // (detection then forwards it as opaque), half-close, wait for the proxy to close.
    for _ in 0..SCANNED {
        let mut stream = TcpStream::connect(addrs.inbound[0]).await.unwrap();
        // No TIME_WAIT left behind on this side: 20,000 of them would crowd the
        // ephemeral ports other tests on this host need.
        stream.set_zero_linger().unwrap();
        let _ = stream.write_all(b"x").await;
        let _ = stream.shutdown().await;
        let _ = stream.read_to_end(&mut Vec::new()).await;
    }
    // Closes are recorded when each connection task ends, a moment after the client
    // saw EOF.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let m = get_metrics(addrs.admin).await;
        if total(&m, "tcp_close_total") == f64::from(SCANNED) {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "closes missing:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_after = rss_kib();
    let targets = target_addrs(&after);
    eprintln!(
        "port scan of {SCANNED}: /metrics {} -> {} bytes, {} distinct target_addr, \
         RSS {rss_before} -> {rss_after} KiB (+{} KiB)",
        before.len(),
        after.len(),
        targets.len(),
        rss_after.saturating_sub(rss_before),
    );

    assert!(after.len() < 2 << 20, "/metrics is {} bytes", after.len());
    // The cap of 2,048 label sets, plus the overflow one.
    assert!(
        targets.len() <= 2_049,
        "{} target_addr values",
        targets.len()
    );
    assert!(targets.contains("overflow"), "overflow not counted");
    // Every connection is still counted, under its target or under overflow.
    assert_eq!(total(&after, "tcp_open_total"), f64::from(SCANNED));

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
