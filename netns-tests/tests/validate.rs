//! `meshinit validate` (does redirection work in this namespace?) and `meshinit check
//! --repair` (the periodic probe that restores drifted rules).

use std::process::Command;

use netns_tests::{Family, Netns, Pods};

const TIMEOUT: &[&str] = &["--validate-timeout", "2s"];

fn validate(ns: &Netns, extra: &[&str]) -> netns_tests::Run {
    let args: Vec<&str> = ["validate"]
        .iter()
        .chain(TIMEOUT)
        .chain(extra)
        .copied()
        .collect();
    ns.meshinit(&args)
}

/// A pod with a default route (towards the peer), as a real pod has: the test address
/// 198.18.255.254 must be routable for connect() to send anything.
fn pods_with_default_route(name: &str) -> Pods {
    let pods = Pods::new(name);
    pods.pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &Family::V4.peer().to_string(),
    ]);
    pods
}

#[test]
fn validate_passes_with_rules_and_exits_95_without() {
    let pods = pods_with_default_route("validate_with_and_without");

    let run = validate(&pods.pod, &[]).expect_code(95);
    assert!(run.stderr.contains("no redirect"), "{run}");

    pods.pod.meshinit(&["apply"]).expect_ok();
    let run = validate(&pods.pod, &[]).expect_ok();
    assert!(run.stdout.contains("198.18.255.254:1404"), "{run}");

    // The same through --netns, from outside the pod, and to another test address.
    let netns = pods.pod.path().display().to_string();
    let outside = Netns::create(&format!("{}-outside", pods.peer.name()));
    outside
        .meshinit(&[
            "validate",
            "--netns",
            &netns,
            "--validate-addr",
            "198.18.200.1:80",
            "--validate-timeout",
            "2s",
        ])
        .expect_ok();

    // An outbound skip port is not redirected: validation against it must fail.
    pods.pod
        .meshinit(&["apply", "--outbound-ports-to-ignore", "1404"])
        .expect_ok();
    validate(&pods.pod, &[]).expect_code(95);

    pods.pod.meshinit(&["cleanup"]).expect_ok();
    validate(&pods.pod, &[]).expect_code(95);
}

#[test]
fn validate_reports_an_unroutable_test_address_and_refuses_the_proxy_uid() {
    let ns = Netns::create(&format!("nt-validate-noroute-{}", std::process::id()));
    ns.meshinit(&["apply"]).expect_ok();
    let run = validate(&ns, &[]).expect_code(95);
    assert!(run.stderr.contains("unreachable"), "{run}");

    // Testing as the proxy's uid would prove nothing: its traffic is exempt.
    let run = validate(&ns, &["--validate-uid", "2102"]).expect_code(2);
    assert!(run.stderr.contains("2102"), "{run}");
}

#[test]
fn validate_fails_while_the_outbound_port_is_taken() {
    let pods = pods_with_default_route("validate_port_taken");
    pods.pod.meshinit(&["apply"]).expect_ok();
    let _held = pods
        .pod
        .run(|| std::net::TcpListener::bind("127.0.0.1:4140").expect("bind 4140"));
    let run = validate(&pods.pod, &[]).expect_code(95);
    assert!(run.stderr.contains("cannot listen"), "{run}");
}

#[test]
fn check_repair_restores_a_deleted_rule() {
    let pods = Pods::new("check_repair");
    let flags = ["--outbound-ports-to-ignore", "5432"];
    let with = |sub: &str, extra: &[&str]| -> Vec<String> {
        std::iter::once(sub)
            .chain(flags)
            .chain(extra.iter().copied())
            .map(str::to_string)
            .collect()
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pods.pod.meshinit(&args)
    };
    run(with("apply", &[])).expect_ok();
    let installed = pods.pod.meshinit_table().expect("our table");

    // Nothing to repair: exit 0, nothing changes.
    run(with("check", &["--repair"])).expect_ok();
    assert_eq!(
        pods.pod.meshinit_table().as_deref(),
        Some(installed.as_str())
    );

    let rule = pods
        .pod
        .meshinit_rules()
        .into_iter()
        .find(|r| r.chain == "prerouting")
        .expect("an inbound rule");
    pods.pod.delete_rule(&rule);
    run(with("check", &[])).expect_code(1);

    let repaired = run(with("check", &["--repair"])).expect_ok();
    assert!(repaired.stdout.contains("drift"), "{repaired}");
    assert!(repaired.stdout.contains("repaired"), "{repaired}");
    assert!(
        repaired.stderr.contains("repaired drift"),
        "the repair is not logged\n{repaired}"
    );
    assert_eq!(
        pods.pod.meshinit_table().as_deref(),
        Some(installed.as_str())
    );
    run(with("check", &[])).expect_ok();

    // A repair that cannot apply exits 1: meshinit finds no `nft` (PATH is empty for it;
    // `ip` is named by its full path because Command looks programs up in the new PATH).
    pods.pod.delete_rule(&pods.pod.meshinit_rules()[0]);
    let ip = netns_tests::Run::of(Command::new("sh").args(["-c", "command -v ip"])).expect_ok();
    let mut cmd = Command::new(ip.stdout.trim());
    cmd.args(["netns", "exec", pods.pod.name()])
        .arg(netns_tests::meshinit_bin())
        .args(with("check", &["--repair", "--backend", "nft"]))
        .env("PATH", "/nonexistent");
    let failed = netns_tests::Run::of(&mut cmd);
    assert_eq!(failed.code, Some(1), "{failed}");
    assert!(failed.stderr.contains("nft"), "{failed}");
}
