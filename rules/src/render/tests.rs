//! Snapshot tests of the three renderers for named configurations, and
//! properties of the output.

use proptest::prelude::*;

use crate::{
    iptables, nft_json, nft_text, Family, Jumps, Match, PortRange, PortSet, Ruleset, Spec,
};

/// The named configurations every renderer is snapshotted for.
fn configurations() -> Vec<(&'static str, Spec)> {
    let d = Spec::default;
    vec![
        ("defaults", d()),
        (
            "many_ports_and_ranges",
            Spec {
                inbound_ports_to_ignore: "4190,4191,22,8000-8100,9000-9010,25,26,27"
                    .parse()
                    .unwrap(),
                outbound_ports_to_ignore: (1..=40)
                    .map(|i| (i * 3).to_string())
                    .chain(["5000-5100".to_string(), "6000-6010".to_string()])
                    .collect::<Vec<_>>()
                    .join(",")
                    .parse()
                    .unwrap(),
                ..d()
            },
        ),
        (
            "uid_and_gid",
            Spec {
                proxy_uid: Some(2102),
                proxy_gid: Some(2103),
                ..d()
            },
        ),
        (
            "v6_subnets",
            Spec {
                inbound_subnets_to_ignore: "198.18.0.0/24,fd00:18::/64,fd00:99::1".parse().unwrap(),
                outbound_subnets_to_ignore: "198.19.0.0/16,fd00:18::/64".parse().unwrap(),
                ..d()
            },
        ),
        (
            "ports_to_redirect",
            Spec {
                ports_to_redirect: "8080,9000-9010".parse().unwrap(),
                ..d()
            },
        ),
        (
            "ipv6_off",
            Spec {
                ipv6: false,
                outbound_subnets_to_ignore: "198.19.0.0/16,fd00:18::/64".parse().unwrap(),
                ..d()
            },
        ),
        (
            "tproxy",
            Spec {
                mode: crate::Mode::Tproxy(crate::Tproxy::DEFAULT),
                inbound_subnets_to_ignore: "198.18.0.0/24,fd00:18::/64".parse().unwrap(),
                ports_to_redirect: "8080,9000-9010".parse().unwrap(),
                ..d()
            },
        ),
    ]
}

#[test]
fn nft_text_snapshots() {
    for (name, spec) in configurations() {
        insta::assert_snapshot!(
            format!("nft_text_{name}"),
            nft_text::render(&Ruleset::from(&spec))
        );
    }
}

#[test]
fn nft_json_snapshots() {
    for (name, spec) in configurations() {
        let batch = nft_json::apply_batch(&Ruleset::from(&spec));
        let json = serde_json::to_string_pretty(&batch).unwrap();
        insta::assert_snapshot!(format!("nft_json_{name}"), json);
    }
}

#[test]
fn iptables_snapshots() {
    for (name, spec) in configurations() {
        let rules = Ruleset::from(&spec);
        let v4 = iptables::restore_text(&rules, Family::V4, Jumps::BOTH);
        let v6 = iptables::restore_text(&rules, Family::V6, Jumps::NONE);
        insta::assert_snapshot!(format!("iptables_{name}"), format!("# iptables-restore --noflush\n{v4}# ip6tables-restore --noflush (jumps already present)\n{v6}"));
    }
}

#[test]
fn installed_listing_equal_to_expected_has_no_diff() {
    // What `nft -j list table inet meshinit` printed for the defaults (nft 1.0.6),
    // with the handles nft adds; they must be ignored.
    let rules = Ruleset::from(&Spec::default());
    let mut listing = vec![
        serde_json::json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
    ];
    listing.push(serde_json::json!({"table": {"family": "inet", "name": "meshinit", "handle": 7}}));
    for (i, object) in nft_json::objects(&rules).into_iter().enumerate() {
        let mut value = serde_json::to_value(&object).unwrap();
        let inner = value.as_object_mut().unwrap().values_mut().next().unwrap();
        inner
            .as_object_mut()
            .unwrap()
            .insert("handle".into(), (i + 1).into());
        listing.push(value);
    }
    let text = serde_json::json!({ "nftables": listing }).to_string();
    assert_eq!(nft_json::diff(&rules, &text).unwrap(), Vec::<String>::new());

    // The same listing compared with other flags reports what differs.
    let other = Ruleset::from(&Spec {
        outbound_ports_to_ignore: "5555".parse().unwrap(),
        ..Spec::default()
    });
    let differences = nft_json::diff(&other, &text).unwrap();
    assert!(
        differences
            .iter()
            .any(|d| d == "set outbound_ports_to_ignore (1 element): missing"),
        "{differences:?}"
    );
}

proptest! {
    #[test]
    fn rendering_is_deterministic(ports in proptest::collection::vec(1u16..=65535, 0..100)) {
        let spec = Spec {
            outbound_ports_to_ignore: PortSet::new(ports.iter().map(|&p| PortRange::single(p))),
            ..Spec::default()
        };
        let a = Ruleset::from(&spec);
        let b = Ruleset::from(&spec.clone());
        prop_assert_eq!(nft_text::render(&a), nft_text::render(&b));
        prop_assert_eq!(
            serde_json::to_string(&nft_json::apply_batch(&a)).unwrap(),
            serde_json::to_string(&nft_json::apply_batch(&b)).unwrap()
        );
        prop_assert_eq!(
            iptables::restore_text(&a, Family::V4, Jumps::BOTH),
            iptables::restore_text(&b, Family::V4, Jumps::BOTH)
        );
    }

    #[test]
    fn multiport_chunks_hold_at_most_15_ports_and_cover_all(
        items in proptest::collection::vec((1u16..=65535, 0u16..5), 0..200)
    ) {
        let set = PortSet::new(items.iter().map(|&(lo, len)| PortRange { lo, hi: lo.saturating_add(len) }));
        let chunks = iptables::multiport_chunks(set.ranges());
        let mut covered = Vec::new();
        for chunk in &chunks {
            let mut slots = 0;
            for entry in chunk.split(',') {
                let range = match entry.split_once(':') {
                    Some((lo, hi)) => { slots += 2; PortRange { lo: lo.parse().unwrap(), hi: hi.parse().unwrap() } }
                    None => { slots += 1; PortRange::single(entry.parse().unwrap()) }
                };
                covered.push(range);
            }
            prop_assert!(slots <= iptables::MULTIPORT_MAX, "{} slots in {}", slots, chunk);
        }
        prop_assert_eq!(PortSet::new(covered), set);
    }
}

/// An `iptables-save -t nat` listing with our chains, our jump, a second
/// (hand-added) jump and a foreign rule.
const SAVED: &str = r#"# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MESHINIT_INBOUND - [0:0]
:MESHINIT_OUTPUT - [0:0]
:FOREIGN - [0:0]
-A PREROUTING -m comment --comment "meshinit: inbound TCP goes through our chain" -j MESHINIT_INBOUND
-A OUTPUT -m comment --comment "meshinit: outbound TCP goes through our chain" -j MESHINIT_OUTPUT
-A OUTPUT -j MESHINIT_OUTPUT
-A OUTPUT -p tcp --dport 1 -j FOREIGN
-A MESHINIT_OUTPUT -o lo -m comment --comment old -j RETURN
COMMIT
"#;

#[test]
fn installed_reads_only_ours() {
    let installed = iptables::Installed::parse(SAVED);
    assert_eq!(installed.chains, ["MESHINIT_INBOUND", "MESHINIT_OUTPUT"]);
    assert_eq!(
        installed.rules,
        ["-A MESHINIT_OUTPUT -o lo -m comment --comment old -j RETURN"]
    );
    assert_eq!(installed.jump_lines.len(), 3);
    assert_eq!(installed.jumps(), Jumps::BOTH);
}

#[test]
fn apply_text_deletes_surplus_jumps_and_adds_none_that_exist() {
    let installed = iptables::Installed::parse(SAVED);
    let text = installed.apply_text(&Ruleset::from(&Spec::default()), Family::V4);
    assert!(text.contains("\n-D OUTPUT -j MESHINIT_OUTPUT\n"), "{text}");
    assert!(!text.contains("-A OUTPUT"), "{text}");
    assert!(!text.contains("-A PREROUTING"), "{text}");
    assert!(!text.contains("FOREIGN"), "{text}");
    assert!(text.ends_with("COMMIT\n"));
    assert_eq!(text.matches("COMMIT").count(), 1);
}

#[test]
fn rollback_text_restores_rules_and_jumps_verbatim() {
    let before = iptables::Installed::parse(SAVED);
    let now = iptables::Installed::parse(&iptables::restore_text(
        &Ruleset::from(&Spec::default()),
        Family::V4,
        Jumps::BOTH,
    ));
    let text = before.rollback_text(&now);
    assert!(
        text.contains("-A MESHINIT_OUTPUT -o lo -m comment --comment old -j RETURN"),
        "{text}"
    );
    assert!(text.contains("\n-A OUTPUT -j MESHINIT_OUTPUT\n"), "{text}");
    assert_eq!(text.matches("-D PREROUTING").count(), 1, "{text}");
    assert!(!text.contains("-X"), "chains existed before: {text}");

    let empty = iptables::Installed::default();
    let text = empty.rollback_text(&now);
    assert!(
        text.contains("-X MESHINIT_INBOUND") && text.contains("-X MESHINIT_OUTPUT"),
        "{text}"
    );
}

#[test]
fn iptables_diff_counts_jumps_and_compares_lines_as_arguments() {
    let rules = Ruleset::from(&Spec::default());
    // iptables-save prints one-word comments unquoted: still equal.
    let text = iptables::restore_text(&rules, Family::V4, Jumps::BOTH);
    let installed = iptables::Installed::parse(&text);
    assert_eq!(installed.diff(&rules, Family::V4), Vec::<String>::new());
    let differences = iptables::Installed::parse(SAVED).diff(&rules, Family::V4);
    assert!(
        differences
            .iter()
            .any(|d| d.contains("2 jumps from OUTPUT")),
        "{differences:?}"
    );
    assert!(
        differences.iter().any(|d| d.starts_with("rule missing")),
        "{differences:?}"
    );
}

/// What real tools printed after `meshinit apply` (nft 1.0.6, iptables 1.8.9), kept in the
/// fuzz corpora: reading them back must find no drift. This pins the form nft and
/// iptables-save print our matches in (`fib daddr type != local`, the loopback prefix,
/// `-m addrtype ! --dst-type LOCAL`, `-d ::1/128`), which `meshinit check` relies on.
#[test]
fn real_listings_after_apply_have_no_diff() {
    let defaults = Ruleset::from(&Spec::default());
    let listing = include_str!("../../../fuzz/corpus/nft_listing/defaults.json");
    assert_eq!(
        nft_json::diff(&defaults, listing).unwrap(),
        Vec::<String>::new()
    );
    let v6_subnets = Ruleset::from(&Spec {
        inbound_subnets_to_ignore: "198.18.0.0/24,fd00:18::/64,fd00:99::1".parse().unwrap(),
        outbound_subnets_to_ignore: "198.19.0.0/16,fd00:18::/64".parse().unwrap(),
        ..Spec::default()
    });
    let listing = include_str!("../../../fuzz/corpus/nft_listing/v6_subnets.json");
    assert_eq!(
        nft_json::diff(&v6_subnets, listing).unwrap(),
        Vec::<String>::new()
    );
    // Applied with `--subnets-to-ignore ::ffff:198.18.0.0/111`: IPv4 rules for 198.18.0.0/15.
    let mapped = Ruleset::from(&Spec {
        inbound_subnets_to_ignore: "::ffff:198.18.0.0/111".parse().unwrap(),
        outbound_subnets_to_ignore: "::ffff:198.18.0.0/111".parse().unwrap(),
        ..Spec::default()
    });
    let saved = include_str!("../../../fuzz/corpus/iptables_save/local_only");
    let (v4, v6) = saved.split_at(saved.find("COMMIT\n").unwrap() + "COMMIT\n".len());
    for (family, save) in [(Family::V4, v4), (Family::V6, v6)] {
        let installed = iptables::Installed::parse(save);
        assert_eq!(
            installed.diff(&mapped, family),
            Vec::<String>::new(),
            "{save}"
        );
        assert!(installed.rules[0].contains("-m addrtype ! --dst-type LOCAL"));
        assert!(installed.is_exactly(&mapped, family), "{save}");
    }
    // `tproxy` mode (the `tproxy` configuration above): the mark, `ct mark`,
    // `tproxy to` and `fib saddr` forms nft prints read back as ours.
    let tproxy = configurations()
        .into_iter()
        .find(|(name, _)| *name == "tproxy")
        .unwrap()
        .1;
    let listing = include_str!("../../../fuzz/corpus/nft_listing/tproxy.json");
    assert_eq!(
        nft_json::diff(&Ruleset::from(&tproxy), listing).unwrap(),
        Vec::<String>::new()
    );
    // ... and are drift for the same flags in redirect mode.
    let redirect = Spec {
        mode: crate::Mode::Redirect,
        ..tproxy
    };
    let differences = nft_json::diff(&Ruleset::from(&redirect), listing).unwrap();
    assert!(
        differences.iter().any(|d| d.contains("chain replies")),
        "{differences:?}"
    );
    // Without the local-only rules the same listings are drift.
    let mut old = defaults.clone();
    old.inbound
        .rules
        .retain(|rule| !matches!(rule.when, Match::DstNotLocal | Match::DstLoopback(_)));
    let listing = include_str!("../../../fuzz/corpus/nft_listing/defaults.json");
    let differences = nft_json::diff(&old, listing).unwrap();
    assert_eq!(differences.len(), 3, "{differences:?}");
    assert!(
        differences.iter().all(|d| d.ends_with("not expected")),
        "{differences:?}"
    );
}

/// What iptables-nft-save printed after `meshinit apply --mode tproxy` (the `tproxy`
/// configuration, iptables 1.8.9): both tables of both families read back as ours with no
/// drift, in the forms iptables-save prints (`--on-ip`, the CONNMARK masks).
#[test]
fn real_iptables_listing_in_tproxy_mode_has_no_diff_and_redirect_mode_sees_it_as_drift() {
    use crate::iptables::Table;
    let tproxy = configurations()
        .into_iter()
        .find(|(name, _)| *name == "tproxy")
        .unwrap()
        .1;
    let rules = Ruleset::from(&tproxy);
    let saved = include_str!("../../../fuzz/corpus/iptables_save/tproxy");
    let second = saved.match_indices("*mangle").nth(1).unwrap().0;
    let (v4, v6) = saved.split_at(second);
    for (family, save) in [(Family::V4, v4), (Family::V6, v6)] {
        for table in Table::ALL {
            let installed = iptables::Installed::parse_table(save, table);
            assert!(!installed.is_empty(), "{table:?}");
            assert_eq!(
                installed.diff(&rules, family),
                Vec::<String>::new(),
                "{table:?}\n{save}"
            );
            assert!(installed.is_exactly(&rules, family), "{table:?}\n{save}");
        }
        let mangle = iptables::Installed::parse_table(save, Table::Mangle);
        assert!(!mangle.is_exactly(&Ruleset::from(&Spec::default()), family));
        assert_eq!(mangle.chains, ["MESHINIT_INBOUND", "MESHINIT_REPLIES"]);
        // In redirect mode the mangle chains are the other mode's: drift, and apply
        // removes them with their jumps.
        let redirect = Ruleset::from(&Spec::default());
        let differences = mangle.diff(&redirect, family);
        assert!(
            differences
                .iter()
                .any(|d| d.contains("MESHINIT_REPLIES in table mangle not expected")),
            "{differences:?}"
        );
        let text = mangle.apply_text(&redirect, family);
        for needle in [
            "-D PREROUTING -m comment",
            "-D OUTPUT -m comment",
            "-X MESHINIT_INBOUND",
            "-X MESHINIT_REPLIES",
        ] {
            assert!(text.contains(needle), "{needle:?} missing:\n{text}");
        }
        assert!(!text.contains("-A "), "{text}");
    }
}

#[test]
fn in_tproxy_mode_the_nat_inbound_chain_of_redirect_mode_is_removed() {
    let redirect = Ruleset::from(&Spec::default());
    let nat =
        iptables::Installed::parse(&iptables::restore_text(&redirect, Family::V4, Jumps::BOTH));
    let tproxy = Ruleset::from(&Spec {
        mode: crate::Mode::Tproxy(crate::Tproxy::DEFAULT),
        ..Spec::default()
    });
    let text = nat.apply_text(&tproxy, Family::V4);
    assert!(
        text.starts_with("*nat\n:MESHINIT_OUTPUT - [0:0]\n"),
        "{text}"
    );
    assert!(text.contains("-D PREROUTING -m comment"), "{text}");
    assert!(
        text.contains(":MESHINIT_INBOUND - [0:0]\n-X MESHINIT_INBOUND\n"),
        "{text}"
    );
    assert!(!text.contains("-A MESHINIT_INBOUND"), "{text}");
    let differences = nat.diff(&tproxy, Family::V4);
    assert!(
        differences
            .iter()
            .any(|d| d.contains("MESHINIT_INBOUND in table nat not expected")),
        "{differences:?}"
    );
}

/// A re-apply writes nothing when the table is exactly what its document would leave; any
/// difference `check` reports, and a jump of ours from elsewhere (which apply deletes but
/// `check` does not count), makes it write.
#[test]
fn only_a_table_exactly_as_applied_is_left_unwritten() {
    let rules = Ruleset::from(&Spec::default());
    let applied = iptables::restore_text(&rules, Family::V4, Jumps::BOTH);
    assert!(iptables::Installed::parse(&applied).is_exactly(&rules, Family::V4));
    assert!(!iptables::Installed::parse("*nat\nCOMMIT\n").is_exactly(&rules, Family::V4));
    assert!(!iptables::Installed::parse(SAVED).is_exactly(&rules, Family::V4));
    let other = Ruleset::from(&Spec {
        outgoing_proxy_port: 4141,
        ..Spec::default()
    });
    assert!(!iptables::Installed::parse(&applied).is_exactly(&other, Family::V4));
    let tampered = [
        applied.replace("-j REDIRECT --to-ports 4140", "-j RETURN"),
        applied.replace("COMMIT", "-A MESHINIT_OUTPUT -j RETURN\nCOMMIT"),
        applied.replace("COMMIT", "-A POSTROUTING -j MESHINIT_OUTPUT\nCOMMIT"),
        applied.replace("COMMIT", ":MESHINIT_REPLIES - [0:0]\nCOMMIT"),
    ];
    for text in tampered {
        assert!(
            !iptables::Installed::parse(&text).is_exactly(&rules, Family::V4),
            "{text}"
        );
    }
    // A jump of ours from the wrong chain is not counted by `check`, but apply deletes it.
    let stray = applied.replace("COMMIT", "-A POSTROUTING -j MESHINIT_OUTPUT\nCOMMIT");
    assert!(iptables::Installed::parse(&stray)
        .diff(&rules, Family::V4)
        .is_empty());
    // A rule twice, a rule dropped, a chain missing.
    let lines: Vec<&str> = applied.lines().collect();
    let redirect = lines
        .iter()
        .position(|line| line.contains("REDIRECT --to-ports 4140"))
        .unwrap();
    let mut twice = lines.clone();
    twice.insert(redirect, lines[redirect]);
    let mut dropped = lines.clone();
    dropped.remove(redirect);
    let no_inbound: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| !line.contains("MESHINIT_INBOUND"))
        .collect();
    for text in [twice, dropped, no_inbound] {
        let text = text.join("\n");
        let installed = iptables::Installed::parse(&text);
        assert!(!installed.diff(&rules, Family::V4).is_empty(), "{text}");
        assert!(!installed.is_exactly(&rules, Family::V4), "{text}");
    }
    // Only the order of two rules changed.
    let lines: Vec<&str> = applied.lines().collect();
    let outputs: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("-A MESHINIT_OUTPUT"))
        .collect();
    let mut swapped = lines.clone();
    swapped.swap(outputs[0], outputs[1]);
    let swapped = swapped.join("\n");
    assert!(!iptables::Installed::parse(&swapped).is_exactly(&rules, Family::V4));
}
