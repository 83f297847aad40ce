//! Apply is all or nothing under faults, and repeated or concurrent runs converge.
//!
//! Faults are injected with stand-in tools first in meshinit's PATH ([`FaultyTools`]):
//! a tool that refuses (exit 1 with a message) or is killed mid-run (SIGKILL after
//! reading its input). In every case the exit code and message must say what happened
//! and the whole firewall (nft ruleset and every iptables table) must be exactly what it
//! was before. The IPv6-after-IPv4 failure of the iptables backends is in `backends.rs`.

use std::process::{Child, Command, Stdio};

use netns_tests::fault::{self, FaultyTools};
use netns_tests::{for_each_backend, meshinit_bin, Backend, Pods};

/// The tools a backend runs to change rules.
fn writers(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Nft => &["nft"],
        Backend::IptablesNft => &["iptables-nft-restore", "ip6tables-nft-restore"],
        Backend::IptablesLegacy => &["iptables-legacy-restore", "ip6tables-legacy-restore"],
    }
}

for_each_backend!(a_refusing_tool_leaves_the_previous_rules);
fn a_refusing_tool_leaves_the_previous_rules(backend: Backend) {
    let pods = Pods::new(&backend.test_name("fault_refusing_tool"));
    pods.pod
        .meshinit_on(backend, &["apply", "--outbound-ports-to-ignore=5555"])
        .expect_ok();
    let before = pods.pod.firewall();
    let faulty = FaultyTools::new(
        &format!("refuses-{}", backend.name()),
        writers(backend),
        fault::FAILS,
    );
    for args in [
        &["apply", "--outbound-ports-to-ignore=6666"][..],
        &["cleanup"][..],
    ] {
        let run = faulty
            .meshinit(&pods.pod, &[args, &[&backend.flag()]].concat())
            .expect_code(1);
        assert!(run.stderr.contains("injected failure"), "{run}");
        assert_eq!(pods.pod.firewall(), before, "{args:?} changed the firewall");
    }
    pods.pod
        .meshinit_on(backend, &["check", "--outbound-ports-to-ignore=5555"])
        .expect_ok();
}

for_each_backend!(a_tool_killed_mid_run_leaves_the_previous_rules);
fn a_tool_killed_mid_run_leaves_the_previous_rules(backend: Backend) {
    let pods = Pods::new(&backend.test_name("fault_killed_tool"));
    pods.pod
        .meshinit_on(backend, &["apply", "--outbound-ports-to-ignore=5555"])
        .expect_ok();
    let before = pods.pod.firewall();
    let faulty = FaultyTools::new(
        &format!("killed-{}", backend.name()),
        writers(backend),
        fault::KILLED,
    );
    let run = faulty
        .meshinit(
            &pods.pod,
            &["apply", "--outbound-ports-to-ignore=6666", &backend.flag()],
        )
        .expect_code(1);
    // The error names the signal, so the operator knows the tool did not just refuse.
    assert!(run.stderr.contains("signal: 9"), "{run}");
    assert_eq!(pods.pod.firewall(), before);
}

#[test]
fn a_namespace_that_disappeared_is_bad_input_and_touches_nothing_else() {
    let pods = Pods::new("fault_namespace_gone");
    let sleeper = pods.peer.spawn_sleeper();
    let path = format!("/proc/{}/ns/net", sleeper.pid());
    drop(sleeper);
    let before = pods.pod.firewall();
    let run = pods
        .pod
        .meshinit(&["apply", "--netns", &path])
        .expect_code(2);
    assert!(run.stderr.contains(&path), "{run}");
    assert_eq!(pods.pod.firewall(), before);
    assert_eq!(pods.peer.firewall(), pods.pod.firewall());
}

for_each_backend!(a_hundred_applies_leave_one_identical_ruleset);
fn a_hundred_applies_leave_one_identical_ruleset(backend: Backend) {
    let pods = Pods::new(&backend.test_name("fault_hundred_applies"));
    let args = [
        "apply",
        "--outbound-ports-to-ignore=5555,9000-9010",
        "--subnets-to-ignore=198.19.0.0/16,fd00:99::/64",
    ];
    pods.pod.meshinit_on(backend, &args).expect_ok();
    let first = pods.pod.firewall();
    for _ in 0..99 {
        pods.pod.meshinit_on(backend, &args).expect_ok();
    }
    assert_eq!(pods.pod.firewall(), first);
    let mut check = args.to_vec();
    check[0] = "check";
    pods.pod.meshinit_on(backend, &check).expect_ok();
}

/// Starts `meshinit apply` in `ns` without waiting for it.
fn start_apply(ns_path: &str, backend: Backend, port: u16) -> Child {
    Command::new(meshinit_bin())
        .args(["apply", "--netns", ns_path, &backend.flag()])
        .arg(format!("--outbound-ports-to-ignore={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshinit")
}

for_each_backend!(concurrent_applies_end_in_one_runs_ruleset);
/// Two meshinit processes applying different rules into one namespace at the same time
/// end in exactly one of the two rulesets, never a mix: meshinit takes an exclusive
/// lock on /run/meshinit.lock around every change, so the runs take turns.
fn concurrent_applies_end_in_one_runs_ruleset(backend: Backend) {
    let pods = Pods::new(&backend.test_name("fault_concurrent_applies"));
    let ns_path = pods.pod.path().display().to_string();
    for round in 0..10 {
        let runs: Vec<Child> = [5555, 6666]
            .iter()
            .map(|&port| start_apply(&ns_path, backend, port))
            .collect();
        for run in runs {
            let output = run.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let matches: Vec<u16> = [5555, 6666]
            .into_iter()
            .filter(|port| {
                pods.pod
                    .meshinit_on(
                        backend,
                        &["check", &format!("--outbound-ports-to-ignore={port}")],
                    )
                    .success()
            })
            .collect();
        assert_eq!(
            matches.len(),
            1,
            "round {round}: the ruleset matches {matches:?}, not exactly one run\n{}",
            pods.pod.firewall()
        );
    }
}
