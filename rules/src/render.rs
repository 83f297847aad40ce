//! Renderers: one per output format, all pure functions of a [`Ruleset`](crate::Ruleset).

pub mod iptables;
pub mod nft_json;
pub mod nft_text;

use crate::ruleset::Direction;

/// Name of the nftables base chain for a direction.
pub(crate) fn nft_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "prerouting",
        Direction::Outbound => "output",
    }
}

#[cfg(test)]
mod tests;
