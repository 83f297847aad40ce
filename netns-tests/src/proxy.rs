//! The real `meshproxy` running in a namespace as the proxy uid, and what its admin port
//! says: `/ready` to wait for it, `/metrics` to read its counters.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::bins::meshproxy_bin;
use crate::netns::Netns;
use crate::process::Spawned;

/// The uid (and gid) meshproxy runs as: meshinit's default `--proxy-uid`, whose own
/// connections the outbound rule exempts. As any other user, every connection the proxy
/// opens would be redirected back into it.
pub const PROXY_UID: u32 = 2102;

/// meshproxy's default admin port (`/metrics`, `/ready`, `/live`), which meshinit's default
/// `--inbound-ports-to-ignore` exempts.
pub const ADMIN_PORT: u16 = 4191;

/// How long meshproxy may take from its start to answering `/ready` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `meshproxy` process in a namespace, started by [`Netns::start_meshproxy`] and killed on
/// `Drop`. Its log (stderr) goes to a file, printed when the test is panicking.
#[derive(Debug)]
pub struct MeshProxy<'a> {
    ns: &'a Netns,
    process: Spawned,
    log: PathBuf,
}

impl Netns {
    /// Starts `meshproxy ARGS…` in this namespace as [`PROXY_UID`] (through `setpriv`, no
    /// supplementary groups) and returns once `/ready` on `127.0.0.1:4191` answers 200.
    /// The listeners are meshproxy's defaults unless `args` say otherwise; the admin
    /// listener must stay on port [`ADMIN_PORT`]. Panics, with the proxy's log, when it exits
    /// or is not ready within 10 s.
    pub fn start_meshproxy(&self, args: &[&str]) -> MeshProxy<'_> {
        self.start_meshproxy_as(PROXY_UID, &[], args)
    }

    /// Like [`Netns::start_meshproxy`], but as `uid` (and gid; 0 is root) and through
    /// `wrapper`, a command that execs its arguments (`prlimit --nofile=256:4096`), run
    /// before the uid changes.
    pub fn start_meshproxy_as(&self, uid: u32, wrapper: &[&str], args: &[&str]) -> MeshProxy<'_> {
        self.start_meshproxy_with(uid, wrapper, &[], args)
    }

    /// [`Netns::start_meshproxy`] with `--inbound-transparent` and the one capability it
    /// needs, CAP_NET_ADMIN, kept across the uid change as an ambient capability (what a
    /// container's `securityContext.capabilities.add: [NET_ADMIN]` gives a non-root
    /// process).
    pub fn start_meshproxy_transparent(&self, args: &[&str]) -> MeshProxy<'_> {
        let args = [&["--inbound-transparent"], args].concat();
        self.start_meshproxy_with(
            PROXY_UID,
            &[],
            &["--inh-caps=+net_admin", "--ambient-caps=+net_admin"],
            &args,
        )
    }

    /// The general form: `wrapper`, then `setpriv` with `setpriv_caps` (its capability
    /// options), then meshproxy.
    pub fn start_meshproxy_with(
        &self,
        uid: u32,
        wrapper: &[&str],
        setpriv_caps: &[&str],
        args: &[&str],
    ) -> MeshProxy<'_> {
        let log = std::env::temp_dir().join(format!("{}-meshproxy.log", self.name()));
        // The shell (still root) opens the log, then becomes the wrapper, setpriv, then
        // meshproxy: one pid throughout, so the guard kills meshproxy itself.
        let mut cmd = self.command("sh");
        cmd.arg("-c")
            .arg(r#"log="$1"; shift; exec "$@" 2>"$log""#)
            .arg("sh")
            .arg(&log)
            .args(wrapper)
            .arg("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .args(setpriv_caps)
            .arg(meshproxy_bin())
            .args(args)
            .env("RUST_LOG", "meshproxy=debug");
        let proxy = MeshProxy {
            ns: self,
            process: self.spawn(cmd),
            log,
        };
        proxy.wait_ready();
        proxy
    }
}

impl MeshProxy<'_> {
    /// The admin address, as reached from inside the proxy's namespace.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT))
    }

    /// The process id of meshproxy (for `/proc/PID/limits`).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What meshproxy has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// `GET /metrics`, parsed. Panics unless the answer is 200.
    #[track_caller]
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self
            .get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}",));
        assert_eq!(status, 200, "GET /metrics\n{body}",);
        Metrics { text: body }
    }

    /// Polls `/metrics` until the sum of the series of `name` that carry `labels` equals
    /// `want`, and returns that scrape. Panics with the last scrape after `timeout`.
    #[track_caller]
    pub fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = self.metrics();
            let got = metrics.sum(name, labels);
            if got == want {
                return metrics;
            }
            if Instant::now() > deadline {
                panic!("{name}{labels:?} is {got}, expected {want} within {timeout:?}\n{metrics}",);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET PATH` on the admin port from inside the namespace: status and body.
    pub fn get(&self, path: &str) -> io::Result<(u16, String)> {
        let admin = self.admin_addr();
        let response = self.ns.run(|| -> io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: meshproxy\r\nConnection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not an HTTP response: {response:?}"),
                )
            })?;
        Ok((status, body.to_string()))
    }

    /// The command line and the log. Printed on `Drop` when the test is panicking, so a
    /// failure message need not include it.
    pub fn report(&self) -> String {
        format!("--- `{}` log\n{}---", self.process.command(), self.log())
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.get("/ready") {
                Ok((200, _)) => return,
                _ if Instant::now() > deadline => {
                    panic!("meshproxy not ready within {READY_TIMEOUT:?}",)
                }
                _ => {}
            }
            if !self.is_running() {
                panic!("meshproxy exited before it was ready");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process has not exited.
    fn is_running(&self) -> bool {
        // `Spawned::is_running` needs `&mut` to reap; `/proc` answers without it.
        crate::netns::is_alive(self.process.pid())
    }
}

impl Drop for MeshProxy<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.report());
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// One scrape of `/metrics` (Prometheus text format).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
}

impl Metrics {
    /// The sum of the samples of metric `name` whose labels include every `(key, value)` of
    /// `labels` (other labels may differ); 0 when there are none, as Prometheus would say of
    /// a counter never incremented.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(sample_labels, _)| {
                labels
                    .iter()
                    .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|(_, value)| value)
            // An empty f64 sum is -0, which a failure message would print as "-0".
            .fold(0.0, |sum, value| sum + value)
    }

    /// Every sample of metric `name`: its labels and its value.
    pub fn samples<'s>(
        &'s self,
        name: &'s str,
    ) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 's {
        self.text.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.rsplit_once('}')?;
                    (parse_labels(labels), value)
                }
                None if rest.starts_with(' ') => (Vec::new(), rest),
                None => return None,
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some((labels, value))
        })
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--- /metrics\n{}---", self.text)
    }
}

/// `k="v",k2="v2"` (values with `\"`, `\\` and `\n` escapes) as pairs.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_samples_that_carry_the_labels() {
        let metrics = Metrics {
            text: concat!(
                "# TYPE tcp_open_total counter\n",
                "tcp_open_total{direction=\"outbound\",target_addr=\"[fd00:18::2]:80\",protocol=\"http1\"} 2\n",
                "tcp_open_total{direction=\"inbound\",target_addr=\"198.18.0.1:80\",protocol=\"opaque\"} 3\n",
                "tcp_open_totalx{direction=\"inbound\"} 100\n",
                "odd{a=\"x\\\"}y\",b=\"2\"} 7\n",
                "bare 5\n",
            )
            .to_string(),
        };
        assert_eq!(metrics.sum("tcp_open_total", &[]), 5.0);
        assert_eq!(
            metrics.sum(
                "tcp_open_total",
                &[("target_addr", "[fd00:18::2]:80"), ("protocol", "http1")]
            ),
            2.0
        );
        assert_eq!(metrics.sum("tcp_open_total", &[("direction", "none")]), 0.0);
        assert_eq!(metrics.sum("odd", &[("a", "x\"}y"), ("b", "2")]), 7.0);
        assert_eq!(metrics.sum("bare", &[]), 5.0);
    }
}
