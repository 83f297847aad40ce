//! What one proxied connection costs meshproxy in syscalls, watched from outside with
//! `strace -p` on the real binary behind meshinit's rules (docs/bench/issue14-conn-s5.md).
//!
//! - The accept loop does not ask the kernel again what `accept` told it: no
//!   `getpeername`, and no `getsockname` on the outbound listener, which is bound to one
//!   address (`127.0.0.1:4140`, `[::1]:4140`).
//! - Of the two half-closes of a connection only the first is a `shutdown(SHUT_WR)`: the
//!   direction that ends last leaves its FIN to `close`, which sends it at once since
//!   nothing is left unread. The clients still see every byte and then a clean EOF
//!   (not a reset), whichever side closes first, so half-close semantics are unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use netns_tests::{Family, Listener, MeshProxy, Pods};

/// A port in meshproxy's default opaque list (PostgreSQL): forwarded without detection.
const OPAQUE_PORT: u16 = 5432;
/// Connections per case: enough that a per-connection syscall shows as N, few enough
/// to stay quick under strace.
const CONNECTIONS: usize = 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `strace -f -z -p PID` (successful calls only) limited to the syscalls these tests
/// count, writing to a file.
struct Strace {
    child: Child,
    out: std::path::PathBuf,
}

impl Strace {
    /// Attaches to every thread of `proxy`; returns once strace says it is attached.
    fn attach(proxy: &MeshProxy<'_>, name: &str) -> Strace {
        let out = std::env::temp_dir().join(format!("{name}-strace.txt"));
        let mut child = Command::new("strace")
            .args(["-f", "-z", "-o"])
            .arg(&out)
            .args([
                "-e",
                "trace=accept4,getpeername,getsockname,shutdown",
                "-p",
                &proxy.pid().to_string(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strace (Debian package strace)");
        // strace reports "Process N attached" on stderr for each thread.
        let mut stderr = child.stderr.take().expect("strace's stderr");
        let mut seen = Vec::new();
        let mut byte = [0; 1];
        while !String::from_utf8_lossy(&seen).contains("attached") {
            match stderr.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!(
                    "strace did not attach to {}: {}",
                    proxy.pid(),
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        thread::spawn(move || {
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        });
        Strace { child, out }
    }

    /// Detaches (SIGINT) and returns the traced calls, one per line.
    fn finish(mut self) -> String {
        // Let the proxy finish closing the last connection first.
        thread::sleep(Duration::from_millis(300));
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("signal strace");
        self.child.wait().expect("wait for strace");
        std::fs::read_to_string(&self.out).expect("read strace's output")
    }
}

/// The traced calls of `syscall` that succeeded (`-z` prints only those; a call that
/// another thread's output interrupted is printed as `unfinished` and `resumed` halves,
/// of which only the first names it with a parenthesis).
fn succeeded(trace: &str, syscall: &str) -> usize {
    trace
        .lines()
        .filter(|l| l.contains(&format!(" {syscall}(")) && !l.contains("= -1"))
        .count()
}

/// A peer server on `listener`, for `count` connections one after another: the client
/// speaks first and half-closes; the server reads to EOF, answers, and closes.
fn echo_after_eof(listener: Listener, count: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for i in 0..count {
            let mut stream = listener
                .accept_within(IO_TIMEOUT)
                .unwrap_or_else(|| panic!("connection {i} did not reach the peer"))
                .stream;
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut got = Vec::new();
            stream
                .read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("server, connection {i}: no EOF: {e}"));
            stream.write_all(&got).unwrap();
        }
    })
}

/// A peer server for `count` connections that speaks first and closes without reading.
fn banner_and_close(listener: Listener, count: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for i in 0..count {
            let mut stream = listener
                .accept_within(IO_TIMEOUT)
                .unwrap_or_else(|| panic!("connection {i} did not reach the peer"))
                .stream;
            stream.write_all(format!("banner {i}").as_bytes()).unwrap();
        }
    })
}

fn connect(pods: &Pods, to: SocketAddr) -> TcpStream {
    let stream = pods
        .pod
        .connect(to)
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

#[test]
fn a_proxied_connection_makes_one_shutdown_and_no_address_lookups() {
    let pods = Pods::new("syscalls_per_conn");
    pods.pod.meshinit(&["apply"]).expect_ok();
    let proxy = pods.pod.start_meshproxy(&[]);
    for family in Family::ALL {
        let to = SocketAddr::new(family.peer(), OPAQUE_PORT);

        // The client ends first: client FIN, then the server's answer and FIN.
        let server = echo_after_eof(
            pods.peer.listen("peer app", family.any_port(OPAQUE_PORT)),
            CONNECTIONS,
        );
        let strace = Strace::attach(&proxy, &format!("syscalls_per_conn_{family:?}_client"));
        for i in 0..CONNECTIONS {
            let mut client = connect(&pods, to);
            let sent = format!("request {i}");
            client.write_all(sent.as_bytes()).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut got = String::new();
            client.read_to_string(&mut got).unwrap_or_else(|e| {
                panic!("{family:?} connection {i}: the answer then a clean EOF: {e}")
            });
            assert_eq!(got, sent, "{family:?} connection {i}: the server's answer");
        }
        server.join().expect("server");
        let client_first = strace.finish();

        // The server ends first: its banner and FIN, then the client's FIN.
        let server = banner_and_close(
            pods.peer.listen("peer app", family.any_port(OPAQUE_PORT)),
            CONNECTIONS,
        );
        let strace = Strace::attach(&proxy, &format!("syscalls_per_conn_{family:?}_server"));
        for i in 0..CONNECTIONS {
            let mut client = connect(&pods, to);
            let mut got = String::new();
            client.read_to_string(&mut got).unwrap_or_else(|e| {
                panic!("{family:?} connection {i}: the banner then a clean EOF: {e}")
            });
            assert_eq!(got, format!("banner {i}"), "{family:?} connection {i}");
        }
        server.join().expect("server");
        let server_first = strace.finish();

        for (case, trace) in [("client", client_first), ("server", server_first)] {
            let what = format!("{family:?}, the {case} closing first, {CONNECTIONS} connections");
            assert_eq!(
                succeeded(&trace, "accept4"),
                CONNECTIONS,
                "{what}: accepted\n{trace}"
            );
            assert_eq!(
                succeeded(&trace, "getpeername"),
                0,
                "{what}: accept gave the peer\n{trace}"
            );
            assert_eq!(
                succeeded(&trace, "getsockname"),
                0,
                "{what}: the listener's address is the local one\n{trace}"
            );
            assert_eq!(
                succeeded(&trace, "shutdown"),
                CONNECTIONS,
                "{what}: one shutdown per connection, the last FIN by close\n{trace}"
            );
        }
    }
}
