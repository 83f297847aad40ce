//! The meshinit CLI without privileges: rendering, help, bad input.
//! Nothing here touches the kernel (`show` only renders).

use std::process::{Command, Output};

fn meshinit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshinit"))
        .args(args)
        .env_clear()
        .env("PATH", "/nonexistent")
        .output()
        .expect("run meshinit")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn show_prints_nft_text_with_sets_for_skip_lists() {
    let out = meshinit(&[
        "show",
        "--outbound-ports-to-ignore",
        "5555,9000-9010",
        "--proxy-gid",
        "7",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("table inet meshinit {"), "{text}");
    assert!(text.contains("elements = { 5555, 9000-9010 }"), "{text}");
    assert!(text.contains("meta skuid 2102 return"), "{text}");
    assert!(text.contains("meta skgid 7 return"), "{text}");
    assert!(text.contains("redirect to :4143"), "{text}");
    assert!(text.contains("redirect to :4140"), "{text}");
}

#[test]
fn dry_run_and_simulate_print_and_need_no_nft() {
    // PATH has no nft: a dry run that tried to apply would fail with exit 1.
    for flag in ["--dry-run", "--simulate"] {
        let out = meshinit(&[flag]);
        assert!(out.status.success(), "{flag}: {}", stderr(&out));
        assert!(stdout(&out).contains("table inet meshinit"));
    }
}

#[test]
fn show_with_iptables_mode_prints_restore_text() {
    let out = meshinit(&[
        "show",
        "--backend",
        "iptables-legacy",
        "--subnets-to-ignore",
        "198.18.0.0/24,fd00::/8",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(":MESHINIT_INBOUND - [0:0]"), "{text}");
    assert!(text.contains("-s 198.18.0.0/24"), "{text}");
    assert!(text.contains("-s fd00::/8"), "{text}");
}

#[test]
fn ipv4_mapped_skip_subnets_are_rendered_as_ipv4() {
    for backend in ["nft", "iptables-nft"] {
        let out = meshinit(&[
            "show",
            "--backend",
            backend,
            "--subnets-to-ignore",
            "::ffff:198.18.0.0/111",
            "--outbound-subnets-to-ignore",
            "::ffff:198.19.0.7",
        ]);
        assert!(out.status.success(), "{backend}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(!text.contains("::ffff:"), "{backend}: {text}");
        if backend == "nft" {
            assert!(
                text.contains("elements = { 198.18.0.0/15 }"),
                "{backend}: {text}"
            );
            assert!(!text.contains("_v6"), "{backend}: {text}");
        } else {
            assert!(text.contains("-s 198.18.0.0/15"), "{backend}: {text}");
            assert!(text.contains("-d 198.18.0.0/15"), "{backend}: {text}");
        }
    }
}

#[test]
fn show_intercepts_inbound_only_to_the_pods_own_addresses() {
    let out = meshinit(&["show"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let redirect = text.find("redirect to :4143").expect("inbound redirect");
    for rule in [
        "fib daddr type != local return",
        "ip daddr 127.0.0.0/8 return",
        "ip6 daddr ::1 return",
    ] {
        let at = text.find(rule).unwrap_or_else(|| panic!("{rule}: {text}"));
        assert!(at < redirect, "{rule} after the redirect: {text}");
    }
    let out = meshinit(&["show", "--backend", "iptables-legacy"]);
    let text = stdout(&out);
    for rule in [
        "-A MESHINIT_INBOUND -m addrtype ! --dst-type LOCAL",
        "-A MESHINIT_INBOUND -d 127.0.0.0/8",
        "-A MESHINIT_INBOUND -d ::1/128",
    ] {
        assert!(text.contains(rule), "{rule}: {text}");
    }
}

#[test]
fn bad_input_exits_2_naming_the_value() {
    let cases: &[(&[&str], &str)] = &[
        (&["--outbound-ports-to-ignore", "0"], "\"0\""),
        (&["--outbound-ports-to-ignore", "70000"], "\"70000\""),
        (&["--inbound-ports-to-ignore", "9-3"], "\"9-3\""),
        (&["--ports-to-redirect", "abc"], "\"abc\""),
        (
            &["--subnets-to-ignore", "198.18.0.0/33"],
            "\"198.18.0.0/33\"",
        ),
        (
            &["--inbound-subnets-to-ignore", "::ffff:198.18.0.0/80"],
            "\"::ffff:198.18.0.0/80\"",
        ),
        (&["--incoming-proxy-port", "4140"], "4140"),
        (
            &["--netns", "/var/run/netns/meshinit-does-not-exist"],
            "meshinit-does-not-exist",
        ),
        (
            &["--config", "/nonexistent/meshinit.toml"],
            "/nonexistent/meshinit.toml",
        ),
        (&["--netns", ""], "--netns: \"\" is empty"),
        (&["apply", "--lock-timeout", "0s"], "\"0s\""),
        (
            &["validate", "--validate-timeout", "500000000000years"],
            "--validate-timeout: \"500000000000years\" is out of range",
        ),
        (&["cleanup", "--lock-timeout=2days"], "\"2days\""),
    ];
    for (args, needle) in cases {
        let out = meshinit(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

/// A duration given in the environment is named as such (clap's own `env` support
/// would not say where the value came from).
#[test]
fn a_bad_duration_in_the_environment_names_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshinit"))
        .args(["validate"])
        .env_clear()
        .env("PATH", "/nonexistent")
        .env("MESHINIT_VALIDATE_TIMEOUT", "500000000000years")
        .output()
        .expect("run meshinit");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("MESHINIT_VALIDATE_TIMEOUT: \"500000000000years\" is out of range"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_config_key_exits_2() {
    let dir = std::env::temp_dir().join(format!("meshinit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "outbound_ports_to_ignore = \"80\"\nskip_evrything = true\n",
    )
    .unwrap();
    let out = meshinit(&["--config", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("skip_evrything"), "{}", stderr(&out));
}

#[test]
fn missing_nft_binary_exits_1_naming_it() {
    // `check` (read-only): this test runs in whatever namespace `cargo test` runs in,
    // which may be the host's, where `apply` is refused.
    let out = meshinit(&["check", "--backend", "nft"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`nft` was not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = meshinit(&["--outbound-ports-to-ignore", "abc", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(!text.trim().is_empty());
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(value.is_object(), "{line}");
    }
}

#[test]
fn help_lists_every_flag_of_the_contract() {
    let out = meshinit(&["--help"]);
    let text = stdout(&out);
    for flag in [
        "--incoming-proxy-port",
        "--outgoing-proxy-port",
        "--proxy-uid",
        "--proxy-gid",
        "--inbound-ports-to-ignore",
        "--outbound-ports-to-ignore",
        "--ports-to-redirect",
        "--subnets-to-ignore",
        "--inbound-subnets-to-ignore",
        "--outbound-subnets-to-ignore",
        "--backend",
        "--iptables-mode",
        "--ipv6",
        "--netns",
        "--dry-run",
        "--config",
        "--log-format",
        "--allow-host-netns",
        "--lock-timeout",
        "--validate-timeout",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn completions_and_man_page_come_from_the_flags() {
    let out = meshinit(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("--outbound-ports-to-ignore"));
    let out = meshinit(&["man"]);
    assert!(out.status.success());
    let page = stdout(&out);
    assert!(page.contains(".TH meshinit 1"), "{page}");
    assert!(page.contains("subnets\\-to\\-ignore"), "{page}");
}

/// A boolean flag takes its value after a space like every other flag (`--ipv6 false`),
/// as well as after `=`; standing alone it still means true, also before a subcommand.
#[test]
fn ipv6_false_with_a_space_leaves_ipv6_out() {
    for args in [
        &["show", "--ipv6", "false", "--backend", "iptables-nft"][..],
        &["show", "--ipv6=false", "--backend", "iptables-nft"],
        &["--ipv6", "false", "show", "--backend", "iptables-nft"],
    ] {
        let out = meshinit(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            !stdout(&out).contains("ip6tables"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
    let out = meshinit(&["--ipv6", "show", "--backend", "iptables-nft"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ip6tables"), "{}", stdout(&out));
    let out = meshinit(&["--dry-run", "show"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A bad value in the environment or the file names the variable or the file's key,
/// not the flag.
#[test]
fn a_bad_port_list_names_the_variable_or_the_file_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshinit"))
        .args(["show"])
        .env("MESHINIT_OUTBOUND_PORTS_TO_IGNORE", "70000")
        .output()
        .expect("run meshinit");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("MESHINIT_OUTBOUND_PORTS_TO_IGNORE: invalid port \"70000\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn show_in_tproxy_mode_prints_the_tproxy_chains_and_the_policy_routing() {
    let out = meshinit(&["show", "--mode", "tproxy", "--tproxy-table", "77"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "type filter hook prerouting priority mangle;",
        "tproxy to :4143 meta mark set 0x4d49 accept",
        "type route hook output priority mangle;",
        "redirect to :4140",
        "# policy routing (rtnetlink): ip -4 rule add fwmark 0x4d49 lookup 77 priority 4143",
        "# policy routing (rtnetlink): ip -6 route add local default dev lo table 77",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    assert!(!text.contains("redirect to :4143"), "{text}");
    // Redirect mode prints no policy routing.
    assert!(!stdout(&meshinit(&["show"])).contains("policy routing"));
    // The iptables rendering puts the inbound chain in table mangle.
    let out = meshinit(&["show", "--mode", "tproxy", "--backend", "iptables-nft"]);
    let text = stdout(&out);
    assert!(
        text.contains("*mangle\n:MESHINIT_INBOUND - [0:0]"),
        "{text}"
    );
    assert!(
        text.contains("-j TPROXY --on-port 4143 --on-ip 0.0.0.0 --tproxy-mark 0x4d49/0xffffffff"),
        "{text}"
    );
}

#[test]
fn a_bad_mode_is_bad_input_naming_value_and_source() {
    let out = meshinit(&["show", "--mode", "transparent"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("\"transparent\"")
            && err.contains("--mode: ")
            && err.contains("redirect or tproxy"),
        "{err}"
    );
}
