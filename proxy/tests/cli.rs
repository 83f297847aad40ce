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
