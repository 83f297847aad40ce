//! The one `SO_ORIGINAL_DST` reader of the project (meshproxy's listeners, meshinit's
//! `validate`, the netns tests).
//!
//! When nat rules redirect a connection, the kernel rewrites its destination but keeps
//! the original in the conntrack entry: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4,
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6 (both optname 80). nix wraps
//! both calls, so this needs no `unsafe`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The original destination of an accepted connection: its address and port. `ipv6`
/// says which table holds the NAT record: the family of the socket's local address
/// (listeners are `IPV6_V6ONLY`). An IPv6 destination keeps its scope id but never a
/// flow label: the kernel fills `sin6_flowinfo` with the accepted socket's label (with
/// `net.ipv6.flowlabel_reflect=1`, the client's), which is not part of where the client
/// meant to go and would make a comparison with an address fail.
///
/// `ENOENT` means the connection has no NAT record: it was not redirected.
pub fn original_dst(socket: &impl AsFd, ipv6: bool) -> io::Result<SocketAddr> {
    if ipv6 {
        let sa = getsockopt(socket, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            0,
            sa.sin6_scope_id,
        )))
    } else {
        let sa = getsockopt(socket, sockopt::OriginalDst)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}
