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

#[cfg(test)]
mod tests;
