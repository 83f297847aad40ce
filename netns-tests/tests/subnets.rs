//! Subnets to ignore: `--subnets-to-ignore` exempts inbound traffic by source and outbound
//! traffic by destination; the `--inbound-`/`--outbound-` variants one direction only. Each
//! backend, IPv4 and IPv6.

use std::net::SocketAddr;

use netns_tests::{for_each_backend, Backend, Family, Pods};

const IN_PROXY: &str = "pod proxy :4143";
const OUT_PROXY: &str = "pod proxy :4140";
const DIRECT: &str = "app";

/// Where a connection from the peer to the pod's 8080 lands, and one from the pod to the
/// peer's 8080: the proxy or the application.
fn both_directions(pods: &Pods, family: Family) -> (String, String) {
    let inbound = {
        let proxy = pods.pod.listen(IN_PROXY, family.any_port(4143));
        let app = pods.pod.listen(DIRECT, family.any_port(8080));
        let to = SocketAddr::new(family.pod(), 8080);
        pods.peer
            .connect_and_land(to, &[&proxy, &app])
            .0
            .to_string()
    };
    let outbound = {
        let proxy = pods.pod.listen(OUT_PROXY, family.any_port(4140));
        let app = pods.peer.listen(DIRECT, family.any_port(8080));
        let to = SocketAddr::new(family.peer(), 8080);
        pods.pod.connect_and_land(to, &[&proxy, &app]).0.to_string()
    };
    (inbound, outbound)
}

/// Applies `flag=<the veth subnets of both families>` and checks where traffic lands.
fn check(backend: Backend, test: &str, flag: &str, subnets: &str, want_in: &str, want_out: &str) {
    let pods = Pods::new(&backend.test_name(test));
    let arg = format!("{flag}={subnets}");
    pods.pod.meshinit_on(backend, &["apply", &arg]).expect_ok();
    // The rules are installed, so traffic that is not redirected was exempted by them.
    assert!(
        !pods.pod.ours_in(backend).is_empty(),
        "{arg}: nothing installed in {backend}"
    );
    pods.pod
        .meshinit_on(backend, &["check", &arg])
        .expect_code(0);
    for family in Family::ALL {
        let (inbound, outbound) = both_directions(&pods, family);
        assert_eq!(inbound, want_in, "{family:?} {arg}: peer -> pod:8080");
        assert_eq!(outbound, want_out, "{family:?} {arg}: pod -> peer:8080");
    }
}

const VETH_SUBNETS: &str = "198.18.0.0/24,fd00:18::/64";

fn subnets_to_ignore_exempt_both_directions(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_both",
        "--subnets-to-ignore",
        VETH_SUBNETS,
        DIRECT,
        DIRECT,
    );
}

fn inbound_subnets_to_ignore_exempt_inbound_only(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_inbound",
        "--inbound-subnets-to-ignore",
        VETH_SUBNETS,
        DIRECT,
        OUT_PROXY,
    );
}

fn outbound_subnets_to_ignore_exempt_outbound_only(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_outbound",
        "--outbound-subnets-to-ignore",
        VETH_SUBNETS,
        IN_PROXY,
        DIRECT,
    );
}

fn single_addresses_are_subnets_too(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_hosts",
        "--subnets-to-ignore",
        "198.18.0.2/32,fd00:18::2/128",
        DIRECT,
        DIRECT,
    );
}

fn subnets_that_do_not_contain_the_peer_exempt_nothing(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_other",
        "--subnets-to-ignore",
        "198.19.0.0/16,198.18.0.4/30,fd00:19::/64,fd00:18::4/126",
        IN_PROXY,
        OUT_PROXY,
    );
}

/// An IPv4-mapped IPv6 subnet (`::ffff:198.18.0.0/120`, how an IPv6 socket shows IPv4
/// peers) stands for the IPv4 subnet: it exempts the IPv4 peer, in both directions.
fn ipv4_mapped_subnets_exempt_ipv4_traffic(backend: Backend) {
    check(
        backend,
        "subnets_to_ignore_mapped",
        "--subnets-to-ignore",
        "::ffff:198.18.0.0/120,fd00:18::/64",
        DIRECT,
        DIRECT,
    );
}

for_each_backend!(
    subnets_to_ignore_exempt_both_directions,
    inbound_subnets_to_ignore_exempt_inbound_only,
    outbound_subnets_to_ignore_exempt_outbound_only,
    single_addresses_are_subnets_too,
    subnets_that_do_not_contain_the_peer_exempt_nothing,
    ipv4_mapped_subnets_exempt_ipv4_traffic,
);

/// IPv4 subnets go only into the IPv4 rules and IPv6 subnets only into the IPv6 rules (the
/// issue names mixing them up as a known bug of the reference tool).
fn iptables_get_each_family_its_own_subnets(backend: Backend) {
    let pods = Pods::new(&backend.test_name("iptables_subnets_per_family"));
    pods.pod
        .meshinit_on(
            backend,
            &["apply", &format!("--subnets-to-ignore={VETH_SUBNETS}")],
        )
        .expect_ok();
    let v4 = pods.pod.nat_save(backend, Family::V4);
    let v6 = pods.pod.nat_save(backend, Family::V6);
    assert!(
        v4.contains("198.18.0.0/24"),
        "IPv4 rules lack the IPv4 subnet\n{v4}"
    );
    assert!(!v4.contains("fd00"), "IPv4 rules hold an IPv6 subnet\n{v4}");
    assert!(
        v6.contains("fd00:18::/64"),
        "IPv6 rules lack the IPv6 subnet\n{v6}"
    );
    assert!(
        !v6.contains("198.18."),
        "IPv6 rules hold an IPv4 subnet\n{v6}"
    );
}

#[test]
fn iptables_nft_gets_each_family_its_own_subnets() {
    iptables_get_each_family_its_own_subnets(Backend::IptablesNft);
}

#[test]
fn iptables_legacy_gets_each_family_its_own_subnets() {
    iptables_get_each_family_its_own_subnets(Backend::IptablesLegacy);
}
