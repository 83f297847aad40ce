//! The backend-neutral model of what meshinit installs.
//!
//! Two chains, each a short list of rules: exemptions that `return` first,
//! then one redirect (or, in `tproxy` mode, one TPROXY, plus a third chain
//! that routes the application's replies back to the proxy). Lists of ports and subnets are *one* rule each (a set in
//! nftables), so the number of rules never grows with the size of the lists.

use ipnet::IpNet;

use crate::ports::PortSet;
use crate::spec::{Mode, Spec, Tproxy};

/// Whether a chain handles traffic entering the pod or leaving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// prerouting: connections from outside to the pod.
    Inbound,
    /// nat output: connections the pod's processes open.
    Outbound,
    /// mangle output (`tproxy` mode only): packets the pod's processes send
    /// on connections the proxy opened transparently, i.e. the application's
    /// replies to a client address that is not the pod's.
    Replies,
}

/// What kind of hook a chain sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainKind {
    /// Destination NAT (priority dstnat / table nat): `redirect`.
    Nat,
    /// Before routing, no NAT (priority mangle / table mangle): TPROXY and
    /// marks. nft: a `filter` chain in prerouting, a `route` chain in output
    /// (so that a changed mark re-routes the packet).
    Mangle,
}

/// IP family of a subnet match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// Which address of the packet a subnet match looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Source,
    Destination,
}

/// What a rule matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Any IPv6 packet (used to leave IPv6 alone when `--ipv6=false`).
    Ipv6,
    /// Any TCP packet.
    Tcp,
    /// TCP destination port in the named set.
    DstPort { set: &'static str, ports: PortSet },
    /// Source or destination address in the named set (one family per set).
    Subnets {
        set: &'static str,
        side: Side,
        family: Family,
        nets: Vec<IpNet>,
    },
    /// Socket owned by this UID (locally generated traffic only).
    Uid(u32),
    /// Socket owned by this GID.
    Gid(u32),
    /// Leaving through the loopback interface.
    OutLoopback,
    /// Destination is not an address of this namespace (any interface, lo
    /// included): the kernel's routing would forward or drop the packet, not
    /// deliver it. nft `fib daddr type != local`, iptables `-m addrtype !
    /// --dst-type LOCAL`.
    DstNotLocal,
    /// Destination is a loopback address of this family: 127.0.0.0/8 or ::1.
    DstLoopback(Family),
    /// Arrived through the loopback interface: sent by a process of the pod.
    InLoopback,
    /// Arrived through the loopback interface from an address that is not the
    /// pod's: only a transparent socket (the proxy's hop to the application,
    /// bound to the client's address) sends such packets. nft `iifname "lo"
    /// fib saddr type != local`, iptables `-i lo -m addrtype ! --src-type LOCAL`.
    TransparentHop,
    /// The connection's conntrack mark equals this value.
    CtMark(u32),
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the chain: the packet is not redirected.
    Return,
    /// Redirect to this local port (the proxy).
    Redirect(u16),
    /// Hand a new connection to the socket listening on this local port without
    /// changing its destination, and mark it (TPROXY). Later packets of the
    /// connection reach the proxy's socket by its address.
    Tproxy { port: u16, mark: u32 },
    /// Set the connection's conntrack mark, and go on with the next rule.
    SetCtMark(u32),
    /// Copy the connection's conntrack mark to the packet (which re-routes it),
    /// and go on with the next rule.
    RestoreMark,
    /// Refuse a new connection with a TCP reset; other packets go on.
    Reject,
}

impl Action {
    /// True when the packet leaves the chain at this rule (a TPROXY that found
    /// the proxy's socket accepts the packet).
    pub fn is_final(self) -> bool {
        !matches!(self, Action::SetCtMark(_) | Action::RestoreMark)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub when: Match,
    pub action: Action,
    /// Says why the rule exists; installed with it so listings explain themselves.
    pub comment: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub direction: Direction,
    pub kind: ChainKind,
    pub rules: Vec<Rule>,
}

/// Everything meshinit installs for one spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// When false, IPv6 traffic is left alone and no IPv6 rules are written.
    pub ipv6: bool,
    pub inbound: Chain,
    pub outbound: Chain,
    /// `tproxy` mode: the chain that marks the application's replies to the
    /// proxy's transparent connections, and the policy routing the runner
    /// installs beside the rules.
    pub tproxy: Option<(Chain, Tproxy)>,
}

impl Ruleset {
    /// Every chain, in the order renderers write them.
    pub fn chains(&self) -> Vec<&Chain> {
        let mut chains = vec![&self.inbound, &self.outbound];
        if let Some((replies, _)) = &self.tproxy {
            chains.push(replies);
        }
        chains
    }

    /// Total number of rules, for reports and benchmarks.
    pub fn rule_count(&self) -> usize {
        self.chains().iter().map(|chain| chain.rules.len()).sum()
    }
}

impl From<&Spec> for Ruleset {
    fn from(spec: &Spec) -> Self {
        Ruleset {
            ipv6: spec.ipv6,
            inbound: inbound(spec),
            outbound: outbound(spec),
            tproxy: match spec.mode {
                Mode::Redirect => None,
                Mode::Tproxy(tproxy) => Some((replies(tproxy), tproxy)),
            },
        }
    }
}

fn rule(when: Match, action: Action, comment: impl Into<String>) -> Rule {
    Rule {
        when,
        action,
        comment: comment.into(),
    }
}

/// Leaves IPv6 alone when asked to. Matching it first, rather than filtering
/// every later rule, keeps one table for both families (DESIGN.md) while
/// guaranteeing that no IPv6 packet reaches a redirect.
fn ipv6_off(spec: &Spec, rules: &mut Vec<Rule>) {
    if !spec.ipv6 {
        rules.push(rule(
            Match::Ipv6,
            Action::Return,
            "meshinit: IPv6 is left alone (--ipv6=false)",
        ));
    }
}

/// One rule per non-empty (family, list): a set in nftables, so the rule count
/// is independent of how many subnets are listed.
fn subnet_rules(
    spec: &Spec,
    nets: &crate::SubnetList,
    side: Side,
    sets: [&'static str; 2],
    comment: &str,
    rules: &mut Vec<Rule>,
) {
    let v4: Vec<IpNet> = nets.v4.iter().copied().map(IpNet::V4).collect();
    let v6: Vec<IpNet> = nets.v6.iter().copied().map(IpNet::V6).collect();
    for (family, set, nets, name) in [
        (Family::V4, sets[0], v4, "IPv4"),
        (Family::V6, sets[1], v6, "IPv6"),
    ] {
        if nets.is_empty() || (family == Family::V6 && !spec.ipv6) {
            continue;
        }
        let when = Match::Subnets {
            set,
            side,
            family,
            nets,
        };
        rules.push(rule(when, Action::Return, format!("{comment} ({name})")));
    }
}

/// Inbound interception covers only connections addressed to one of the
/// namespace's own non-loopback addresses.
///
/// nat prerouting runs before routing. Without these rules a host on the
/// pod's L2 segment could send a SYN to `127.0.0.1:PORT`, or to any address
/// that is not the pod's, and the redirect would hand it to the proxy before
/// routing drops it (as a martian, or because the pod does not forward); the
/// proxy would then connect, as its exempt UID, to a loopback-only service or
/// onwards to the foreign address.
///
/// Two checks, because neither is enough alone: the FIB says whether the
/// destination is local, but loopback addresses are local too (they live in
/// the local table on `lo`), so they get their own exemption. A loopback
/// destination is exempt whatever the input interface: traffic the pod sends
/// itself over `lo` has its NAT decided in the output hook and never reaches
/// nat prerouting as a new connection, so there is nothing to lose, and the
/// rule then says exactly what the contract says.
fn local_only(spec: &Spec, rules: &mut Vec<Rule>) {
    rules.push(rule(
        Match::DstNotLocal,
        Action::Return,
        "meshinit: inbound to an address that is not local to the pod is not intercepted",
    ));
    rules.push(rule(
        Match::DstLoopback(Family::V4),
        Action::Return,
        "meshinit: inbound to a loopback address is not intercepted (IPv4)",
    ));
    if spec.ipv6 {
        rules.push(rule(
            Match::DstLoopback(Family::V6),
            Action::Return,
            "meshinit: inbound to a loopback address is not intercepted (IPv6)",
        ));
    }
}

/// In `tproxy` mode the inbound chain sits in the mangle hook, which, unlike
/// nat prerouting, also sees every packet the pod sends itself over `lo`.
///
/// Those are never intercepted, as in `redirect` mode (where their NAT is
/// decided in the output hook): otherwise the proxy's own connection to the
/// application would be handed back to the proxy. Before leaving, the proxy's
/// transparent hops (from the client's address, over `lo`) get a conntrack
/// mark, which the [`replies`] chain copies onto the application's answers so
/// that policy routing sends them back over `lo` to the proxy instead of out
/// to the real client.
fn own_traffic(tproxy: Tproxy, rules: &mut Vec<Rule>) {
    rules.push(rule(
        Match::TransparentHop,
        Action::SetCtMark(tproxy.mark),
        "meshinit: the proxy's transparent connections to the application are marked, so the replies come back to it",
    ));
    rules.push(rule(
        Match::InLoopback,
        Action::Return,
        "meshinit: traffic the pod sends itself (via lo) is not intercepted",
    ));
}

/// The application's replies on a marked connection get the mark, and the
/// `ip rule` for the mark routes them to the `local` table, i.e. over `lo` to
/// the proxy's transparent socket.
fn replies(tproxy: Tproxy) -> Chain {
    Chain {
        direction: Direction::Replies,
        kind: ChainKind::Mangle,
        rules: vec![rule(
            Match::CtMark(tproxy.mark),
            Action::RestoreMark,
            "meshinit: packets of the proxy's transparent connections are routed back to it (policy routing)",
        )],
    }
}

fn inbound(spec: &Spec) -> Chain {
    let mut rules = Vec::new();
    ipv6_off(spec, &mut rules);
    if let Mode::Tproxy(tproxy) = spec.mode {
        own_traffic(tproxy, &mut rules);
    }
    local_only(spec, &mut rules);
    if !spec.inbound_ports_to_ignore.is_empty() {
        rules.push(rule(
            Match::DstPort {
                set: "inbound_ports_to_ignore",
                ports: spec.inbound_ports_to_ignore.clone(),
            },
            Action::Return,
            "meshinit: inbound ports to ignore reach the application directly",
        ));
    }
    subnet_rules(
        spec,
        &spec.inbound_subnets_to_ignore,
        Side::Source,
        [
            "inbound_subnets_to_ignore_v4",
            "inbound_subnets_to_ignore_v6",
        ],
        "meshinit: sources in inbound subnets to ignore reach the application directly",
        &mut rules,
    );
    let redirect = match spec.mode {
        Mode::Redirect => Action::Redirect(spec.incoming_proxy_port),
        Mode::Tproxy(tproxy) => Action::Tproxy {
            port: spec.incoming_proxy_port,
            mark: tproxy.mark,
        },
    };
    let intercepted = if spec.ports_to_redirect.is_empty() {
        Match::Tcp
    } else {
        Match::DstPort {
            set: "ports_to_redirect",
            ports: spec.ports_to_redirect.clone(),
        }
    };
    rules.push(rule(
        intercepted.clone(),
        redirect,
        if spec.ports_to_redirect.is_empty() {
            "meshinit: all other inbound TCP goes to the proxy"
        } else {
            "meshinit: inbound TCP to the ports to redirect goes to the proxy"
        },
    ));
    // nft's TPROXY does nothing when no transparent socket listens on the port
    // (the proxy is not running yet, or crashed), and the packet would go on to
    // the application around the proxy: no mTLS, no required identity. Redirect
    // mode refuses such connections (nothing listens on the port it rewrites
    // to), and so does this rule. (iptables' TPROXY target drops them itself.)
    if matches!(spec.mode, Mode::Tproxy(_)) {
        rules.push(rule(
            intercepted,
            Action::Reject,
            "meshinit: inbound TCP is refused while the proxy is not listening",
        ));
    }
    Chain {
        direction: Direction::Inbound,
        kind: match spec.mode {
            Mode::Redirect => ChainKind::Nat,
            Mode::Tproxy(_) => ChainKind::Mangle,
        },
        rules,
    }
}

fn outbound(spec: &Spec) -> Chain {
    let mut rules = Vec::new();
    ipv6_off(spec, &mut rules);
    // The proxy's own connections (to the original destination, or to the
    // application on the inbound side) must not be sent back to the proxy,
    // or every connection would loop.
    if let Some(uid) = spec.proxy_uid {
        rules.push(rule(
            Match::Uid(uid),
            Action::Return,
            format!("meshinit: the proxy (uid {uid}) connects directly"),
        ));
    }
    if let Some(gid) = spec.proxy_gid {
        rules.push(rule(
            Match::Gid(gid),
            Action::Return,
            format!("meshinit: the proxy (gid {gid}) connects directly"),
        ));
    }
    // Traffic that stays in the pod (localhost, or the pod's own address,
    // which routes over lo) never leaves, so there is nothing to proxy; the
    // inbound proxy's connection to the application takes this path too.
    rules.push(rule(
        Match::OutLoopback,
        Action::Return,
        "meshinit: traffic that stays in the pod (via lo) is not redirected",
    ));
    if !spec.outbound_ports_to_ignore.is_empty() {
        rules.push(rule(
            Match::DstPort {
                set: "outbound_ports_to_ignore",
                ports: spec.outbound_ports_to_ignore.clone(),
            },
            Action::Return,
            "meshinit: outbound ports to ignore are reached directly",
        ));
    }
    subnet_rules(
        spec,
        &spec.outbound_subnets_to_ignore,
        Side::Destination,
        [
            "outbound_subnets_to_ignore_v4",
            "outbound_subnets_to_ignore_v6",
        ],
        "meshinit: destinations in outbound subnets to ignore are reached directly",
        &mut rules,
    );
    rules.push(rule(
        Match::Tcp,
        Action::Redirect(spec.outgoing_proxy_port),
        "meshinit: all other outbound TCP goes to the proxy",
    ));
    Chain {
        direction: Direction::Outbound,
        kind: ChainKind::Nat,
        rules,
    }
}

#[cfg(test)]
mod tests;
