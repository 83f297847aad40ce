//! meshproxy's async runtime (`--cores`): the real binary in a pod behind meshinit's rules.
//!
//! - The runtime has the threads asked for: by default, and with `--cores 1`, one thread
//!   runs everything (a current-thread runtime); `--cores 3` adds three workers to the
//!   main thread. Counted in `/proc/PID/task`.
//! - On one thread nothing may starve: while a bulk transfer keeps the proxy busy
//!   (spliced as fast as the veth goes), `/metrics` answers and a new connection on a
//!   detected port is detected and forwarded, each quickly, and the transfer is intact.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::transfer::{receive, Pattern, CHUNK};
use netns_tests::{Family, MeshProxy, Pods};

/// A port in meshproxy's default opaque list (PostgreSQL): the bulk transfer is spliced.
const OPAQUE_PORT: u16 = 5432;
/// A port not in the opaque list: a new connection there goes through detection.
const DETECTED_PORT: u16 = 8080;
/// The longest one probe may take while the transfer runs. A probe answers in about a
/// millisecond; a task that never yields would hold it until the transfer ends, seconds
/// later. Generous for a loaded 2-vCPU CI machine.
const PROBE_LIMIT: Duration = Duration::from_millis(500);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The threads of a process: one entry per thread in `/proc/PID/task`.
fn threads(proxy: &MeshProxy<'_>) -> usize {
    let dir = format!("/proc/{}/task", proxy.pid());
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .count()
}

#[test]
fn cores_sets_the_threads_of_the_runtime() {
    let pods = Pods::new("runtime_cores");
    pods.pod.meshinit(&["apply"]).expect_ok();
    // No blocking task has run yet (only /ready was asked), so the process holds the
    // main thread plus the runtime's workers and nothing else.
    for (args, want) in [
        (&[][..], 1),
        (&["--cores=1"][..], 1),
        (&["--cores=3"][..], 4),
    ] {
        let proxy = pods.pod.start_meshproxy(args);
        assert_eq!(
            threads(&proxy),
            want,
            "meshproxy {args:?}: threads in /proc/{}/task",
            proxy.pid()
        );
        let log = proxy.log();
        let workers = want.max(2) - 1;
        assert!(
            log.contains(&format!("workers={workers}")),
            "meshproxy {args:?}: the start-up log names {workers} worker(s)\n{log}"
        );
        // Forwarding works on that runtime.
        let server = pods
            .peer
            .listen("peer app", Family::V4.any_port(OPAQUE_PORT));
        let mut client = pods
            .pod
            .connect(SocketAddr::new(Family::V4.peer(), OPAQUE_PORT))
            .expect("connect through the proxy");
        let mut accepted = server
            .accept_within(Duration::from_secs(2))
            .expect("the proxy connects to the peer")
            .stream;
        client.write_all(b"ping").expect("write");
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");
    }
}

#[test]
fn a_busy_transfer_does_not_starve_metrics_or_detection_on_one_core() {
    let pods = Pods::new("runtime_starve");
    pods.pod.meshinit(&["apply"]).expect_ok();
    let proxy = pods.pod.start_meshproxy(&["--cores=1"]);
    let family = Family::V4;
    let bulk_server = pods
        .peer
        .listen("peer bulk sink", family.any_port(OPAQUE_PORT));
    let http_server = pods
        .peer
        .listen("peer http app", family.any_port(DETECTED_PORT));
    let mut bulk = pods
        .pod
        .connect(SocketAddr::new(family.peer(), OPAQUE_PORT))
        .expect("connect the bulk client");
    bulk.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut sink = bulk_server
        .accept_within(Duration::from_secs(2))
        .expect("the proxy connects the bulk client")
        .stream;
    sink.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let (sent_transfer, received, probes) = thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let mut pattern = Pattern::new(14);
            while !stop.load(Ordering::Relaxed) {
                pattern.send(&mut bulk, CHUNK as u64).expect("send bulk");
                sent.fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
            bulk.shutdown(Shutdown::Write).expect("shut down");
            pattern.finish()
        });
        let receiver = scope.spawn(|| receive(&mut sink).expect("receive bulk"));

        // Let the transfer reach full speed first: the proxy is splicing by then.
        let start = Instant::now();
        while sent.load(Ordering::Relaxed) < 64 << 20 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the bulk transfer did not get going"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let before = sent.load(Ordering::Relaxed);
        let mut probes = Vec::new();
        for i in 0..10 {
            let t = Instant::now();
            let metrics = proxy.metrics();
            probes.push(("GET /metrics", t.elapsed()));
            assert!(
                metrics.sum("tcp_open_connections", &[]) >= 1.0,
                "the bulk connection is open\n{metrics}"
            );
            let t = Instant::now();
            let mut client = pods
                .pod
                .connect(SocketAddr::new(family.peer(), DETECTED_PORT))
                .expect("connect to the detected port");
            write!(client, "GET /{i} HTTP/1.1\r\nHost: peer\r\n\r\n").expect("request");
            let accepted = http_server
                .accept_within(Duration::from_secs(5))
                .expect("the proxy detects HTTP and connects to the peer");
            probes.push(("detect and connect", t.elapsed()));
            drop((client, accepted));
        }
        let during = sent.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        let sent_transfer = sender.join().expect("sender");
        let received = receiver.join().expect("receiver");
        // The probes ran while the transfer was moving, not in a pause of it.
        assert!(
            during >= 8 << 20,
            "only {during} bytes moved during the probes: the transfer was not busy"
        );
        (sent_transfer, received, probes)
    });
    assert_eq!(received, sent_transfer, "the bulk transfer arrived intact");
    for (probe, took) in &probes {
        assert!(
            *took < PROBE_LIMIT,
            "{probe} took {took:?} during a busy transfer on one core (limit {PROBE_LIMIT:?}): \
             a task does not yield; all probes: {probes:?}"
        );
    }
    // Each detected connection was labelled HTTP/1: detection itself ran.
    let target = SocketAddr::new(family.peer(), DETECTED_PORT).to_string();
    proxy.wait_for_metric(
        "tcp_close_total",
        &[("target_addr", target.as_str()), ("protocol", "http1")],
        10.0,
        Duration::from_secs(5),
    );
}
