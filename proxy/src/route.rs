//! The decision for one accepted connection, before any byte is read: forward it to its
//! original destination, terminate it as a peer proxy's direct mTLS connection, or refuse
//! it. A pure function over plain values ([`route`]); the kernel's answers (the original
//! destination, whether an address is ours) are passed in. What a forwarded connection
//! becomes once its first bytes are read is the next decision, `hop`.
//!
//! # The trust boundary
//!
//! The proxy connects wherever a connection's original destination says, as the proxy
//! UID, whose traffic meshinit never redirects. So the original destination must be
//! somewhere the client could have reached without us:
//!
//! - **Inbound**, it must be an address of the pod itself. meshinit's rules only redirect
//!   such packets; this is the proxy's own defence in depth against rules that are
//!   missing, stale or written by someone else. A packet from outside addressed to
//!   `127.0.0.1` (`loopback_destination`) would otherwise reach services that listen on
//!   loopback precisely so that nothing outside can; to another host
//!   (`foreign_destination`) it would make the pod an open relay; the unspecified
//!   address means "this host" to `connect` (`unspecified_destination`), and TCP never
//!   goes to multicast or broadcast (`multicast_destination`).
//! - **Either direction**, it must not be one of our own listeners (`self_loop`): the
//!   proxy would connect to itself, and with a redirect that keeps matching, again and
//!   again until `--max-connections` runs out. A wildcard listener (`0.0.0.0:4140`)
//!   stands for every local address with its port. The one exception is a peer proxy's
//!   direct mTLS connection to our inbound port, which we terminate rather than forward.
//!
//! Outbound destinations are otherwise the application's business: it may connect to
//! anything, and the proxy only sees what the application could have reached directly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::balance::{Service, Table};
use crate::metrics::Label;
use crate::orig_dst::OrigDstError;
use crate::outcome::Refused;

/// Which listener accepted a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From outside the pod to an application in it (port 4143).
    Inbound,
    /// From an application in the pod to anywhere (port 4140).
    Outbound,
}

impl Direction {
    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    /// The peer identity's label on an mTLS hop, with `id` as its value: the client's
    /// (`client_id`) on inbound connections, the server's (`server_id`) on outbound ones.
    pub fn peer_id(self, id: &str) -> (&'static str, &str) {
        let key = match self {
            Direction::Inbound => "client_id",
            Direction::Outbound => "server_id",
        };
        (key, id)
    }
}

impl Label for Direction {
    fn label(&self) -> &'static str {
        self.as_str()
    }
}

/// What to do with a connection that is not refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Forward to this original destination (detection, plaintext or mTLS out).
    Forward(SocketAddr),
    /// A peer proxy's direct mTLS connection to our inbound listener at this address:
    /// terminate it and forward to the port its transport header names.
    Direct(SocketAddr),
    /// An outbound connection to an address of a `--discovery` service: connect to one
    /// of its endpoints instead of the address dialled (a virtual one, like a
    /// Kubernetes ClusterIP).
    Balanced(SocketAddr, Arc<Service>),
}

/// Why a connection is refused. Each names the address it was refused for.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    NoOriginalDst(OrigDstError),
    #[error("original destination {0} is a loopback address, which no inbound client may reach")]
    Loopback(SocketAddr),
    #[error("original destination {0} is the unspecified address")]
    Unspecified(SocketAddr),
    #[error("original destination {0} is a multicast or broadcast address")]
    Multicast(SocketAddr),
    #[error("original destination {0} is not an address of this pod (network namespace)")]
    Foreign(SocketAddr),
    #[error("original destination {original} is the proxy's own listener {listener}: forwarding would connect to itself")]
    SelfLoop {
        original: SocketAddr,
        listener: SocketAddr,
    },
}

impl Refusal {
    /// The `reason` label of `tcp_refused_total`.
    pub fn reason(&self) -> Refused {
        match self {
            Refusal::NoOriginalDst(_) => Refused::NoOriginalDst,
            Refusal::Loopback(_) => Refused::LoopbackDestination,
            Refusal::Unspecified(_) => Refused::UnspecifiedDestination,
            Refusal::Multicast(_) => Refused::MulticastDestination,
            Refusal::Foreign(_) => Refused::ForeignDestination,
            Refusal::SelfLoop { .. } => Refused::SelfLoop,
        }
    }
}

/// What [`route`] needs to know besides the connection itself.
pub struct Context<'a> {
    /// Whether the inbound listener takes direct connections from peer proxies (an
    /// identity is configured).
    pub accepts_direct: bool,
    /// The inbound listeners, as bound.
    pub inbound: &'a [SocketAddr],
    /// The outbound listeners, as bound.
    pub outbound: &'a [SocketAddr],
    /// Whether an address belongs to this namespace (`orig_dst::is_local`). `None`
    /// when the destination does not come from the kernel but from a caller that chose
    /// it (`Proxy::serve_with` in tests): the inbound address checks are skipped, the
    /// self-loop check is not.
    pub is_local: Option<&'a dyn Fn(IpAddr) -> bool>,
    /// The services of `--discovery`, when configured.
    pub services: Option<&'a Table>,
}

/// Decides what to do with a connection accepted by the `direction` listener whose
/// original destination lookup gave `original`.
pub fn route(
    direction: Direction,
    original: Result<SocketAddr, OrigDstError>,
    cx: &Context<'_>,
) -> Result<Route, Refusal> {
    let direct_ok = direction == Direction::Inbound && cx.accepts_direct;
    let original = match original {
        Ok(original) => original,
        // With mTLS, peer proxies connect to the inbound port directly. Under meshinit's
        // rules such a connection is redirected to the port it was already going to
        // (original destination == our own address); without rules it has no NAT record
        // at all. Either way its destination is the listener itself.
        Err(OrigDstError::NotRedirected { local, .. } | OrigDstError::Lookup { local, .. })
            if direct_ok =>
        {
            return Ok(Route::Direct(local))
        }
        Err(error) => return Err(Refusal::NoOriginalDst(error)),
    };
    let ip = original.ip().to_canonical();
    if direction == Direction::Inbound {
        if let Some(is_local) = cx.is_local {
            if ip.is_loopback() {
                return Err(Refusal::Loopback(original));
            }
            if ip.is_unspecified() {
                return Err(Refusal::Unspecified(original));
            }
            if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
                return Err(Refusal::Multicast(original));
            }
            if !is_local(ip) {
                return Err(Refusal::Foreign(original));
            }
        }
    }
    match own_listener(original, cx) {
        // Our inbound port at another of our addresses (the redirect rewrote the
        // destination to the interface's primary address): still a peer proxy's direct
        // connection, which we terminate.
        Some((Direction::Inbound, _)) if direct_ok => Ok(Route::Direct(original)),
        Some((_, listener)) => Err(Refusal::SelfLoop { original, listener }),
        // Only the pod's own outbound connections are balanced: inbound ones were
        // already balanced by whoever sent them to this pod.
        None => match cx.services.and_then(|table| table.service(original)) {
            Some(service) if direction == Direction::Outbound => {
                Ok(Route::Balanced(original, service.clone()))
            }
            _ => Ok(Route::Forward(original)),
        },
    }
}

/// The listener of ours that `addr` reaches, if any, and its direction: the same
/// address and port, or a wildcard listener of the same family and port when `addr` is
/// local.
pub fn own_listener(addr: SocketAddr, cx: &Context<'_>) -> Option<(Direction, SocketAddr)> {
    // `connect` to the unspecified address goes to loopback (`0.0.0.0` is 127.0.0.1,
    // `::` is `::1`), so that is the address it reaches.
    let ip = match addr.ip().to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let reaches = |listener: &SocketAddr| {
        if listener.port() != addr.port() {
            return false;
        }
        let bound = listener.ip().to_canonical();
        if !bound.is_unspecified() {
            return bound == ip;
        }
        // A wildcard listener takes its own family only (IPv6 ones are IPV6_V6ONLY),
        // at every local address. Loopback always is; anything else is asked, and
        // taken as local when the caller chose the destination itself.
        bound.is_ipv4() == ip.is_ipv4()
            && (ip.is_loopback() || cx.is_local.is_none_or(|is_local| is_local(ip)))
    };
    let tagged = |direction| move |l: &SocketAddr| (direction, *l);
    cx.inbound
        .iter()
        .map(tagged(Direction::Inbound))
        .chain(cx.outbound.iter().map(tagged(Direction::Outbound)))
        .find(|(_, listener)| reaches(listener))
}

#[cfg(test)]
mod tests;
