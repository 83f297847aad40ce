//! Real HTTP applications for the HTTP tests, started inside a namespace: Debian's `nginx`,
//! `nghttpd` (package nghttp2-server) and `tinyproxy` (a `CONNECT` server), and the Python programs in `netns-tests/apps/`
//! (grpcio, websockets, http.server) run by the venv that `scripts/test.sh` builds; and the
//! real clients that talk to them (`curl`, `h2load`, `nghttp`, the same Python programs).
//!
//! Clients are run as root inside the client's namespace, so meshinit's outbound rule sends
//! them through that pod's proxy. Every client is told to ignore the environment's proxy
//! settings (`http_proxy` and friends): the test's requests must go where the test says.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::{Run, Spawned};

/// How long a server may take from its start to accepting connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest a single client command may take (curl's `--max-time`, h2load's timeouts).
/// Generous for a loaded 2-core CI machine; a hung proxy fails the test instead of hanging it.
pub const CLIENT_TIMEOUT_SECS: u32 = 120;

/// A server started in a namespace, killed on `Drop`; its output goes to a log file that
/// [`App::log`] reads (printed in panic messages).
#[derive(Debug)]
pub struct App {
    process: Spawned,
    log: PathBuf,
}

impl App {
    /// Starts `argv` in `ns` with stdout and stderr in `log`, and returns once
    /// `127.0.0.1:port` inside `ns` accepts a connection (loopback, which meshinit never
    /// redirects). Panics with the log when the process exits or is not ready in time.
    pub fn start(ns: &Netns, argv: &[&OsStr], log: PathBuf, port: u16) -> App {
        // The shell opens the log, then execs the program under the same pid.
        let mut cmd = ns.command("sh");
        cmd.arg("-c")
            .arg(r#"log="$1"; shift; exec "$@" >"$log" 2>&1"#)
            .arg("sh")
            .arg(&log)
            .args(argv);
        let mut app = App {
            process: ns.spawn(cmd),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if ns
                .run(|| TcpStream::connect_timeout(&local, Duration::from_millis(200)))
                .is_ok()
            {
                return app;
            }
            if !app.process.is_running() || Instant::now() > deadline {
                panic!(
                    "`{}` is not accepting on port {port}\n--- log\n{}---",
                    app.process.command(),
                    app.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server has printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }
}

/// Debian's `nginx`, as root (its workers too, so they may read the test's files), in the
/// foreground, with one worker, everything it writes kept in `dir`, and `servers` (nginx
/// `server { … }` blocks) as its only sites. `port` is one the servers listen on, to wait for.
pub fn nginx(ns: &Netns, dir: &Path, servers: &str, port: u16) -> App {
    let path = |name: &str| dir.join(name).display().to_string();
    // nginx's own default of 1,000 requests per connection would close a keep-alive
    // connection in the middle of a test that counts requests on one.
    let config = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {pid};\nerror_log stderr;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  default_type text/plain;\n  keepalive_requests 1000000;\n\
         \x20 keepalive_timeout 120s;\n  client_body_temp_path {body};\n  proxy_temp_path {proxy};\n\
         \x20 fastcgi_temp_path {fastcgi};\n  uwsgi_temp_path {uwsgi};\n  scgi_temp_path {scgi};\n\
         {servers}\n}}\n",
        pid = path("nginx.pid"),
        body = path("nginx-body"),
        proxy = path("nginx-proxy"),
        fastcgi = path("nginx-fastcgi"),
        uwsgi = path("nginx-uwsgi"),
        scgi = path("nginx-scgi"),
    );
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    let argv = ["nginx", "-e", "stderr", "-c"].map(OsStr::new);
    App::start(
        ns,
        &[&argv[..], &[conf.as_os_str()]].concat(),
        dir.join("nginx.log"),
        port,
    )
}

/// Debian's `tinyproxy`, an HTTP proxy that answers `CONNECT` by opening a tunnel to
/// the host and port asked for (any port), in the foreground on `port` of every IPv4
/// address, its configuration and log in `dir`.
pub fn tinyproxy(ns: &Netns, dir: &Path, port: u16) -> App {
    // No `ConnectPort` line: CONNECT to any port; no `Allow` line: any client.
    let config = format!(
        "User nobody\nGroup nogroup\nPort {port}\nListen 0.0.0.0\nTimeout 60\n\
         MaxClients 16\nLogLevel Info\n"
    );
    let conf = dir.join("tinyproxy.conf");
    fs::write(&conf, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    let argv = ["tinyproxy", "-d", "-c"].map(OsStr::new);
    App::start(
        ns,
        &[&argv[..], &[conf.as_os_str()]].concat(),
        dir.join("tinyproxy.log"),
        port,
    )
}

/// Debian's `nghttpd` (an HTTP/2 server from nghttp2), cleartext with prior knowledge only,
/// serving the files of `docroot` on `port` of every address.
pub fn nghttpd(ns: &Netns, dir: &Path, docroot: &Path, port: u16) -> App {
    let port_arg = port.to_string();
    let argv = [
        OsStr::new("nghttpd"),
        OsStr::new("--no-tls"),
        OsStr::new("-d"),
        docroot.as_os_str(),
        OsStr::new(&port_arg),
    ];
    App::start(ns, &argv, dir.join("nghttpd.log"), port)
}

/// The venv's `python3`: `$HTTP_TEST_VENV/bin/python3`, or `target/http-venv` in the
/// workspace, where `scripts/test.sh` installs grpcio, websockets, h2 and hypercorn.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("HTTP_TEST_VENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/http-venv"),
        PathBuf::from,
    );
    let python = venv.join("bin/python3");
    if !python.is_file() {
        panic!(
            "{} not found: run scripts/test.sh, or `python3 -m venv target/http-venv && \
             target/http-venv/bin/pip install grpcio websockets h2 hypercorn`, or set HTTP_TEST_VENV",
            python.display()
        );
    }
    python
}

/// `netns-tests/apps/NAME`, one of the Python programs.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("apps")
        .join(name)
}

/// Starts the Python server `script ARGS…` in `ns`, listening on `port`.
pub fn python_server(ns: &Netns, dir: &Path, name: &str, args: &[&str], port: u16) -> App {
    let (python, script) = (python(), script(name));
    let mut argv = vec![python.as_os_str(), script.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    App::start(ns, &argv, dir.join(format!("{name}.log")), port)
}

/// Runs the Python client `script ARGS…` in `ns` to completion.
pub fn python_client(ns: &Netns, name: &str, args: &[&str]) -> Run {
    Run::of(ns.command(python()).arg(script(name)).args(args))
}

/// `curl ARGS…` in `ns`: silent but for errors, no proxy from the environment, at most
/// [`CLIENT_TIMEOUT_SECS`].
pub fn curl(ns: &Netns, args: &[&str]) -> Run {
    Run::of(
        ns.command("curl")
            .args(["-sS", "--noproxy", "*", "--max-time"])
            .arg(CLIENT_TIMEOUT_SECS.to_string())
            .args(args),
    )
}

/// `h2load ARGS… http://TO/PATH` in `ns` (nghttp2-client's load generator), which must
/// succeed.
///
/// Over HTTP/2, h2load 1.52 writes an IPv6 `:authority` without its brackets
/// (`fd00:18::2:8081`), which is not a valid authority (RFC 3986 §3.2.2) and which a strict
/// HTTP/2 stack refuses (nghttpd happens to accept it); so it is given explicitly.
pub fn h2load(ns: &Netns, args: &[&str], to: SocketAddr, path: &str) -> Run {
    let mut cmd = ns.command("h2load");
    cmd.args(args);
    if to.is_ipv6() && !args.contains(&"--h1") {
        cmd.arg("-H").arg(format!(":authority: {to}"));
    }
    Run::of(cmd.arg(url(to, path))).expect_ok()
}

/// The counts of h2load's summary line `requests: N total, N started, N done, N succeeded,
/// N failed, N errored, N timeout`, by word (`"succeeded"` → N).
pub fn h2load_requests(run: &Run, word: &str) -> u64 {
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no `requests:` line\n{run}"));
    line.trim_start_matches("requests:")
        .split(',')
        .find_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse().ok()?;
            (words.next()? == word).then_some(n)
        })
        .unwrap_or_else(|| panic!("no `{word}` count in `{line}`\n{run}"))
}

/// `http://ADDR PATH` (an IPv6 address in brackets).
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}
