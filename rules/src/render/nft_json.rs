//! nft JSON, built from the `nftables` crate's typed schema.
//!
//! [`apply_batch`] is one transaction that replaces our table: `add table`
//! (so the next command cannot fail on a fresh host), `delete table`, then the
//! whole table anew. nft applies a batch all-or-nothing, so the namespace has
//! either the old table or the new one, never a mix, and nothing outside
//! `inet meshinit` is named, so nothing else can change.

use std::borrow::Cow;
use std::collections::HashSet;

use ipnet::IpNet;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, Range, CT,
};
use nftables::schema::{
    Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{
    Mangle, Match as NftMatch, Operator, Reject, RejectType, Return, Statement, TProxy, NAT,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::{loopback_net, nft_address, nft_chain};
use crate::ports::PortSet;
use crate::ruleset::{
    Action, Chain as ModelChain, ChainKind, Direction, Family, Match, Ruleset, Side,
};

/// Our one table, `inet meshinit`: both families in one place.
pub const TABLE: &str = "meshinit";

/// Priority of the nat base chains. -100 is `dstnat`, where destination NAT
/// belongs; the output chain uses the same number.
const PRIORITY: i32 = -100;

/// Priority of the `tproxy` mode's chains: -150 is `mangle`, before
/// destination NAT and routing, where TPROXY and marks belong.
const MANGLE_PRIORITY: i32 = -150;

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

/// The batch that atomically replaces our table with `ruleset`.
pub fn apply_batch(ruleset: &Ruleset) -> Nftables<'static> {
    let mut commands = vec![
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
    ];
    commands.extend(
        objects(ruleset)
            .into_iter()
            .map(|object| NfObject::CmdObject(NfCmd::Add(object))),
    );
    Nftables {
        objects: commands.into(),
    }
}

/// The batch that removes our table, and succeeds when it is already gone.
pub fn cleanup_batch() -> Nftables<'static> {
    Nftables {
        objects: vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ]
        .into(),
    }
}

/// The sets, chains and rules of our table, in the order `nft -j list table`
/// prints them and in the form it prints them (elements sorted, single values
/// bare), so an installed table can be compared with an expected one.
pub fn objects(ruleset: &Ruleset) -> Vec<NfListObject<'static>> {
    let mut sets = Vec::new();
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for chain in ruleset.chains() {
        chains.push(NfListObject::Chain(base_chain(chain)));
        for rule in &chain.rules {
            if let Some(set) = named_set(&rule.when) {
                sets.push(NfListObject::Set(Box::new(set)));
            }
            let mut expr = matches(&rule.when);
            expr.extend(action(rule.action));
            rules.push(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: TABLE.into(),
                chain: nft_chain(chain.direction).into(),
                expr: expr.into(),
                handle: None,
                index: None,
                comment: Some(rule.comment.clone().into()),
            }));
        }
    }
    sets.into_iter().chain(chains).chain(rules).collect()
}

/// `ct state new`, in the form nft lists it.
fn ct_state_new() -> Statement<'static> {
    Statement::Match(NftMatch {
        left: ct("state"),
        right: Expression::String("new".into()),
        op: Operator::IN,
    })
}

fn mangle(key: Expression<'static>, value: Expression<'static>) -> Statement<'static> {
    Statement::Mangle(Mangle { key, value })
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

/// The statements of an action, in the order nft lists them.
fn action(action: Action) -> Vec<Statement<'static>> {
    match action {
        Action::Return => vec![Statement::Return(None::<Return>)],
        Action::Redirect(port) => vec![Statement::Redirect(Some(NAT {
            addr: None,
            family: None,
            port: Some(Expression::Number(port.into())),
            flags: None,
        }))],
        // New connections only: the rest of an intercepted connection reaches the
        // proxy's socket by its address, and replies to the pod's own connections
        // must not be touched. The mark and `accept` once the socket was found (when
        // it was not, nft skips the rest of the rule and the next one refuses the
        // connection).
        Action::Tproxy { port, mark } => vec![
            ct_state_new(),
            Statement::TProxy(TProxy {
                family: None,
                port,
                addr: None,
            }),
            mangle(meta(MetaKey::Mark), Expression::Number(mark)),
            Statement::Accept(None),
        ],
        Action::Reject => vec![
            ct_state_new(),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ],
        Action::SetCtMark(mark) => vec![mangle(ct("mark"), Expression::Number(mark))],
        Action::RestoreMark => vec![mangle(meta(MetaKey::Mark), ct("mark"))],
    }
}

/// A nat chain at dstnat; in `tproxy` mode a filter chain in prerouting and
/// a route chain in output (so a changed mark re-routes), both at mangle.
fn base_chain(chain: &ModelChain) -> Chain<'static> {
    let hook = match chain.direction {
        Direction::Inbound => NfHook::Prerouting,
        Direction::Outbound | Direction::Replies => NfHook::Output,
    };
    let (kind, prio) = match (chain.kind, chain.direction) {
        (ChainKind::Nat, _) => (NfChainType::NAT, PRIORITY),
        (ChainKind::Mangle, Direction::Inbound) => (NfChainType::Filter, MANGLE_PRIORITY),
        (ChainKind::Mangle, _) => (NfChainType::Route, MANGLE_PRIORITY),
    };
    Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: nft_chain(chain.direction).into(),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

fn named_set(when: &Match) -> Option<Set<'static>> {
    let (name, set_type, elem) = match when {
        Match::DstPort { set, ports } => (*set, SetType::InetService, port_elements(ports)),
        Match::Subnets {
            set, family, nets, ..
        } => {
            let set_type = match family {
                Family::V4 => SetType::Ipv4Addr,
                Family::V6 => SetType::Ipv6Addr,
            };
            (*set, set_type, nets.iter().map(net_element).collect())
        }
        _ => return None,
    };
    Some(Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        handle: None,
        set_type: SetTypeValue::Single(set_type),
        policy: None,
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem: Some(elem.into()),
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    })
}

fn port_elements(ports: &PortSet) -> Vec<Expression<'static>> {
    ports
        .ranges()
        .iter()
        .map(|range| {
            if range.is_single() {
                Expression::Number(range.lo.into())
            } else {
                Expression::Range(Box::new(Range {
                    range: [
                        Expression::Number(range.lo.into()),
                        Expression::Number(range.hi.into()),
                    ],
                }))
            }
        })
        .collect()
}

fn net_element(net: &IpNet) -> Expression<'static> {
    let addr = Expression::String(net.network().to_string().into());
    if net.prefix_len() == net.max_prefix_len() {
        addr
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr),
            len: net.prefix_len().into(),
        }))
    }
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(NftMatch {
        left,
        right,
        op: Operator::EQ,
    })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

fn fib_type(flag: FibFlag) -> Expression<'static> {
    Expression::Named(NamedExpression::Fib(Fib {
        result: FibResult::Type,
        flags: HashSet::from([flag]),
    }))
}

fn not_local(flag: FibFlag) -> Statement<'static> {
    Statement::Match(NftMatch {
        left: fib_type(flag),
        right: Expression::String("local".into()),
        op: Operator::NEQ,
    })
}

fn in_loopback() -> Statement<'static> {
    eq(meta(MetaKey::Iifname), Expression::String("lo".into()))
}

fn matches(when: &Match) -> Vec<Statement<'static>> {
    let statement = match when {
        Match::TransparentHop => return vec![in_loopback(), not_local(FibFlag::Saddr)],
        Match::InLoopback => in_loopback(),
        Match::CtMark(mark) => eq(ct("mark"), Expression::Number(*mark)),
        Match::Ipv6 => eq(meta(MetaKey::Nfproto), Expression::String("ipv6".into())),
        Match::Tcp => eq(meta(MetaKey::L4proto), Expression::String("tcp".into())),
        Match::DstPort { set, .. } => eq(payload("tcp", "dport"), set_ref(set)),
        Match::Subnets {
            set, side, family, ..
        } => {
            let (protocol, field) = nft_address(*family, *side);
            eq(payload(protocol, field), set_ref(set))
        }
        Match::Uid(uid) => eq(meta(MetaKey::Skuid), Expression::Number(*uid)),
        Match::Gid(gid) => eq(meta(MetaKey::Skgid), Expression::Number(*gid)),
        Match::OutLoopback => eq(meta(MetaKey::Oifname), Expression::String("lo".into())),
        Match::DstNotLocal => not_local(FibFlag::Daddr),
        Match::DstLoopback(family) => {
            let (protocol, field) = nft_address(*family, Side::Destination);
            eq(
                payload(protocol, field),
                net_element(&loopback_net(*family)),
            )
        }
    };
    vec![statement]
}

/// Compares the output of `nft -j list table inet meshinit` with `ruleset`
/// and describes every difference; an empty list means they are equal.
///
/// Only objects of our table are looked at. Handles are ignored, and so is
/// anything nft adds that we never set (the `metainfo` object).
pub fn diff(expected: &Ruleset, listed: &str) -> Result<Vec<String>, serde_json::Error> {
    let listed: Nftables<'_> = serde_json::from_str(listed)?;
    let installed: Vec<NfListObject<'_>> = listed
        .objects
        .iter()
        .filter_map(|object| match object {
            NfObject::ListObject(object) => ours(object),
            NfObject::CmdObject(_) => None,
        })
        .collect();
    let expected = objects(expected);
    let mut differences = Vec::new();
    for object in &expected {
        if !installed.contains(object) {
            let what = describe(object);
            match installed.iter().find(|o| same_identity(o, object)) {
                Some(_) => differences.push(format!("{what}: installed differs from expected")),
                None => differences.push(format!("{what}: missing")),
            }
        }
    }
    for object in &installed {
        if !expected.contains(object) && !expected.iter().any(|o| same_identity(o, object)) {
            differences.push(format!("{}: not expected", describe(object)));
        }
    }
    let order = |objects: &[NfListObject<'_>]| -> Vec<String> {
        objects
            .iter()
            .filter(|o| matches!(o, NfListObject::Rule(_)))
            .map(describe)
            .collect()
    };
    if differences.is_empty() && order(&installed) != order(&expected) {
        differences.push("rules are installed in a different order".to_string());
    }
    Ok(differences)
}

/// Keeps an object of our table with its handle cleared, drops the rest.
fn ours<'a>(object: &NfListObject<'a>) -> Option<NfListObject<'a>> {
    let is_ours = |family: &NfFamily, table: &str| *family == NfFamily::INet && table == TABLE;
    match object {
        NfListObject::Set(set) if is_ours(&set.family, &set.table) => {
            let mut set = set.clone();
            set.handle = None;
            Some(NfListObject::Set(set))
        }
        NfListObject::Chain(chain) if is_ours(&chain.family, &chain.table) => {
            let mut chain = chain.clone();
            chain.handle = None;
            Some(NfListObject::Chain(chain))
        }
        NfListObject::Rule(rule) if is_ours(&rule.family, &rule.table) => {
            let mut rule = rule.clone();
            rule.handle = None;
            Some(NfListObject::Rule(rule))
        }
        _ => None,
    }
}

/// Sets and chains are identified by name; rules by chain and comment.
fn same_identity(a: &NfListObject<'_>, b: &NfListObject<'_>) -> bool {
    match (a, b) {
        (NfListObject::Set(a), NfListObject::Set(b)) => a.name == b.name,
        (NfListObject::Chain(a), NfListObject::Chain(b)) => a.name == b.name,
        (NfListObject::Rule(a), NfListObject::Rule(b)) => {
            a.chain == b.chain && a.comment == b.comment
        }
        _ => false,
    }
}

fn describe(object: &NfListObject<'_>) -> String {
    match object {
        NfListObject::Set(set) => {
            let count = set.elem.as_ref().map_or(0, |e| e.len());
            let noun = if count == 1 { "element" } else { "elements" };
            format!("set {} ({count} {noun})", set.name)
        }
        NfListObject::Chain(chain) => format!("chain {}", chain.name),
        NfListObject::Rule(rule) => format!(
            "rule in chain {} ({})",
            rule.chain,
            rule.comment.as_deref().unwrap_or("no comment")
        ),
        _ => "object".to_string(),
    }
}
