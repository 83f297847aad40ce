//! apply / check / cleanup as a whole: idempotence, drift detection, restoring the exact
//! ruleset that was there before, never touching what is not ours, `--ipv6=false`, and both
//! ways into a namespace (`ip netns exec` and `--netns PATH`). Each backend.

use std::net::SocketAddr;

use netns_tests::{for_each_backend, Backend, Family, Pods};

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

/// The `-A PARENT … -j CHAIN` lines of a normalised `*-save -t nat` listing.
fn jumps(save: &str, parent: &str, chain: &str) -> usize {
    save.lines()
        .filter(|l| l.starts_with(&format!("-A {parent} ")) && l.ends_with(&format!("-j {chain}")))
        .count()
}

fn apply_three_times_gives_the_identical_ruleset_and_check_agrees(backend: Backend) {
    let pods = Pods::new(&backend.test_name("apply_twice_identical"));
    let apply = with("apply", FLAGS);
    let check = with("check", FLAGS);

    let run = pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
    let first = pods.pod.firewall();
    assert!(
        !pods.pod.ours_in(backend).is_empty(),
        "nothing installed in {backend}\n{run}\n{first}"
    );
    pods.pod.meshinit_on(backend, &args(&check)).expect_code(0);

    for round in ["second", "third"] {
        let run = pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
        assert!(
            !run.stderr.contains("already exists"),
            "the {round} apply complained\n{run}"
        );
        let again = pods.pod.firewall();
        assert_eq!(first, again, "the {round} apply changed the rules\n{run}");
        pods.pod.meshinit_on(backend, &args(&check)).expect_code(0);
    }
    if backend.is_iptables() {
        for family in Family::ALL {
            let save = pods.pod.nat_save(backend, family);
            assert_eq!(
                jumps(&save, "PREROUTING", "MESHINIT_INBOUND"),
                1,
                "{family:?}: one jump from PREROUTING\n{save}"
            );
            assert_eq!(
                jumps(&save, "OUTPUT", "MESHINIT_OUTPUT"),
                1,
                "{family:?}: one jump from OUTPUT\n{save}"
            );
        }
    }
}

/// Deletes one rule of ours and returns what `check` must then mention.
fn delete_one_of_ours(pods: &Pods, backend: Backend, family: Family) -> String {
    if backend == Backend::Nft {
        let rules = pods.pod.meshinit_rules();
        let victim = rules.first().expect("meshinit installed rules").clone();
        pods.pod.delete_rule(&victim);
        return victim.chain;
    }
    let tool = backend.tool(family, "");
    pods.pod
        .exec(&[&tool, "-t", "nat", "-D", "MESHINIT_OUTPUT", "1"])
        .expect_ok();
    "MESHINIT_OUTPUT".to_string()
}

fn check_reports_drift_after_a_rule_is_deleted(backend: Backend) {
    let pods = Pods::new(&backend.test_name("check_reports_drift"));
    let check = with("check", FLAGS);
    let apply = with("apply", FLAGS);

    // Nothing installed yet: that is drift too.
    pods.pod.meshinit_on(backend, &args(&check)).expect_code(1);

    for family in Family::ALL {
        pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
        pods.pod.meshinit_on(backend, &args(&check)).expect_code(0);

        let named = delete_one_of_ours(&pods, backend, family);
        let drift = pods.pod.meshinit_on(backend, &args(&check)).expect_code(1);
        let said = format!("{}{}", drift.stdout, drift.stderr);
        assert!(
            said.contains(&named),
            "{family:?}: check should say what differs (a rule of {named} is missing)\n{drift}"
        );
        if backend.is_iptables() {
            let name = match family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            assert!(said.contains(name), "check should name {name}\n{drift}");
        }
    }

    if backend.is_iptables() {
        // A missing jump is drift as well: the chains would never be reached.
        for family in Family::ALL {
            pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
            pods.pod.meshinit_on(backend, &args(&check)).expect_code(0);
            let tool = backend.tool(family, "");
            // The pod's PREROUTING holds nothing but our jump.
            pods.pod
                .exec(&[&tool, "-t", "nat", "-D", "PREROUTING", "1"])
                .expect_ok();
            let drift = pods.pod.meshinit_on(backend, &args(&check)).expect_code(1);
            assert!(
                drift.stdout.contains("PREROUTING"),
                "{family:?}: check should name the missing jump\n{drift}"
            );
        }
    }

    // Flags that describe other rules than the installed ones: drift as well.
    pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
    pods.pod
        .meshinit_on(backend, &["check", "--outbound-ports-to-ignore=5556"])
        .expect_code(1);
}

/// Whatever `check` calls drift, the next apply repairs: check agrees right after it.
fn apply_repairs_every_drift_that_check_reports(backend: Backend) {
    let pods = Pods::new(&backend.test_name("apply_repairs_drift"));
    let apply = with("apply", FLAGS);
    let check = with("check", FLAGS);
    let drifts: Vec<(String, Vec<String>)> = match backend {
        Backend::Nft => vec![
            ("an extra rule in our output chain".to_string(), vec![]),
            ("a deleted rule".to_string(), vec![]),
        ],
        iptables => Family::ALL
            .iter()
            .flat_map(|&family| {
                let tool = iptables.tool(family, "");
                let argv = |rest: &[&str]| -> Vec<String> {
                    std::iter::once(tool.as_str())
                        .chain(["-t", "nat"])
                        .chain(rest.iter().copied())
                        .map(str::to_string)
                        .collect()
                };
                [
                    ("a deleted rule", argv(&["-D", "MESHINIT_OUTPUT", "1"])),
                    (
                        "an extra rule",
                        argv(&["-I", "MESHINIT_INBOUND", "1", "-j", "RETURN"]),
                    ),
                    ("a deleted jump", argv(&["-D", "PREROUTING", "1"])),
                    (
                        "a second jump",
                        argv(&["-A", "OUTPUT", "-j", "MESHINIT_OUTPUT"]),
                    ),
                ]
                .map(|(what, argv)| (format!("{family:?}: {what} (`{}`)", argv.join(" ")), argv))
            })
            .collect(),
    };
    for (what, argv) in drifts {
        pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
        pods.pod.meshinit_on(backend, &args(&check)).expect_code(0);
        if argv.is_empty() {
            // nft: the two cases above.
            if what.starts_with("an extra") {
                let chain = pods
                    .pod
                    .meshinit_rules()
                    .first()
                    .expect("rules")
                    .chain
                    .clone();
                pods.pod.nft(&[
                    "insert", "rule", "inet", "meshinit", &chain, "tcp", "dport", "1", "return",
                ]);
            } else {
                let victim = pods.pod.meshinit_rules().first().expect("rules").clone();
                pods.pod.delete_rule(&victim);
            }
        } else {
            pods.pod.exec(&args(&argv)).expect_ok();
        }
        let drift = pods.pod.meshinit_on(backend, &args(&check));
        assert_eq!(
            drift.code,
            Some(1),
            "{what}: check should report drift\n{drift}"
        );
        let run = pods.pod.meshinit_on(backend, &args(&apply)).expect_ok();
        let after = pods.pod.meshinit_on(backend, &args(&check));
        assert_eq!(
            after.code,
            Some(0),
            "{what}: apply did not repair what check reported\n{drift}\n{run}\n{after}"
        );
    }
}

/// Adds rules that belong to someone else, next to where `backend` writes ours: an `inet`
/// filter table for every backend; for nft also the `ip nat` table that iptables-nft would
/// create, and iptables-legacy rules; for iptables, a chain of its own, rules in the nat
/// chains we jump from (so that the nat tables exist before us) and a filter rule, in both
/// families.
fn add_foreign_rules(pods: &Pods, backend: Backend) {
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
    let iptables = match backend {
        Backend::Nft => {
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
            Backend::IptablesLegacy
        }
        other => other,
    };
    for family in Family::ALL {
        let tool = iptables.tool(family, "");
        for rule in [
            &["-t", "nat", "-N", "FOREIGN"][..],
            &[
                "-t", "nat", "-A", "FOREIGN", "-p", "tcp", "--dport", "3", "-j", "RETURN",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "3",
                "-j",
                "FOREIGN",
            ],
            &[
                "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "2", "-j", "ACCEPT",
            ],
            &[
                "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "1", "-j", "ACCEPT",
            ],
        ] {
            pods.pod
                .exec(&[&[tool.as_str()][..], rule].concat())
                .expect_ok();
        }
    }
}

/// Every rule of the namespace that is not meshinit's: the whole firewall without the lines
/// that name a `MESHINIT_*` chain and without the `inet meshinit` table.
fn foreign_rules(pods: &Pods) -> String {
    let firewall = pods.pod.firewall();
    let mut out = String::new();
    // The indentation of the closing brace of the nft table or chain of ours being skipped.
    let mut skipping: Option<&str> = None;
    for line in firewall.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        match skipping {
            Some(end) => {
                if trimmed == "}" && indent == end {
                    skipping = None;
                }
            }
            None if trimmed.starts_with("table inet meshinit ")
                || trimmed.starts_with("chain MESHINIT_") =>
            {
                skipping = Some(indent);
            }
            // Blank lines separate nft chains: one is left over wherever ours was cut out.
            None if line.contains("MESHINIT_") || trimmed.is_empty() => {}
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn cleanup_restores_the_exact_rules_from_before_and_foreign_rules_are_untouched(backend: Backend) {
    let pods = Pods::new(&backend.test_name("cleanup_restores_the_ruleset"));
    add_foreign_rules(&pods, backend);
    let before = pods.pod.firewall();
    let foreign = foreign_rules(&pods);
    assert!(foreign.contains("FOREIGN"), "{foreign}");

    pods.pod
        .meshinit_on(backend, &args(&with("apply", FLAGS)))
        .expect_ok();
    assert_eq!(
        foreign_rules(&pods),
        foreign,
        "apply touched a foreign rule"
    );
    assert!(
        !pods.pod.ours_in(backend).is_empty(),
        "apply installed nothing"
    );
    pods.pod
        .meshinit_on(backend, &args(&with("apply", FLAGS)))
        .expect_ok();
    assert_eq!(
        foreign_rules(&pods),
        foreign,
        "a second apply touched a foreign rule"
    );

    let run = pods.pod.meshinit_on(backend, &["cleanup"]).expect_ok();
    for other in Backend::ALL {
        assert_eq!(
            pods.pod.ours_in(other),
            Vec::<String>::new(),
            "{other} after cleanup\n{run}"
        );
    }
    assert_eq!(
        pods.pod.firewall(),
        before,
        "cleanup did not restore the rules\n{run}"
    );

    // Cleaning up what is already clean changes nothing either.
    let again = pods.pod.meshinit_on(backend, &["cleanup"]);
    assert_eq!(
        pods.pod.firewall(),
        before,
        "a second cleanup changed the rules\n{again}"
    );
}

/// From an empty namespace, cleanup leaves nothing of ours. (iptables-nft leaves its empty
/// `ip nat` / `ip6 nat` tables behind, as the README says: only our chains and jumps must go.)
fn cleanup_after_apply_in_an_empty_namespace_leaves_nothing_of_ours(backend: Backend) {
    let pods = Pods::new(&backend.test_name("cleanup_empty_namespace"));
    pods.pod
        .meshinit_on(backend, &args(&with("apply", FLAGS)))
        .expect_ok();
    let run = pods.pod.meshinit_on(backend, &["cleanup"]).expect_ok();
    for other in Backend::ALL {
        assert_eq!(
            pods.pod.ours_in(other),
            Vec::<String>::new(),
            "{other} after cleanup\n{run}"
        );
    }
    let firewall = pods.pod.firewall();
    assert!(!firewall.contains("meshinit"), "{firewall}");
    // The same with the default backend choice, which cleans every backend.
    pods.pod
        .meshinit_on(backend, &args(&with("apply", FLAGS)))
        .expect_ok();
    let run = pods.pod.meshinit(&["cleanup"]).expect_ok();
    for other in Backend::ALL {
        assert_eq!(
            pods.pod.ours_in(other),
            Vec::<String>::new(),
            "{other} after auto cleanup\n{run}"
        );
    }
}

fn cleanup_stops_the_redirect(backend: Backend) {
    let pods = Pods::new(&backend.test_name("cleanup_stops_the_redirect"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"],
        "after apply"
    );
    pods.pod.meshinit_on(backend, &["cleanup"]).expect_ok();
    assert_eq!(
        outbound_lands(&pods),
        ["peer app", "peer app"],
        "after cleanup"
    );
}

/// The IPv6 part of the firewall: the `ip6tables-*-save` sections of [`Netns::firewall`].
fn ipv6_iptables(pods: &Pods) -> String {
    let firewall = pods.pod.firewall();
    let mut out = String::new();
    let mut in_v6 = false;
    for line in firewall.lines() {
        if let Some(section) = line.strip_prefix("## ") {
            in_v6 = section.starts_with("ip6tables-");
        }
        if in_v6 {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn ipv6_false_leaves_ipv6_traffic_alone(backend: Backend) {
    let pods = Pods::new(&backend.test_name("ipv6_false_leaves_ipv6_alone"));
    let v6_before = ipv6_iptables(&pods);
    let run = pods
        .pod
        .meshinit_on(backend, &["apply", "--ipv6=false"])
        .expect_ok();
    assert_eq!(
        ipv6_iptables(&pods),
        v6_before,
        "--ipv6=false changed ip6tables\n{run}"
    );
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
    pods.pod
        .meshinit_on(backend, &["check", "--ipv6=false"])
        .expect_code(0);
    assert_eq!(ipv6_iptables(&pods), v6_before, "check changed ip6tables");
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

fn netns_flag_enters_a_named_namespace_file(backend: Backend) {
    let pods = Pods::new(&backend.test_name("netns_flag_named"));
    let target = pods.pod.path();
    let target = target.to_str().unwrap();
    let peer_before = pods.peer.firewall();

    // Run from the peer, so a meshinit that ignored --netns would show up in the peer's
    // ruleset, not in the host's.
    pods.peer
        .meshinit_on(backend, &["apply", "--netns", target])
        .expect_ok();
    assert!(
        !pods.pod.ours_in(backend).is_empty(),
        "nothing installed in the target namespace"
    );
    assert_eq!(
        pods.peer.firewall(),
        peer_before,
        "meshinit changed the namespace it ran in"
    );
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"]
    );
    pods.peer
        .meshinit_on(backend, &["check", "--netns", target])
        .expect_code(0);

    pods.peer
        .meshinit_on(backend, &["cleanup", "--netns", target])
        .expect_ok();
    assert_eq!(
        pods.pod.ours_in(backend),
        Vec::<String>::new(),
        "cleanup --netns left rules of ours"
    );
    assert_eq!(outbound_lands(&pods), ["peer app", "peer app"]);
}

fn netns_flag_enters_the_namespace_of_a_process(backend: Backend) {
    let pods = Pods::new(&backend.test_name("netns_flag_proc"));
    let sleeper = pods.pod.spawn_sleeper();
    let target = format!("/proc/{}/ns/net", sleeper.pid());
    let peer_before = pods.peer.firewall();

    pods.peer
        .meshinit_on(backend, &["apply", "--netns", &target])
        .expect_ok();
    assert!(
        !pods.pod.ours_in(backend).is_empty(),
        "nothing installed in the namespace of {target}"
    );
    assert_eq!(
        pods.peer.firewall(),
        peer_before,
        "meshinit changed the namespace it ran in"
    );
    assert_eq!(
        outbound_lands(&pods),
        ["pod proxy :4140", "pod proxy :4140"]
    );
    pods.peer
        .meshinit_on(backend, &["check", "--netns", &target])
        .expect_code(0);

    pods.peer
        .meshinit_on(backend, &["cleanup", "--netns", &target])
        .expect_ok();
    assert_eq!(
        pods.pod.ours_in(backend),
        Vec::<String>::new(),
        "cleanup --netns left rules of ours"
    );
}

for_each_backend!(
    apply_three_times_gives_the_identical_ruleset_and_check_agrees,
    check_reports_drift_after_a_rule_is_deleted,
    apply_repairs_every_drift_that_check_reports,
    cleanup_restores_the_exact_rules_from_before_and_foreign_rules_are_untouched,
    cleanup_after_apply_in_an_empty_namespace_leaves_nothing_of_ours,
    cleanup_stops_the_redirect,
    ipv6_false_leaves_ipv6_traffic_alone,
    netns_flag_enters_a_named_namespace_file,
    netns_flag_enters_the_namespace_of_a_process,
);
