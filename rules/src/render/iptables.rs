//! iptables-restore text, one document per family.
//!
//! Our rules live in two chains of table nat, `MESHINIT_INBOUND` (jumped to
//! from PREROUTING) and `MESHINIT_OUTPUT` (from OUTPUT). A document declares
//! both chains (which creates or empties them under `--noflush`), fills them,
//! and appends the jumps only when the caller says they are missing: a restore
//! cannot test for a rule, and a second jump would run our chain twice.
//! One `COMMIT` makes the document one transaction.

use std::fmt::Write;

use crate::ports::PortRange;
use crate::ruleset::{Action, Direction, Family, Match, Rule, Ruleset, Side};

pub const INBOUND_CHAIN: &str = "MESHINIT_INBOUND";
pub const OUTBOUND_CHAIN: &str = "MESHINIT_OUTPUT";

/// The most ports one `-m multiport` match takes; a range counts as two.
pub const MULTIPORT_MAX: usize = 15;

/// Which jumps into our chains the document must add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jumps {
    pub prerouting: bool,
    pub output: bool,
}

impl Jumps {
    pub const BOTH: Jumps = Jumps {
        prerouting: true,
        output: true,
    };
    pub const NONE: Jumps = Jumps {
        prerouting: false,
        output: false,
    };
}

pub fn chain_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => INBOUND_CHAIN,
        Direction::Outbound => OUTBOUND_CHAIN,
    }
}

/// The built-in chain that jumps to ours.
pub fn parent_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "PREROUTING",
        Direction::Outbound => "OUTPUT",
    }
}

/// The jump rule's arguments, as iptables-save prints them after `-A PARENT`.
pub fn jump_rule(direction: Direction) -> String {
    format!(
        "-m comment --comment \"meshinit: {} TCP goes through our chain\" -j {}",
        match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        },
        chain_name(direction)
    )
}

/// The restore document installing `ruleset` for one family.
pub fn restore_text(ruleset: &Ruleset, family: Family, jumps: Jumps) -> String {
    let mut out = String::from("*nat\n");
    for chain in ruleset.chains() {
        let _ = writeln!(out, ":{} - [0:0]", chain_name(chain.direction));
    }
    for chain in ruleset.chains() {
        let name = chain_name(chain.direction);
        let _ = writeln!(out, "-F {name}");
        for rule in &chain.rules {
            for line in rule_lines(rule, family) {
                let _ = writeln!(out, "-A {name} {line}");
            }
        }
    }
    for (direction, wanted) in [
        (Direction::Inbound, jumps.prerouting),
        (Direction::Outbound, jumps.output),
    ] {
        if wanted {
            let _ = writeln!(out, "-A {} {}", parent_chain(direction), jump_rule(direction));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The restore document removing our chains, given which jumps exist.
pub fn cleanup_text(jumps: Jumps, chains: bool) -> String {
    let mut out = String::from("*nat\n");
    for (direction, present) in [
        (Direction::Inbound, jumps.prerouting),
        (Direction::Outbound, jumps.output),
    ] {
        if present {
            let _ = writeln!(out, "-D {} {}", parent_chain(direction), jump_rule(direction));
        }
    }
    if chains {
        for name in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let _ = writeln!(out, ":{name} - [0:0]\n-X {name}");
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The iptables lines for one model rule in one family; empty when the rule
/// does not apply to this family (IPv6-only rules in IPv4, and the reverse).
fn rule_lines(rule: &Rule, family: Family) -> Vec<String> {
    let target = match rule.action {
        Action::Return => "-j RETURN".to_string(),
        Action::Redirect(port) => format!("-j REDIRECT --to-ports {port}"),
    };
    let comment = format!("-m comment --comment \"{}\"", rule.comment);
    let line = |matches: String| format!("{matches} {comment} {target}");
    match &rule.when {
        // The IPv6 document is not written at all when IPv6 is off.
        Match::Ipv6 => vec![],
        Match::Tcp => vec![line("-p tcp".into())],
        Match::DstPort { ports, .. } => multiport_chunks(ports.ranges())
            .into_iter()
            .map(|list| line(format!("-p tcp -m multiport --dports {list}")))
            .collect(),
        Match::Subnets {
            side,
            family: net_family,
            nets,
            ..
        } => {
            if *net_family != family {
                return vec![];
            }
            let flag = match side {
                Side::Source => "-s",
                Side::Destination => "-d",
            };
            nets.iter().map(|net| line(format!("{flag} {net}"))).collect()
        }
        Match::Uid(uid) => vec![line(format!("-m owner --uid-owner {uid}"))],
        Match::Gid(gid) => vec![line(format!("-m owner --gid-owner {gid}"))],
        Match::OutLoopback => vec![line("-o lo".into())],
    }
}

/// Splits port ranges into multiport lists of at most [`MULTIPORT_MAX`]
/// ports each, a range counting as two (that is how the kernel module
/// counts them).
pub fn multiport_chunks(ranges: &[PortRange]) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ranges {
        let cost = if range.is_single() { 1 } else { 2 };
        if used + cost > MULTIPORT_MAX {
            chunks.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(if range.is_single() {
            range.lo.to_string()
        } else {
            format!("{}:{}", range.lo, range.hi)
        });
        used += cost;
    }
    if !current.is_empty() {
        chunks.push(current.join(","));
    }
    chunks
}
