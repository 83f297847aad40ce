//! apply / check / cleanup as a whole: idempotence, drift detection, restoring the exact
//! ruleset that was there before, never touching what is not ours, `--ipv6=false`, and both
//! ways into a namespace (`ip netns exec` and `--netns PATH`).

use std::net::SocketAddr;

use netns_tests::{Family, Pods};

const FLAGS: &[&str] = &[
    "--outbound-ports-to-ignore=5555,9000-9010",
    "--inbound-ports-to-ignore=4190,4191,7000-7100",
    "--subnets-to-ignore=198.19.0.0/16,fd00:19::/64",
    "--proxy-gid=2200",
];

fn with(subcommand: &str, flags: &[&str]) -> Vec<String> {
    std::iter::once(subcommand)
        .chain(flags.iter().copied())
        .map(str::to_string)
        .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn apply_twice_gives_the_identical_ruleset_and_check_agrees() {
    let pods = Pods::new("apply_twice_identical");
    let apply = with("apply", FLAGS);
    let check = with("check", FLAGS);

    pods.pod.meshinit(&args(&apply)).expect_ok();
    let first = pods.pod.ruleset();
    assert!(first.contains("table inet meshinit"), "{first}");
    pods.pod.meshinit(&args(&check)).expect_code(0);

    pods.pod.meshinit(&args(&apply)).expect_ok();
    let second = pods.pod.ruleset();
    assert_eq!(first, second, "the second apply changed the ruleset");
    pods.pod.meshinit(&args(&check)).expect_code(0);
}

#[test]
fn check_reports_drift_after_a_rule_is_deleted() {
    let pods = Pods::new("check_reports_drift");
    let check = with("check", FLAGS);

    // Nothing installed yet: that is drift too.
    pods.pod.meshinit(&args(&check)).expect_code(1);

    pods.pod.meshinit(&args(&with("apply", FLAGS))).expect_ok();
    pods.pod.meshinit(&args(&check)).expect_code(0);

    let rules = pods.pod.meshinit_rules();
    let victim = rules.first().expect("meshinit installed rules").clone();
    pods.pod.delete_rule(&victim);
    let drift = pods.pod.meshinit(&args(&check)).expect_code(1);
    let said = format!("{}{}", drift.stdout, drift.stderr);
    let named = victim
        .comment
        .as_deref()
        .map_or(said.contains(&victim.chain), |comment| {
            said.contains(comment) || said.contains(&victim.chain)
        });
    assert!(
        named,
        "check should say what differs (the missing rule {victim:?} of chain {})\n{drift}",
        victim.chain
    );

    // Flags that describe other rules than the installed ones: drift as well.
    pods.pod.meshinit(&args(&with("apply", FLAGS))).expect_ok();
    pods.pod
        .meshinit(&["check", "--outbound-ports-to-ignore=5556"])
        .expect_code(1);
}

/// Adds tables and chains that belong to someone else: an `inet` filter table and the `ip nat`
/// table that iptables-nft would create, each with a rule.
fn add_foreign_tables(pods: &Pods) {
    pods.pod.nft(&["add", "table", "inet", "foreign"]);
    pods.pod.nft(&[
        "add",
        "chain",
        "inet",
        "foreign",
        "c",
        "{ type filter hook output priority 0; policy accept; }",
    ]);
    pods.pod.nft(&[
        "add", "rule", "inet", "foreign", "c", "tcp", "dport", "1", "accept",
    ]);
    pods.pod.nft(&["add", "table", "ip", "nat"]);
    pods.pod.nft(&[
        "add",
        "chain",
        "ip",
        "nat",
        "OUTPUT",
        "{ type nat hook output priority -100; policy accept; }",
    ]);
    pods.pod.nft(&[
        "add", "rule", "ip", "nat", "OUTPUT", "tcp", "dport", "2", "counter", "accept",
    ]);
}

fn foreign_tables(pods: &Pods) -> (String, String) {
    (
        pods.pod.nft(&["list", "table", "inet", "foreign"]).stdout,
        pods.pod.nft(&["list", "table", "ip", "nat"]).stdout,
    )
}

#[test]
fn cleanup_restores_the_exact_ruleset_from_before_and_foreign_tables_are_untouched() {
    let pods = Pods::new("cleanup_restores_the_ruleset");
    add_foreign_tables(&pods);
    let before = pods.pod.ruleset();
    let foreign = foreign_tables(&pods);

    pods.pod.meshinit(&args(&with("apply", FLAGS))).expect_ok();
    assert_eq!(
        foreign_tables(&pods),
        foreign,
        "apply touched a foreign table"
    );
    assert!(
        pods.pod.meshinit_table().is_some(),
        "apply installed no table"
    );
    pods.pod.meshinit(&args(&with("apply", FLAGS))).expect_ok();
    assert_eq!(
        foreign_tables(&pods),
        foreign,
        "a second apply touched a foreign table"
    );

    pods.pod.meshinit(&["cleanup"]).expect_ok();
    assert_eq!(
        foreign_tables(&pods),
        foreign,
        "cleanup touched a foreign table"
    );
    assert_eq!(
        pods.pod.ruleset(),
        before,
        "cleanup did not restore the ruleset"
    );

    // Cleaning up what is already clean changes nothing either.
    let again = pods.pod.meshinit(&["cleanup"]);
    assert_eq!(
        pods.pod.ruleset(),
        before,
        "a second cleanup changed the ruleset\n{again}"
    );
}

#[test]
fn cleanup_stops_the_redirect() {
    let pods = Pods::new("cleanup_stops_the_redirect");
    pods.pod.meshinit(&["apply"]).expect_ok();
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"],
        "after apply"
    );
    pods.pod.meshinit(&["cleanup"]).expect_ok();
    assert_eq!(
        outbound_lands(&pods),
        ["peer app", "peer app"],
        "after cleanup"
    );
}

#[test]
fn ipv6_false_leaves_ipv6_traffic_alone() {
    let pods = Pods::new("ipv6_false_leaves_ipv6_alone");
    pods.pod.meshinit(&["apply", "--ipv6=false"]).expect_ok();
    for (family, want_out, want_in) in [
        (Family::V4, "pod proxy :4140", "pod proxy :4143"),
        (Family::V6, "peer app", "pod app"),
    ] {
        let out_proxy = pods.pod.listen("pod proxy :4140", family.any_port(4140));
        let peer_app = pods.peer.listen("peer app", family.any_port(8080));
        let to = SocketAddr::new(family.peer(), 8080);
        let (on, _) = pods.pod.connect_and_land(to, &[&out_proxy, &peer_app]);
        assert_eq!(on, want_out, "--ipv6=false, {family:?} pod -> {to}");

        let in_proxy = pods.pod.listen("pod proxy :4143", family.any_port(4143));
        let pod_app = pods.pod.listen("pod app", family.any_port(8080));
        let to = SocketAddr::new(family.pod(), 8080);
        let (on, _) = pods.peer.connect_and_land(to, &[&in_proxy, &pod_app]);
        assert_eq!(on, want_in, "--ipv6=false, {family:?} peer -> {to}");
    }
    pods.pod.meshinit(&["check", "--ipv6=false"]).expect_code(0);
}

/// Where an outbound connection from the pod to the peer lands, per family.
fn outbound_lands(pods: &Pods) -> Vec<String> {
    Family::ALL
        .iter()
        .map(|&family| {
            let proxy = pods.pod.listen("pod proxy :4140", family.any_port(4140));
            let app = pods.peer.listen("peer app", family.any_port(8080));
            let to = SocketAddr::new(family.peer(), 8080);
            pods.pod.connect_and_land(to, &[&proxy, &app]).0.to_string()
        })
        .collect()
}

#[test]
fn netns_flag_enters_a_named_namespace_file() {
    let pods = Pods::new("netns_flag_named");
    let target = pods.pod.path();
    let target = target.to_str().unwrap();
    let peer_before = pods.peer.ruleset();

    // Run from the peer, so a meshinit that ignored --netns would show up in the peer's
    // ruleset, not in the host's.
    pods.peer
        .meshinit(&["apply", "--netns", target])
        .expect_ok();
    assert!(
        pods.pod.meshinit_table().is_some(),
        "no table in the target namespace"
    );
    assert_eq!(
        pods.peer.ruleset(),
        peer_before,
        "meshinit changed the namespace it ran in"
    );
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"]
    );
    pods.peer
        .meshinit(&["check", "--netns", target])
        .expect_code(0);

    pods.peer
        .meshinit(&["cleanup", "--netns", target])
        .expect_ok();
    assert!(
        pods.pod.meshinit_table().is_none(),
        "cleanup --netns left the table"
    );
    assert_eq!(outbound_lands(&pods), ["peer app", "peer app"]);
}

#[test]
fn netns_flag_enters_the_namespace_of_a_process() {
    let pods = Pods::new("netns_flag_proc");
    let sleeper = pods.pod.spawn_sleeper();
    let target = format!("/proc/{}/ns/net", sleeper.pid());
    let peer_before = pods.peer.ruleset();

    pods.peer
        .meshinit(&["apply", "--netns", &target])
        .expect_ok();
    assert!(
        pods.pod.meshinit_table().is_some(),
        "no table in the namespace of {target}"
    );
    assert_eq!(
        pods.peer.ruleset(),
        peer_before,
        "meshinit changed the namespace it ran in"
    );
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"]
    );
    pods.peer
        .meshinit(&["check", "--netns", &target])
        .expect_code(0);

    pods.peer
        .meshinit(&["cleanup", "--netns", &target])
        .expect_ok();
    assert!(
        pods.pod.meshinit_table().is_none(),
        "cleanup --netns left the table"
    );
}
