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
        "--discovery",
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

/// `meshproxy discovery check FILE`: 0 for a valid file, 2 naming the problem and
/// where it is for an invalid one (and for a file that cannot be read).
#[test]
fn discovery_check_validates_a_file() {
    let dir = std::env::temp_dir().join(format!("meshproxy-cli-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("discovery.toml");
    let good = r#"
[[service]]
name = "redis"
addrs = ["198.18.100.10:6379", "[fd00:100::10]:6379"]
protocol = "opaque"
[[service.backend]]
name = "redis-a"
weight = 100
endpoints = [ { addr = "198.18.1.2:6379", identity = "redis-a.shop.mesh.local" } ]
[[service.backend]]
name = "redis-b"
weight = 0
endpoints = [ { addr = "198.18.2.2:6379" } ]
"#;
    let check = |text: &str| {
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
            .args(["discovery", "check"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = check(good);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\"redis\""), "{text}");
    for (bad, needle) in [
        (good.replace("weight = 0", "weight = -1"), "weight -1"),
        (good.replace("weight = 0", "wieght = 0"), "wieght"),
        (good.replace("198.18.2.2:6379", "198.18.2.2"), "198.18.2.2"),
        (
            good.replace("redis-a.shop.mesh.local", "redis_a!"),
            "redis_a!",
        ),
        (
            format!("{good}[[service]]\nname = \"x\"\naddrs = [\"[fd00:100::10]:6379\"]\n"),
            "fd00:100::10",
        ),
    ] {
        let (code, text) = check(&bad);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains(needle), "{needle}: {text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
        .args(["discovery", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The proxy refuses to start (exit 2, before binding anything) with an invalid
/// discovery file, or with endpoints that need mTLS when it has no identity.
#[test]
fn an_invalid_discovery_file_stops_the_proxy_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("meshproxy-cli-start-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("discovery.toml");
    let service = "[[service]]\nname = \"s\"\naddrs = [\"198.18.100.10:80\"]\n[[service.backend]]\nname = \"b\"\nweight = 1\n";
    for (text, needle) in [
        (format!("{service}endpoints = [ {{ addr = \"198.18.1.2:80\" }} ]\nweight2 = 1\n"), "weight2"),
        (
            format!("{service}endpoints = [ {{ addr = \"198.18.1.2:80\", identity = \"b.mesh.local\" }} ]\n"),
            "--identity-cert",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_meshproxy"))
            .arg("--discovery")
            .arg(&file)
            // Unusable if it ever got that far: the check must come first.
            .args(["--admin-addr", "127.0.0.1:1", "--outbound-addr", "127.0.0.1:1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle) && stderr.contains("discovery"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
