//! nft text: what `meshinit show` and `--dry-run` print.
//!
//! The output is valid `nft -f` input for the same table the JSON batch
//! installs, laid out the way `nft list table inet meshinit` prints it.

use std::fmt::Write;

use ipnet::IpNet;

use super::nft_json::TABLE;
use super::{loopback_net, nft_address, nft_chain};
use crate::ruleset::{Action, ChainKind, Direction, Family, Match, Ruleset, Side};

/// Renders the whole table.
pub fn render(ruleset: &Ruleset) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for chain in ruleset.chains() {
        for rule in &chain.rules {
            if let Some((name, kind, elements)) = set_of(&rule.when) {
                let _ = write!(
                    out,
                    "\tset {name} {{\n\t\ttype {kind}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n\n",
                    elements.join(", ")
                );
            }
        }
    }
    for (i, chain) in ruleset.chains().into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let hook = match (chain.kind, chain.direction) {
            (ChainKind::Nat, Direction::Inbound) => "nat hook prerouting priority dstnat",
            (ChainKind::Nat, _) => "nat hook output priority -100",
            (ChainKind::Mangle, Direction::Inbound) => "filter hook prerouting priority mangle",
            (ChainKind::Mangle, _) => "route hook output priority mangle",
        };
        let _ = write!(
            out,
            "\tchain {} {{\n\t\ttype {hook}; policy accept;\n",
            nft_chain(chain.direction)
        );
        for rule in &chain.rules {
            let action = match rule.action {
                Action::Return => "return".to_string(),
                Action::Redirect(port) => format!("redirect to :{port}"),
                Action::Tproxy { port, mark } => {
                    format!("ct state new tproxy to :{port} meta mark set {mark:#x} accept")
                }
                Action::Reject => "ct state new reject with tcp reset".to_string(),
                Action::SetCtMark(mark) => format!("ct mark set {mark:#x}"),
                Action::RestoreMark => "meta mark set ct mark".to_string(),
            };
            let _ = writeln!(
                out,
                "\t\t{} {action} comment \"{}\"",
                match_text(&rule.when),
                rule.comment
            );
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

fn set_of(when: &Match) -> Option<(&'static str, &'static str, Vec<String>)> {
    match when {
        Match::DstPort { set, ports } => Some((
            set,
            "inet_service",
            ports.ranges().iter().map(ToString::to_string).collect(),
        )),
        Match::Subnets {
            set, family, nets, ..
        } => {
            let kind = match family {
                Family::V4 => "ipv4_addr",
                Family::V6 => "ipv6_addr",
            };
            Some((set, kind, nets.iter().map(net_text).collect()))
        }
        _ => None,
    }
}

fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn match_text(when: &Match) -> String {
    match when {
        Match::Ipv6 => "meta nfproto ipv6".to_string(),
        Match::Tcp => "meta l4proto tcp".to_string(),
        Match::DstPort { set, .. } => format!("tcp dport @{set}"),
        Match::Subnets {
            set, side, family, ..
        } => {
            let (protocol, field) = nft_address(*family, *side);
            format!("{protocol} {field} @{set}")
        }
        Match::Uid(uid) => format!("meta skuid {uid}"),
        Match::Gid(gid) => format!("meta skgid {gid}"),
        Match::OutLoopback => "oifname \"lo\"".to_string(),
        Match::DstNotLocal => "fib daddr type != local".to_string(),
        Match::InLoopback => "iifname \"lo\"".to_string(),
        Match::TransparentHop => "iifname \"lo\" fib saddr type != local".to_string(),
        Match::CtMark(mark) => format!("ct mark {mark:#x}"),
        Match::DstLoopback(family) => {
            let (protocol, field) = nft_address(*family, Side::Destination);
            format!("{protocol} {field} {}", net_text(&loopback_net(*family)))
        }
    }
}
