//! Renderers: one per output format, all pure functions of a [`Ruleset`](crate::Ruleset).

pub mod iptables;
pub mod nft_json;
pub mod nft_text;

use crate::ruleset::{Direction, Family, Side};

/// Name of the nftables base chain for a direction.
pub(crate) fn nft_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "prerouting",
        Direction::Outbound => "output",
        Direction::Replies => "replies",
    }
}

/// The nft payload (protocol, field) an address match reads: `ip saddr`, `ip6 daddr`, ...
pub(crate) fn nft_address(family: Family, side: Side) -> (&'static str, &'static str) {
    let protocol = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    let field = match side {
        Side::Source => "saddr",
        Side::Destination => "daddr",
    };
    (protocol, field)
}

/// The loopback network of a family, as the renderers write it: the whole
/// 127.0.0.0/8 (every address of it is loopback in Linux) or the one address ::1.
pub(crate) fn loopback_net(family: Family) -> ipnet::IpNet {
    match family {
        Family::V4 => ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).expect("8 <= 32"),
        ),
        Family::V6 => ipnet::IpNet::V6(
            ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).expect("128 <= 128"),
        ),
    }
}

#[cfg(test)]
mod tests;
