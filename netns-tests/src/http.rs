//! The set-up the HTTP tests share (`tests/http*.rs`): the ports of the real servers, both
//! pods meshed in plaintext ([`mesh_both`], a [`Pair`] of proxies that a request passes),
//! waiting for a metric at a proxy ([`expect`]), nginx with the sites the tests use
//! ([`nginx_sites`]), and small helpers for curl runs, files, memory and promtool.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::apps::{self, curl, url, App};
use crate::mesh::Scratch;
use crate::netns::Netns;
use crate::pods::Pods;
use crate::process::Run;
use crate::proxy::{MeshProxy, Metrics};

/// nginx, HTTP/1.1 (a port meshproxy detects: not in the opaque list).
pub const HTTP1: u16 = 8080;
/// nginx, HTTP/2 with prior knowledge (`listen … http2` without TLS).
pub const H2C: u16 = 8081;
/// nghttpd, HTTP/2 with prior knowledge.
pub const NGHTTPD: u16 = 8082;
/// The Python upload sink (http.server).
pub const SINK: u16 = 8090;
/// Nothing listens here.
pub const NOBODY: u16 = 8099;
/// The Python gRPC server (grpcio).
pub const GRPC: u16 = 50051;
/// The Python WebSocket echo server (websockets).
pub const WS: u16 = 8765;
/// The Python WebSocket echo server over HTTP/2 and HTTP/1.1 (hypercorn, `apps/ws_h2.py`).
pub const WS_H2: u16 = 8766;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// How long a proxy may take to count what a finished client saw.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxies a request passes: the pod's outbound one, then the peer's inbound one.
pub struct Pair<'p> {
    pub outbound: MeshProxy<'p>,
    pub inbound: MeshProxy<'p>,
}

/// meshinit's default rules and a plaintext meshproxy in both namespaces.
pub fn mesh_both(pods: &Pods) -> Pair<'_> {
    pods.pod.meshinit(&["apply"]).expect_ok();
    pods.peer.meshinit(&["apply"]).expect_ok();
    Pair {
        inbound: pods.peer.start_meshproxy(&[]),
        outbound: pods.pod.start_meshproxy(&[]),
    }
}

impl Pair<'_> {
    /// Waits until the samples of `name` for `target` with `labels` sum to `want` at both
    /// proxies (with `direction` outbound at the pod's, inbound at the peer's); returns both
    /// scrapes.
    #[track_caller]
    pub fn expect(
        &self,
        name: &str,
        target: SocketAddr,
        labels: &[(&str, &str)],
        want: f64,
    ) -> (Metrics, Metrics) {
        (
            expect(&self.outbound, "outbound", name, target, labels, want),
            expect(&self.inbound, "inbound", name, target, labels, want),
        )
    }

    /// Waits until both proxies count `want` responses from `target` with `status_code`
    /// `status`, classified `classification`.
    #[track_caller]
    pub fn expect_responses(
        &self,
        target: SocketAddr,
        status: &str,
        classification: &str,
        want: f64,
    ) -> (Metrics, Metrics) {
        let labels = [("status_code", status), ("classification", classification)];
        self.expect("response_total", target, &labels, want)
    }
}

/// Waits until `name{direction, target_addr=target, labels…}` sums to `want` at `proxy`.
#[track_caller]
pub fn expect(
    proxy: &MeshProxy<'_>,
    direction: &str,
    name: &str,
    target: SocketAddr,
    labels: &[(&str, &str)],
    want: f64,
) -> Metrics {
    let target = target.to_string();
    let mut all = vec![("direction", direction), ("target_addr", target.as_str())];
    all.extend_from_slice(labels);
    proxy.wait_for_metric(name, &all, want, METRICS_TIMEOUT)
}

/// Waits until `proxy` counts `want` responses from `target` with `status_code` `status`,
/// classified `classification`.
#[track_caller]
pub fn expect_responses(
    proxy: &MeshProxy<'_>,
    direction: &str,
    target: SocketAddr,
    status: &str,
    classification: &str,
    want: f64,
) -> Metrics {
    let labels = [("status_code", status), ("classification", classification)];
    expect(proxy, direction, "response_total", target, &labels, want)
}

/// Waits until `proxy` counts `want` connections to `target` detected as `protocol`.
#[track_caller]
pub fn expect_connections(
    proxy: &MeshProxy<'_>,
    direction: &str,
    target: SocketAddr,
    protocol: &str,
    want: f64,
) -> Metrics {
    expect(
        proxy,
        direction,
        "tcp_open_total",
        target,
        &[("protocol", protocol)],
        want,
    )
}

/// nginx's sites: HTTP/1.1 on [`HTTP1`] and HTTP/2 on [`H2C`], both families, serving the
/// files of `www`, with fixed answers on a few paths.
pub fn nginx_sites(ns: &Netns, scratch: &Scratch) -> App {
    let www = scratch.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("small"), "a small file\n").unwrap();
    let locations = "\
        location = /ok { return 200 \"ok\\n\"; }\n\
        location = /fail { return 503 \"unavailable\\n\"; }\n\
        location = /missing { return 404 \"missing\\n\"; }\n\
        location = /echo { return 200 \"$http_host $request_method $request_uri $http_x_custom $server_protocol\\n\"; }\n\
        location / { }\n";
    let sites = format!(
        "server {{\n listen {HTTP1}; listen [::]:{HTTP1};\n root {www};\n client_max_body_size 200m;\n{locations}}}\n\
         server {{\n listen {H2C} http2; listen [::]:{H2C} http2;\n root {www};\n{locations}}}\n",
        www = www.display(),
    );
    apps::nginx(ns, scratch.path(), &sites, HTTP1)
}

/// The `%{http_code}` of each transfer of a curl run with `-w '%{http_code}\n' -o /dev/null`.
pub fn codes(run: &Run) -> Vec<&str> {
    run.stdout.lines().collect()
}

/// curl arguments fetching `path` from `to` `n` times, discarding the bodies.
pub fn repeat(to: SocketAddr, path: &str, n: usize) -> Vec<String> {
    let target = url(to, path);
    (0..n)
        .flat_map(|_| ["-o".to_string(), "/dev/null".to_string(), target.clone()])
        .collect()
}

/// The `&str`s of `args`, for a command line.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// SHA-256 of `path` in hex, by `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let run = Run::of(Command::new("sha256sum").arg(path)).expect_ok();
    run.stdout.split_whitespace().next().unwrap().to_string()
}

/// Runs `client "$url" | sha256sum` in `ns` (bash, `pipefail`: the client must succeed)
/// and asserts that what the client wrote has the SHA-256 `sha`.
#[track_caller]
pub fn assert_fetched_sha256(ns: &Netns, client: &str, url: &str, sha: &str) {
    let script = format!(r#"set -o pipefail; {client} "$1" | sha256sum"#);
    let run = Run::of(
        ns.command("bash")
            .arg("-c")
            .arg(script)
            .arg("bash")
            .arg(url),
    )
    .expect_ok();
    assert_eq!(
        run.stdout.split_whitespace().next(),
        Some(sha),
        "{client} {url}\n{run}"
    );
}

/// The JSON that a client script (`grpc_echo.py call`, `ws_echo.py call`) prints, and its
/// run; the run must succeed.
#[track_caller]
pub fn python_call(ns: &Netns, name: &str, args: &[&str]) -> (serde_json::Value, Run) {
    let run = apps::python_client(ns, name, args).expect_ok();
    let result = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}\n{run}"));
    (result, run)
}

/// A WebSocket over HTTP/2 (extended `CONNECT`) from `ns` to `to` (`apps/ws_h2.py`):
/// the tunnel opens with a 200 and 20 messages of 100 kB come back as they were sent.
#[track_caller]
pub fn ws_h2_echo(ns: &Netns, to: SocketAddr) {
    let (host, port) = (to.ip().to_string(), to.port().to_string());
    let (result, run) = python_call(ns, "ws_h2.py", &["call", &host, &port]);
    assert_eq!(result["status"], "200", "{run}");
    assert_eq!(result["sent"], 20, "{run}");
    assert_eq!(result["echoed"], result["sent"], "{run}");
    assert!(result.get("mismatch_at").is_none(), "{run}");
}

/// A request reaches nginx's `/echo` as the client sent it: Host with its case, method,
/// path and query, a custom header, the protocol version (HTTP/1.1 to `to`).
#[track_caller]
pub fn assert_echo_unchanged(ns: &Netns, to: SocketAddr) {
    let run = curl(
        ns,
        &[
            "-g",
            "-X",
            "PATCH",
            "-H",
            "Host: Shop.Example:8080",
            "-H",
            "X-Custom: kept as is",
            &url(to, "/echo?a=1&b=%20"),
        ],
    )
    .expect_ok();
    assert_eq!(
        run.stdout, "Shop.Example:8080 PATCH /echo?a=1&b=%20 kept as is HTTP/1.1\n",
        "{run}"
    );
}

/// The peak resident memory (`VmHWM`) of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// A file of `size` random bytes in `scratch/www` (so nginx serves it as `/big`), and its
/// SHA-256.
pub fn random_file(scratch: &Scratch, size: u64) -> (PathBuf, String) {
    let big = scratch.join("www/big");
    Run::of(
        Command::new("head")
            .args(["-c", &size.to_string(), "/dev/urandom"])
            .stdout(fs::File::create(&big).unwrap()),
    )
    .expect_ok();
    let sha = sha256_file(&big);
    (big, sha)
}

/// `promtool check metrics` (Debian's prometheus package) must accept `text`.
#[track_caller]
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (package prometheus): {e}"));
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `curl -i` (the response head and body), with its status code.
pub fn curl_head(ns: &Netns, to: SocketAddr, path: &str) -> (u16, String) {
    let run = curl(ns, &["-g", "-i", &url(to, path)]).expect_ok();
    let status = run
        .stdout
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line\n{run}"));
    (status, run.stdout)
}

/// The value of header `name` in a response head, case-insensitively.
pub fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .split("\r\n\r\n")
        .next()?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Sends `heads` (each a request line and header lines, without the blank line that ends
/// them) pipelined on one connection from `ns` to `to`, the last with `Connection:
/// close`; one thread writes while this one reads, so a proxy that answers as it reads
/// never blocks on a full socket. Everything the connection returned until it closed.
pub fn pipelined(ns: &Netns, to: SocketAddr, heads: Vec<String>) -> String {
    let stream = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let total = heads.len();
    let sender = std::thread::spawn(move || {
        for (i, head) in heads.iter().enumerate() {
            let close = if i + 1 == total {
                "Connection: close\r\n"
            } else {
                ""
            };
            write!(writer, "{head}{close}\r\n").unwrap();
        }
    });
    let mut responses = String::new();
    (&stream).read_to_string(&mut responses).unwrap();
    sender.join().unwrap();
    responses
}
