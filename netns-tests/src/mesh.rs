//! Two meshed pods for the mTLS tests: a throwaway CA and identities made with the real
//! `meshproxy identity` helpers, `--mesh-peers` files, a real Redis, a packet capture on the
//! veth, and `openssl s_client` as a TLS client that is not our proxy.
//!
//! The "pod" of [`Pods`] plays pod A (`a.default.mesh.local`), the "peer" pod B
//! (`b.default.mesh.local`); both get meshinit's default rules and a meshproxy.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bins::meshproxy_bin;
use crate::netns::Netns;
use crate::pods::{Family, Pods};
use crate::process::{Run, Spawned};
use crate::proxy::{MeshProxy, PROXY_UID};

/// Pod A's identity (the [`Pods::pod`] namespace).
pub const POD_ID: &str = "a.default.mesh.local";
/// Pod B's identity (the [`Pods::peer`] namespace).
pub const PEER_ID: &str = "b.default.mesh.local";
/// The ALPN of the proxies' mTLS, which a direct client of port 4143 must offer.
pub const TRANSPORT_ALPN: &str = "transport.l5d.io/v1";
/// meshproxy's inbound port, where the peer proxy's mTLS arrives.
pub const INBOUND_PORT: u16 = 4143;

/// How long a helper process (Redis, tcpdump) may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

static SERIAL: AtomicU32 = AtomicU32::new(0);

/// A directory under the temp dir for one test's keys, certificates and captures, removed
/// on `Drop`. World-readable (mode 0755) so the proxy uid can traverse it; the keys
/// themselves are 0600 and owned by that uid.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(test_name: &str) -> Scratch {
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "nt-mesh-{test_name}-{}-{serial}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A dev CA made by `meshproxy identity new-ca DIR`.
#[derive(Debug)]
pub struct DevCa {
    pub dir: PathBuf,
    /// `DIR/ca.crt`, for `--trust-anchors`.
    pub anchors: PathBuf,
}

/// A certificate and key made by `meshproxy identity issue`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevCa {
    /// `meshproxy identity new-ca DIR`.
    pub fn new(dir: PathBuf) -> DevCa {
        Run::of(
            Command::new(meshproxy_bin())
                .args(["identity", "new-ca"])
                .arg(&dir),
        )
        .expect_ok();
        DevCa {
            anchors: dir.join("ca.crt"),
            dir,
        }
    }

    /// `meshproxy identity issue --ca DIR NAME --out OUT` (again: a rotation, written
    /// atomically), then hands the key (mode 0600) to the proxy uid, which reads it.
    pub fn issue(&self, name: &str, out: &Path) -> Identity {
        Run::of(
            Command::new(meshproxy_bin())
                .args(["identity", "issue", "--ca"])
                .arg(&self.dir)
                .arg(name)
                .arg("--out")
                .arg(out),
        )
        .expect_ok();
        let identity = Identity {
            name: name.to_string(),
            cert: out.join(format!("{name}.crt")),
            key: out.join(format!("{name}.key")),
        };
        nix::unistd::chown(
            &identity.key,
            Some(nix::unistd::Uid::from_raw(PROXY_UID)),
            Some(nix::unistd::Gid::from_raw(PROXY_UID)),
        )
        .unwrap_or_else(|e| panic!("chown {}: {e}", identity.key.display()));
        identity
    }
}

impl Identity {
    /// The certificate file's PEM block, as `openssl s_client` prints a server's.
    pub fn cert_pem(&self) -> String {
        let text = fs::read_to_string(&self.cert)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.cert.display()));
        first_pem_block(&text)
            .unwrap_or_else(|| panic!("{} holds no certificate", self.cert.display()))
    }
}

/// The first `-----BEGIN CERTIFICATE-----` … `-----END CERTIFICATE-----` block of `text`.
pub fn first_pem_block(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)?;
    let end = start + text[start..].find(END)? + END.len();
    Some(text[start..end].to_string())
}

/// Everything two meshed pods share: the CA, both identities and both `--mesh-peers` files
/// (each listing the other pod's IPv4 /32 and IPv6 /128), in one scratch directory.
#[derive(Debug)]
pub struct Mesh {
    pub scratch: Scratch,
    pub ca: DevCa,
    /// Pod A's identity.
    pub a: Identity,
    /// Pod B's identity.
    pub b: Identity,
    /// A's `--mesh-peers`: B's addresses, with B's identity.
    pub peers_of_a: PathBuf,
    /// B's `--mesh-peers`: A's addresses, with A's identity.
    pub peers_of_b: PathBuf,
}

impl Mesh {
    /// Makes the CA and identities, writes the peers files and installs meshinit's default
    /// rules in both pods.
    pub fn new(test_name: &str, pods: &Pods) -> Mesh {
        let scratch = Scratch::new(test_name);
        let ca = DevCa::new(scratch.join("ca"));
        let a = ca.issue(POD_ID, &scratch.join("a"));
        let b = ca.issue(PEER_ID, &scratch.join("b"));
        let peers_of_a = scratch.join("peers-a.toml");
        let peers_of_b = scratch.join("peers-b.toml");
        write_peers(
            &peers_of_a,
            Family::ALL.map(|f| (f.peer(), PEER_ID)).as_slice(),
        );
        write_peers(
            &peers_of_b,
            Family::ALL.map(|f| (f.pod(), POD_ID)).as_slice(),
        );
        for ns in [&pods.pod, &pods.peer] {
            ns.meshinit(&[]).expect_ok();
        }
        Mesh {
            scratch,
            ca,
            a,
            b,
            peers_of_a,
            peers_of_b,
        }
    }

    /// Starts pod A's proxy with its identity and `peers` (normally
    /// [`Mesh::peers_of_a`]; `None` reaches every destination in plaintext), plus `extra`.
    pub fn start_a<'p>(
        &self,
        pods: &'p Pods,
        peers: Option<&Path>,
        extra: &[&str],
    ) -> MeshProxy<'p> {
        start(&pods.pod, &self.a, &self.ca, peers, extra)
    }

    /// Starts pod B's proxy with its identity and [`Mesh::peers_of_b`], plus `extra`.
    pub fn start_b<'p>(&self, pods: &'p Pods, extra: &[&str]) -> MeshProxy<'p> {
        start(&pods.peer, &self.b, &self.ca, Some(&self.peers_of_b), extra)
    }

    /// [`Mesh::start_b`] with `--inbound-transparent` and CAP_NET_ADMIN, for B under
    /// `meshinit --mode tproxy`.
    pub fn start_b_transparent<'p>(&self, pods: &'p Pods, extra: &[&str]) -> MeshProxy<'p> {
        let args = identity_args(&self.b, &self.ca, Some(&self.peers_of_b), extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pods.peer.start_meshproxy_transparent(&args)
    }
}

fn start<'p>(
    ns: &'p Netns,
    id: &Identity,
    ca: &DevCa,
    peers: Option<&Path>,
    extra: &[&str],
) -> MeshProxy<'p> {
    let args = identity_args(id, ca, peers, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.start_meshproxy(&args)
}

/// meshproxy's identity flags (and `--mesh-peers` when given), then `extra`.
fn identity_args(id: &Identity, ca: &DevCa, peers: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--identity-cert".into(),
        path_str(&id.cert),
        "--identity-key".into(),
        path_str(&id.key),
        "--trust-anchors".into(),
        path_str(&ca.anchors),
    ];
    if let Some(peers) = peers {
        args.extend(["--mesh-peers".into(), path_str(peers)]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
        .to_string()
}

/// Writes a `--mesh-peers` file: one `[[peer]]` per address, as a /32 or /128.
pub fn write_peers(path: &Path, peers: &[(IpAddr, &str)]) {
    let text: String = peers
        .iter()
        .map(|(ip, id)| {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            format!("[[peer]]\nnet = \"{ip}/{len}\"\nidentity = \"{id}\"\n\n")
        })
        .collect();
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Debian's `redis-server` on port 6379 of every address of `ns` (IPv4 and IPv6), without
/// persistence, started as root and killed on `Drop` of the returned guard. Returns once
/// it answers PING.
pub fn start_redis(ns: &Netns, dir: &Path) -> Spawned {
    let mut cmd = ns.command("redis-server");
    cmd.args(["--port", "6379", "--bind", "0.0.0.0", "::"])
        .args(["--protected-mode", "no", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir);
    let mut redis = ns.spawn(cmd);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        // From inside B over loopback, which meshinit's rules exempt.
        let ping = redis_cli(ns, "127.0.0.1".parse().expect("an address"), &["PING"]);
        if ping.success() && ping.stdout.trim() == "PONG" {
            return redis;
        }
        if !redis.is_running() || Instant::now() > deadline {
            panic!("`{}` is not answering\n{ping}", redis.command());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -h HOST ARGS…` in `ns`, as root (so meshinit's outbound rule applies).
pub fn redis_cli(ns: &Netns, host: IpAddr, args: &[&str]) -> Run {
    Run::of(
        ns.command("redis-cli")
            .args(["-h", &host.to_string(), "-p", "6379"])
            .args(args),
    )
}

/// `openssl s_client` connecting to `to` from `ns` as the proxy uid (so that meshinit's
/// outbound rule lets it out directly instead of into the pod's own proxy), TLS 1.3 with
/// the transport ALPN, presenting `client` when given, verifying the server against
/// `anchors`, and sending the bytes of the file `stdin` once connected.
pub fn s_client(
    ns: &Netns,
    to: SocketAddr,
    client: Option<&Identity>,
    anchors: &Path,
    stdin: &Path,
) -> Run {
    let mut cmd = ns.command("sh");
    cmd.arg("-c")
        .arg(r#"input="$1"; shift; exec setpriv "$@" <"$input""#)
        .arg("sh")
        .arg(stdin)
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .arg("--clear-groups")
        .args(["openssl", "s_client", "-tls1_3", "-alpn", TRANSPORT_ALPN])
        .arg("-connect")
        .arg(to.to_string())
        .arg("-CAfile")
        .arg(anchors);
    if let Some(id) = client {
        cmd.arg("-cert").arg(&id.cert).arg("-key").arg(&id.key);
    }
    Run::of(&mut cmd)
}

/// A transport header (DESIGN.md, Linkerd's wire format) naming `port` and no session
/// protocol: preamble, 4-byte big-endian length, protobuf `{1: port}`.
pub fn transport_header(port: u16) -> Vec<u8> {
    let mut message = vec![0x08];
    let mut value = u32::from(port);
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            message.push(byte);
            break;
        }
        message.push(byte | 0x80);
    }
    let mut header = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    header.extend_from_slice(&(message.len() as u32).to_be_bytes());
    header.extend_from_slice(&message);
    header
}

/// `tcpdump` writing every TCP packet of the namespace's veth to a file, packet by packet.
#[derive(Debug)]
pub struct Capture {
    process: Spawned,
    file: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts the capture on `ns`'s veth into `file` and returns once tcpdump listens.
    pub fn start(ns: &Netns, file: PathBuf) -> Capture {
        let log = file.with_extension("log");
        let mut cmd = ns.command("sh");
        // `-Z root`: Debian's tcpdump otherwise drops to its own user, which may not
        // write into the scratch directory. `--immediate-mode`: without it the kernel hands
        // packets over in blocks (up to a second late), and those still pending when
        // tcpdump is stopped are never written. `-U`: each packet is written when captured.
        cmd.arg("-c")
            .arg(r#"log="$1"; shift; exec "$@" 2>"$log""#)
            .arg("sh")
            .arg(&log)
            .args([
                "tcpdump",
                "-i",
                crate::pods::VETH,
                "-n",
                "-s",
                "0",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
            ])
            .arg("-w")
            .arg(&file)
            .arg("tcp");
        let mut capture = Capture {
            process: ns.spawn(cmd),
            file,
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !capture.log_text().contains("listening on") {
            if !capture.process.is_running() || Instant::now() > deadline {
                panic!(
                    "`{}` did not start capturing\n{}",
                    capture.process.command(),
                    capture.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        capture
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops tcpdump (SIGINT, so it closes the file properly) and returns the pcap file's
    /// bytes: packet headers and payloads, in which a plaintext payload appears as is.
    pub fn stop(mut self) -> Vec<u8> {
        // Let tcpdump take the last packets of the exchange off the socket.
        thread::sleep(Duration::from_millis(50));
        let pid = Pid::from_raw(i32::try_from(self.process.pid()).expect("a pid"));
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.process.is_running() {
            if Instant::now() > deadline {
                panic!("`{}` ignored SIGINT", self.process.command());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let bytes = fs::read(&self.file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.file.display()));
        let log = self.log_text();
        assert!(
            log.contains("\n0 packets dropped by kernel") && !log.contains("\n0 packets captured"),
            "tcpdump lost packets or captured none\n{log}"
        );
        bytes
    }
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
