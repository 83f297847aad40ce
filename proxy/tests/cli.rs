//! The meshproxy CLI without running a proxy: help, completions, man page.

use std::process::Command;

fn meshproxy(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
        .args(args)
        .output()
        .expect("run meshproxy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn help_is_grouped_and_lists_the_contract_flags() {
    let (ok, text) = meshproxy(&["--help"]);
    assert!(ok);
    for heading in [
        "Listeners:",
        "Protocol detection:",
        "Limits:",
        "Identity (mTLS):",
    ] {
        assert!(text.contains(heading), "{heading} missing from --help");
    }
    for flag in [
        "--inbound-addr",
        "--outbound-addr",
        "--admin-addr",
        "--opaque-ports",
        "--detect-timeout",
        "--identity-cert",
        "--identity-key",
        "--trust-anchors",
        "--mesh-peers",
        "--require-identity-ports",
        "--shutdown-grace",
        "--handshake-timeout",
        "--proxy-uid",
        "--inbound-transparent",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn completions_and_man_page_come_from_the_flags() {
    let (ok, script) = meshproxy(&["completions", "bash"]);
    assert!(ok);
    assert!(script.contains("--opaque-ports"), "{script}");
    let (ok, page) = meshproxy(&["man"]);
    assert!(ok);
    assert!(page.contains(".TH meshproxy 1"), "{page}");
    assert!(page.contains("detect\\-timeout"), "{page}");
}

/// An error's cause is printed once: rustls' PEM error already says "I/O error: …" and
/// also returns the io::Error as its source, which used to be printed again.
#[test]
fn an_error_cause_is_printed_once() {
    let dir = std::env::temp_dir();
    let dir = dir.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
        .args(["--identity-cert", dir, "--identity-key", dir])
        .args(["--trust-anchors", dir, "--admin-addr", "127.0.0.1:0"])
        .args([
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run meshproxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read the identity certificate"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Is a directory").count(), 1, "{stderr}");
}

/// `MESHPROXY_LOG` sets the log filter, over `RUST_LOG`, as `MESHINIT_LOG` does for
/// meshinit.
#[test]
fn meshproxy_log_sets_the_filter_over_rust_log() {
    let dir = std::env::temp_dir();
    let dir = dir.to_str().unwrap();
    let run = |vars: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
            .env_remove("RUST_LOG")
            .env_remove("MESHPROXY_LOG")
            .envs(vars.iter().copied())
            .args(["--identity-cert", dir, "--identity-key", dir])
            .args(["--trust-anchors", dir, "--admin-addr", "127.0.0.1:0"])
            .args([
                "--inbound-addr",
                "127.0.0.1:0",
                "--outbound-addr",
                "127.0.0.1:0",
            ])
            .output()
            .expect("run meshproxy");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[]).contains("ERROR"));
    assert!(!run(&[("MESHPROXY_LOG", "off")]).contains("ERROR"));
    assert!(!run(&[("MESHPROXY_LOG", "off"), ("RUST_LOG", "info")]).contains("ERROR"));
    assert!(!run(&[("RUST_LOG", "off")]).contains("ERROR"));
}
