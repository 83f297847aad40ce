//! Bad input changes nothing: exit 2, a message naming the bad value, the ruleset exactly as
//! before. A failure while applying: exit 1, the previous ruleset intact. Each backend.

use std::io::Write;

use netns_tests::{for_each_backend, meshinit_bin, Backend, Family, Pods, Run};

/// The valid rules installed first, so that "before" is not empty and a bad run that
/// deleted our table would show.
const INSTALLED: &[&str] = &["apply", "--outbound-ports-to-ignore=5555"];

/// Runs `meshinit ARGS` in a pod holding valid rules and asserts exit 2, a message that
/// names `bad`, and an unchanged ruleset.
#[track_caller]
fn assert_rejected(pods: &Pods, backend: Backend, args: &[&str], bad: &str) {
    let before = pods.pod.firewall();
    let run = pods.pod.meshinit_on(backend, args);
    assert_eq!(run.code, Some(2), "bad input must exit 2\n{run}");
    assert!(
        run.stderr.contains(bad),
        "the message should name the bad value {bad:?}\n{run}"
    );
    assert_eq!(
        pods.pod.firewall(),
        before,
        "bad input changed the rules\n{run}"
    );
}

fn bad_ports_and_ranges_exit_2_and_change_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("bad_ports_and_ranges"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    for (args, bad) in [
        (&["apply", "--incoming-proxy-port", "0"][..], "0"),
        (&["apply", "--outgoing-proxy-port", "70000"], "70000"),
        (&["apply", "--outbound-ports-to-ignore", "9-3"], "9-3"),
        (&["apply", "--inbound-ports-to-ignore", "abc"], "abc"),
        (&["apply", "--outbound-ports-to-ignore", "80,0"], "0"),
        (&["apply", "--ports-to-redirect", "8080,65536"], "65536"),
        (&["apply", "--inbound-ports-to-ignore", "1-70000"], "70000"),
        (&["apply", "--proxy-uid", "abc"], "abc"),
        (
            &[
                "apply",
                "--incoming-proxy-port",
                "4000",
                "--outgoing-proxy-port",
                "4000",
            ],
            "4000",
        ),
        (&["cleanup", "--outbound-ports-to-ignore", "9-3"], "9-3"),
    ] {
        assert_rejected(&pods, backend, args, bad);
    }
}

fn bad_cidrs_exit_2_and_change_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("bad_cidrs"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    for (flag, bad) in [
        ("--subnets-to-ignore", "198.18.0.0/33"),
        ("--outbound-subnets-to-ignore", "10.0.0/8x"),
        ("--inbound-subnets-to-ignore", "fd00:18::/129"),
        ("--subnets-to-ignore", "not-a-cidr"),
    ] {
        let list = format!("10.0.0.0/8,{bad}");
        assert_rejected(&pods, backend, &["apply", flag, &list], bad);
    }
}

fn bad_environment_values_exit_2_and_change_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("bad_environment_values"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    let before = pods.pod.firewall();
    let mut cmd = pods.pod.meshinit_command();
    cmd.arg("apply")
        .arg(backend.flag())
        .env("MESHINIT_OUTBOUND_PORTS_TO_IGNORE", "9-3");
    let run = Run::of(&mut cmd).expect_code(2);
    assert!(run.stderr.contains("9-3"), "{run}");
    assert_eq!(pods.pod.firewall(), before);
}

fn an_unknown_config_key_exits_2_and_changes_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("unknown_config_key"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    let path = std::env::temp_dir().join(format!(
        "netns-tests-{}-{}-unknown-key.toml",
        std::process::id(),
        backend.name()
    ));
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(
        file,
        "outbound_ports_to_ignore = \"5555\"\noutbound_ports_to_ignoer = \"9000\""
    )
    .unwrap();
    drop(file);
    let config = path.to_str().unwrap().to_string();
    assert_rejected(
        &pods,
        backend,
        &["apply", "--config", &config],
        "outbound_ports_to_ignoer",
    );
    let _ = std::fs::remove_file(&path);
}

fn a_missing_config_file_exits_2_and_changes_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("missing_config_file"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    let missing = format!("/nonexistent/netns-tests-{}.toml", std::process::id());
    assert_rejected(&pods, backend, &["apply", "--config", &missing], &missing);
}

fn a_missing_netns_file_exits_2_and_changes_nothing(backend: Backend) {
    let pods = Pods::new(&backend.test_name("missing_netns_file"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    // Run inside the pod: a meshinit that ignored the bad path would change the pod's rules
    // (and the test would see it), never the host's.
    let missing = format!("/var/run/netns/netns-tests-missing-{}", std::process::id());
    assert_rejected(&pods, backend, &["apply", "--netns", &missing], &missing);
    assert_rejected(&pods, backend, &["cleanup", "--netns", &missing], &missing);
}

/// With an empty PATH the backend's tool is missing: exit 1, a message naming it, and the
/// rules as before. (The default backend choice finds nothing usable: exit 1 as well.)
fn a_missing_tool_exits_1_and_keeps_the_previous_rules(backend: Backend) {
    let pods = Pods::new(&backend.test_name("missing_tool_in_path"));
    pods.pod.meshinit_on(backend, INSTALLED).expect_ok();
    let before = pods.pod.firewall();
    let empty = std::env::temp_dir().join(format!(
        "netns-tests-{}-{}-empty-path",
        std::process::id(),
        backend.name()
    ));
    std::fs::create_dir_all(&empty).unwrap();
    let tool = match backend {
        Backend::Nft => "nft".to_string(),
        iptables => iptables.tool(Family::V4, "save"),
    };
    let flag = backend.flag();

    // `env` sets PATH for meshinit only (Command::env would also change how `ip` is found).
    for (args, named) in [
        (
            &["apply", &flag, "--outbound-ports-to-ignore=6666"][..],
            tool.as_str(),
        ),
        (&["apply", "--outbound-ports-to-ignore=6666"], "nft"),
        (&["cleanup", &flag], &tool),
    ] {
        let mut cmd = pods.pod.command("env");
        cmd.arg(format!("PATH={}", empty.display()))
            .arg(meshinit_bin())
            .args(args);
        let run = Run::of(&mut cmd);
        assert_eq!(
            run.code,
            Some(1),
            "a failure while applying must exit 1\n{run}"
        );
        assert!(
            run.stderr.contains(named),
            "the message should name {named}\n{run}"
        );
        assert_eq!(
            pods.pod.firewall(),
            before,
            "the previous rules must be intact\n{run}"
        );
    }
    let _ = std::fs::remove_dir(&empty);
}

for_each_backend!(
    bad_ports_and_ranges_exit_2_and_change_nothing,
    bad_cidrs_exit_2_and_change_nothing,
    bad_environment_values_exit_2_and_change_nothing,
    an_unknown_config_key_exits_2_and_changes_nothing,
    a_missing_config_file_exits_2_and_changes_nothing,
    a_missing_netns_file_exits_2_and_changes_nothing,
    a_missing_tool_exits_1_and_keeps_the_previous_rules,
);
