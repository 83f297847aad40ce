//! iptables-restore text, one document per family.
//!
//! Our rules live in two chains of table nat, `MESHINIT_INBOUND` (jumped to
//! from PREROUTING) and `MESHINIT_OUTPUT` (from OUTPUT). A document declares
//! both chains (which creates or empties them under `--noflush`), fills them,
//! and appends the jumps only when the caller says they are missing: a restore
//! cannot test for a rule, and a second jump would run our chain twice.
//! One `COMMIT` makes the document one transaction.
//!
//! In `tproxy` mode the inbound chain and `MESHINIT_REPLIES` (from OUTPUT)
//! live in table mangle instead, written as a `*mangle` section before the
//! `*nat` one; [`Installed`] reads and rewrites one table at a time.

use std::fmt::Write;

use crate::ports::PortRange;
use crate::ruleset::{Action, ChainKind, Direction, Family, Match, Rule, Ruleset, Side};

pub const INBOUND_CHAIN: &str = "MESHINIT_INBOUND";
pub const OUTBOUND_CHAIN: &str = "MESHINIT_OUTPUT";
pub const REPLIES_CHAIN: &str = "MESHINIT_REPLIES";

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
        Direction::Replies => REPLIES_CHAIN,
    }
}

/// The built-in chain that jumps to ours.
pub fn parent_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "PREROUTING",
        Direction::Outbound | Direction::Replies => "OUTPUT",
    }
}

/// The jump rule's arguments, as iptables-save prints them after `-A PARENT`.
pub fn jump_rule(direction: Direction) -> String {
    format!(
        "-m comment --comment \"meshinit: {} TCP goes through our chain\" -j {}",
        match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Replies => "transparent reply",
        },
        chain_name(direction)
    )
}

/// The `-A MESHINIT_*` lines for `ruleset` in one family, in order.
pub fn chain_rules(ruleset: &Ruleset, family: Family) -> Vec<String> {
    ruleset
        .chains()
        .into_iter()
        .flat_map(|chain| chain_lines(chain, family))
        .collect()
}

/// The restore document installing `ruleset` for one family.
///
/// Declaring a chain under `--noflush` creates it, or empties it when it
/// exists, so a re-run never fails with "chain already exists".
pub fn restore_text(ruleset: &Ruleset, family: Family, jumps: Jumps) -> String {
    let mut out = String::new();
    // The mangle section (`tproxy` mode) always jumps: it is only rendered.
    let mangle: Vec<_> = ruleset
        .chains()
        .into_iter()
        .filter(|chain| chain.kind == ChainKind::Mangle)
        .collect();
    if !mangle.is_empty() {
        out.push_str("*mangle\n");
        for chain in &mangle {
            let _ = writeln!(out, ":{} - [0:0]", chain_name(chain.direction));
        }
        for chain in &mangle {
            for line in chain_lines(chain, family) {
                let _ = writeln!(out, "{line}");
            }
        }
        for chain in &mangle {
            let _ = writeln!(
                out,
                "-A {} {}",
                parent_chain(chain.direction),
                jump_rule(chain.direction)
            );
        }
        out.push_str("COMMIT\n");
    }
    out.push_str("*nat\n");
    let nat: Vec<_> = ruleset
        .chains()
        .into_iter()
        .filter(|chain| chain.kind == ChainKind::Nat)
        .collect();
    for chain in &nat {
        let _ = writeln!(out, ":{} - [0:0]", chain_name(chain.direction));
    }
    for chain in &nat {
        for line in chain_lines(chain, family) {
            let _ = writeln!(out, "{line}");
        }
    }
    for (direction, wanted) in [
        (Direction::Inbound, jumps.prerouting),
        (Direction::Outbound, jumps.output),
    ] {
        if wanted && nat.iter().any(|chain| chain.direction == direction) {
            let _ = writeln!(
                out,
                "-A {} {}",
                parent_chain(direction),
                jump_rule(direction)
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The `-A` lines of one chain in one family.
fn chain_lines(chain: &crate::Chain, family: Family) -> Vec<String> {
    let name = chain_name(chain.direction);
    chain
        .rules
        .iter()
        .flat_map(|rule| rule_lines(rule, family))
        .map(|line| format!("-A {name} {line}"))
        .collect()
}

/// A table our chains live in: nat (`redirect` mode, and outbound in both
/// modes) or mangle (inbound and the replies chain in `tproxy` mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Table {
    #[default]
    Nat,
    Mangle,
}

impl Table {
    /// Both, in the order a document writes them: mangle first, so that in
    /// `tproxy` mode the TPROXY chain exists before nat stops redirecting.
    pub const ALL: [Table; 2] = [Table::Mangle, Table::Nat];

    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Mangle => "mangle",
        }
    }

    fn of(kind: ChainKind) -> Table {
        match kind {
            ChainKind::Nat => Table::Nat,
            ChainKind::Mangle => Table::Mangle,
        }
    }
}

/// The chains of `ruleset` that live in `table`.
pub fn chains_in(ruleset: &Ruleset, table: Table) -> Vec<&crate::Chain> {
    ruleset
        .chains()
        .into_iter()
        .filter(|chain| Table::of(chain.kind) == table)
        .collect()
}

/// What of ours one table of an `iptables-save` listing holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The table read.
    pub table: Table,
    /// Our chains that exist.
    pub chains: Vec<String>,
    /// The `-A` lines of our chains, verbatim.
    pub rules: Vec<String>,
    /// The `-A PREROUTING|OUTPUT ... -j MESHINIT_*` lines, verbatim.
    pub jump_lines: Vec<String>,
}

const OUR_CHAINS: [&str; 3] = [INBOUND_CHAIN, OUTBOUND_CHAIN, REPLIES_CHAIN];

fn is_ours(chain: &str) -> bool {
    OUR_CHAINS.contains(&chain)
}

/// The chain a jump line jumps to, if any.
fn jump_target(tokens: &[String]) -> Option<&str> {
    tokens
        .windows(2)
        .find(|w| w[0] == "-j")
        .map(|w| w[1].as_str())
}

impl Installed {
    /// Reads the nat table of an `iptables-save` listing.
    pub fn parse(save: &str) -> Installed {
        Installed::parse_table(save, Table::Nat)
    }

    /// Reads `table` of an `iptables-save` listing.
    pub fn parse_table(save: &str, table: Table) -> Installed {
        let mut installed = Installed {
            table,
            ..Installed::default()
        };
        let mut in_table = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_table = name == table.name();
                continue;
            }
            if !in_table {
                continue;
            }
            if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split_whitespace().next().unwrap_or_default();
                if is_ours(name) {
                    installed.chains.push(name.to_string());
                }
                continue;
            }
            let tokens = tokens(line);
            if tokens.len() < 2 || tokens[0] != "-A" {
                continue;
            }
            if is_ours(&tokens[1]) {
                installed.rules.push(line.to_string());
            } else if jump_target(&tokens).is_some_and(is_ours) {
                installed.jump_lines.push(line.to_string());
            }
        }
        installed
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jump_lines.is_empty()
    }

    /// How many jumps go from the parent chain of `direction` into ours.
    fn jump_count(&self, direction: Direction) -> usize {
        self.jump_lines
            .iter()
            .filter(|line| {
                let t = tokens(line);
                t[1] == parent_chain(direction) && jump_target(&t) == Some(chain_name(direction))
            })
            .count()
    }

    /// Which jumps into our nat chains exist.
    pub fn jumps(&self) -> Jumps {
        Jumps {
            prerouting: self.jump_count(Direction::Inbound) > 0,
            output: self.jump_count(Direction::Outbound) > 0,
        }
    }

    /// The restore document that removes everything of ours listed here:
    /// every jump into our chains (whatever its comment), then the chains.
    pub fn cleanup_text(&self) -> String {
        let mut out = format!("*{}\n", self.table.name());
        for line in &self.jump_lines {
            let _ = writeln!(out, "-D{}", &line[2..]);
        }
        for chain in &self.chains {
            let _ = writeln!(out, ":{chain} - [0:0]\n-X {chain}");
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Jump lines beyond the first one from the right parent into each chain
    /// `expected` in this table: a second jump would run our chain twice, a
    /// jump from elsewhere or into a chain this table should not hold is not
    /// ours to keep. Apply deletes them.
    fn surplus_jumps(&self, expected: &[&crate::Chain]) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        let mut surplus = Vec::new();
        for line in &self.jump_lines {
            let t = tokens(line);
            let keep = expected.iter().any(|chain| {
                let name = chain_name(chain.direction);
                t[1] == parent_chain(chain.direction)
                    && jump_target(&t) == Some(name)
                    && !seen.contains(&name)
            });
            if keep {
                if let Some(target) = OUR_CHAINS.iter().find(|c| jump_target(&t) == Some(**c)) {
                    seen.push(target);
                }
            } else {
                surplus.push(line.as_str());
            }
        }
        surplus
    }

    /// The restore document that turns this table into what `ruleset` wants
    /// of it: its chains refilled, missing jumps added, surplus jumps deleted,
    /// and chains of ours it should not hold (the other mode's) removed.
    pub fn apply_text(&self, ruleset: &Ruleset, family: Family) -> String {
        let expected = chains_in(ruleset, self.table);
        let mut out = format!("*{}\n", self.table.name());
        for chain in &expected {
            let _ = writeln!(out, ":{} - [0:0]", chain_name(chain.direction));
        }
        for chain in &expected {
            for line in chain_lines(chain, family) {
                let _ = writeln!(out, "{line}");
            }
        }
        for chain in &expected {
            if self.jump_count(chain.direction) == 0 {
                let _ = writeln!(
                    out,
                    "-A {} {}",
                    parent_chain(chain.direction),
                    jump_rule(chain.direction)
                );
            }
        }
        for line in self.surplus_jumps(&expected) {
            let _ = writeln!(out, "-D{}", &line[2..]);
        }
        for chain in self.stale(&expected) {
            let _ = writeln!(out, ":{chain} - [0:0]\n-X {chain}");
        }
        out.push_str("COMMIT\n");
        out
    }

    /// True when [`apply_text`](Self::apply_text) would leave this table exactly as
    /// it is: our chains hold the expected rules in order, each expected chain has
    /// its one jump, and nothing else of ours (another chain, another jump) is here.
    ///
    /// The same verdict as an empty [`diff`](Self::diff) without a surplus jump, in
    /// linear time: `diff` looks each rule up among all the others (quadratic, tens
    /// of milliseconds for 10,000 scattered skip ports), fine for `check` but not
    /// for every apply.
    pub fn is_exactly(&self, ruleset: &Ruleset, family: Family) -> bool {
        let expected = chains_in(ruleset, self.table);
        let chains_match = self.chains.len() == expected.len()
            && expected
                .iter()
                .all(|chain| self.chains.iter().any(|c| c == chain_name(chain.direction)));
        if !chains_match
            || expected
                .iter()
                .any(|chain| self.jump_count(chain.direction) != 1)
            || !self.surplus_jumps(&expected).is_empty()
        {
            return false;
        }
        let mut lines = expected.iter().flat_map(|chain| chain_lines(chain, family));
        let mut installed = self.rules.iter();
        loop {
            match (lines.next(), installed.next()) {
                (None, None) => return true,
                (Some(want), Some(have)) if tokens(&want) == tokens(have) => {}
                _ => return false,
            }
        }
    }

    /// Our chains in this table that `expected` does not hold.
    fn stale<'s>(&'s self, expected: &[&crate::Chain]) -> Vec<&'s str> {
        self.chains
            .iter()
            .filter(|name| !expected.iter().any(|c| chain_name(c.direction) == *name))
            .map(String::as_str)
            .collect()
    }

    /// The restore document that puts this state back, given the state `now`
    /// left by [`apply_text`](Self::apply_text) or
    /// [`cleanup_text`](Self::cleanup_text) (used when a later family fails,
    /// so no family is left half-applied).
    pub fn rollback_text(&self, now: &Installed) -> String {
        let mut out = format!("*{}\n", self.table.name());
        let present =
            |chain: &str, installed: &Installed| installed.chains.iter().any(|c| c == chain);
        let touched: Vec<&str> = OUR_CHAINS
            .into_iter()
            .filter(|chain| present(chain, self) || present(chain, now))
            .collect();
        for chain in &touched {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for line in &self.rules {
            let _ = writeln!(out, "{line}");
        }
        // The jumps that exist now go, and the ones that existed before come
        // back, verbatim.
        for line in &now.jump_lines {
            let _ = writeln!(out, "-D{}", &line[2..]);
        }
        for line in &self.jump_lines {
            let _ = writeln!(out, "{line}");
        }
        for chain in &touched {
            if !present(chain, self) {
                let _ = writeln!(out, "-X {chain}");
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Differences from what `ruleset` expects of this table; empty when equal.
    ///
    /// Lines are compared as argument lists, because iptables-save drops the
    /// quotes around one-word comments.
    pub fn diff(&self, ruleset: &Ruleset, family: Family) -> Vec<String> {
        let expected_chains = chains_in(ruleset, self.table);
        let mut differences = Vec::new();
        for chain in &expected_chains {
            let name = chain_name(chain.direction);
            if !self.chains.iter().any(|c| c == name) {
                differences.push(format!("chain {name} missing"));
            }
        }
        for chain in self.stale(&expected_chains) {
            differences.push(format!(
                "chain {chain} in table {} not expected",
                self.table.name()
            ));
        }
        let expected_lines: Vec<String> = expected_chains
            .iter()
            .flat_map(|chain| chain_lines(chain, family))
            .collect();
        let expected: Vec<Vec<String>> = expected_lines.iter().map(|l| tokens(l)).collect();
        let installed: Vec<Vec<String>> = self.rules.iter().map(|l| tokens(l)).collect();
        for (line, t) in expected_lines.iter().zip(&expected) {
            if !installed.contains(t) {
                differences.push(format!("rule missing: {line}"));
            }
        }
        for (line, t) in self.rules.iter().zip(&installed) {
            if !expected.contains(t) {
                differences.push(format!("rule not expected: {line}"));
            }
        }
        if differences.is_empty() && expected != installed {
            differences.push("rules are installed in a different order".to_string());
        }
        for chain in &expected_chains {
            let count = self.jump_count(chain.direction);
            if count != 1 {
                differences.push(format!(
                    "{count} jumps from {} to {} (expected exactly 1)",
                    parent_chain(chain.direction),
                    chain_name(chain.direction)
                ));
            }
        }
        differences
    }
}

/// Splits an iptables line into arguments the way the shell would
/// (double quotes group words; backslash escapes the next character).
pub fn tokens(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut started, mut chars) = (false, false, line.chars());
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    tokens.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        tokens.push(current);
    }
    tokens
}

/// The iptables lines for one model rule in one family; empty when the rule
/// does not apply to this family (IPv6-only rules in IPv4, and the reverse).
fn rule_lines(rule: &Rule, family: Family) -> Vec<String> {
    let target = match rule.action {
        Action::Return => "-j RETURN".to_string(),
        Action::Redirect(port) => format!("-j REDIRECT --to-ports {port}"),
        // New connections only: iptables' TPROXY drops packets of sockets that are not
        // transparent, such as the replies to the pod's own connections.
        // Written the way iptables-save prints it (with the `--on-ip` it adds), so
        // that `check` compares equal.
        Action::Tproxy { port, mark } => format!(
            "-m conntrack --ctstate NEW -j TPROXY --on-port {port} --on-ip {} --tproxy-mark {mark:#x}/0xffffffff",
            match family {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            }
        ),
        Action::SetCtMark(mark) => format!("-j CONNMARK --set-xmark {mark:#x}/0xffffffff"),
        Action::RestoreMark => {
            "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff".to_string()
        }
        // The TPROXY target drops what finds no socket itself, and REJECT is not
        // valid in PREROUTING.
        Action::Reject => return vec![],
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
            nets.iter()
                .map(|net| line(format!("{flag} {net}")))
                .collect()
        }
        Match::Uid(uid) => vec![line(format!("-m owner --uid-owner {uid}"))],
        Match::Gid(gid) => vec![line(format!("-m owner --gid-owner {gid}"))],
        Match::OutLoopback => vec![line("-o lo".into())],
        Match::DstNotLocal => vec![line("-m addrtype ! --dst-type LOCAL".into())],
        Match::DstLoopback(net_family) if *net_family == family => {
            vec![line(format!("-d {}", super::loopback_net(family)))]
        }
        Match::DstLoopback(_) => vec![],
        Match::InLoopback => vec![line("-i lo".into())],
        Match::TransparentHop => vec![line("-i lo -m addrtype ! --src-type LOCAL".into())],
        Match::CtMark(mark) => vec![line(format!("-m connmark --mark {mark:#x}"))],
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
