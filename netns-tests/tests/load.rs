//! meshproxy under load (issue 8, "The proxy under load"), with meshinit's real rules and
//! the real `meshproxy` binary running as the proxy uid:
//!
//! - many idle connections held open end to end, with the proxy's RSS per connection;
//! - a flood of silent clients, bounded by `--max-detecting` and `--detect-timeout`, while
//!   a well-behaved client's round-trip latency is measured;
//! - bulk data both ways through two proxies and their mTLS hop, hash-identical, with
//!   half-close honoured;
//! - an upstream that refuses or resets connections: counted by errno in
//!   `tcp_close_total`, no crash, no leaked task, descriptor or thread.
//!
//! The defaults are CI's: about 25 s for the file with the debug build on 2 cores, of which
//! the gigabyte each way through two proxies and TLS is 10 s. `scripts/soak.sh` runs the
//! same tests with the release build and the long sizes through these environment
//! variables:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `LOAD_CONNECTIONS` | 2000 | idle connections held open at once |
//! | `LOAD_FLOOD` | 1000 | silent clients in the flood |
//! | `LOAD_ROUND_TRIPS` | 100 | well-behaved round trips measured during the flood |
//! | `LOAD_MTLS_MIB` | 1024 | MiB sent each way through the two proxies |
//! | `LOAD_CHURN` | 500 | refused + reset upstream connections |
//! | `LOAD_ROUNDS` | 2 | rounds of `LOAD_CONNECTIONS` opened and closed |
//!
//! Each test prints a `LOAD NAME key=value …` line with its figures (run with `--nocapture`
//! to see them), which `scripts/soak.sh` turns into a BENCHMARKS.md section.
//!
//! Every connection costs a descriptor at each end, in this process (client and server ends
//! both live here) and twice in the proxy, which inherits this process's `RLIMIT_NOFILE`: a
//! test that asks for more connections than the hard limit allows fails and says so.
//! The tests take turns (one lock): they measure latency and memory, which a concurrent
//! gigabyte transfer on the same two cores would distort.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use netns_tests::mesh::{Mesh, PEER_ID, POD_ID};
use netns_tests::transfer::{receive, Exchange, Pattern};
use netns_tests::{Family, MeshProxy, Metrics, Netns, Pods};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6,
};

const MIB: u64 = 1 << 20;

/// A port in meshproxy's default opaque list (PostgreSQL): forwarded at once, without
/// waiting for the client to speak.
const OPAQUE_PORT: u16 = 5432;
/// A port that is not: connections to it go through protocol detection.
const DETECTED_PORT: u16 = 8080;

/// How long a metric may take to show what the clients just did.
const METRICS_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a single read or write may block: a stalled proxy fails the test instead of
/// hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect timeout of every client: a lost SYN (a full backlog) is retransmitted after 1 s
/// and 3 s, which must fail nothing, only show in the figures.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors the test process and the proxy need besides their sockets.
const FD_MARGIN: u64 = 100;

/// One test at a time (see the module docs).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// `$NAME` as a number, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
        Err(_) => default,
    }
}

/// Applies meshinit's default rules in the pod and starts meshproxy there with `args`.
fn meshed<'a>(pods: &'a Pods, args: &[&str]) -> MeshProxy<'a> {
    pods.pod.meshinit(&["apply"]).expect_ok();
    pods.pod.start_meshproxy(args)
}

// ---------------------------------------------------------------------------------------
// 1. Many idle connections held open

#[test]
fn many_idle_connections_stay_open_end_to_end_with_bounded_memory() {
    let _turn = one_at_a_time();
    let n = env_u64("LOAD_CONNECTIONS", 2000) as usize;
    // The client and the server ends are both in this process, and the proxy holds two
    // sockets per connection; it inherits this process's limit.
    let limit = raise_nofile_limit();
    let need = 2 * n as u64 + FD_MARGIN;
    assert!(
        limit >= need,
        "{n} connections need {need} descriptors in this process and in the proxy, but the \
         hard RLIMIT_NOFILE is {limit} (raising it needs CAP_SYS_RESOURCE): lower \
         LOAD_CONNECTIONS or raise the limit"
    );

    let pods = Pods::new("load_many_idle");
    // Clients and the proxy's own connections both take ephemeral ports of the pod's
    // addresses towards the same destinations.
    pods.pod
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        .expect_ok();
    let proxy = meshed(&pods, &[]);
    let proxy_proc = Proc::of_meshproxy(&pods.pod);
    thread::sleep(Duration::from_millis(200));
    let idle = proxy_proc.status();

    let listeners: Vec<TcpListener> = Family::ALL
        .iter()
        .map(|f| pods.peer.run(|| listener(f.any_port(OPAQUE_PORT))))
        .collect();
    let idle_fds = proxy_proc.fd_count();
    let first = hold_open(&pods, &proxy, &listeners, n, 1, idle_fds);
    let after_close = proxy_proc.status();
    // Again, with the same connections: the memory the first round freed is reused.
    let rounds = env_u64("LOAD_ROUNDS", 2).max(2) as usize;
    let mut per_round = vec![first.loaded.rss_kib];
    for round in 2..=rounds {
        per_round.push(
            hold_open(&pods, &proxy, &listeners, n, round, idle_fds)
                .loaded
                .rss_kib,
        );
    }

    let per_conn_kib = (first.loaded.rss_kib.saturating_sub(idle.rss_kib)) as f64 / n as f64;
    let per_conn_anon_kib = (first.loaded.anon_kib.saturating_sub(idle.anon_kib)) as f64 / n as f64;
    let per_round_mib: Vec<String> = per_round.iter().map(|&kib| mib(kib)).collect();
    report(
        "idle-connections",
        &[
            ("n", n.to_string()),
            ("opened_s", format!("{:.2}", first.opened_in.as_secs_f64())),
            ("idle_rss_mib", mib(idle.rss_kib)),
            ("rss_at_n_mib", mib(first.loaded.rss_kib)),
            ("per_conn_kib", format!("{per_conn_kib:.1}")),
            ("per_conn_anon_kib", format!("{per_conn_anon_kib:.1}")),
            ("proxy_fds", first.fds.to_string()),
            ("proxy_threads", first.loaded.threads.to_string()),
            ("rss_after_close_mib", mib(after_close.rss_kib)),
            ("rss_at_n_per_round_mib", per_round_mib.join(",")),
            (
                "malloc_arena_max",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "default".into()),
            ),
        ],
    );
    assert!(
        first.fds >= 2 * n,
        "the proxy holds {} descriptors for {n} connections: fewer than two each",
        first.fds
    );
    // PERFORMANCE.md's target, which the soak checks at 10,000: about 16 KiB is measured,
    // debug build included (two 4 KiB copy buffers, the task, the two sockets' state).
    assert!(
        per_conn_kib <= 24.0,
        "{per_conn_kib:.1} KiB of RSS per idle connection (idle {} KiB, at {n} {} KiB); the \
         target is 24 KiB",
        idle.rss_kib,
        first.loaded.rss_kib
    );
    // Leaks are caught by the descriptor count and `tcp_open_connections` (a task that
    // outlives its connection holds its sockets). RSS is only bounded loosely: glibc keeps
    // what a closed connection freed in the arena of the worker thread that allocated it,
    // and the next round's allocations land in other arenas too, so the RSS at N creeps up
    // over rounds towards a multiple of the first (with MALLOC_ARENA_MAX=1 it is flat).
    let last = *per_round.last().expect("two rounds");
    assert!(
        last <= 2 * first.loaded.rss_kib,
        "RSS at {n} connections went from {} KiB in the first round to {last} KiB in round \
         {rounds}",
        first.loaded.rss_kib,
    );
    proxy_proc.assert_alive(&proxy);
}

/// What [`hold_open`] measured.
struct Held {
    opened_in: Duration,
    /// The proxy with all `n` connections open and idle.
    loaded: Status,
    fds: usize,
}

/// Opens `n` connections from the pod to the peer's [`OPAQUE_PORT`] (alternating families)
/// through the proxy, measures the proxy once they are all open and idle, proves each is
/// open end to end (one byte each way), then closes them all and waits until the proxy has
/// counted them closed, cleanly, and its descriptors are back to `idle_fds`. `round`
/// numbers the calls, for the cumulative counters.
fn hold_open(
    pods: &Pods,
    proxy: &MeshProxy<'_>,
    listeners: &[TcpListener],
    n: usize,
    round: usize,
    idle_fds: usize,
) -> Held {
    let proxy_proc = Proc::of_meshproxy(&pods.pod);
    let started = Instant::now();
    let (servers, clients) = thread::scope(|scope| {
        let acceptor = scope.spawn(|| accept_n(listeners, n, Duration::from_secs(120)));
        let clients = pods.pod.run(|| {
            (0..n)
                .map(|i| {
                    let family = Family::ALL[i % 2];
                    let to = SocketAddr::new(family.peer(), OPAQUE_PORT);
                    TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).unwrap_or_else(|e| {
                        panic!("connection {i} of {n}, to {to} through the proxy: {e}")
                    })
                })
                .collect::<Vec<_>>()
        });
        (acceptor.join().expect("the acceptor"), clients)
    });
    let opened_in = started.elapsed();
    assert_eq!(servers.len(), n, "the peer accepted every connection");
    proxy.wait_for_metric("tcp_open_connections", &[], n as f64, METRICS_TIMEOUT);
    // Let the proxy's tasks settle into their idle state before measuring.
    thread::sleep(Duration::from_millis(500));
    let loaded = proxy_proc.status();
    let fds = proxy_proc.fd_count();

    // Every connection is open end to end, both ways: one byte from each server end to its
    // client, then one from each client to its server.
    for (i, server) in servers.iter().enumerate() {
        set_timeouts(server);
        (&*server)
            .write_all(b"s")
            .unwrap_or_else(|e| panic!("server end {i}: write: {e}"));
    }
    for (i, client) in clients.iter().enumerate() {
        set_timeouts(client);
        let mut byte = [0; 1];
        (&*client)
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("client {i}: the server's byte never arrived: {e}"));
        assert_eq!(&byte, b"s", "client {i}");
        (&*client)
            .write_all(b"c")
            .unwrap_or_else(|e| panic!("client {i}: write: {e}"));
    }
    for (i, server) in servers.iter().enumerate() {
        let mut byte = [0; 1];
        (&*server)
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("server end {i}: the client's byte never arrived: {e}"));
        assert_eq!(&byte, b"c", "server end {i}");
    }
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum("tcp_open_connections", &[]),
        n as f64,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_open_total", &[]),
        (round * n) as f64,
        "{metrics}"
    );
    assert_eq!(metrics.sum("tcp_refused_total", &[]), 0.0, "{metrics}");

    // Closing them all leaves nothing behind.
    drop(clients);
    drop(servers);
    proxy.wait_for_metric("tcp_open_connections", &[], 0.0, METRICS_TIMEOUT);
    let metrics =
        proxy.wait_for_metric("tcp_close_total", &[], (round * n) as f64, METRICS_TIMEOUT);
    assert_eq!(
        metrics.sum("tcp_close_total", &[("errno", "")]),
        (round * n) as f64,
        "every connection closed cleanly\n{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy_proc.fd_count() > idle_fds && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        proxy_proc.fd_count(),
        idle_fds,
        "the proxy's descriptors after all {n} connections closed, and when idle\n{}",
        proxy_proc.fd_listing()
    );
    thread::sleep(Duration::from_millis(200));
    Held {
        opened_in,
        loaded,
        fds,
    }
}

// ---------------------------------------------------------------------------------------
// 2. A flood of silent clients

#[test]
fn a_silent_flood_is_capped_and_times_out_without_delaying_well_behaved_clients() {
    const DETECT_TIMEOUT: Duration = Duration::from_secs(2);
    const MAX_DETECTING: usize = 200;
    /// The pause between two measured round trips, so they spread over the flood.
    const PACE: Duration = Duration::from_millis(20);
    let _turn = one_at_a_time();
    let flood = env_u64("LOAD_FLOOD", 1000) as usize;
    // 100, not 50: of 50 samples the p99 is the maximum, which one scheduler hiccup on two
    // shared cores decides.
    let round_trips = env_u64("LOAD_ROUND_TRIPS", 100) as usize;
    let limit = raise_nofile_limit();
    let need = 2 * flood as u64 + FD_MARGIN;
    assert!(
        limit >= need,
        "a flood of {flood} needs {need} descriptors, the hard RLIMIT_NOFILE is {limit}"
    );

    let pods = Pods::new("load_silent_flood");
    let proxy = meshed(
        &pods,
        &[
            "--detect-timeout=2s",
            &format!("--max-detecting={MAX_DETECTING}"),
        ],
    );
    let proxy_proc = Proc::of_meshproxy(&pods.pod);
    let _detected = HttpOkServer::start(&pods.peer, Family::V4.any_port(DETECTED_PORT));
    let _opaque = EchoServer::start(&pods.peer, Family::V4.any_port(OPAQUE_PORT));
    let detected_to = SocketAddr::new(Family::V4.peer(), DETECTED_PORT);
    let opaque_to = SocketAddr::new(Family::V4.peer(), OPAQUE_PORT);

    // A well-behaved HTTP/1 client on a detected port, connected (and detected) before
    // the flood, and one that opens a new connection per exchange on an opaque port.
    let request = b"GET /ping HTTP/1.1\r\nHost: peer\r\nUser-Agent: load\r\n\r\n";
    let mut keepalive = connect(&pods.pod, detected_to);
    http_round_trip(&mut keepalive, request)
        .expect("the first request on the kept-alive connection");
    let measure = |keepalive: &mut TcpStream, samples: &mut Samples| {
        let t = Instant::now();
        http_round_trip(keepalive, request)
            .unwrap_or_else(|e| panic!("kept-alive HTTP/1 round trip: {e}"));
        samples.keepalive.push(t.elapsed());
        let t = Instant::now();
        let mut fresh = connect(&pods.pod, opaque_to);
        round_trip(&mut fresh, b"ping over a new connection")
            .unwrap_or_else(|e| panic!("new-connection round trip to {opaque_to}: {e}"));
        samples.fresh.push(t.elapsed());
    };
    let mut before = Samples::default();
    for _ in 0..round_trips {
        measure(&mut keepalive, &mut before);
        thread::sleep(PACE);
    }

    // The flood: `flood` clients connect to the detected port and say nothing. Once a
    // quarter of them are in, the well-behaved client measures again, and tries new
    // connections on the detected port, which the full detection cap turns away.
    let opened = AtomicUsize::new(0);
    let flood_started = Instant::now();
    let (silent, flood_opened_in, during, probes) = thread::scope(|scope| {
        let flooder = scope.spawn(|| {
            pods.pod.run(|| {
                let silent = (0..flood)
                    .map(|i| {
                        let stream = TcpStream::connect_timeout(&detected_to, CONNECT_TIMEOUT)
                            .unwrap_or_else(|e| panic!("silent client {i}: connect: {e}"));
                        opened.fetch_add(1, Ordering::Relaxed);
                        stream
                    })
                    .collect::<Vec<_>>();
                (silent, flood_started.elapsed())
            })
        });
        while opened.load(Ordering::Relaxed) < flood / 4 && !flooder.is_finished() {
            thread::sleep(Duration::from_millis(1));
        }
        let mut during = Samples::default();
        let mut probes = Probes::default();
        for i in 0..round_trips {
            measure(&mut keepalive, &mut during);
            if i % 5 == 0 {
                probes.try_once(&pods.pod, detected_to, request);
            }
            thread::sleep(PACE);
        }
        let (silent, opened_in) = flooder.join().expect("the flood");
        (silent, opened_in, during, probes)
    });

    // Every silent client was either refused at once (the cap) or held for the detect
    // timeout and then forwarded as opaque. The refused probes count as refusals too; the
    // probes that got in were detected as HTTP/1. "At least": in one soak run of 8,000
    // the proxy accounted for one connection more than the clients opened (see
    // `unmatched` in the report); none may be missing, which would be a client still in
    // detection past the timeout.
    let expected = (flood + probes.refused) as f64;
    let deadline = Instant::now() + DETECT_TIMEOUT + METRICS_TIMEOUT;
    let metrics = loop {
        let metrics = proxy.metrics();
        let refused = metrics.sum("tcp_refused_total", &[("reason", "max_detecting")]);
        let timeouts = metrics.sum("detect_results_total", &[("result", "timeout")]);
        if refused + timeouts >= expected {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "refused for max_detecting ({refused}) + detect timeouts ({timeouts}) never \
             reached {expected}: {flood} silent clients and {} refused probes\n{metrics}",
            probes.refused
        );
        thread::sleep(Duration::from_millis(50));
    };
    let refused = metrics.sum("tcp_refused_total", &[("reason", "max_detecting")]);
    let timeouts = metrics.sum("detect_results_total", &[("result", "timeout")]);
    let unmatched = refused + timeouts - expected;
    assert!(refused > 0.0, "the detection cap never engaged\n{metrics}");
    assert!(
        timeouts >= MAX_DETECTING as f64,
        "{timeouts} detect timeouts: the cap of {MAX_DETECTING} was never full\n{metrics}"
    );
    assert_eq!(
        metrics.sum("detect_results_total", &[("result", "http1")]),
        (1 + probes.served) as f64,
        "the kept-alive client and the probes that got in were detected as HTTP/1\n{metrics}"
    );
    assert_eq!(
        metrics.sum("tcp_refused_total", &[("reason", "max_connections")]),
        0.0,
        "{metrics}"
    );

    // The silent clients that were held are now forwarded, end to end (one byte each way
    // through the echo server); the refused ones were closed.
    let mut forwarded = 0;
    let mut closed = 0;
    for (i, mut client) in silent.iter().enumerate() {
        set_timeouts(client);
        let mut byte = [0; 1];
        // The proxy may already have closed a refused client: a failed write is a close.
        let written = client.write_all(b"x");
        match (written, client.read(&mut byte)) {
            (Ok(()), Ok(1)) => {
                assert_eq!(&byte, b"x", "silent client {i}");
                forwarded += 1;
            }
            (_, Ok(0)) | (Err(_), _) => closed += 1,
            (_, Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => closed += 1,
            (_, other) => panic!("silent client {i}: {other:?}"),
        }
    }
    let refused_silent = refused - probes.refused as f64;
    assert!(
        forwarded as f64 <= timeouts && forwarded as f64 >= timeouts - unmatched,
        "{forwarded} silent clients forwarded, {timeouts} detect timeouts"
    );
    assert!(
        closed as f64 <= refused_silent && closed as f64 >= refused_silent - unmatched,
        "{closed} silent clients closed, {refused_silent} refused"
    );

    let hwm = proxy_proc.status().hwm_kib;
    let mut fields = vec![
        ("flood", flood.to_string()),
        ("opened_s", format!("{:.2}", flood_opened_in.as_secs_f64())),
        ("max_detecting", MAX_DETECTING.to_string()),
        ("detect_timeout_s", DETECT_TIMEOUT.as_secs().to_string()),
        ("refused", refused.to_string()),
        ("timed_out_forwarded", timeouts.to_string()),
        ("unmatched", unmatched.to_string()),
        ("round_trips", round_trips.to_string()),
    ];
    for (name, samples) in [
        ("keepalive_before", &before.keepalive),
        ("keepalive_during", &during.keepalive),
        ("fresh_before", &before.fresh),
        ("fresh_during", &during.fresh),
    ] {
        for (p, label) in [(50.0, "p50"), (99.0, "p99"), (100.0, "max")] {
            fields.push((
                leak(format!("{name}_{label}_ms")),
                format!("{:.2}", ms(samples.percentile(p))),
            ));
        }
    }
    fields.extend([
        ("probes_served", probes.served.to_string()),
        ("probes_refused", probes.refused.to_string()),
        ("probes_slowest_ms", format!("{:.2}", ms(probes.slowest))),
        ("proxy_hwm_mib", mib(hwm)),
    ]);
    report("silent-flood", &fields);
    for (what, samples) in [
        ("kept-alive HTTP/1", &during.keepalive),
        ("new opaque connection", &during.fresh),
    ] {
        // A quarter of the 2 s detect timeout: a client delayed by the flood would wait
        // for a detection slot, i.e. the timeout. Measured p99 is about 1 ms on a quiet
        // machine; the margin is for a loaded 2-core CI machine (149 ms was seen).
        let p99 = samples.percentile(99.0);
        assert!(
            p99 < Duration::from_millis(500),
            "{what} round trips during the flood: p99 {p99:?} (all: {})",
            samples.summary()
        );
    }
    assert!(
        probes.slowest < Duration::from_secs(1),
        "a new connection on the detected port waited {:?} during the flood: neither served \
         nor refused at once",
        probes.slowest
    );

    // Nothing leaks: once every client is gone, no connection is open.
    drop(silent);
    drop(keepalive);
    proxy.wait_for_metric("tcp_open_connections", &[], 0.0, METRICS_TIMEOUT);
    proxy_proc.assert_alive(&proxy);
}

/// Round-trip times of one kind of exchange.
#[derive(Default)]
struct Durations(Vec<Duration>);

impl Durations {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// The nearest-rank percentile `p` (0–100).
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            ms(self.percentile(50.0)),
            ms(self.percentile(99.0)),
            ms(self.percentile(100.0)),
            self.0.len()
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[derive(Default)]
struct Samples {
    keepalive: Durations,
    fresh: Durations,
}

/// New connections on the detected port during the flood: served (answered) or refused.
#[derive(Default)]
struct Probes {
    served: usize,
    refused: usize,
    slowest: Duration,
}

impl Probes {
    fn try_once(&mut self, ns: &Netns, to: SocketAddr, request: &[u8]) {
        let t = Instant::now();
        let mut stream = connect(ns, to);
        match http_round_trip(&mut stream, request) {
            Ok(()) => self.served += 1,
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.kind() == io::ErrorKind::ConnectionReset
                    || e.kind() == io::ErrorKind::BrokenPipe =>
            {
                self.refused += 1
            }
            Err(e) => panic!("a new connection to {to} during the flood: {e}"),
        }
        self.slowest = self.slowest.max(t.elapsed());
    }
}

/// What [`HttpOkServer`] answers to every request.
const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Sends the HTTP/1 `request` and reads [`HTTP_OK`] back, exactly (the proxy forwards
/// HTTP request by request and must not change the response).
fn http_round_trip(stream: &mut TcpStream, request: &[u8]) -> io::Result<()> {
    stream.write_all(request)?;
    let mut response = vec![0; HTTP_OK.len()];
    stream.read_exact(&mut response)?;
    if response != HTTP_OK {
        return Err(io::Error::other(format!(
            "answered {:?}",
            String::from_utf8_lossy(&response)
        )));
    }
    Ok(())
}

/// Sends `message` and reads it back from the echo server.
fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != message {
        return Err(io::Error::other(format!(
            "echoed {:?}",
            String::from_utf8_lossy(&echoed)
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. Bulk data through two proxies and mTLS

#[test]
fn bulk_both_ways_through_two_proxies_with_mtls_arrives_intact_with_half_close() {
    const APP_PORT: u16 = 7000;
    let _turn = one_at_a_time();
    let size = env_u64("LOAD_MTLS_MIB", 1024) * MIB;
    let pods = Pods::new("load_mtls_bulk");
    let mesh = Mesh::new("load_mtls_bulk", &pods);
    let b = mesh.start_b(&pods, &[]);
    let a = mesh.start_a(&pods, Some(&mesh.peers_of_a), &[]);
    let a_proc = Proc::of_meshproxy(&pods.pod);
    let b_proc = Proc::of_meshproxy(&pods.peer);

    let to = SocketAddr::new(Family::V4.peer(), APP_PORT);
    let server = pods.peer.run(|| listener(Family::V4.any_port(APP_PORT)));
    let client = connect(&pods.pod, to);
    let started = Instant::now();
    let exchange = exchange(client, &server, size);
    let took = started.elapsed();
    exchange.assert_intact(&format!(
        "pod A -> {to} through A's and B's proxies and mTLS"
    ));

    let target = to.to_string();
    let a_metrics = a.wait_for_metric(
        "tcp_close_total",
        &[("direction", "outbound"), ("target_addr", &target)],
        1.0,
        METRICS_TIMEOUT,
    );
    let b_metrics = b.wait_for_metric(
        "tcp_close_total",
        &[("direction", "inbound"), ("target_addr", &target)],
        1.0,
        METRICS_TIMEOUT,
    );
    let outbound = [
        ("direction", "outbound"),
        ("target_addr", target.as_str()),
        ("tls", "true"),
        ("server_id", PEER_ID),
    ];
    assert_eq!(
        a_metrics.sum("tcp_open_total", &outbound),
        1.0,
        "A sent it over mTLS to B's identity\n{a_metrics}"
    );
    let inbound = [
        ("direction", "inbound"),
        ("target_addr", target.as_str()),
        ("tls", "true"),
        ("client_id", POD_ID),
    ];
    assert_eq!(
        b_metrics.sum("tcp_open_total", &inbound),
        1.0,
        "B received it over mTLS from A's identity\n{b_metrics}"
    );
    for (name, metrics, labels) in [
        ("A", &a_metrics, &outbound[..2]),
        ("B", &b_metrics, &inbound[..2]),
    ] {
        let clean = [labels[0], labels[1], ("errno", "")];
        assert_eq!(
            metrics.sum("tcp_close_total", &clean),
            1.0,
            "{name}: closed cleanly\n{metrics}"
        );
        assert_eq!(
            metrics.sum("tcp_read_bytes_total", labels),
            size as f64,
            "{name}: bytes read from its client\n{metrics}"
        );
        assert_eq!(
            metrics.sum("tcp_write_bytes_total", labels),
            size as f64,
            "{name}: bytes written to its client\n{metrics}"
        );
    }
    let (a_status, b_status) = (a_proc.status(), b_proc.status());
    report(
        "mtls-bulk",
        &[
            ("mib_each_way", (size / MIB).to_string()),
            ("seconds", format!("{:.2}", took.as_secs_f64())),
            (
                "mib_s_each_way",
                format!("{:.0}", (size / MIB) as f64 / took.as_secs_f64()),
            ),
            ("sha256_up", exchange.up_received.sha256.clone()),
            ("sha256_down", exchange.down_received.sha256.clone()),
            ("a_rss_mib", mib(a_status.rss_kib)),
            ("a_hwm_mib", mib(a_status.hwm_kib)),
            ("b_rss_mib", mib(b_status.rss_kib)),
            ("b_hwm_mib", mib(b_status.hwm_kib)),
        ],
    );
    a_proc.assert_alive(&a);
    b_proc.assert_alive(&b);
}

/// Sends `size` bytes from `client` to the server that `server` accepts and `size` back,
/// concurrently, and proves half-close on the way: the client shuts down its write side
/// once it has sent everything and reads on; the server sends half, waits for the
/// client's EOF (the FIN crossed both proxies while the other direction stayed open), then
/// sends the other half and closes, all of which the client must receive.
fn exchange(client: TcpStream, server: &TcpListener, size: u64) -> Exchange {
    set_timeouts(&client);
    thread::scope(|scope| {
        let mut client_writer = client.try_clone().expect("clone the client stream");
        let client_sends = scope.spawn(move || {
            let mut bytes = Pattern::new(1);
            bytes
                .send(&mut client_writer, size)
                .unwrap_or_else(|e| panic!("client send: {e}"));
            client_writer
                .shutdown(Shutdown::Write)
                .unwrap_or_else(|e| panic!("client shutdown(write): {e}"));
            bytes.finish()
        });
        let mut client_reader = client;
        let client_receives = scope.spawn(move || {
            receive(&mut client_reader).unwrap_or_else(|e| panic!("client receive: {e}"))
        });

        let accepted = accept_n(std::slice::from_ref(server), 1, Duration::from_secs(10))
            .pop()
            .expect("one connection");
        set_timeouts(&accepted);
        let mut server_reader = accepted.try_clone().expect("clone the server stream");
        let (eof_tx, eof_rx) = mpsc::channel();
        let server_receives = scope.spawn(move || {
            let received =
                receive(&mut server_reader).unwrap_or_else(|e| panic!("server receive: {e}"));
            let _ = eof_tx.send(());
            received
        });
        let mut server_writer = accepted;
        let mut bytes = Pattern::new(2);
        let first = size / 2;
        bytes
            .send(&mut server_writer, first)
            .unwrap_or_else(|e| panic!("server send (first half): {e}"));
        eof_rx.recv_timeout(IO_TIMEOUT * 10).unwrap_or_else(|_| {
            panic!("server: no EOF from the client: its FIN was not forwarded")
        });
        bytes
            .send(&mut server_writer, size - first)
            .unwrap_or_else(|e| panic!("server send (after the client's EOF): {e}"));
        server_writer
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("server shutdown(write): {e}"));

        Exchange {
            up_sent: client_sends.join().expect("client sender"),
            up_received: server_receives.join().expect("server receiver"),
            down_sent: bytes.finish(),
            down_received: client_receives.join().expect("client receiver"),
        }
    })
}

// ---------------------------------------------------------------------------------------
// 4. An upstream that refuses or resets

#[test]
fn refused_and_reset_upstreams_are_counted_by_errno_and_leak_nothing() {
    /// Nothing listens here: the peer's kernel answers the proxy's SYN with a reset.
    const REFUSING_PORT: u16 = 9001;
    /// A server that accepts, then closes with `SO_LINGER` 0: a reset.
    const RESETTING_PORT: u16 = 9002;
    /// An echo server: the proxy still serves afterwards.
    const ECHO_PORT: u16 = 9003;
    /// Clients at once.
    const PARALLEL: usize = 10;
    let _turn = one_at_a_time();
    let churn = env_u64("LOAD_CHURN", 500) as usize;
    let pods = Pods::new("load_refused_reset");
    // Every connection takes a new ephemeral port of the pod's address (see above).
    pods.pod
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        .expect_ok();
    // Opaque, so the proxy connects without waiting for the (silent) clients to speak.
    let proxy = meshed(&pods, &["--opaque-ports=9001,9002,9003"]);
    let proxy_proc = Proc::of_meshproxy(&pods.pod);
    let mut servers = Vec::new();
    for family in Family::ALL {
        servers.push(ResettingServer::start(
            &pods.peer,
            family.any_port(RESETTING_PORT),
        ));
    }
    let _echo: Vec<EchoServer> = Family::ALL
        .iter()
        .map(|f| EchoServer::start(&pods.peer, f.any_port(ECHO_PORT)))
        .collect();

    // Each target once per family as a warm-up, so that whatever the proxy allocates once
    // (its metric series, its runtime's threads) is in the baseline.
    let targets = |family: Family| {
        [REFUSING_PORT, RESETTING_PORT].map(|port| SocketAddr::new(family.peer(), port))
    };
    let mut closed = 0;
    for family in Family::ALL {
        for to in targets(family) {
            expect_closed_by_proxy(&pods.pod, to);
            closed += 1;
        }
        echo_once(&pods.pod, SocketAddr::new(family.peer(), ECHO_PORT));
        closed += 1;
    }
    proxy.wait_for_metric("tcp_close_total", &[], closed as f64, METRICS_TIMEOUT);
    proxy.wait_for_metric("tcp_open_connections", &[], 0.0, METRICS_TIMEOUT);
    thread::sleep(Duration::from_millis(200));
    let baseline = (proxy_proc.fd_count(), proxy_proc.status());

    // The churn: `churn` connections, half to each target, both families, `PARALLEL`
    // clients at once.
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let slowest = Mutex::new(Duration::ZERO);
    thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= churn {
                    return;
                }
                let family = Family::ALL[(i / 2) % 2];
                let to = targets(family)[i % 2];
                let took = expect_closed_by_proxy(&pods.pod, to);
                let mut slowest = slowest.lock().unwrap_or_else(|p| p.into_inner());
                *slowest = (*slowest).max(took);
            });
        }
    });
    let churn_took = started.elapsed();
    let per_target = |family: Family, port: u16, errno: &str, metrics: &Metrics| {
        let target = SocketAddr::new(family.peer(), port).to_string();
        metrics.sum(
            "tcp_close_total",
            &[("target_addr", target.as_str()), ("errno", errno)],
        )
    };
    let metrics = proxy.wait_for_metric(
        "tcp_close_total",
        &[],
        (closed + churn) as f64,
        METRICS_TIMEOUT,
    );
    let refused = metrics.sum("tcp_close_total", &[("errno", "ECONNREFUSED")]);
    let reset = metrics.sum("tcp_close_total", &[("errno", "ECONNRESET")]);
    for family in Family::ALL {
        // Half of the churn, plus the warm-up's one, per port; the families alternate
        // every two connections.
        let expected = |port_index: usize| {
            let mine = (0..churn)
                .filter(|i| Family::ALL[(i / 2) % 2] == family && i % 2 == port_index)
                .count();
            (mine + 1) as f64
        };
        assert_eq!(
            per_target(family, REFUSING_PORT, "ECONNREFUSED", &metrics),
            expected(0),
            "{family:?}: every connection to the refusing port is counted as ECONNREFUSED\n{metrics}"
        );
        assert_eq!(
            per_target(family, RESETTING_PORT, "ECONNRESET", &metrics),
            expected(1),
            "{family:?}: every connection to the resetting server is counted as ECONNRESET\n{metrics}"
        );
    }
    assert_eq!(
        refused + reset + 2.0,
        metrics.sum("tcp_close_total", &[]),
        "only the two echo connections closed otherwise\n{metrics}"
    );

    // No task, socket or thread outlives its connection.
    proxy.wait_for_metric("tcp_open_connections", &[], 0.0, METRICS_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = (proxy_proc.fd_count(), proxy_proc.status());
        if (now.0 <= baseline.0 && now.1.threads <= baseline.1.threads) || Instant::now() > deadline
        {
            break now;
        }
        thread::sleep(Duration::from_millis(50));
    };
    report(
        "refused-reset",
        &[
            ("churn", churn.to_string()),
            ("parallel", PARALLEL.to_string()),
            ("seconds", format!("{:.2}", churn_took.as_secs_f64())),
            (
                "slowest_close_ms",
                format!(
                    "{:.2}",
                    ms(*slowest.lock().unwrap_or_else(|p| p.into_inner()))
                ),
            ),
            ("econnrefused", refused.to_string()),
            ("econnreset", reset.to_string()),
            ("fds_before", baseline.0.to_string()),
            ("fds_after", after.0.to_string()),
            ("threads_before", baseline.1.threads.to_string()),
            ("threads_after", after.1.threads.to_string()),
            ("rss_before_mib", mib(baseline.1.rss_kib)),
            ("rss_after_mib", mib(after.1.rss_kib)),
        ],
    );
    assert!(
        after.0 <= baseline.0,
        "the proxy holds {} descriptors after the churn, {} before: a leak\n{}",
        after.0,
        baseline.0,
        proxy_proc.fd_listing()
    );
    assert!(
        after.1.threads <= baseline.1.threads,
        "the proxy runs {} threads after the churn, {} before",
        after.1.threads,
        baseline.1.threads
    );

    // Still serving, and it never crashed.
    for family in Family::ALL {
        echo_once(&pods.pod, SocketAddr::new(family.peer(), ECHO_PORT));
    }
    proxy_proc.assert_alive(&proxy);
    drop(servers);
}

/// Connects to `to` through the proxy, whose upstream refuses or resets: the proxy must
/// close the client (EOF or reset) promptly. Returns how long that took.
#[track_caller]
fn expect_closed_by_proxy(ns: &Netns, to: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut client = connect(ns, to);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut buf = [0; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{to}: got {:?} from a dead upstream", &buf[..n]),
        Err(e) => panic!("{to}: the proxy did not close the client: {e}"),
    }
    started.elapsed()
}

/// One round trip to the echo server at `to` through the proxy.
#[track_caller]
fn echo_once(ns: &Netns, to: SocketAddr) {
    let mut client = connect(ns, to);
    round_trip(&mut client, b"still there?").unwrap_or_else(|e| panic!("echo via {to}: {e}"));
    client.shutdown(Shutdown::Write).expect("shutdown(write)");
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("echo via {to}: waiting for the close: {e}"));
}

// ---------------------------------------------------------------------------------------
// Helpers: the report, the proxy process, servers, sockets

/// Prints `LOAD NAME binary=… key=value …`, one line that `scripts/soak.sh` parses.
fn report(name: &str, fields: &[(&str, String)]) {
    let mut line = format!(
        "LOAD {name} binary={}",
        netns_tests::meshproxy_bin().display()
    );
    for (key, value) in fields {
        line.push_str(&format!(" {key}={value}"));
    }
    println!("{line}");
}

/// KiB as MiB, one decimal.
fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (processes started from
/// here, the proxy among them, inherit it) with `prlimit`, and returns it.
fn raise_nofile_limit() -> u64 {
    let (soft, hard) = nofile_limits();
    if soft < hard {
        let run = Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .output()
            .expect("run prlimit");
        assert!(run.status.success(), "prlimit: {run:?}");
        assert_eq!(
            nofile_limits(),
            (hard, hard),
            "prlimit raised the soft limit"
        );
    }
    hard
}

/// The soft and hard `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn nofile_limits() -> (u64, u64) {
    let limits = fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a `Max open files` line");
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    let soft = values.next().expect("a soft limit");
    let hard = values.next().expect("a hard limit");
    (soft, hard)
}

/// The `meshproxy` process of a namespace, read through `/proc`.
struct Proc {
    pid: u32,
}

/// A few lines of `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
struct Status {
    rss_kib: u64,
    anon_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

impl Proc {
    /// The one process named `meshproxy` in `ns`.
    fn of_meshproxy(ns: &Netns) -> Proc {
        let listed = Command::new("ip")
            .args(["netns", "pids", ns.name()])
            .output()
            .expect("ip netns pids");
        let pids: Vec<u32> = String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "meshproxy")
            })
            .collect();
        match pids[..] {
            [pid] => Proc { pid },
            _ => panic!(
                "expected one meshproxy in {}, found pids {pids:?}",
                ns.name()
            ),
        }
    }

    fn status(&self) -> Status {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_else(|e| panic!("meshproxy (pid {}) is gone: {e}", self.pid));
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{}/status", self.pid))
        };
        Status {
            rss_kib: field("VmRSS"),
            anon_kib: field("RssAnon"),
            hwm_kib: field("VmHWM"),
            threads: field("Threads"),
        }
    }

    fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap_or_else(|e| panic!("meshproxy (pid {}) is gone: {e}", self.pid))
            .count()
    }

    /// What each descriptor is, for a failure message.
    fn fd_listing(&self) -> String {
        let mut lines: Vec<String> = fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| {
                        let target = fs::read_link(e.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_default();
                        format!("{} -> {target}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        lines.sort();
        lines.join("\n")
    }

    /// The proxy is still the same running process, and it never panicked.
    #[track_caller]
    fn assert_alive(&self, proxy: &MeshProxy<'_>) {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("gone");
        assert!(
            state != "Z" && state != "X" && state != "gone",
            "meshproxy (pid {}) exited",
            self.pid
        );
        assert!(
            !proxy.log().contains("panicked"),
            "meshproxy logged a panic\n{}",
            proxy.report()
        );
    }
}

/// A listener on `addr` (IPv6 ones `IPV6_V6ONLY`) with the largest backlog (`SOMAXCONN`:
/// thousands of connections arrive at once), in the calling thread's namespace. Non-blocking; see [`accept_n`].
fn listener(addr: SocketAddr) -> TcpListener {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    match addr {
        SocketAddr::V4(v4) => bind(fd.as_raw_fd(), &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("IPV6_V6ONLY");
            bind(fd.as_raw_fd(), &SockaddrIn6::from(v6))
        }
    }
    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listen(&fd, Backlog::MAXCONN).expect("listen");
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).expect("non-blocking");
    listener
}

/// Accepts `n` connections from any of `listeners` within `timeout`; panics otherwise.
fn accept_n(listeners: &[TcpListener], n: usize, timeout: Duration) -> Vec<TcpStream> {
    let deadline = Instant::now() + timeout;
    let mut accepted = Vec::with_capacity(n);
    while accepted.len() < n {
        let mut idle = true;
        for listener in listeners {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    accepted.push(stream);
                    idle = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if idle {
            assert!(
                Instant::now() < deadline,
                "accepted {} of {n} connections within {timeout:?}",
                accepted.len()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
    accepted
}

/// A server that runs `handle` on every connection it accepts (on a thread of its own
/// when `threaded`), until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, addr: SocketAddr, threaded: bool, handle: fn(TcpStream)) -> Server {
        let listener = ns.run(|| listener(addr));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).expect("blocking stream");
                            if threaded {
                                thread::spawn(move || handle(stream));
                            } else {
                                handle(stream);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            }
        });
        Server {
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Echoes every byte back until the client's EOF, then closes.
struct EchoServer(#[allow(dead_code)] Server);

impl EchoServer {
    fn start(ns: &Netns, addr: SocketAddr) -> EchoServer {
        EchoServer(Server::start(ns, addr, true, |mut stream| {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let mut reader = match stream.try_clone() {
                Ok(reader) => reader,
                Err(_) => return,
            };
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        }))
    }
}

/// Answers every HTTP/1 request head (no body) with [`HTTP_OK`], keeping the
/// connection open, until the client's EOF; a connection that does not start with
/// `GET ` (a silent client forwarded as opaque after the detect timeout) is echoed.
struct HttpOkServer(#[allow(dead_code)] Server);

impl HttpOkServer {
    fn start(ns: &Netns, addr: SocketAddr) -> HttpOkServer {
        HttpOkServer(Server::start(ns, addr, true, |mut stream| {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let mut pending = Vec::new();
            let mut buf = [0; 4096];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                if !b"GET ".starts_with(&pending[..pending.len().min(4)]) {
                    // Not HTTP: echo what came and the rest, as `EchoServer` does.
                    if stream.write_all(&pending).is_err() {
                        return;
                    }
                    if let Ok(mut reader) = stream.try_clone() {
                        let _ = io::copy(&mut reader, &mut stream);
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                    return;
                }
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..end + 4);
                    if stream.write_all(HTTP_OK).is_err() {
                        return;
                    }
                }
            }
        }))
    }
}

/// Accepts and at once closes with `SO_LINGER` 0: the kernel sends a reset.
struct ResettingServer(#[allow(dead_code)] Server);

impl ResettingServer {
    fn start(ns: &Netns, addr: SocketAddr) -> ResettingServer {
        ResettingServer(Server::start(ns, addr, false, |stream| {
            setsockopt(
                &stream,
                sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .expect("SO_LINGER");
            drop(stream);
        }))
    }
}

/// Connects from `ns` to `to` (through the proxy, when the rules redirect it), with
/// [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
fn connect(ns: &Netns, to: SocketAddr) -> TcpStream {
    let stream = ns
        .run(|| TcpStream::connect_timeout(&to, CONNECT_TIMEOUT))
        .unwrap_or_else(|e| panic!("connect from {} to {to}: {e}", ns.name()));
    set_timeouts(&stream);
    stream
}

fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
}
