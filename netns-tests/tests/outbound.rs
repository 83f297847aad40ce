//! Outbound traffic (nat output): redirected to the proxy's port 4140 unless a skip port or
//! the proxy's own uid/gid exempts it. Every case runs for each backend, IPv4 and IPv6.

use std::net::SocketAddr;

use netns_tests::{for_each_backend, landed_on, Backend, Family, Listener, Pods};

const PROXY: &str = "pod proxy :4140";
const APP: &str = "peer app";

/// The pod's outbound proxy listener for `family`.
fn proxy(pods: &Pods, family: Family) -> Listener {
    pods.pod.listen(PROXY, family.any_port(4140))
}

/// Connects from the pod (as root) to the peer's `port`, where the peer listens, and asserts
/// that the connection landed on `want` (and, when that is the proxy, that `SO_ORIGINAL_DST`
/// names the peer's address and port).
#[track_caller]
fn assert_outbound(pods: &Pods, family: Family, port: u16, want: &str, context: &str) {
    let proxy = proxy(pods, family);
    let app = pods.peer.listen(APP, family.any_port(port));
    let to = SocketAddr::new(family.peer(), port);
    let (on, accepted) = pods.pod.connect_and_land(to, &[&proxy, &app]);
    assert_eq!(
        on, want,
        "{context}: pod -> {to} landed on the wrong listener"
    );
    if on == PROXY {
        assert_eq!(
            accepted.original_dst.as_ref().ok(),
            Some(&to),
            "{context}: SO_ORIGINAL_DST of pod -> {to}: {:?}",
            accepted.original_dst
        );
    } else {
        assert_eq!(
            accepted.peer.ip(),
            family.pod(),
            "{context}: the peer sees the pod"
        );
    }
}

fn outbound_connection_lands_on_4140_with_the_original_destination(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_connection_lands_on_4140"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    for family in Family::ALL {
        assert_outbound(&pods, family, 8080, PROXY, "defaults");
        assert_outbound(&pods, family, 443, PROXY, "defaults");
    }
}

fn outbound_connection_to_the_pod_itself_via_lo_is_not_redirected(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_via_lo_is_not_redirected"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    for family in Family::ALL {
        let proxy = proxy(&pods, family);
        let local = pods.pod.listen("pod app", family.any_port(8080));
        let to = SocketAddr::new(family.pod(), 8080);
        let (on, _) = pods.pod.connect_and_land(to, &[&proxy, &local]);
        assert_eq!(on, "pod app", "pod -> its own {to} leaves through lo");
        drop((proxy, local));
        // Control: the rules are there.
        assert_outbound(&pods, family, 8080, PROXY, "defaults");
    }
}

fn outbound_skip_ports_single_and_in_a_range_reach_the_peer_directly(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_skip_ports"));
    let flags = "--outbound-ports-to-ignore=5555,9000-9010";
    pods.pod.meshinit_on(backend, &["apply", flags]).expect_ok();
    for family in Family::ALL {
        for port in [5555, 9000, 9005, 9010] {
            assert_outbound(&pods, family, port, APP, flags);
        }
        for port in [5554, 5556, 8999, 9011] {
            assert_outbound(&pods, family, port, PROXY, flags);
        }
    }
}

/// More skip ports than one iptables `multiport` match takes (15, a range counting as two):
/// the ports of every chunk, the first and the last, are exempt.
fn outbound_skip_ports_beyond_one_multiport_match(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_many_skip_ports"));
    let singles: Vec<String> = (0..20).map(|i| (5000 + 10 * i).to_string()).collect();
    let flags = format!(
        "--outbound-ports-to-ignore={},6000-6009,6100-6109,6200-6209",
        singles.join(",")
    );
    pods.pod
        .meshinit_on(backend, &["apply", &flags])
        .expect_ok();
    pods.pod
        .meshinit_on(backend, &["check", &flags])
        .expect_code(0);
    for family in Family::ALL {
        for port in [5000, 5140, 5190, 6000, 6105, 6209] {
            assert_outbound(&pods, family, port, APP, &flags);
        }
        for port in [5001, 5195, 6010, 6210] {
            assert_outbound(&pods, family, port, PROXY, &flags);
        }
    }
}

/// Connects from the pod as `uid`/`gid` (through `setpriv`) to the peer's `port` and returns
/// where it landed.
fn outbound_as(pods: &Pods, family: Family, uid: u32, gid: u32) -> String {
    let proxy = proxy(pods, family);
    let app = pods.peer.listen(APP, family.any_port(8080));
    let to = SocketAddr::new(family.peer(), 8080);
    pods.pod.connect_as(to, uid, gid).expect_ok();
    let (on, _) = landed_on(&[&proxy, &app]);
    on.to_string()
}

fn outbound_connection_of_the_proxy_uid_is_not_redirected(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_proxy_uid"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    for family in Family::ALL {
        assert_eq!(
            outbound_as(&pods, family, 2102, 2102),
            APP,
            "{family:?}: default proxy uid 2102"
        );
        assert_eq!(
            outbound_as(&pods, family, 1000, 1000),
            PROXY,
            "{family:?}: any other uid"
        );
    }

    pods.pod
        .meshinit_on(backend, &["apply", "--proxy-uid", "3000"])
        .expect_ok();
    for family in Family::ALL {
        assert_eq!(
            outbound_as(&pods, family, 3000, 3000),
            APP,
            "{family:?}: --proxy-uid 3000"
        );
        assert_eq!(
            outbound_as(&pods, family, 2102, 2102),
            PROXY,
            "{family:?}: 2102 is no longer the proxy"
        );
    }
}

fn outbound_connection_of_the_proxy_gid_is_not_redirected(backend: Backend) {
    let pods = Pods::new(&backend.test_name("outbound_proxy_gid"));
    pods.pod
        .meshinit_on(backend, &["apply", "--proxy-gid", "2200"])
        .expect_ok();
    for family in Family::ALL {
        assert_eq!(
            outbound_as(&pods, family, 1000, 2200),
            APP,
            "{family:?}: --proxy-gid 2200"
        );
        assert_eq!(
            outbound_as(&pods, family, 1000, 1000),
            PROXY,
            "{family:?}: another gid"
        );
        assert_eq!(
            outbound_as(&pods, family, 2102, 1000),
            APP,
            "{family:?}: the uid still exempts"
        );
    }
}

for_each_backend!(
    outbound_connection_lands_on_4140_with_the_original_destination,
    outbound_connection_to_the_pod_itself_via_lo_is_not_redirected,
    outbound_skip_ports_single_and_in_a_range_reach_the_peer_directly,
    outbound_skip_ports_beyond_one_multiport_match,
    outbound_connection_of_the_proxy_uid_is_not_redirected,
    outbound_connection_of_the_proxy_gid_is_not_redirected,
);
