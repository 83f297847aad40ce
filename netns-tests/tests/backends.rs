//! Choosing and switching backends (issue 3): what `--backend auto` picks in a namespace and
//! why, switching between backends leaves no stale rules of ours, `check` calls stale rules in
//! another backend drift, and an iptables apply whose IPv6 half fails rolls the IPv4 half back.

use std::net::SocketAddr;

use netns_tests::fault::{self, FaultyTools};
use netns_tests::{Backend, Family, Pods};

const OUT_PROXY: &str = "pod proxy :4140";
const IN_PROXY: &str = "pod proxy :4143";
const APP: &str = "app";

/// Where connections land, per family: `[outbound V4, outbound V6, inbound V4, inbound V6]`
/// (pod -> peer:8080 and peer -> pod:8080; each the proxy or the application).
fn landings(pods: &Pods) -> Vec<String> {
    let mut out = Vec::new();
    for family in Family::ALL {
        let proxy = pods.pod.listen(OUT_PROXY, family.any_port(4140));
        let app = pods.peer.listen(APP, family.any_port(8080));
        let to = SocketAddr::new(family.peer(), 8080);
        out.push(pods.pod.connect_and_land(to, &[&proxy, &app]).0.to_string());
    }
    for family in Family::ALL {
        let proxy = pods.pod.listen(IN_PROXY, family.any_port(4143));
        let app = pods.pod.listen(APP, family.any_port(8080));
        let to = SocketAddr::new(family.pod(), 8080);
        out.push(
            pods.peer
                .connect_and_land(to, &[&proxy, &app])
                .0
                .to_string(),
        );
    }
    out
}

const REDIRECTED: [&str; 4] = [OUT_PROXY, OUT_PROXY, IN_PROXY, IN_PROXY];

/// Asserts that `backend` holds our rules and no other backend holds any.
#[track_caller]
fn assert_only_in(pods: &Pods, backend: Backend, context: &str) {
    for other in Backend::ALL {
        let ours = pods.pod.ours_in(other);
        if other == backend {
            assert!(!ours.is_empty(), "{context}: nothing of ours in {other}");
        } else {
            assert_eq!(
                ours,
                Vec::<String>::new(),
                "{context}: rules of ours left in {other}"
            );
        }
    }
}

#[test]
fn auto_picks_nft_in_an_empty_namespace() {
    let pods = Pods::new("auto_picks_nft_when_empty");
    let run = pods.pod.meshinit(&["apply"]).expect_ok();
    assert!(
        run.stderr.contains("backend=\"nft\""),
        "auto should log its choice of nft\n{run}"
    );
    assert!(run.stderr.contains("auto:"), "auto should log why\n{run}");
    assert_only_in(&pods, Backend::Nft, "auto in an empty namespace");
    pods.pod.meshinit(&["check"]).expect_code(0);
    assert_eq!(landings(&pods), REDIRECTED);
}

/// Empty legacy tables (someone only listed them: `iptables-legacy-save -t nat` creates the
/// nat table) hold no rules, so there is nothing to stay consistent with: still nft.
#[test]
fn auto_picks_nft_when_legacy_tables_exist_but_hold_no_rule() {
    let pods = Pods::new("auto_picks_nft_empty_legacy_tables");
    for family in Family::ALL {
        pods.pod.nat_save(Backend::IptablesLegacy, family);
    }
    let run = pods.pod.meshinit(&["apply"]).expect_ok();
    assert!(run.stderr.contains("backend=\"nft\""), "{run}");
    assert_only_in(&pods, Backend::Nft, "auto with empty legacy tables");
}

/// A rule of anyone's in iptables-legacy (IPv4 or IPv6, any table) makes auto pick legacy:
/// rules split between legacy and nf_tables break traffic silently.
#[test]
fn auto_picks_iptables_legacy_when_legacy_already_holds_a_rule() {
    for tool in ["iptables-legacy", "ip6tables-legacy"] {
        let pods = Pods::new(&format!("auto_picks_legacy_{tool}"));
        pods.pod
            .exec(&[
                tool, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "1", "-j", "ACCEPT",
            ])
            .expect_ok();
        let run = pods.pod.meshinit(&["apply"]).expect_ok();
        assert!(
            run.stderr.contains("backend=\"iptables-legacy\""),
            "a {tool} rule: auto should log its choice of iptables-legacy\n{run}"
        );
        assert_only_in(&pods, Backend::IptablesLegacy, tool);
        assert!(
            pods.pod.meshinit_table().is_none(),
            "{tool}: table inet meshinit installed"
        );
        pods.pod.meshinit(&["check"]).expect_code(0);
        assert_eq!(landings(&pods), REDIRECTED, "{tool}");
        // The foreign rule is still there.
        let save = pods
            .pod
            .exec(&[&format!("{tool}-save"), "-t", "filter"])
            .expect_ok();
        assert!(save.stdout.contains("--dport 1 -j ACCEPT"), "{save}");
    }
}

/// Every switch between two backends (all six of them, in one cycle) leaves our rules in the
/// new backend only, and traffic redirected.
#[test]
fn switching_backends_leaves_our_rules_in_the_new_backend_only() {
    let pods = Pods::new("switching_backends");
    let flags = "--outbound-ports-to-ignore=5555";
    use Backend::{IptablesLegacy as Legacy, IptablesNft, Nft};
    let mut previous: Option<Backend> = None;
    for backend in [Nft, IptablesNft, Legacy, Nft, Legacy, IptablesNft, Nft] {
        let context = match previous {
            Some(from) => format!("from {from} to {backend}"),
            None => format!("first {backend}"),
        };
        let run = pods.pod.meshinit_on(backend, &["apply", flags]).expect_ok();
        assert_only_in(&pods, backend, &format!("{context}\n{run}"));
        if let Some(from) = previous {
            assert!(
                run.stderr.contains(&format!("removed_from=\"{from}\"")),
                "{context}: the switch should log what it removed\n{run}"
            );
        }
        pods.pod
            .meshinit_on(backend, &["check", flags])
            .expect_code(0);
        assert_eq!(landings(&pods), REDIRECTED, "{context}");
        previous = Some(backend);
    }
}

/// The tools an apply may run, each wrapped to log its name before running the real one.
const TOOLS: [&str; 9] = [
    "nft",
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
];

/// An nft apply runs one process, `nft`, when no other backend holds anything: the
/// leftover check for iptables-nft reads the tables that same `nft` listed, and the one
/// for iptables-legacy reads /proc. With iptables-nft tables present the check still
/// looks (and the switch test above shows it still removes ours).
#[test]
fn an_nft_apply_runs_one_nft_process_when_there_is_nothing_to_clean() {
    let pods = Pods::new("an_nft_apply_runs_one_process");
    let log = std::env::temp_dir().join(format!(
        "netns-tests-{}-one-process.log",
        std::process::id()
    ));
    let script = format!(
        "#!/bin/sh\nname=$(basename \"$0\")\necho \"$name\" >> {}\nexec /usr/sbin/\"$name\" \"$@\"\n",
        log.display()
    );
    let logged = FaultyTools::new("one-process", &TOOLS, &script);
    let ran = |args: &[&str]| {
        let _ = std::fs::remove_file(&log);
        logged.meshinit(&pods.pod, args).expect_ok();
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    // First apply (no table yet), then a re-apply replacing it, then one with `auto` (the
    // default), whose choice of nft is made in process: the apply's `nft` is the only one.
    for (round, backend) in [("first", "nft"), ("again", "nft"), ("auto", "auto")] {
        let tools = ran(&[
            "apply",
            "--backend",
            backend,
            "--outbound-ports-to-ignore=5555",
        ]);
        assert_eq!(tools, "nft\n", "{round} apply");
    }
    assert_only_in(&pods, Backend::Nft, "after the nft applies");

    // Someone's iptables-nft table (not ours) in the namespace: now the check must look.
    pods.pod
        .exec(&[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-j",
            "ACCEPT",
        ])
        .expect_ok();
    let tools = ran(&["apply", "--backend", "nft"]);
    assert!(tools.starts_with("nft\n"), "{tools}");
    assert!(tools.contains("iptables-nft-save"), "{tools}");
    let _ = std::fs::remove_file(&log);
}

/// Runs `meshinit ARGS…` with every tool an apply may run wrapped to log its name, and
/// returns the names, sorted (the families' tools run at the same time).
fn tools_run(pods: &Pods, test: &str, args: &[&str]) -> Vec<String> {
    let log = std::env::temp_dir().join(format!("netns-tests-{}-{test}.log", std::process::id()));
    let script = format!(
        "#!/bin/sh\nname=$(basename \"$0\")\necho \"$name\" >> {}\nexec /usr/sbin/\"$name\" \"$@\"\n",
        log.display()
    );
    let logged = FaultyTools::new(test, &TOOLS, &script);
    let _ = std::fs::remove_file(&log);
    logged.meshinit(&pods.pod, args).expect_ok();
    let mut tools: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let _ = std::fs::remove_file(&log);
    tools.sort();
    tools
}

/// An iptables apply runs only the processes that have work (issue 14): the tables that
/// exist are read from /proc (legacy) or listed over netlink (iptables-nft, and the nft
/// leftover check), never by running `nft`. A first apply runs the two restores; a
/// re-apply reads both families and restores only those that changed; a re-apply of the
/// rules already in place restores nothing.
fn an_iptables_apply_runs_only_the_tools_with_work(backend: Backend) {
    let pods = Pods::new(&backend.test_name("apply_tools"));
    let tool = |family, name| backend.tool(family, name);
    let (save4, save6) = (tool(Family::V4, "save"), tool(Family::V6, "save"));
    let (restore4, restore6) = (tool(Family::V4, "restore"), tool(Family::V6, "restore"));
    let sorted = |names: &[&String]| {
        let mut names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        names.sort();
        names
    };
    let test = format!("{}-tools", backend.name());
    let apply = |extra: &[&str]| {
        let flag = backend.flag();
        let mut args = vec!["apply", flag.as_str()];
        args.extend_from_slice(extra);
        tools_run(&pods, &test, &args)
    };
    assert_eq!(apply(&[]), sorted(&[&restore4, &restore6]), "first apply");
    assert_eq!(
        apply(&[]),
        sorted(&[&save4, &save6]),
        "the same rules again"
    );
    let changed = ["--outgoing-proxy-port", "4141"];
    assert_eq!(
        apply(&changed),
        sorted(&[&save4, &save6, &restore4, &restore6]),
        "changed rules"
    );
    // Only the family whose rules were changed by hand is written.
    pods.pod
        .exec(&[
            &tool(Family::V6, ""),
            "-t",
            "nat",
            "-D",
            "MESHINIT_OUTPUT",
            "1",
        ])
        .expect_ok();
    assert_eq!(
        apply(&changed),
        sorted(&[&save4, &save6, &restore6]),
        "after an IPv6 rule was deleted by hand"
    );
    assert_eq!(
        apply(&[]),
        sorted(&[&save4, &save6, &restore4, &restore6]),
        "back to the first rules"
    );
    assert_only_in(&pods, backend, "after the applies");
    assert_eq!(landings(&pods), REDIRECTED);
}

#[test]
fn an_iptables_nft_apply_runs_only_the_tools_with_work() {
    an_iptables_apply_runs_only_the_tools_with_work(Backend::IptablesNft)
}

#[test]
fn an_iptables_legacy_apply_runs_only_the_tools_with_work() {
    an_iptables_apply_runs_only_the_tools_with_work(Backend::IptablesLegacy)
}

/// After a switch from one iptables flavour to the other, the leftover checks still find
/// and remove the old rules without running `nft` (the nf_tables listing is in process).
#[test]
fn an_iptables_apply_runs_no_nft_process_for_the_leftover_checks() {
    let pods = Pods::new("an_iptables_apply_no_nft");
    // Legacy in an empty namespace, then iptables-nft (which removes legacy's rules).
    for backend in [Backend::IptablesLegacy, Backend::IptablesNft] {
        let tools = tools_run(&pods, "no-nft", &["apply", &backend.flag()]);
        assert!(
            !tools.iter().any(|tool| tool == "nft"),
            "{backend}: {tools:?}"
        );
        assert_only_in(&pods, backend, &format!("after the {backend} apply"));
    }
}

/// Our lines in both families' `*-save -c` of `backend`, counters included: a rule that is
/// deleted and re-added comes back with its counters at zero.
fn ours_with_counters(pods: &Pods, backend: Backend) -> String {
    let mut out = String::new();
    for family in Family::ALL {
        let save = pods
            .pod
            .exec(&[&backend.tool(family, "save"), "-c"])
            .expect_ok()
            .stdout;
        for line in save.lines().filter(|line| line.contains("MESHINIT_")) {
            out.push_str(&format!("{family:?}: {line}\n"));
        }
    }
    out
}

/// Re-applying the rules already in place writes nothing (issue 14): the rules are the
/// same objects, counters and all, not deleted and re-added; a re-apply after someone
/// changed them still repairs them (and leaves the untouched family as it was).
fn a_reapply_of_the_rules_in_place_writes_nothing_and_repairs_a_tampered_one(backend: Backend) {
    let pods = Pods::new(&backend.test_name("reapply_in_place"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    // Connections through both chains in both families: our rules' counters are not zero.
    assert_eq!(landings(&pods), REDIRECTED);
    let before = ours_with_counters(&pods, backend);
    assert!(
        before
            .lines()
            .any(|line| !line.contains("[0:0]") && line.contains("REDIRECT")),
        "traffic should have counted on our REDIRECT rules:\n{before}"
    );
    let firewall = pods.pod.firewall();
    let run = pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    assert_eq!(
        ours_with_counters(&pods, backend),
        before,
        "a re-apply of the same rules rewrote them"
    );
    assert!(run.stderr.contains("unchanged=true"), "{}", run.stderr);
    assert_eq!(pods.pod.firewall(), firewall);

    // Tampered with: IPv4's outbound redirect deleted, a second jump added.
    let v4 = backend.tool(Family::V4, "");
    pods.pod
        .exec(&[&v4, "-t", "nat", "-D", "MESHINIT_OUTPUT", "3"])
        .expect_ok();
    pods.pod
        .exec(&[&v4, "-t", "nat", "-A", "OUTPUT", "-j", "MESHINIT_OUTPUT"])
        .expect_ok();
    pods.pod.meshinit_on(backend, &["check"]).expect_code(1);
    let run = pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    assert!(run.stderr.contains("unchanged=false"), "{}", run.stderr);
    pods.pod.meshinit_on(backend, &["check"]).expect_ok();
    assert_eq!(
        pods.pod.firewall(),
        firewall,
        "the repair restores every rule"
    );
    let after = ours_with_counters(&pods, backend);
    let v6 = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| line.starts_with("V6"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        v6(&after),
        v6(&before),
        "the untouched family was rewritten"
    );
    assert_eq!(landings(&pods), REDIRECTED);
}

#[test]
fn iptables_nft_reapply_of_the_rules_in_place_writes_nothing_and_repairs_a_tampered_one() {
    a_reapply_of_the_rules_in_place_writes_nothing_and_repairs_a_tampered_one(Backend::IptablesNft)
}

#[test]
fn iptables_legacy_reapply_of_the_rules_in_place_writes_nothing_and_repairs_a_tampered_one() {
    a_reapply_of_the_rules_in_place_writes_nothing_and_repairs_a_tampered_one(
        Backend::IptablesLegacy,
    )
}

/// Legacy to nft, as the issue asks: no `MESHINIT_*` chain survives in legacy (either family),
/// and since legacy then holds no rule, auto agrees with nft.
#[test]
fn switching_from_legacy_to_nft_leaves_no_meshinit_chain_in_legacy() {
    let pods = Pods::new("switching_legacy_to_nft");
    pods.pod
        .meshinit_on(Backend::IptablesLegacy, &["apply"])
        .expect_ok();
    pods.pod.meshinit_on(Backend::Nft, &["apply"]).expect_ok();
    for family in Family::ALL {
        let save = pods.pod.nat_save(Backend::IptablesLegacy, family);
        assert!(
            !save.contains("MESHINIT_"),
            "{family:?}: legacy still holds ours\n{save}"
        );
    }
    assert!(pods.pod.meshinit_table().is_some());
    assert_eq!(landings(&pods), REDIRECTED);
    let run = pods.pod.meshinit(&["check"]).expect_code(0);
    assert!(
        run.stdout.contains("(nft)"),
        "auto should now pick nft\n{run}"
    );
}

#[test]
fn iptables_mode_is_an_alias_of_backend() {
    let pods = Pods::new("iptables_mode_alias");
    pods.pod
        .meshinit(&["apply", "--iptables-mode=legacy"])
        .expect_ok();
    assert_only_in(&pods, Backend::IptablesLegacy, "--iptables-mode=legacy");
    pods.pod
        .meshinit(&["apply", "--iptables-mode", "nft"])
        .expect_ok();
    assert_only_in(&pods, Backend::IptablesNft, "--iptables-mode nft");
    pods.pod
        .meshinit(&["check", "--iptables-mode=nft"])
        .expect_code(0);
}

/// Our chain created by hand in another backend (what an old run, or an init tool that
/// crashed half-way, would leave) is drift; the next apply removes it.
#[test]
fn check_reports_stale_rules_of_ours_in_another_backend() {
    for (backend, stale) in [
        (Backend::Nft, Backend::IptablesLegacy),
        (Backend::Nft, Backend::IptablesNft),
        (Backend::IptablesNft, Backend::IptablesLegacy),
        (Backend::IptablesLegacy, Backend::IptablesNft),
    ] {
        let pods = Pods::new(&format!(
            "check_stale_{}_in_{}",
            backend.name(),
            stale.name()
        ));
        pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
        pods.pod.meshinit_on(backend, &["check"]).expect_code(0);
        pods.pod
            .exec(&[
                &stale.tool(Family::V4, ""),
                "-t",
                "nat",
                "-N",
                "MESHINIT_OUTPUT",
            ])
            .expect_ok();
        let drift = pods.pod.meshinit_on(backend, &["check"]).expect_code(1);
        assert!(
            drift.stdout.contains(stale.name()),
            "check --backend {backend} should name {stale}\n{drift}"
        );
        pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
        assert_only_in(
            &pods,
            backend,
            &format!("apply after a stale chain in {stale}"),
        );
        pods.pod.meshinit_on(backend, &["check"]).expect_code(0);
    }
}

/// The nat tables of `backend`, both families, as `*-save -t nat` prints them (normalised).
fn nat_tables(pods: &Pods, backend: Backend) -> Vec<String> {
    Family::ALL
        .iter()
        .map(|&family| pods.pod.nat_save(backend, family))
        .collect()
}

/// When one family's restore fails and the other's succeeds (the two run at the same
/// time, so either may be the one that commits), apply exits 1 with the tool's message
/// and the rules are what they were: nothing (from an empty namespace), the older
/// ruleset of the same backend, or the older ruleset of another backend (a failed switch
/// removes nothing), which still work.
fn one_family_failing_rolls_back_the_other(backend: Backend, failing: Family) {
    let (name, tools) = match failing {
        Family::V4 => ("ip4", ["iptables-legacy-restore", "iptables-nft-restore"]),
        Family::V6 => ("ip6", ["ip6tables-legacy-restore", "ip6tables-nft-restore"]),
    };
    let failing = FaultyTools::new(
        &format!("{name}-restore-fails-{}", backend.name()),
        &tools,
        fault::FAILS,
    );
    let older = "--outbound-ports-to-ignore=5555";
    let newer = [
        "--outbound-ports-to-ignore=6666",
        "--inbound-ports-to-ignore=7777",
    ];
    for installed in [None, Some(backend), Some(Backend::Nft)] {
        let context = format!("{backend}, installed before: {installed:?}");
        let pods = Pods::new(&backend.test_name(&format!("{name}_failure_rolls_back")));
        if let Some(earlier) = installed {
            pods.pod.meshinit_on(earlier, &["apply", older]).expect_ok();
        }
        let before = (nat_tables(&pods, backend), pods.pod.meshinit_table());
        let flag = backend.flag();
        let run = failing.meshinit(&pods.pod, &[&["apply", &flag][..], &newer].concat());
        assert_eq!(
            run.code,
            Some(1),
            "{context}: a failed apply must exit 1\n{run}"
        );
        assert!(
            run.stderr.contains("injected failure"),
            "{context}: the tool's message\n{run}"
        );
        assert_eq!(
            (nat_tables(&pods, backend), pods.pod.meshinit_table()),
            before,
            "{context}: the family that committed was not rolled back\n{run}"
        );
        let Some(earlier) = installed else {
            for other in Backend::ALL {
                assert_eq!(
                    pods.pod.ours_in(other),
                    Vec::<String>::new(),
                    "{context}: {other}"
                );
            }
            continue;
        };
        assert_only_in(&pods, earlier, &context);
        pods.pod
            .meshinit_on(earlier, &["check", older])
            .expect_code(0);
        assert_eq!(landings(&pods), REDIRECTED, "{context}");
        // The older skip port is still skipped, the newer one not yet.
        for family in Family::ALL {
            for (port, want) in [(5555, APP), (6666, OUT_PROXY)] {
                let proxy = pods.pod.listen(OUT_PROXY, family.any_port(4140));
                let app = pods.peer.listen(APP, family.any_port(port));
                let to = SocketAddr::new(family.peer(), port);
                let (on, _) = pods.pod.connect_and_land(to, &[&proxy, &app]);
                assert_eq!(on, want, "{context}: pod -> {to}");
            }
        }
    }
}

#[test]
fn iptables_nft_ipv6_failure_rolls_back_ipv4() {
    one_family_failing_rolls_back_the_other(Backend::IptablesNft, Family::V6);
}

#[test]
fn iptables_legacy_ipv6_failure_rolls_back_ipv4() {
    one_family_failing_rolls_back_the_other(Backend::IptablesLegacy, Family::V6);
}

#[test]
fn iptables_nft_ipv4_failure_rolls_back_ipv6() {
    one_family_failing_rolls_back_the_other(Backend::IptablesNft, Family::V4);
}

#[test]
fn iptables_legacy_ipv4_failure_rolls_back_ipv6() {
    one_family_failing_rolls_back_the_other(Backend::IptablesLegacy, Family::V4);
}
