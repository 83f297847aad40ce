//! meshinit-rules: the pure core of meshinit.
//!
//! A validated [`Spec`] (what the user asked for) becomes a [`Ruleset`] (the
//! chains, sets and rules that implement it), which the renderers turn into
//! text for a backend. Nothing here spawns a process, opens a socket or reads
//! a file, so every behaviour is testable with plain values.
//!
//! - `ports`: port lists and ranges (`4190,4191,9000-9010`), merged into intervals.
//! - `subnets`: CIDR lists, split by family, with covered subnets removed.
//! - `spec`: the validated input and its errors.
//! - `ruleset`: the backend-neutral model of what gets installed.
//! - `render`: nft JSON (typed, from the `nftables` crate), nft text, and
//!   iptables-restore text; plus the comparison of an installed nft table with
//!   the expected one.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod ports;
mod render;
mod ruleset;
mod spec;
mod subnets;

pub use ports::{PortRange, PortSet};
pub use render::iptables::{self, Installed, Jumps};
pub use render::nft_json::{self, TABLE};
pub use render::nft_text;
pub use ruleset::{Action, Chain, ChainKind, Direction, Family, Match, Rule, Ruleset, Side};
pub use spec::{Mode, Spec, SpecError, Tproxy};
pub use subnets::SubnetList;
