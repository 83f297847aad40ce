//! Model-level properties: a tiny evaluator walks a chain the way the kernel
//! would, so "every skip port is exempt" is checked on the model itself,
//! independently of any renderer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::{PortRange, SubnetList};

/// The parts of a packet our rules look at.
#[derive(Clone, Debug)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    uid: u32,
    gid: u32,
    via_lo: bool,
}

/// Where the chain sends the packet: `Some(port)` when redirected.
fn verdict(chain: &Chain, packet: &Packet) -> Option<u16> {
    for rule in &chain.rules {
        let hit = match &rule.when {
            Match::Ipv6 => packet.dst.is_ipv6(),
            Match::Tcp => true,
            Match::DstPort { ports, .. } => ports.contains(packet.dport),
            Match::Subnets {
                side, family, nets, ..
            } => {
                let addr = match side {
                    Side::Source => packet.src,
                    Side::Destination => packet.dst,
                };
                let same_family = matches!(
                    (family, addr),
                    (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
                );
                same_family && nets.iter().any(|net| net.contains(&addr))
            }
            Match::Uid(uid) => packet.uid == *uid,
            Match::Gid(gid) => packet.gid == *gid,
            Match::OutLoopback => packet.via_lo,
            Match::DstNotLocal => !is_local(packet.dst),
            Match::DstLoopback(family) => {
                let same_family = matches!(
                    (family, packet.dst),
                    (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
                );
                same_family && packet.dst.is_loopback()
            }
            Match::InLoopback => packet.via_lo,
            Match::TransparentHop => packet.via_lo && !is_local(packet.src),
            // No connection in this model carries a conntrack mark.
            Match::CtMark(_) => false,
        };
        if hit {
            match rule.action {
                Action::Return => return None,
                Action::Redirect(port) | Action::Tproxy { port, .. } => return Some(port),
                Action::Reject => return Some(0),
                Action::SetCtMark(_) | Action::RestoreMark => {}
            }
        }
    }
    None
}

/// The pod's own addresses, as in the netns tests.
const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

/// What `fib daddr type local` says in the pod: its addresses, and loopback
/// (which the kernel's local table holds too).
fn is_local(addr: IpAddr) -> bool {
    addr.is_loopback() || addr == IpAddr::V4(POD_V4) || addr == IpAddr::V6(POD_V6)
}

fn app_packet(dport: u16) -> Packet {
    Packet {
        src: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
        dst: IpAddr::V4(POD_V4),
        dport,
        uid: 1000,
        gid: 1000,
        via_lo: false,
    }
}

#[test]
fn defaults_redirect_both_ways_and_exempt_the_proxy_and_loopback() {
    let rules = Ruleset::from(&Spec::default());
    assert_eq!(verdict(&rules.inbound, &app_packet(8080)), Some(4143));
    assert_eq!(verdict(&rules.inbound, &app_packet(4190)), None);
    assert_eq!(verdict(&rules.inbound, &app_packet(4191)), None);
    assert_eq!(verdict(&rules.outbound, &app_packet(8080)), Some(4140));
    let proxy = Packet {
        uid: 2102,
        ..app_packet(8080)
    };
    assert_eq!(verdict(&rules.outbound, &proxy), None);
    let local = Packet {
        via_lo: true,
        ..app_packet(8080)
    };
    assert_eq!(verdict(&rules.outbound, &local), None);
}

#[test]
fn inbound_redirects_only_the_pods_own_non_loopback_addresses() {
    for spec in [
        Spec::default(),
        Spec {
            ports_to_redirect: "8080".parse().unwrap(),
            ..Spec::default()
        },
    ] {
        let rules = Ruleset::from(&spec);
        for dst in [IpAddr::V4(POD_V4), IpAddr::V6(POD_V6)] {
            let to_pod = Packet {
                dst,
                ..app_packet(8080)
            };
            assert_eq!(verdict(&rules.inbound, &to_pod), Some(4143), "{dst}");
        }
        for dst in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "198.18.0.99",
            "fd00:18::99",
            "198.19.0.1",
            "::ffff:127.0.0.1",
        ] {
            let dst: IpAddr = dst.parse().unwrap();
            for via_lo in [false, true] {
                let packet = Packet {
                    dst,
                    via_lo,
                    ..app_packet(8080)
                };
                assert_eq!(
                    verdict(&rules.inbound, &packet),
                    None,
                    "{dst} via lo {via_lo}"
                );
            }
        }
    }
}

#[test]
fn local_only_rules_come_before_any_redirect_and_follow_ipv6() {
    for ipv6 in [true, false] {
        let rules = Ruleset::from(&Spec {
            ipv6,
            ..Spec::default()
        });
        let whens: Vec<&Match> = rules.inbound.rules.iter().map(|r| &r.when).collect();
        let at = |m: &Match| whens.iter().position(|w| *w == m);
        let redirect = rules
            .inbound
            .rules
            .iter()
            .position(|r| matches!(r.action, Action::Redirect(_)))
            .unwrap();
        assert!(at(&Match::DstNotLocal).unwrap() < redirect);
        assert!(at(&Match::DstLoopback(Family::V4)).unwrap() < redirect);
        assert_eq!(at(&Match::DstLoopback(Family::V6)).is_some(), ipv6);
        // Outbound is unchanged: a connection from the pod to a foreign address
        // is what the outbound proxy is for.
        assert!(!rules
            .outbound
            .rules
            .iter()
            .any(|r| matches!(r.when, Match::DstNotLocal | Match::DstLoopback(_))));
    }
}

#[test]
fn ipv6_off_leaves_ipv6_alone_and_drops_v6_sets() {
    let spec = Spec {
        ipv6: false,
        outbound_subnets_to_ignore: "fd00::/8,198.19.0.0/16".parse().unwrap(),
        ..Spec::default()
    };
    let rules = Ruleset::from(&spec);
    let v6 = Packet {
        src: IpAddr::V6(Ipv6Addr::LOCALHOST),
        dst: "fd00:18::2".parse().unwrap(),
        ..app_packet(8080)
    };
    assert_eq!(verdict(&rules.outbound, &v6), None);
    assert_eq!(verdict(&rules.inbound, &v6), None);
    assert_eq!(verdict(&rules.outbound, &app_packet(8080)), Some(4140));
    let v6_sets = rules.outbound.rules.iter().any(|rule| {
        matches!(
            rule.when,
            Match::Subnets {
                family: Family::V6,
                ..
            }
        )
    });
    assert!(!v6_sets);
}

#[test]
fn ports_to_redirect_limits_inbound_only() {
    let spec = Spec {
        ports_to_redirect: "8080,9000-9001".parse().unwrap(),
        ..Spec::default()
    };
    let rules = Ruleset::from(&spec);
    assert_eq!(verdict(&rules.inbound, &app_packet(8080)), Some(4143));
    assert_eq!(verdict(&rules.inbound, &app_packet(9001)), Some(4143));
    assert_eq!(verdict(&rules.inbound, &app_packet(8081)), None);
    assert_eq!(verdict(&rules.outbound, &app_packet(8081)), Some(4140));
}

fn port_set() -> impl Strategy<Value = PortSet> {
    proptest::collection::vec((1u16..=65535, 0u16..20), 0..60).prop_map(|items| {
        PortSet::new(items.into_iter().map(|(lo, len)| PortRange {
            lo,
            hi: lo.saturating_add(len),
        }))
    })
}

fn v4_subnets() -> impl Strategy<Value = SubnetList> {
    proptest::collection::vec((any::<u32>(), 8u8..=32), 0..20).prop_map(|items| {
        SubnetList::new(
            items.into_iter().map(|(addr, len)| {
                ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(addr)), len).unwrap()
            }),
        )
    })
}

fn tproxy(spec: Spec) -> Spec {
    Spec {
        mode: crate::Mode::Tproxy(crate::Tproxy::DEFAULT),
        ..spec
    }
}

#[test]
fn tproxy_mode_marks_and_intercepts_in_mangle_and_leaves_outbound_as_it_was() {
    let redirect = Ruleset::from(&Spec::default());
    let rules = Ruleset::from(&tproxy(Spec::default()));
    assert_eq!(rules.inbound.kind, ChainKind::Mangle);
    assert_eq!(rules.outbound, redirect.outbound);
    let [.., tproxy_rule, reject] = rules.inbound.rules.as_slice() else {
        panic!("too few rules");
    };
    assert_eq!(reject.action, Action::Reject);
    assert_eq!(reject.when, tproxy_rule.when);
    assert_eq!(
        tproxy_rule.action,
        Action::Tproxy {
            port: 4143,
            mark: 0x4d49
        }
    );
    let (replies, routing) = rules.tproxy.as_ref().unwrap();
    assert_eq!(*routing, crate::Tproxy::DEFAULT);
    assert_eq!(replies.direction, Direction::Replies);
    assert_eq!(replies.rules[0].when, Match::CtMark(0x4d49));
    assert_eq!(replies.rules[0].action, Action::RestoreMark);
    assert!(redirect.tproxy.is_none());
    assert_eq!(verdict(&rules.inbound, &app_packet(8080)), Some(4143));
    assert_eq!(verdict(&rules.inbound, &app_packet(4190)), None);
}

#[test]
fn tproxy_mode_never_intercepts_what_the_pod_sends_itself() {
    let rules = Ruleset::from(&tproxy(Spec::default()));
    // The proxy's transparent hop to the application: from the client's
    // address, over lo, to the pod's address.
    let hop = Packet {
        via_lo: true,
        ..app_packet(8080)
    };
    assert_eq!(verdict(&rules.inbound, &hop), None);
    let marks: Vec<_> = rules
        .inbound
        .rules
        .iter()
        .take_while(|rule| rule.action != Action::Return)
        .collect();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].when, Match::TransparentHop);
    assert_eq!(marks[0].action, Action::SetCtMark(0x4d49));
}

proptest! {
    /// Everything that is not sent over lo is intercepted in `tproxy` mode
    /// exactly when `redirect` mode intercepts it, to the same port: the skip
    /// ports, skip subnets, ports to redirect and local-destination rules all
    /// hold the same way.
    #[test]
    fn tproxy_intercepts_exactly_what_redirect_does(
        ignored in port_set(), redirected in port_set(), nets in v4_subnets(),
        src in any::<u32>(), dst_pick in 0u8..4, v4 in any::<u32>(), port in 1u16..=65535,
        ipv6 in any::<bool>(), via_lo in any::<bool>(),
    ) {
        let spec = Spec {
            inbound_ports_to_ignore: ignored,
            ports_to_redirect: redirected,
            inbound_subnets_to_ignore: nets,
            ipv6,
            ..Spec::default()
        };
        let redirect = Ruleset::from(&spec);
        let transparent = Ruleset::from(&tproxy(spec));
        let dst = match dst_pick {
            0 => IpAddr::V4(POD_V4),
            1 => IpAddr::V6(POD_V6),
            2 => IpAddr::V4(Ipv4Addr::from(v4)),
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let packet = Packet { src: IpAddr::V4(Ipv4Addr::from(src)), dst, via_lo, ..app_packet(port) };
        let want = if via_lo { None } else { verdict(&redirect.inbound, &packet) };
        prop_assert_eq!(verdict(&transparent.inbound, &packet), want);
        prop_assert_eq!(&transparent.outbound, &redirect.outbound);
    }
}

proptest! {
    #[test]
    fn every_skip_port_is_exempt_and_others_are_redirected(
        inbound in port_set(), outbound in port_set(), probe in 1u16..=65535,
    ) {
        let spec = Spec {
            inbound_ports_to_ignore: inbound.clone(),
            outbound_ports_to_ignore: outbound.clone(),
            ..Spec::default()
        };
        let rules = Ruleset::from(&spec);
        for range in inbound.ranges() {
            for port in [range.lo, range.hi] {
                prop_assert_eq!(verdict(&rules.inbound, &app_packet(port)), None);
            }
        }
        for range in outbound.ranges() {
            for port in [range.lo, range.hi] {
                prop_assert_eq!(verdict(&rules.outbound, &app_packet(port)), None);
            }
        }
        let expect_in = if inbound.contains(probe) { None } else { Some(4143) };
        let expect_out = if outbound.contains(probe) { None } else { Some(4140) };
        prop_assert_eq!(verdict(&rules.inbound, &app_packet(probe)), expect_in);
        prop_assert_eq!(verdict(&rules.outbound, &app_packet(probe)), expect_out);
    }

    #[test]
    fn every_skip_subnet_is_exempt_in_its_direction(
        both in v4_subnets(), inbound_only in v4_subnets(), probe in any::<u32>(),
    ) {
        let spec = Spec {
            inbound_subnets_to_ignore: both.union(&inbound_only),
            outbound_subnets_to_ignore: both.clone(),
            ..Spec::default()
        };
        let rules = Ruleset::from(&spec);
        let probe = IpAddr::V4(Ipv4Addr::from(probe));
        let inbound = Packet { src: probe, ..app_packet(8080) };
        let outbound = Packet { dst: probe, ..app_packet(8080) };
        let exempt_in = spec.inbound_subnets_to_ignore.contains(probe);
        let exempt_out = both.contains(probe);
        prop_assert_eq!(verdict(&rules.inbound, &inbound), if exempt_in { None } else { Some(4143) });
        prop_assert_eq!(verdict(&rules.outbound, &outbound), if exempt_out { None } else { Some(4140) });
        for net in both.v4.iter() {
            let inside = Packet { dst: IpAddr::V4(net.broadcast()), ..app_packet(8080) };
            prop_assert_eq!(verdict(&rules.outbound, &inside), None);
        }
    }

    #[test]
    fn inbound_is_redirected_only_to_the_pods_own_non_loopback_addresses(
        ignored in port_set(), redirected in port_set(), nets in v4_subnets(),
        v4 in any::<u32>(), v6 in any::<u128>(), port in 1u16..=65535, ipv6 in any::<bool>(),
    ) {
        let spec = Spec {
            inbound_ports_to_ignore: ignored,
            ports_to_redirect: redirected,
            inbound_subnets_to_ignore: nets,
            ipv6,
            ..Spec::default()
        };
        let rules = Ruleset::from(&spec);
        let loopback_v4 = Ipv4Addr::from((127u32 << 24) | (v4 & 0x00ff_ffff));
        for dst in [
            IpAddr::V4(Ipv4Addr::from(v4)),
            IpAddr::V4(loopback_v4),
            IpAddr::V6(Ipv6Addr::from(v6)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            if dst == IpAddr::V4(POD_V4) || dst == IpAddr::V6(POD_V6) {
                continue;
            }
            for via_lo in [false, true] {
                let packet = Packet { dst, via_lo, ..app_packet(port) };
                prop_assert_eq!(verdict(&rules.inbound, &packet), None, "{} via lo {}", dst, via_lo);
            }
        }
    }

    #[test]
    fn rule_count_does_not_grow_with_lists(ports in port_set(), nets in v4_subnets()) {
        let spec = Spec {
            inbound_ports_to_ignore: ports.clone(),
            outbound_ports_to_ignore: ports,
            inbound_subnets_to_ignore: nets.clone(),
            outbound_subnets_to_ignore: nets,
            proxy_gid: Some(7),
            ..Spec::default()
        };
        // At most: 2 skip-port rules, 4 subnet rules, uid, gid, lo, 2 redirects,
        // and the 3 rules that keep inbound to the pod's own addresses.
        prop_assert!(Ruleset::from(&spec).rule_count() <= 14);
    }
}
