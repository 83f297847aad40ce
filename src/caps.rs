//! Least privilege: which capabilities meshinit needs, checked up front.
//!
//! meshinit needs CAP_NET_ADMIN to change rules, CAP_NET_RAW for the
//! iptables-legacy tools (they reach x_tables through a raw socket; nft and
//! iptables-nft use netlink and do not need it), and CAP_SYS_ADMIN only
//! to enter another namespace with `--netns` (`netns` says so when setns is
//! refused). Checking the effective set at
//! start-up turns "Operation not permitted" from deep inside nft into a message
//! that names the missing capability and what to grant.

use std::fmt;

/// A Linux capability, by its number in `linux/capability.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    NetAdmin = 12,
    NetRaw = 13,
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::NetRaw => "CAP_NET_RAW",
        })
    }
}

/// The effective capability set of this process, from `/proc/self/status`.
/// `None` when it cannot be read (then nothing is checked: the kernel will
/// still refuse, with its own message).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("CapEff:"))?;
    // In bounds and on a char boundary: `line` starts with these ASCII bytes.
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// The capabilities of `needed` that `effective` lacks.
pub fn missing(effective: u64, needed: &[Cap]) -> Vec<Cap> {
    needed
        .iter()
        .copied()
        .filter(|cap| effective & (1u64 << *cap as u32) == 0)
        .collect()
}

/// Fails with a message naming every missing capability.
pub fn require(needed: &[Cap], what: &str) -> Result<(), String> {
    let Some(effective) = effective() else {
        return Ok(());
    };
    let missing = missing(effective, needed);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Err(format!(
        "{what} needs {} (missing from the effective capability set): run as root, or grant it \
         (Kubernetes: securityContext.capabilities.add: [NET_ADMIN], plus NET_RAW for iptables-legacy)",
        names.join(" and ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tmeshinit\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n";
        assert_eq!(parse_cap_eff(status), Some(0x3000));
    }

    #[test]
    fn names_what_is_missing() {
        let net_admin_only = 1 << 12;
        assert_eq!(
            missing(net_admin_only, &[Cap::NetAdmin, Cap::NetRaw]),
            [Cap::NetRaw]
        );
        assert_eq!(missing(u64::MAX, &[Cap::NetAdmin, Cap::NetRaw]), []);
        assert_eq!(missing(0, &[Cap::NetAdmin]), [Cap::NetAdmin]);
    }
}
