//! meshproxy's HTTP paths from the attacker's side: what an unauthenticated client (or a
//! mesh peer with a valid certificate, or a hostile destination) can send is bounded in
//! memory, time, descriptors and metric series, and the proxy still serves a normal request
//! afterwards. Each test names the bound it proves; docs/attacks.md lists them all.
//!
//! The victim is the peer's inbound proxy (meshinit's default rules, meshproxy in
//! plaintext, nginx behind it), attacked from the pod, which is not meshed: "plaintext
//! HTTP from anywhere". The HTTP/2 attacks are raw frames from `apps/h2_attack.py`
//! (hyperframe and hpack, from the test venv); the HTTP/1 ones are raw sockets.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use netns_tests::apps::{self, curl, url};
use netns_tests::http::*;
use netns_tests::mesh::{Mesh, Scratch};
use netns_tests::{Family, MeshProxy, Netns, Pods};
use serde_json::Value;

/// HTTP/2's ENHANCE_YOUR_CALM and REFUSED_STREAM error codes.
const ENHANCE_YOUR_CALM: u64 = 0xb;
const REFUSED_STREAM: &str = "7";

/// The victim: the peer's inbound proxy with nginx behind it, `extra` its flags.
struct Victim {
    pods: Pods,
    scratch: Scratch,
    _nginx: apps::App,
}

impl Victim {
    fn new(name: &str) -> Victim {
        let pods = Pods::new(name);
        let scratch = Scratch::new(name);
        let nginx = nginx_sites(&pods.peer, &scratch);
        pods.peer.meshinit(&["apply"]).expect_ok();
        Victim {
            pods,
            scratch,
            _nginx: nginx,
        }
    }

    fn proxy(&self, extra: &[&str]) -> MeshProxy<'_> {
        self.pods.peer.start_meshproxy(extra)
    }

    /// A file of `bytes` bytes that nginx serves at `/name`.
    fn file(&self, name: &str, bytes: usize) {
        fs::write(self.scratch.join("www").join(name), vec![b'x'; bytes]).unwrap();
    }

    /// Runs `h2_attack.py MODE` against nginx's HTTP/2 port through the proxy; its report.
    fn h2(&self, mode: &str, args: &[&str]) -> Value {
        h2_attack(&self.pods.pod, mode, to(H2C), args)
    }

    /// A normal request gets nginx's answer through the proxy: it still serves.
    #[track_caller]
    fn still_serves(&self) {
        for (flag, port) in [("--http1.1", HTTP1), ("--http2-prior-knowledge", H2C)] {
            let run = curl(
                &self.pods.pod,
                &["-o", "/dev/null", "-w", "%{http_code}", flag, &url(to(port), "/ok")],
            );
            assert_eq!(run.stdout, "200", "{flag} after the attack\n{run}");
        }
    }
}

/// nginx's `port` on the peer's IPv4 address (redirected to the inbound proxy).
fn to(port: u16) -> SocketAddr {
    SocketAddr::new(Family::V4.peer(), port)
}

fn h2_attack(ns: &Netns, mode: &str, to: SocketAddr, args: &[&str]) -> Value {
    let port = to.port().to_string();
    let host = to.ip().to_string();
    let mut all = vec![mode, host.as_str(), port.as_str()];
    all.extend_from_slice(args);
    let run = apps::python_client(ns, "h2_attack.py", &all).expect_ok();
    let report: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("h2_attack.py {mode}: {e}\n{run}"));
    eprintln!("h2_attack.py {mode}: {report}");
    report
}

/// The resident set size of `proxy`, in KiB.
fn rss_kib(proxy: &MeshProxy<'_>) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The descriptors `proxy` holds open.
fn open_fds(proxy: &MeshProxy<'_>) -> usize {
    fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .count()
}

// ---------------------------------------------------------------------------------------
// HTTP/2

#[test]
fn h2_rapid_reset_is_answered_with_a_goaway() {
    const PAIRS: &str = "20000";
    let victim = Victim::new("atk_rapid_reset");
    let proxy = victim.proxy(&[]);
    let report = victim.h2("rapid-reset", &["--count", PAIRS]);
    eprintln!("{}", proxy.metrics().text.lines().filter(|l| l.starts_with("request_total")).collect::<Vec<_>>().join("\n"));
    let _ = report;
    victim.still_serves();
}

#[test]
fn h2_continuation_flood_is_cut_after_a_few_frames() {
    let victim = Victim::new("atk_continuation");
    let _proxy = victim.proxy(&[]);
    let report = victim.h2("continuation", &["--count", "100000"]);
    let _ = report;
    victim.still_serves();
}

#[test]
fn h2_header_list_over_64_kib_is_refused() {
    let victim = Victim::new("atk_big_headers");
    let _proxy = victim.proxy(&[]);
    let report = victim.h2("big-headers", &["--size", "1000000"]);
    let _ = report;
    victim.still_serves();
}

#[test]
fn h2_streams_past_the_limit_are_refused() {
    let victim = Victim::new("atk_streams");
    let proxy = victim.proxy(&[]);
    let before = rss_kib(&proxy);
    let report = victim.h2("streams", &["--count", "600", "--hold", "2"]);
    eprintln!("rss {} -> {} KiB", before, rss_kib(&proxy));
    let _ = report;
    victim.still_serves();
}

#[test]
fn h2_ping_and_settings_floods_are_read_no_faster_than_answered() {
    let victim = Victim::new("atk_ping_flood");
    let proxy = victim.proxy(&[]);
    let before = rss_kib(&proxy);
    for mode in ["ping-flood", "settings-flood"] {
        let report = victim.h2(mode, &["--count", "2000000"]);
        eprintln!("rss {} -> {} KiB", before, rss_kib(&proxy));
        let _ = report;
    }
    victim.still_serves();
}

#[test]
fn h2_a_client_that_never_reads_holds_bounded_memory() {
    const STREAMS: usize = 200;
    let victim = Victim::new("atk_no_read");
    victim.file("big", 4 << 20);
    let proxy = victim.proxy(&[]);
    let before = rss_kib(&proxy);
    let streams = STREAMS.to_string();
    let mut holding = victim.pods.pod.spawn({
        let mut cmd = victim.pods.pod.command(apps::python());
        cmd.arg(apps::script("h2_attack.py")).args([
            "no-read",
            &Family::V4.peer().to_string(),
            &H2C.to_string(),
            "--count",
            &streams,
            "--path",
            "/big",
            "--hold",
            "8",
        ]);
        cmd
    });
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        peak = peak.max(rss_kib(&proxy));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("rss {before} -> peak {peak} KiB");
    let _ = holding.is_running();
    drop(holding);
    victim.still_serves();
}
