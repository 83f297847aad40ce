//! `meshproxy await` against a real meshproxy: it returns once the proxy's /ready
//! says 200, then runs the command it wraps; it gives up with exit 1 when nothing
//! answers, and bad flags exit 2.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn meshproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshproxy"))
}

/// Kills the proxy when the test ends, pass or fail.
struct Proxy(std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn waits_for_a_proxy_started_later_then_runs_the_command() {
    let admin = format!("127.0.0.1:{}", free_port());
    let marker = std::env::temp_dir().join(format!("meshproxy-await-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let started = Instant::now();
    let waiter = meshproxy()
        .args(["await", "--admin-addr", &admin, "--timeout", "30s", "--"])
        .args(["/usr/bin/touch"])
        .arg(&marker)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing listens yet: the command must not have run.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "the command ran before the proxy was up");
    let _proxy = Proxy(
        meshproxy()
            .args(["--admin-addr", &admin])
            .args(["--inbound-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--outbound-addr", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(marker.exists(), "the wrapped command did not run");
    assert!(started.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn gives_up_with_exit_1_when_nothing_answers() {
    let admin = format!("127.0.0.1:{}", free_port());
    let out = meshproxy()
        .args([
            "await",
            "--admin-addr",
            &admin,
            "--timeout",
            "300ms",
            "--",
            "/bin/true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&admin) && stderr.contains("not ready after 300ms"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_exit_2_naming_the_value() {
    for (args, bad) in [
        (["await", "--timeout", "soon"], "soon"),
        (["await", "--admin-addr", "localhost"], "localhost"),
    ] {
        let out = meshproxy().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(bad), "{stderr}");
    }
}
