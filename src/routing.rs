//! The policy routing of `--mode tproxy`, installed, compared and removed over
//! rtnetlink (never by spawning `ip`).
//!
//! TPROXY hands a packet to the proxy's socket, and marks it; the application's
//! replies to the proxy's transparent connections get the same mark (the
//! `replies` chain). Both must be delivered locally although their destination
//! (the client's address) is not the pod's, so, per family:
//!
//! - `ip rule add fwmark MARK lookup TABLE priority PRIORITY`
//! - `ip route add local default dev lo table TABLE`
//!
//! What is ours: the rules at our priority that look up our table, and every
//! route in our table (both numbers are flags, documented as meshinit's). Only
//! those are ever changed; `check` calls one of ours that differs from the
//! expected "altered".
//!
//! As in `addrs`, the netlink socket is created inside a current-thread
//! runtime's `block_on` on the calling thread, so it lives in the namespace
//! that thread entered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use meshinit_rules::{Family, Tproxy};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RoutingError {
    #[error("policy routing: cannot start the netlink runtime: {0}")]
    Runtime(std::io::Error),
    #[error("policy routing: {what} failed: {message}")]
    Netlink { what: String, message: String },
    #[error("policy routing: this namespace has no `lo` interface")]
    NoLoopback,
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let what = what.into();
    move |err| RoutingError::Netlink {
        what,
        message: err.to_string(),
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// The rule we install for `family`.
pub fn expected_rule(tproxy: &Tproxy, family: Family) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = address_family(family);
    rule.header.action = RuleAction::ToTable;
    // Tables above 255 travel only in the attribute; the header then says
    // RT_TABLE_COMPAT (252), as the kernel reports it.
    rule.header.table = if tproxy.table > 255 {
        252
    } else {
        tproxy.table as u8
    };
    rule.attributes = vec![
        RuleAttribute::Table(tproxy.table),
        RuleAttribute::Priority(tproxy.rule_priority),
        RuleAttribute::FwMark(tproxy.mark),
    ];
    rule
}

/// The route we install for `family`: `local default dev lo table TABLE`.
pub fn expected_route(tproxy: &Tproxy, family: Family, lo: u32) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = address_family(family);
    route.header.table = if tproxy.table > 255 {
        RouteHeader::RT_TABLE_UNSPEC
    } else {
        tproxy.table as u8
    };
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.header.destination_prefix_length = 0;
    route.attributes = vec![
        RouteAttribute::Table(tproxy.table),
        RouteAttribute::Destination(match family {
            Family::V4 => RouteAddress::Inet(Ipv4Addr::UNSPECIFIED),
            Family::V6 => RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED),
        }),
        RouteAttribute::Oif(lo),
    ];
    route
}

/// What a rule does, in the words of `ip rule`, for reports.
fn rule_text(rule: &RuleMessage) -> String {
    let mut words = Vec::new();
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => words.insert(0, format!("priority {p}")),
            RuleAttribute::FwMark(m) => words.push(format!("fwmark {m:#x}")),
            RuleAttribute::FwMask(m) => words.push(format!("fwmask {m:#x}")),
            RuleAttribute::Iifname(i) => words.push(format!("iif {i}")),
            RuleAttribute::Oifname(o) => words.push(format!("oif {o}")),
            RuleAttribute::Source(s) => words.push(format!("from {s}/{}", rule.header.src_len)),
            RuleAttribute::Destination(d) => words.push(format!("to {d}/{}", rule.header.dst_len)),
            _ => {}
        }
    }
    words.push(format!("lookup {}", rule_table(rule)));
    if rule.header.action != RuleAction::ToTable {
        words.push(format!("action {:?}", rule.header.action));
    }
    words.join(" ")
}

fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(rule.header.table.into())
}

fn rule_priority(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether an installed rule is the one we install: the same selectors (a
/// whole-word mark and nothing else) and the same action. What the kernel
/// reports on its own (the protocol, the table in both places, a full mask,
/// the suppress defaults) is not a selector.
fn rule_matches(installed: &RuleMessage, expected: &RuleMessage) -> bool {
    let selectors = |rule: &RuleMessage| -> Vec<String> {
        let mut selectors: Vec<String> = rule
            .attributes
            .iter()
            .filter(|a| match a {
                RuleAttribute::FwMask(mask) => *mask != u32::MAX,
                RuleAttribute::FwMark(_)
                | RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Destination(_)
                | RuleAttribute::Goto(_)
                | RuleAttribute::TunId(_)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_) => true,
                _ => false,
            })
            .map(|a| format!("{a:?}"))
            .collect();
        selectors.sort();
        selectors
    };
    installed.header.action == expected.header.action
        && installed.header.src_len == 0
        && installed.header.dst_len == 0
        && installed.header.tos == 0
        && installed.header.flags == expected.header.flags
        && selectors(installed) == selectors(expected)
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_matches(installed: &RouteMessage, lo: u32) -> bool {
    installed.header.kind == RouteType::Local
        && installed.header.destination_prefix_length == 0
        && installed.header.source_prefix_length == 0
        && route_oif(installed) == Some(lo)
}

fn route_text(route: &RouteMessage) -> String {
    let prefix = route.header.destination_prefix_length;
    let destination = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })
        .filter(|_| prefix > 0)
        .map_or("default".to_string(), |a| format!("{a}/{prefix}"));
    let oif = route_oif(route).map_or(String::new(), |i| format!(" dev index {i}"));
    format!(
        "{:?} {destination}{oif} table {}",
        route.header.kind,
        route_table(route)
    )
    .to_lowercase()
}

/// Ours, as installed, in one family.
struct Ours {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
}

/// What [`apply`] changed, so that it can be taken back.
#[derive(Default)]
pub struct Undo {
    added_rules: Vec<RuleMessage>,
    added_routes: Vec<RouteMessage>,
    deleted_rules: Vec<RuleMessage>,
    deleted_routes: Vec<RouteMessage>,
}

impl Undo {
    /// True when nothing was changed.
    pub fn is_empty(&self) -> bool {
        self.added_rules.is_empty()
            && self.added_routes.is_empty()
            && self.deleted_rules.is_empty()
            && self.deleted_routes.is_empty()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, RoutingError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(RoutingError::Runtime)
}

async fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>), RoutingError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|err| RoutingError::Netlink {
            what: "opening a netlink socket".to_string(),
            message: err.to_string(),
        })?;
    Ok((handle, tokio::spawn(connection)))
}

async fn loopback(handle: &Handle) -> Result<u32, RoutingError> {
    let links: Vec<_> = handle
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("reading the lo interface"))?;
    links
        .first()
        .map(|link| link.header.index)
        .ok_or(RoutingError::NoLoopback)
}

/// Whether a netlink error says the kernel has no such address family (a kernel
/// built without IPv6): then there is nothing of ours in it.
fn no_family(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(message)
        if -message.raw_code() == nix::libc::EAFNOSUPPORT)
}

async fn ours(handle: &Handle, tproxy: &Tproxy, family: Family) -> Result<Ours, RoutingError> {
    let version = match family {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    };
    let rules: Vec<RuleMessage> = match handle.rule().get(version).execute().try_collect().await {
        Ok(rules) => rules,
        Err(err) if family == Family::V6 && no_family(&err) => {
            return Ok(Ours {
                rules: vec![],
                routes: vec![],
            })
        }
        Err(err) => {
            return Err(netlink(format!("listing {} rules", family_name(family)))(
                err,
            ))
        }
    };
    let rules = rules
        .into_iter()
        .filter(|rule| {
            rule.header.family == address_family(family)
                && rule_priority(rule) == tproxy.rule_priority
                && rule_table(rule) == tproxy.table
        })
        .collect();
    let mut request = handle.route().get(match family {
        Family::V4 => rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().build(),
    });
    // A dump of every table, not only main.
    request.message_mut().header.table = RouteHeader::RT_TABLE_UNSPEC;
    let routes: Vec<RouteMessage> = request
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing {} routes", family_name(family))))?;
    let routes = routes
        .into_iter()
        .filter(|route| {
            route.header.address_family == address_family(family)
                && route_table(route) == tproxy.table
        })
        .collect();
    Ok(Ours { rules, routes })
}

/// How what is installed differs from what `wanted` families need (none in
/// `redirect` mode: then anything of ours is a difference). Empty when equal.
pub fn drift(tproxy: &Tproxy, wanted: &[Family]) -> Result<Vec<String>, RoutingError> {
    runtime()?.block_on(async {
        let (handle, connection) = connect().await?;
        let lo = loopback(&handle).await?;
        let mut differences = Vec::new();
        for family in [Family::V4, Family::V6] {
            let name = family_name(family);
            let ours = ours(&handle, tproxy, family).await?;
            let want = wanted.contains(&family);
            let rule = expected_rule(tproxy, family);
            if want && !ours.rules.iter().any(|r| rule_matches(r, &rule)) {
                differences.push(format!("ip rule ({name}) {}: missing", rule_text(&rule)));
            }
            for installed in &ours.rules {
                if !want {
                    differences.push(format!(
                        "ip rule ({name}) {}: not expected",
                        rule_text(installed)
                    ));
                } else if !rule_matches(installed, &rule) {
                    differences.push(format!(
                        "ip rule ({name}) {}: altered (expected {})",
                        rule_text(installed),
                        rule_text(&rule)
                    ));
                }
            }
            let route = expected_route(tproxy, family, lo);
            if want && !ours.routes.iter().any(|r| route_matches(r, lo)) {
                differences.push(format!("ip route ({name}) {}: missing", route_text(&route)));
            }
            for installed in &ours.routes {
                if !want {
                    differences.push(format!(
                        "ip route ({name}) {}: not expected",
                        route_text(installed)
                    ));
                } else if !route_matches(installed, lo) {
                    differences.push(format!(
                        "ip route ({name}) {}: altered (expected {})",
                        route_text(installed),
                        route_text(&route)
                    ));
                }
            }
        }
        connection.abort();
        Ok(differences)
    })
}

/// Makes the policy routing what `wanted` families need (none: removes ours):
/// altered ones of ours go, missing ones are added. On any failure everything
/// already changed is taken back before the error is returned; on success the
/// returned [`Undo`] can take it back later (when the rules fail to apply).
pub fn apply(tproxy: &Tproxy, wanted: &[Family]) -> Result<Undo, RoutingError> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let (handle, connection) = connect().await?;
        let mut undo = Undo::default();
        let result = change(&handle, tproxy, wanted, &mut undo).await;
        if let Err(err) = result {
            revert(&handle, &mut undo).await;
            connection.abort();
            return Err(err);
        }
        connection.abort();
        Ok(undo)
    })
}

async fn change(
    handle: &Handle,
    tproxy: &Tproxy,
    wanted: &[Family],
    undo: &mut Undo,
) -> Result<(), RoutingError> {
    let lo = loopback(handle).await?;
    for family in [Family::V4, Family::V6] {
        let name = family_name(family);
        let ours = ours(handle, tproxy, family).await?;
        let want = wanted.contains(&family);
        let rule = expected_rule(tproxy, family);
        let mut rule_present = false;
        for installed in ours.rules {
            if want && !rule_present && rule_matches(&installed, &rule) {
                rule_present = true;
                continue;
            }
            handle
                .rule()
                .del(installed.clone())
                .execute()
                .await
                .map_err(netlink(format!(
                    "deleting ip rule ({name}) {}",
                    rule_text(&installed)
                )))?;
            undo.deleted_rules.push(installed);
        }
        let mut route_present = false;
        for installed in ours.routes {
            if want && !route_present && route_matches(&installed, lo) {
                route_present = true;
                continue;
            }
            handle
                .route()
                .del(installed.clone())
                .execute()
                .await
                .map_err(netlink(format!(
                    "deleting ip route ({name}) {}",
                    route_text(&installed)
                )))?;
            undo.deleted_routes.push(installed);
        }
        if want && !route_present {
            let route = expected_route(tproxy, family, lo);
            handle
                .route()
                .add(route.clone())
                .execute()
                .await
                .map_err(netlink(format!(
                    "adding ip route ({name}) {}",
                    route_text(&route)
                )))?;
            undo.added_routes.push(route);
        }
        if want && !rule_present {
            let mut request = handle.rule().add();
            *request.message_mut() = rule.clone();
            request.execute().await.map_err(netlink(format!(
                "adding ip rule ({name}) {}",
                rule_text(&rule)
            )))?;
            undo.added_rules.push(rule);
        }
    }
    Ok(())
}

/// Takes back what `undo` records, most recent first. Failures are logged:
/// this runs on the way out of an error, which is the one to report.
async fn revert(handle: &Handle, undo: &mut Undo) {
    for rule in undo.added_rules.drain(..).rev() {
        if let Err(err) = handle.rule().del(rule.clone()).execute().await {
            tracing::error!("rollback: deleting ip rule {}: {err}", rule_text(&rule));
        }
    }
    for route in undo.added_routes.drain(..).rev() {
        if let Err(err) = handle.route().del(route.clone()).execute().await {
            tracing::error!("rollback: deleting ip route {}: {err}", route_text(&route));
        }
    }
    for route in undo.deleted_routes.drain(..).rev() {
        if let Err(err) = handle.route().add(route.clone()).execute().await {
            tracing::error!("rollback: restoring ip route {}: {err}", route_text(&route));
        }
    }
    for rule in undo.deleted_rules.drain(..).rev() {
        let mut request = handle.rule().add();
        *request.message_mut() = rule.clone();
        if let Err(err) = request.execute().await {
            tracing::error!("rollback: restoring ip rule {}: {err}", rule_text(&rule));
        }
    }
}

/// Takes back what a successful [`apply`] changed.
pub fn undo(mut undo: Undo) -> Result<(), RoutingError> {
    runtime()?.block_on(async {
        let (handle, connection) = connect().await?;
        revert(&handle, &mut undo).await;
        connection.abort();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_rule_matches_itself_and_the_kernels_form_of_it() {
        let tproxy = Tproxy::DEFAULT;
        let rule = expected_rule(&tproxy, Family::V4);
        assert!(rule_matches(&rule, &rule));
        // The kernel reports the protocol and a full mask on its own.
        let mut listed = rule.clone();
        listed
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Unspec));
        listed.attributes.push(RuleAttribute::FwMask(u32::MAX));
        assert!(rule_matches(&listed, &rule));
        for altered in [
            RuleAttribute::FwMark(1),
            RuleAttribute::FwMask(0xff),
            RuleAttribute::Iifname("eth0".into()),
        ] {
            let mut other = rule.clone();
            other
                .attributes
                .retain(|a| !matches!(a, RuleAttribute::FwMark(_)));
            if !matches!(altered, RuleAttribute::FwMark(_)) {
                other.attributes.push(RuleAttribute::FwMark(tproxy.mark));
            }
            other.attributes.push(altered.clone());
            assert!(!rule_matches(&other, &rule), "{altered:?}");
        }
        assert_eq!(rule_text(&rule), "priority 4143 fwmark 0x4d49 lookup 4143");
    }

    #[test]
    fn only_a_local_default_route_via_lo_matches() {
        let route = expected_route(&Tproxy::DEFAULT, Family::V6, 1);
        assert!(route_matches(&route, 1));
        assert!(!route_matches(&route, 2));
        let mut unicast = route.clone();
        unicast.header.kind = RouteType::Unicast;
        assert!(!route_matches(&unicast, 1));
        assert_eq!(route_text(&route), "local default dev index 1 table 4143");
    }
}
