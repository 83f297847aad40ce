//! The destination a redirected client meant to reach.
//!
//! When meshinit's nat rules redirect a connection to the proxy, the kernel rewrites
//! its destination to our listener but keeps the original in the conntrack entry. We
//! read it back with `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6, through the project's one
//! reader (`meshinit_settings::original_dst`, shared with meshinit's `validate`).
//!
//! It also answers whether an address is one of the namespace's own ([`is_local`]),
//! which `route` asks of every inbound original destination.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use nix::sys::socket::sockopt;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;

/// Why a connection has no usable original destination. Such a connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    /// The kernel has no NAT record for the connection (`ENOENT`): it was not
    /// redirected, or the rules are missing.
    #[error(
        "connection {peer} -> {local} has no original destination (was it redirected?): {source}"
    )]
    Lookup {
        local: SocketAddr,
        peer: SocketAddr,
        source: io::Error,
    },
    /// The original destination is the listener itself: the client connected to the
    /// proxy port directly, without a redirect. Forwarding would connect to ourselves.
    #[error("connection {peer} -> {local} was not redirected: its original destination is the proxy itself")]
    NotRedirected { local: SocketAddr, peer: SocketAddr },
    #[error("cannot read the addresses of an accepted connection: {0}")]
    Addrs(io::Error),
}

/// The original destination of an accepted, redirected connection: its address and
/// port (an IPv6 destination keeps its scope id, never a flow label).
///
/// Refuses a connection whose original destination is the socket's own local address
/// and port: that connection was not redirected, and forwarding it would make the proxy
/// connect to itself, again and again.
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, OrigDstError> {
    let local = stream.local_addr().map_err(OrigDstError::Addrs)?;
    let peer = stream.peer_addr().map_err(OrigDstError::Addrs)?;
    lookup(stream, local, peer)
}

/// [`original_dst`] of a connection that `listener` (the address it is bound to)
/// accepted from `peer`, as the accept loop knows them: `getpeername` is not asked
/// again (`accept` returned the peer), and neither is `getsockname` unless the
/// listener is a wildcard (a listener bound to one address, like the outbound
/// default `127.0.0.1:4140`, accepts only connections to that address, so it is
/// every accepted socket's local address). Two syscalls fewer per connection
/// (docs/bench/issue14-conn-s5.md).
pub fn accepted_original_dst(
    stream: &TcpStream,
    listener: SocketAddr,
    peer: SocketAddr,
) -> Result<SocketAddr, OrigDstError> {
    let local = if listener.ip().is_unspecified() {
        stream.local_addr().map_err(OrigDstError::Addrs)?
    } else {
        listener
    };
    lookup(stream, local, peer)
}

/// The NAT record of `stream`, whose local address is `local`, refused when it names
/// `local` itself.
fn lookup(
    stream: &TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<SocketAddr, OrigDstError> {
    // Our IPv6 listeners are IPV6_V6ONLY, so the family of the local address says which
    // table (iptables or ip6tables/nft ip6) holds the NAT record. The flow label is
    // dropped: with `net.ipv6.flowlabel_reflect=1` it is the client's, never 0, so a
    // whole-`sockaddr_in6` comparison with our own address never matched and a
    // connection to `[pod]:4143` was forwarded to the proxy itself, forever.
    let original = meshinit_settings::original_dst(stream, local.is_ipv6()).map_err(|source| {
        OrigDstError::Lookup {
            local,
            peer,
            source,
        }
    })?;
    if same_endpoint(original, local) {
        return Err(OrigDstError::NotRedirected { local, peer });
    }
    Ok(original)
}

/// The original destination of a connection handed over by TPROXY (meshinit's
/// `tproxy` mode): the accepted socket's own local address, which TPROXY leaves
/// as the client wrote it. `route` then applies the same trust boundary as to a
/// redirected connection's (a local, non-loopback address; not our own listener).
pub fn transparent_dst(stream: &TcpStream) -> Result<SocketAddr, OrigDstError> {
    let local = stream.local_addr().map_err(OrigDstError::Addrs)?;
    Ok(match local {
        // IPv6 listeners are IPV6_V6ONLY; a scope id or flow label is not part of
        // where the client meant to go.
        SocketAddr::V6(v6) => {
            SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, v6.scope_id()))
        }
        v4 => v4,
    })
}

/// Sets IP_TRANSPARENT on a socket of either family (Linux applies the SOL_IP
/// option to IPv6 sockets too): it may then be bound to, and accept connections
/// for, addresses that are not local. Needs CAP_NET_ADMIN (or CAP_NET_RAW).
pub fn set_transparent(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, sockopt::IpTransparent, &true).map_err(io::Error::from)
}

/// Whether two socket addresses name the same endpoint: the same IP and port. Flow
/// labels and scope ids are not compared, and an IPv4-mapped IPv6 address equals its
/// IPv4 address.
pub fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// Whether `ip` is an address of this network namespace: the kernel would deliver a
/// packet addressed to it locally.
///
/// Asked with a bind test: `bind(ip:0)` on a fresh socket succeeds exactly when the
/// address is local (`EADDRNOTAVAIL` otherwise; broadcast addresses are told apart by
/// a `connect`, see below), because the socket sets neither
/// `IP_FREEBIND` nor `IP_TRANSPARENT`. We prefer it to a cached address list because it
/// is always current (an address added a moment ago counts, one removed does not),
/// costs three syscalls and no netlink dump, and uses the kernel's own definition of
/// "local" (for IPv4 that includes `ip route add local` ranges, which an interface list
/// would miss). A UDP socket is used so the port it takes is not a TCP port.
///
/// The one way it can say yes to a foreign address is the sysctl
/// `net.ipv{4,6}.ip_nonlocal_bind=1`; meshproxy warns about that at start-up
/// ([`nonlocal_bind_enabled`]). Any other error (out of descriptors) counts as "not
/// local": the connection is refused rather than forwarded somewhere unknown.
pub fn is_local(ip: IpAddr) -> bool {
    let addr = SocketAddr::new(ip, 0);
    let Ok(socket) = Socket::new(Domain::for_address(addr), Type::DGRAM, None) else {
        return false;
    };
    if socket.bind(&addr.into()).is_err() {
        return false;
    }
    // IPv4 `bind` also accepts broadcast addresses (a subnet's directed broadcast):
    // a UDP `connect` to one fails with EACCES without SO_BROADCAST, and only sets the
    // socket's route otherwise (no packet is sent).
    ip.is_ipv6() || socket.connect(&SocketAddr::new(ip, 9).into()).is_ok()
}

/// Whether `net.ipv4.ip_nonlocal_bind` or `net.ipv6.ip_nonlocal_bind` is set in this
/// namespace, which makes [`is_local`] say yes to every address.
pub fn nonlocal_bind_enabled() -> bool {
    [
        "/proc/sys/net/ipv4/ip_nonlocal_bind",
        "/proc/sys/net/ipv6/ip_nonlocal_bind",
    ]
    .iter()
    .any(|path| std::fs::read_to_string(path).is_ok_and(|v| v.trim() != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV6;
    use tokio::net::TcpListener;

    /// Without redirect rules, loopback connections are either untracked (ENOENT) or
    /// tracked without NAT (original == local): both must be refused, never returned.
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let err = original_dst(&accepted).expect_err("not redirected");
        match err {
            OrigDstError::Lookup { local, .. } | OrigDstError::NotRedirected { local, .. } => {
                assert_eq!(local, addr)
            }
            other => panic!("unexpected error {other}"),
        }
    }

    /// The accept loop's lookup takes the peer from `accept` and, for a listener bound
    /// to one address, the local address from the listener; a wildcard listener's
    /// connections still report the address they really reached.
    #[tokio::test]
    async fn accepted_lookups_name_the_listener_or_the_real_local_address() {
        for bound in ["127.0.0.1:0", "0.0.0.0:0"] {
            let listener = TcpListener::bind(bound).await.unwrap();
            let listener_addr = listener.local_addr().unwrap();
            let port = listener_addr.port();
            let _client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (accepted, peer) = listener.accept().await.unwrap();
            let err =
                accepted_original_dst(&accepted, listener_addr, peer).expect_err("not redirected");
            let want_local: SocketAddr = ([127, 0, 0, 1], port).into();
            match err {
                OrigDstError::Lookup { local, peer: p, .. }
                | OrigDstError::NotRedirected { local, peer: p } => {
                    assert_eq!(local, want_local, "listener {bound}");
                    assert_eq!(p, peer, "listener {bound}");
                }
                other => panic!("unexpected error {other}"),
            }
        }
    }

    #[test]
    fn endpoints_compare_address_and_port_only() {
        let a: SocketAddrV6 = "[fd00:18::1]:4143".parse().unwrap();
        let labelled = SocketAddrV6::new(*a.ip(), 4143, 0xabcde, 0);
        assert!(same_endpoint(a.into(), labelled.into()));
        assert!(!same_endpoint(
            a.into(),
            "[fd00:18::1]:4140".parse().unwrap()
        ));
        assert!(same_endpoint(
            "[::ffff:198.18.0.1]:80".parse().unwrap(),
            "198.18.0.1:80".parse().unwrap()
        ));
    }

    #[test]
    fn loopback_is_local_and_documentation_and_broadcast_addresses_are_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(
            is_local("127.0.0.2".parse().unwrap()),
            "all of 127/8 is local"
        );
        assert!(!is_local("203.0.113.77".parse().unwrap()));
        assert!(!is_local("2001:db8::77".parse().unwrap()));
    }
}
