//! What must hold for any input to meshinit-rules' parsers and renderers.
//!
//! One function per fuzz target. The same file is compiled into
//! `rules/tests/fuzz_corpus.rs` (by `#[path]`), which replays every file of
//! `fuzz/corpus/<target>/` through these functions, so CI checks the corpora
//! with the fuzz targets' own assertions and without cargo-fuzz. That is why
//! it uses only crates meshinit-rules itself depends on.

use std::borrow::Cow;
use std::sync::OnceLock;

use meshinit_rules::iptables::{self, Installed, Jumps, MULTIPORT_MAX};
use meshinit_rules::{
    nft_json, nft_text, Family, Match, PortRange, PortSet, Ruleset, Spec, SubnetList,
};
use nftables::schema::{NfObject, Nftables};

/// `ports`: a port list parses, or is refused, consistently with its items, and
/// what it prints parses back to the same set.
pub fn ports(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(range) = text.parse::<PortRange>() {
        assert!(
            1 <= range.lo && range.lo <= range.hi,
            "{text:?} gave {range:?}"
        );
        assert_eq!(
            range.to_string().parse::<PortRange>(),
            Ok(range),
            "{text:?}"
        );
    }
    let parsed = text.parse::<PortSet>();
    // A list is valid exactly when it is blank or every item is a valid range.
    let items: Result<Vec<PortRange>, _> = text.split(',').map(str::parse::<PortRange>).collect();
    assert_eq!(
        parsed.is_ok(),
        text.trim().is_empty() || items.is_ok(),
        "{text:?}"
    );
    let Ok(set) = parsed else {
        return;
    };
    for range in items.unwrap_or_default() {
        assert!(
            set.contains(range.lo) && set.contains(range.hi),
            "{text:?} lost {range}"
        );
    }
    for range in set.ranges() {
        assert!(
            1 <= range.lo && range.lo <= range.hi,
            "{text:?} gave {range:?}"
        );
    }
    for pair in set.ranges().windows(2) {
        // Sorted, disjoint and not adjacent: otherwise they would have merged.
        assert!(
            u32::from(pair[0].hi) + 1 < u32::from(pair[1].lo),
            "{text:?} gave {set:?}"
        );
    }
    assert!(set.port_count() <= 65535);
    let shown = set.to_string();
    assert_eq!(
        shown.parse::<PortSet>().as_ref(),
        Ok(&set),
        "{text:?} printed as {shown:?}"
    );
}

/// `subnets`: a CIDR list is normalised (host bits cleared, IPv4-mapped nets made
/// IPv4, covered nets dropped, sorted) and what it prints parses back to the same list.
pub fn subnets(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(list) = text.parse::<SubnetList>() else {
        return;
    };
    for net in &list.v4 {
        assert_eq!(*net, net.trunc(), "{text:?}: host bits left in {net}");
    }
    for net in &list.v6 {
        assert_eq!(*net, net.trunc(), "{text:?}: host bits left in {net}");
        // IPv4-mapped subnets become IPv4 ones (or are refused when wider than /96):
        // kept as IPv6 they would match nothing.
        assert!(
            net.network().to_ipv4_mapped().is_none(),
            "{text:?}: IPv4-mapped {net} kept as IPv6"
        );
    }
    for pair in list.v4.windows(2) {
        assert!(
            pair[0] < pair[1] && !pair[0].contains(&pair[1]),
            "{text:?} gave {list:?}"
        );
    }
    for pair in list.v6.windows(2) {
        assert!(
            pair[0] < pair[1] && !pair[0].contains(&pair[1]),
            "{text:?} gave {list:?}"
        );
    }
    // Every item given is still covered.
    for item in text.split(',') {
        let one: SubnetList = item.parse().expect("an item of a valid list is valid");
        for net in one.iter() {
            assert!(list.contains(net.network()), "{text:?} lost {net}");
        }
    }
    let shown = list.to_string();
    assert_eq!(
        shown.parse::<SubnetList>().as_ref(),
        Ok(&list),
        "{text:?} printed as {shown:?}"
    );
    assert_eq!(list.union(&list), list);
}

/// Builds a spec from the fuzz input, one field per line, with the crate's own
/// parsers; a missing line keeps the default, an empty one means none:
///
/// ```text
/// incoming port | outgoing port | uid | gid | inbound ports to ignore |
/// outbound ports to ignore | ports to redirect | inbound subnets to ignore |
/// outbound subnets to ignore | ipv6 (true/false)
/// ```
pub fn spec_from_lines(text: &str) -> Option<Spec> {
    let mut spec = Spec::default();
    let opt_u32 = |line: &str| -> Option<Option<u32>> {
        match line.trim() {
            "" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    for (i, line) in text.lines().enumerate() {
        match i {
            0 => spec.incoming_proxy_port = line.trim().parse().ok()?,
            1 => spec.outgoing_proxy_port = line.trim().parse().ok()?,
            2 => spec.proxy_uid = opt_u32(line)?,
            3 => spec.proxy_gid = opt_u32(line)?,
            4 => spec.inbound_ports_to_ignore = line.parse().ok()?,
            5 => spec.outbound_ports_to_ignore = line.parse().ok()?,
            6 => spec.ports_to_redirect = line.parse().ok()?,
            7 => spec.inbound_subnets_to_ignore = line.parse().ok()?,
            8 => spec.outbound_subnets_to_ignore = line.parse().ok()?,
            9 => spec.ipv6 = line.trim().parse().ok()?,
            _ => return None,
        }
    }
    spec.validate().ok()
}

/// The listing `nft -j list table inet meshinit` prints for `ruleset` (without
/// handles and metainfo, which the comparison ignores).
fn listing(ruleset: &Ruleset) -> String {
    let objects: Vec<NfObject<'static>> = nft_json::objects(ruleset)
        .into_iter()
        .map(NfObject::ListObject)
        .collect();
    serde_json::to_string(&Nftables {
        objects: Cow::Owned(objects),
    })
    .expect("a listing serialises")
}

/// `ruleset`: any valid spec renders in all three formats, deterministically;
/// multiport lists respect the kernel's limit and cover exactly the set; and the
/// comparison of an installed ruleset with the expected one finds no difference
/// when the installed one is what we rendered.
pub fn ruleset(data: &[u8]) {
    let Some(spec) = std::str::from_utf8(data).ok().and_then(spec_from_lines) else {
        return;
    };
    let rules = Ruleset::from(&spec);
    assert_eq!(rules, Ruleset::from(&spec), "rendering is deterministic");

    let text = nft_text::render(&rules);
    assert!(text.contains("table inet meshinit"), "{text}");
    let batch =
        serde_json::to_string(&nft_json::apply_batch(&rules)).expect("the batch serialises");
    serde_json::from_str::<serde_json::Value>(&batch).expect("the batch is JSON");
    let differences = nft_json::diff(&rules, &listing(&rules)).expect("our own listing parses");
    assert_eq!(differences, Vec::<String>::new(), "{spec:?}");

    for chain in rules.chains() {
        for rule in &chain.rules {
            if let Match::DstPort { ports, .. } = &rule.when {
                let chunks = iptables::multiport_chunks(ports.ranges());
                let mut covered = Vec::new();
                for chunk in &chunks {
                    let items: Vec<&str> = chunk.split(',').collect();
                    let cost: usize = items
                        .iter()
                        .map(|i| if i.contains(':') { 2 } else { 1 })
                        .sum();
                    assert!(cost <= MULTIPORT_MAX, "{chunk} holds {cost} ports");
                    for item in items {
                        covered.push(
                            item.replace(':', "-")
                                .parse::<PortRange>()
                                .expect("a multiport item"),
                        );
                    }
                }
                assert_eq!(&PortSet::new(covered), ports, "multiport lists {chunks:?}");
            }
        }
    }
    let families: &[Family] = if rules.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        let restore = iptables::restore_text(&rules, family, Jumps::BOTH);
        assert!(
            restore.starts_with("*nat\n") && restore.ends_with("COMMIT\n"),
            "{restore}"
        );
        let installed = Installed::parse(&restore);
        assert_eq!(
            installed.diff(&rules, family),
            Vec::<String>::new(),
            "{restore}"
        );
        assert_eq!(installed.jumps(), Jumps::BOTH);
        // Applying over what is installed refills the chains with the same rules, and
        // adds no jump and deletes none, since exactly one of each is there.
        let again = installed.apply_text(&rules, family);
        let reapplied = Installed::parse(&again);
        assert_eq!(reapplied.rules, installed.rules, "{again}");
        assert!(
            reapplied.jump_lines.is_empty() && !again.contains("\n-D "),
            "{again}"
        );
    }
}

/// A few rulesets to compare arbitrary listings with.
fn rulesets() -> &'static [Ruleset] {
    static RULESETS: OnceLock<Vec<Ruleset>> = OnceLock::new();
    RULESETS.get_or_init(|| {
        let other = spec_from_lines("15001\n15006\n1337\n1337\n15020,15021,15090\n443\n\n10.0.0.0/8,fd00::/8\n169.254.169.254\nfalse")
            .expect("a valid spec");
        vec![Ruleset::from(&Spec::default()), Ruleset::from(&other)]
    })
}

/// `iptables_save`: reading any `iptables-save` text, and every document built
/// from what was read, never panics, and the documents are one transaction each.
pub fn iptables_save(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let installed = Installed::parse(text);
    assert_eq!(
        Installed::parse(text),
        installed,
        "parsing is deterministic"
    );
    let _ = installed.is_empty();
    let _ = installed.jumps();
    let present = installed.jumps();
    let mut documents = vec![
        installed.cleanup_text(),
        installed.rollback_text(&installed),
    ];
    for rules in rulesets() {
        for family in [Family::V4, Family::V6] {
            let _ = installed.diff(rules, family);
            let applied = installed.apply_text(rules, family);
            // Apply adds exactly the jumps that are missing.
            let added = Installed::parse(&applied);
            assert_eq!(
                added.jumps(),
                Jumps {
                    prerouting: !present.prerouting,
                    output: !present.output
                },
                "{applied}"
            );
            documents.push(installed.rollback_text(&added));
            documents.push(applied);
        }
    }
    // Each document is one transaction of table nat, whatever the listing held:
    // a line read from it cannot open another table or commit early.
    for document in documents {
        let lines: Vec<&str> = document.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"), "{document}");
        assert_eq!(lines.last(), Some(&"COMMIT"), "{document}");
        for line in &lines[1..lines.len() - 1] {
            assert!(
                !line.starts_with('*') && line.trim() != "COMMIT",
                "{line:?} in {document}"
            );
        }
    }
}

/// `nft_listing`: comparing any text with the expected table returns a JSON
/// error or a list of differences, never panics.
pub fn nft_listing(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for rules in rulesets() {
        let _ = nft_json::diff(rules, text);
    }
}
