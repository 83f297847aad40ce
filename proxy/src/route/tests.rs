use std::net::{IpAddr, SocketAddr};

use super::*;

const POD_V4: &str = "198.18.0.1";
const POD_V6: &str = "fd00:18::1";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The pod of the netns tests: its two addresses and loopback are local.
fn pod_local(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip == POD_V4.parse::<IpAddr>().unwrap()
        || ip == POD_V6.parse::<IpAddr>().unwrap()
}

/// meshproxy's default listeners.
fn listeners() -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    (
        vec![addr("0.0.0.0:4143"), addr("[::]:4143")],
        vec![addr("127.0.0.1:4140"), addr("[::1]:4140")],
    )
}

fn decide(direction: Direction, original: &str, accepts_direct: bool) -> Result<Route, Refused> {
    let (inbound, outbound) = listeners();
    let is_local: &dyn Fn(IpAddr) -> bool = &pod_local;
    let cx = Context {
        accepts_direct,
        inbound: &inbound,
        outbound: &outbound,
        is_local: Some(is_local),
        services: None,
    };
    route(direction, Ok(addr(original)), &cx).map_err(|refusal| refusal.reason())
}

#[test]
fn inbound_destinations_must_be_addresses_of_the_pod() {
    use Direction::Inbound;
    let ok = |s: &str| Ok(Route::Forward(addr(s)));
    assert_eq!(
        decide(Inbound, "198.18.0.1:8080", false),
        ok("198.18.0.1:8080")
    );
    assert_eq!(
        decide(Inbound, "[fd00:18::1]:8080", false),
        ok("[fd00:18::1]:8080")
    );
    for (original, reason) in [
        ("127.0.0.1:8080", Refused::LoopbackDestination),
        ("127.9.9.9:22", Refused::LoopbackDestination),
        ("[::1]:8080", Refused::LoopbackDestination),
        ("[::ffff:127.0.0.1]:8080", Refused::LoopbackDestination),
        ("0.0.0.0:8080", Refused::UnspecifiedDestination),
        ("[::]:8080", Refused::UnspecifiedDestination),
        ("224.0.0.1:8080", Refused::MulticastDestination),
        ("255.255.255.255:8080", Refused::MulticastDestination),
        ("[ff02::1]:8080", Refused::MulticastDestination),
        ("198.18.0.2:8080", Refused::ForeignDestination),
        ("[fd00:18::2]:8080", Refused::ForeignDestination),
        ("[::ffff:198.18.0.2]:8080", Refused::ForeignDestination),
    ] {
        assert_eq!(decide(Inbound, original, false), Err(reason), "{original}");
    }
}

#[test]
fn outbound_destinations_are_the_applications_business() {
    use Direction::Outbound;
    for original in [
        "198.18.0.2:80",
        "127.0.0.1:5432",
        "[::1]:8080",
        "198.18.0.1:4143",
    ] {
        // Only the proxy's own listeners are refused (below); even the pod's inbound
        // port at its own address is a wildcard listener, so that one is.
        let got = decide(Outbound, original, false);
        if original.ends_with(":4143") {
            assert_eq!(got, Err(Refused::SelfLoop), "{original}");
        } else {
            assert_eq!(got, Ok(Route::Forward(addr(original))), "{original}");
        }
    }
}

#[test]
fn no_original_destination_is_refused_or_direct_mtls_inbound() {
    let (inbound, outbound) = listeners();
    let local = addr("198.18.0.1:4143");
    let peer = addr("198.18.0.2:40000");
    let not_redirected = || Err(OrigDstError::NotRedirected { local, peer });
    for accepts_direct in [false, true] {
        let cx = Context {
            accepts_direct,
            inbound: &inbound,
            outbound: &outbound,
            is_local: None,
            services: None,
        };
        let got = route(Direction::Inbound, not_redirected(), &cx);
        match (accepts_direct, got) {
            (true, Ok(Route::Direct(at))) => assert_eq!(at, local),
            (false, Err(Refusal::NoOriginalDst(_))) => {}
            (_, other) => panic!("accepts_direct={accepts_direct}: {other:?}"),
        }
        // Outbound never takes direct connections.
        let got = route(Direction::Outbound, not_redirected(), &cx);
        assert!(matches!(got, Err(Refusal::NoOriginalDst(_))), "{got:?}");
    }
}

#[test]
fn every_own_listener_is_a_self_loop_in_both_directions_and_families() {
    for direction in [Direction::Inbound, Direction::Outbound] {
        for original in [
            // The wildcard inbound listeners, at each local address.
            "198.18.0.1:4143",
            "[fd00:18::1]:4143",
            // The loopback outbound listeners (inbound: refused as loopback first).
            "127.0.0.1:4140",
            "[::1]:4140",
        ] {
            let got = decide(direction, original, false);
            let want = if direction == Direction::Inbound && original.contains(":4140") {
                Refused::LoopbackDestination
            } else {
                Refused::SelfLoop
            };
            assert_eq!(got, Err(want), "{direction:?} {original}");
        }
    }
    // A wildcard outbound listener makes the pod address with that port a self-loop too.
    let inbound = [addr("0.0.0.0:4143")];
    let outbound = [addr("0.0.0.0:4140"), addr("[::]:4140")];
    let is_local: &dyn Fn(IpAddr) -> bool = &pod_local;
    let cx = Context {
        accepts_direct: true,
        inbound: &inbound,
        outbound: &outbound,
        is_local: Some(is_local),
        services: None,
    };
    for original in ["198.18.0.1:4140", "[fd00:18::1]:4140"] {
        let got = route(Direction::Inbound, Ok(addr(original)), &cx);
        assert!(
            matches!(got, Err(Refusal::SelfLoop { .. })),
            "{original}: {got:?}"
        );
    }
    // The same port at a foreign address is not ours: outbound, it is forwarded.
    let got = route(Direction::Outbound, Ok(addr("198.18.0.2:4140")), &cx);
    assert_eq!(got.unwrap(), Route::Forward(addr("198.18.0.2:4140")));
    // A v4 wildcard does not take IPv6, and the reverse: [::1]:4143 is no listener here.
    let got = route(Direction::Outbound, Ok(addr("[::1]:4143")), &cx);
    assert_eq!(got.unwrap(), Route::Forward(addr("[::1]:4143")));
    // `connect` takes the unspecified address for loopback: that is our listener too.
    for original in ["0.0.0.0:4140", "[::]:4140"] {
        let got = route(Direction::Outbound, Ok(addr(original)), &cx);
        assert!(
            matches!(got, Err(Refusal::SelfLoop { .. })),
            "{original}: {got:?}"
        );
    }
    let (inbound, outbound) = listeners();
    let cx = Context {
        inbound: &inbound,
        outbound: &outbound,
        ..cx
    };
    for original in ["0.0.0.0:4140", "[::]:4140", "0.0.0.0:4143", "[::]:4143"] {
        let got = route(Direction::Outbound, Ok(addr(original)), &cx);
        assert!(
            matches!(got, Err(Refusal::SelfLoop { .. })),
            "{original}: {got:?}"
        );
    }
}

#[test]
fn the_inbound_port_at_another_pod_address_is_direct_mtls_when_meshed() {
    assert_eq!(
        decide(Direction::Inbound, "[fd00:18::1]:4143", true),
        Ok(Route::Direct(addr("[fd00:18::1]:4143")))
    );
    assert_eq!(
        decide(Direction::Inbound, "198.18.0.1:4143", false),
        Err(Refused::SelfLoop)
    );
    // Meshed or not, an outbound connection to our inbound port is never direct.
    assert_eq!(
        decide(Direction::Outbound, "198.18.0.1:4143", true),
        Err(Refused::SelfLoop)
    );
}

#[test]
fn a_caller_chosen_destination_skips_the_address_checks_but_not_the_self_loop_check() {
    let (inbound, outbound) = listeners();
    let cx = Context {
        accepts_direct: false,
        inbound: &inbound,
        outbound: &outbound,
        is_local: None,
        services: None,
    };
    let got = route(Direction::Inbound, Ok(addr("127.0.0.1:8080")), &cx);
    assert_eq!(got.unwrap(), Route::Forward(addr("127.0.0.1:8080")));
    let got = route(Direction::Inbound, Ok(addr("127.0.0.1:4140")), &cx);
    assert!(matches!(got, Err(Refusal::SelfLoop { .. })), "{got:?}");
}

#[test]
fn outbound_to_a_service_address_is_balanced_inbound_and_other_addresses_are_not() {
    let (inbound, outbound) = listeners();
    let table = crate::balance::Table::parse(
        r#"
        [[service]]
        name = "redis"
        addrs = ["198.18.100.10:6379"]
        [[service.backend]]
        name = "a"
        weight = 1
        endpoints = [ { addr = "198.18.1.2:6379" } ]
        "#,
    );
    let cx = Context {
        accepts_direct: false,
        inbound: &inbound,
        outbound: &outbound,
        is_local: None,
        services: Some(&table),
    };
    let service = addr("198.18.100.10:6379");
    match route(Direction::Outbound, Ok(service), &cx) {
        Ok(Route::Balanced(original, s)) => {
            assert_eq!(original, service);
            assert_eq!(&*s.name, "redis");
        }
        other => panic!("{other:?}"),
    }
    let mapped = addr("[::ffff:198.18.100.10]:6379");
    assert!(matches!(
        route(Direction::Outbound, Ok(mapped), &cx),
        Ok(Route::Balanced(..))
    ));
    assert_eq!(
        route(Direction::Inbound, Ok(service), &cx).unwrap(),
        Route::Forward(service)
    );
    let other = addr("198.18.100.10:6380");
    assert_eq!(
        route(Direction::Outbound, Ok(other), &cx).unwrap(),
        Route::Forward(other)
    );
}
