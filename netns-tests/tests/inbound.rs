//! Inbound traffic (nat prerouting): redirected to the proxy's port 4143 unless an inbound
//! skip port exempts it, or only the `--ports-to-redirect` are. Each backend, IPv4 and IPv6.

use std::net::SocketAddr;

use netns_tests::{for_each_backend, Backend, Family, Pods};

const PROXY: &str = "pod proxy :4143";
const APP: &str = "pod app";

/// Connects from the peer to the pod's `port`, where the pod's application listens, and
/// asserts that the connection landed on `want` (the proxy: with `SO_ORIGINAL_DST` naming the
/// pod's address and `port`).
#[track_caller]
fn assert_inbound(pods: &Pods, family: Family, port: u16, want: &str, context: &str) {
    let proxy = pods.pod.listen(PROXY, family.any_port(4143));
    let app = pods.pod.listen(APP, family.any_port(port));
    let to = SocketAddr::new(family.pod(), port);
    let (on, accepted) = pods.peer.connect_and_land(to, &[&proxy, &app]);
    assert_eq!(
        on, want,
        "{context}: peer -> {to} landed on the wrong listener"
    );
    assert_eq!(
        accepted.peer.ip(),
        family.peer(),
        "{context}: the source is kept"
    );
    if on == PROXY {
        assert_eq!(
            accepted.original_dst.as_ref().ok(),
            Some(&to),
            "{context}: SO_ORIGINAL_DST of peer -> {to}: {:?}",
            accepted.original_dst
        );
    }
}

fn inbound_connection_lands_on_4143_with_the_original_port(backend: Backend) {
    let pods = Pods::new(&backend.test_name("inbound_connection_lands_on_4143"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    for family in Family::ALL {
        for port in [8080, 80, 4189, 4192] {
            assert_inbound(&pods, family, port, PROXY, "defaults");
        }
    }
}

fn inbound_default_skip_ports_4190_and_4191_reach_the_application(backend: Backend) {
    let pods = Pods::new(&backend.test_name("inbound_default_skip_ports"));
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    for family in Family::ALL {
        for port in [4190, 4191] {
            assert_inbound(&pods, family, port, APP, "defaults");
        }
        // Control: the rules are there, and the neighbours are redirected.
        for port in [4189, 4192] {
            assert_inbound(&pods, family, port, PROXY, "defaults");
        }
    }
}

fn inbound_custom_skip_ports_single_and_in_a_range_reach_the_application(backend: Backend) {
    let pods = Pods::new(&backend.test_name("inbound_custom_skip_ports"));
    let flags = "--inbound-ports-to-ignore=7000,7100-7200";
    pods.pod.meshinit_on(backend, &["apply", flags]).expect_ok();
    for family in Family::ALL {
        for port in [7000, 7100, 7150, 7200] {
            assert_inbound(&pods, family, port, APP, flags);
        }
        for port in [6999, 7001, 7099, 7201, 8080] {
            assert_inbound(&pods, family, port, PROXY, flags);
        }
    }
}

fn inbound_ports_to_redirect_redirects_only_those(backend: Backend) {
    let pods = Pods::new(&backend.test_name("inbound_ports_to_redirect"));
    let flags = "--ports-to-redirect=8080,9000-9001";
    pods.pod.meshinit_on(backend, &["apply", flags]).expect_ok();
    for family in Family::ALL {
        for port in [8080, 9000, 9001] {
            assert_inbound(&pods, family, port, PROXY, flags);
        }
        for port in [8081, 8999, 9002, 80] {
            assert_inbound(&pods, family, port, APP, flags);
        }
    }
}

for_each_backend!(
    inbound_connection_lands_on_4143_with_the_original_port,
    inbound_default_skip_ports_4190_and_4191_reach_the_application,
    inbound_custom_skip_ports_single_and_in_a_range_reach_the_application,
    inbound_ports_to_redirect_redirects_only_those,
);
