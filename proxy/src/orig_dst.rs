//! The destination a redirected client meant to reach.
//!
//! When meshinit's nat rules redirect a connection to the proxy, the kernel rewrites
//! its destination to our listener but keeps the original in the conntrack entry. We
//! read it back with `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6 (both optname 80). nix wraps
//! both calls, so this module needs no `unsafe`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
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

/// The original destination of an accepted, redirected connection.
///
/// Refuses a connection whose original destination is the socket's own local address:
/// that connection was not redirected, and forwarding it would make the proxy connect to
/// itself, again and again.
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, OrigDstError> {
    let local = stream.local_addr().map_err(OrigDstError::Addrs)?;
    let peer = stream.peer_addr().map_err(OrigDstError::Addrs)?;
    let lookup = |source: nix::Error| OrigDstError::Lookup {
        local,
        peer,
        source: io::Error::from(source),
    };
    // Our IPv6 listeners are IPV6_V6ONLY, so the family of the local address says which
    // table (iptables or ip6tables/nft ip6) holds the NAT record.
    let original = match local {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(lookup)?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(lookup)?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                sa.sin6_flowinfo,
                sa.sin6_scope_id,
            ))
        }
    };
    if original == local {
        return Err(OrigDstError::NotRedirected { local, peer });
    }
    Ok(original)
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
