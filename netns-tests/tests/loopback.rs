//! Loopback services stay loopback: inbound interception covers only connections addressed
//! to one of the pod's own non-loopback addresses.
//!
//! nat prerouting runs before routing. A host on the pod's L2 segment can put any destination
//! address in a packet it sends to the pod's MAC address: `127.0.0.1`, or an address that is
//! not the pod's at all. The kernel would drop such a packet when routing it (a martian
//! destination; the pod does not forward), but a redirect in prerouting comes first and hands
//! it to the proxy, which then connects, as the exempt proxy uid, to the original destination:
//! a service bound to `127.0.0.1` only, or onwards to the foreign address.
//!
//! The peer here does exactly that. It routes two addresses that are not the pod's through
//! the pod (the pod is their gateway, so their packets go to the pod's MAC address):
//! - [`lure`]: its packets get their destination rewritten to loopback (`127.0.0.1` / `::1`)
//!   by an nft rule in the peer's output hook, after routing chose the pod; the answers get
//!   their source rewritten back in the peer's prerouting, so the peer's TCP sees a normal
//!   handshake.
//! - [`foreign`]: left as it is, an address the pod does not have.
//!
//! With meshinit's rules and meshproxy running as in the other proxy tests, neither may reach
//! anything in the pod: not the loopback-only service, not the proxy. The pod's own address
//! is still redirected. Every backend, IPv4 and IPv6. (The kernel itself drops an IPv6
//! packet addressed to `::1` that arrives on a non-loopback interface, before any hook, so for
//! IPv6 only the foreign address shows the difference on the old rules; the `::1` case is
//! asserted all the same.)

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use netns_tests::{
    for_each_backend, Backend, Family, Listener, MeshProxy, Netns, Pods, ACCEPT_TIMEOUT,
};

/// The port of the pod's loopback-only service, and of its application on the pod address.
/// meshproxy is told it is opaque, so it connects to the original destination at once
/// instead of waiting for protocol detection.
const PORT: u16 = 7777;

/// An address routed through the pod whose packets the peer rewrites to loopback.
fn lure(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, 9, 1)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1)),
    }
}

/// An address routed through the pod that is not the pod's (left as it is).
fn foreign(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, 9, 2)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2)),
    }
}

fn loopback(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// `ip` or `ip6`, as nft names the family's header.
fn nft_ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Makes the peer send [`lure`] and [`foreign`] to the pod's MAC address, and rewrites the
/// lure's destination to loopback (and its answers' source back). Table `inet lure`.
fn set_up_lure(peer: &Netns) {
    for (nets, family) in [("198.18.9.0/24", Family::V4), ("fd00:99::/64", Family::V6)] {
        peer.ip(&["route", "add", nets, "via", &family.pod().to_string()]);
    }
    peer.nft(&["add", "table", "inet", "lure"]);
    // Output, type filter: after routing chose the pod as the next hop, so changing the
    // destination does not reroute the packet (it would go to the peer's own lo).
    peer.nft(&["add chain inet lure out { type filter hook output priority 0 ; policy accept ; }"]);
    // Prerouting at raw priority, before conntrack, so the peer's conntrack sees the answer
    // as the reply to the connection its client opened.
    peer.nft(&[
        "add chain inet lure in { type filter hook prerouting priority -300 ; policy accept ; }",
    ]);
    for family in Family::ALL {
        let (ip, lure, lo) = (nft_ip(family), lure(family), loopback(family));
        peer.nft(&[&format!(
            "add rule inet lure out {ip} daddr {lure} tcp dport {PORT} counter {ip} daddr set {lo}"
        )]);
        peer.nft(&[&format!(
            "add rule inet lure in {ip} saddr {lo} tcp sport {PORT} {ip} saddr set {lure}"
        )]);
    }
}

/// Packets the peer sent to `family`'s lure (so rewritten to loopback) so far.
fn lured_packets(peer: &Netns, family: Family) -> u64 {
    let listing = peer.nft(&["list", "chain", "inet", "lure", "out"]).stdout;
    let line = listing
        .lines()
        .find(|line| line.contains(&format!("daddr {}", lure(family))))
        .unwrap_or_else(|| panic!("no lure rule for {family:?}\n{listing}"));
    counter_packets(line)
}

/// Counts, in the pod, IPv4 packets arriving on the veth addressed to loopback: proof that
/// the lure's packets do reach the pod's prerouting hook (table `inet witness`, raw priority,
/// before meshinit's nat chain). No IPv6 counterpart: the kernel drops those before any hook.
fn set_up_witness(pod: &Netns) {
    pod.nft(&["add", "table", "inet", "witness"]);
    pod.nft(&[
        "add chain inet witness in { type filter hook prerouting priority -300 ; policy accept ; }",
    ]);
    pod.nft(&[&format!(
        "add rule inet witness in iifname \"eth0\" ip daddr 127.0.0.0/8 tcp dport {PORT} counter"
    )]);
}

fn witnessed_packets(pod: &Netns) -> u64 {
    let listing = pod.nft(&["list", "chain", "inet", "witness", "in"]).stdout;
    let line = listing
        .lines()
        .find(|line| line.contains("counter"))
        .unwrap_or_else(|| panic!("no witness rule\n{listing}"));
    counter_packets(line)
}

fn counter_packets(line: &str) -> u64 {
    let mut words = line.split_whitespace();
    words
        .find(|word| *word == "packets")
        .and_then(|_| words.next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {line:?}"))
}

/// Connects from the peer to `to` and checks that nothing in the pod answers: no handshake
/// (the pod drops the SYN). Should one happen anyway, the error says whether the
/// loopback-only `service` was reached through it.
fn unreachable(pods: &Pods, to: SocketAddr, service: &Listener, what: &str) -> Result<(), String> {
    if let Ok(mut client) = pods.peer.connect(to) {
        // Opaque port: the proxy has already dialled its original destination; bytes make
        // any forwarding visible too.
        let _ = client.write_all(b"hello\n");
        let reached = match service.accept_within(ACCEPT_TIMEOUT) {
            Some(accepted) => format!(
                ", and the proxy connected from {} to the loopback-only service {}",
                accepted.peer,
                service.local_addr()
            ),
            None => String::new(),
        };
        return Err(format!(
            "peer -> {to} ({what}): the pod accepted the connection (redirected to the \
             proxy){reached}"
        ));
    }
    match service.try_accept() {
        Some(_) => Err(format!(
            "peer -> {to} ({what}): the loopback-only service {} got a connection",
            service.local_addr()
        )),
        None => Ok(()),
    }
}

/// The pod's own address is still redirected: the connection goes through the proxy (its
/// metrics count it) to the application.
#[track_caller]
fn assert_redirected(pods: &Pods, proxy: &MeshProxy<'_>, family: Family) {
    let to = SocketAddr::new(family.pod(), PORT);
    let app = pods.pod.listen("pod app", to);
    let mut client = pods
        .peer
        .connect(to)
        .unwrap_or_else(|e| panic!("peer -> {to}: {e}"));
    client.write_all(b"hello\n").expect("write to the app");
    let accepted = app
        .accept_within(ACCEPT_TIMEOUT)
        .unwrap_or_else(|| panic!("peer -> {to}: the application got no connection"));
    assert_eq!(
        accepted.peer.ip(),
        family.pod(),
        "peer -> {to}: the application sees the proxy (the pod's address), not the peer"
    );
    let target = to.to_string();
    proxy.wait_for_metric(
        "tcp_open_total",
        &[("direction", "inbound"), ("target_addr", &target)],
        1.0,
        Duration::from_secs(5),
    );
}

/// The pod with meshinit's rules (`backend`) and meshproxy, the peer with its lure; then,
/// per family, a loopback-only service in the pod and `probe`, whose failures are collected
/// so that one run reports every family. Then the pod's own address must still be
/// redirected, and the proxy must have seen nothing but those two control connections.
fn with_lured_peer(
    backend: Backend,
    test: &str,
    probe: impl Fn(&Pods, Family, &Listener) -> Result<(), String>,
) {
    let pods = Pods::new(&backend.test_name(test));
    set_up_lure(&pods.peer);
    set_up_witness(&pods.pod);
    pods.pod.meshinit_on(backend, &["apply"]).expect_ok();
    let proxy = pods
        .pod
        .start_meshproxy(&[&format!("--opaque-ports={PORT}")]);
    let mut failures = Vec::new();
    for family in Family::ALL {
        let service = pods.pod.listen(
            "pod loopback-only service",
            SocketAddr::new(loopback(family), PORT),
        );
        if let Err(failure) = probe(&pods, family, &service) {
            failures.push(format!("{family:?}: {failure}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for family in Family::ALL {
        assert_redirected(&pods, &proxy, family);
    }
    let metrics = proxy.metrics();
    assert_eq!(
        metrics.sum("tcp_open_total", &[("direction", "inbound")]),
        2.0,
        "inbound connections through the proxy: only the two to the pod's address\n{metrics}"
    );
    // The rules that do this are the ones `check` expects.
    pods.pod.meshinit_on(backend, &["check"]).expect_ok();
}

fn a_loopback_only_service_is_not_reachable_from_the_segment(backend: Backend) {
    with_lured_peer(backend, "loopback_service", |pods, family, service| {
        let before = lured_packets(&pods.peer, family);
        let to = SocketAddr::new(lure(family), PORT);
        let result = unreachable(pods, to, service, "rewritten to loopback on the wire");
        // Controls: the lure did send packets addressed to loopback, and (IPv4) they did
        // arrive in the pod's prerouting hook.
        assert!(
            lured_packets(&pods.peer, family) > before,
            "{to}: the peer did not rewrite its packets to {}",
            loopback(family)
        );
        if family == Family::V4 {
            assert!(
                witnessed_packets(&pods.pod) > 0,
                "no packet to 127.0.0.0/8 arrived on the pod's veth: the test proves nothing"
            );
        }
        result
    });
}

fn an_address_that_is_not_the_pods_is_not_intercepted(backend: Backend) {
    with_lured_peer(backend, "foreign_address", |pods, family, service| {
        let to = SocketAddr::new(foreign(family), PORT);
        unreachable(pods, to, service, "not an address of the pod")
    });
}

for_each_backend!(
    a_loopback_only_service_is_not_reachable_from_the_segment,
    an_address_that_is_not_the_pods_is_not_intercepted,
);
