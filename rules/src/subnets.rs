//! CIDR lists (IPv4 and IPv6 mixed), normalised for interval sets.

use std::fmt;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::spec::SpecError;

/// Subnets split by family, with host bits cleared and every subnet that is
/// covered by another one removed.
///
/// nftables refuses overlapping elements in an interval set, and iptables would
/// just carry a useless rule, so `198.18.0.0/15,198.18.1.0/24` keeps only the /15.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubnetList {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl SubnetList {
    /// Normalises `nets`: host bits cleared, IPv4-mapped IPv6 subnets (at
    /// least /96) turned into the IPv4 subnets they stand for, covered
    /// subnets dropped. (The parser refuses mapped subnets wider than /96;
    /// given here, they stay IPv6.)
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            let net = match net {
                IpNet::V6(v6) => unmapped(v6).map_or(net, IpNet::V4),
                IpNet::V4(_) => net,
            };
            match net.trunc() {
                IpNet::V4(net) => v4.push(net),
                IpNet::V6(net) => v6.push(net),
            }
        }
        SubnetList {
            v4: without_covered(v4, |a, b| a.contains(b)),
            v6: without_covered(v6, |a, b| a.contains(b)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Both lists combined; the order is v4 then v6.
    pub fn union(&self, other: &SubnetList) -> SubnetList {
        let all = self.iter().chain(other.iter());
        SubnetList::new(all)
    }

    pub fn iter(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.v4
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(self.v6.iter().map(|n| IpNet::V6(*n)))
    }

    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        self.iter().any(|net| net.contains(&addr))
    }
}

/// Sorts and drops every net contained in an earlier, wider one. Sorting by
/// (network, prefix length) puts a covering net before all the nets it covers.
fn without_covered<N: Ord + Copy>(mut nets: Vec<N>, contains: impl Fn(&N, &N) -> bool) -> Vec<N> {
    nets.sort_unstable();
    nets.dedup();
    let mut kept: Vec<N> = Vec::with_capacity(nets.len());
    for net in nets {
        if !kept.last().is_some_and(|wider| contains(wider, &net)) {
            kept.push(net);
        }
    }
    kept
}

impl FromStr for SubnetList {
    type Err = SpecError;

    /// Parses `"198.18.0.0/15,fd00::/8"`. A bare address means a single host
    /// (/32 or /128). An empty string is the empty list.
    fn from_str(input: &str) -> Result<Self, SpecError> {
        if input.trim().is_empty() {
            return Ok(SubnetList::default());
        }
        let nets = input
            .split(',')
            .map(|item| parse_net(item.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SubnetList::new(nets))
    }
}

fn parse_net(item: &str) -> Result<IpNet, SpecError> {
    let bad = || SpecError::BadCidr {
        input: item.to_string(),
    };
    let net = if item.contains('/') {
        item.parse::<IpNet>().map_err(|_| bad())?
    } else {
        item.parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| bad())?
    };
    match net {
        IpNet::V6(v6) if is_mapped(v6) && v6.prefix_len() < MAPPED_PREFIX => {
            Err(SpecError::MappedCidrTooWide {
                input: item.to_string(),
            })
        }
        IpNet::V6(v6) => Ok(unmapped(v6).map_or(net, IpNet::V4)),
        IpNet::V4(_) => Ok(net),
    }
}

/// Length of the `::ffff:0:0/96` prefix that marks an IPv4-mapped IPv6 address.
const MAPPED_PREFIX: u8 = 96;

/// Whether `net` is written as an IPv4-mapped address (`::ffff:a.b.c.d/N`).
fn is_mapped(net: Ipv6Net) -> bool {
    net.addr().to_ipv4_mapped().is_some()
}

/// The IPv4 subnet an IPv4-mapped IPv6 subnet stands for: `::ffff:198.18.0.0/111`
/// is `198.18.0.0/15`.
///
/// A socket's IPv4 peers show up as mapped addresses, so users copy them into
/// skip lists; but the kernel sees those connections as IPv4, and an IPv6 rule
/// for a mapped subnet matches nothing. Kept as IPv6, such an entry would
/// silently exempt nothing. `None` when `net` is not mapped or is wider than
/// the mapped range (/96), which has no IPv4 equivalent.
fn unmapped(net: Ipv6Net) -> Option<Ipv4Net> {
    let addr = net.addr().to_ipv4_mapped()?;
    let len = net.prefix_len().checked_sub(MAPPED_PREFIX)?;
    Ipv4Net::new(addr, len).ok()
}

impl fmt::Display for SubnetList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_families_and_drops_covered() {
        let list: SubnetList = "198.18.1.0/24, 198.18.0.0/15,fd00:18::/64,fd00::/8,198.19.0.7"
            .parse()
            .unwrap();
        assert_eq!(list.to_string(), "198.18.0.0/15,fd00::/8");
    }

    #[test]
    fn clears_host_bits_and_accepts_bare_hosts() {
        let list: SubnetList = "198.18.3.9/24,198.19.0.1,fd00::1".parse().unwrap();
        assert_eq!(list.to_string(), "198.18.3.0/24,198.19.0.1/32,fd00::1/128");
    }

    #[test]
    fn ipv4_mapped_subnets_become_ipv4() {
        let list: SubnetList = "::ffff:198.18.0.0/112,::ffff:198.19.0.7,::ffff:c612:100/120"
            .parse()
            .unwrap();
        assert_eq!(list.to_string(), "198.18.0.0/16,198.19.0.7/32");
        let list: SubnetList = "::ffff:198.18.0.0/111".parse().unwrap();
        assert_eq!(list.to_string(), "198.18.0.0/15");
        assert!(list.v6.is_empty());
        let list: SubnetList = "::ffff:0.0.0.0/96,fd00::/8".parse().unwrap();
        assert_eq!(list.to_string(), "0.0.0.0/0,fd00::/8");
        // Host bits are cleared after the conversion, and mapped and plain
        // IPv4 subnets merge.
        let list: SubnetList = "::ffff:198.18.3.9/120,198.18.0.0/16".parse().unwrap();
        assert_eq!(list.to_string(), "198.18.0.0/16");
        let list: SubnetList = "::ffff:198.18.3.9/120".parse().unwrap();
        assert_eq!(list.to_string(), "198.18.3.0/24");
        // The same through the constructor.
        let list = SubnetList::new(["::ffff:198.18.0.0/111".parse::<IpNet>().unwrap()]);
        assert_eq!(list.to_string(), "198.18.0.0/15");
    }

    #[test]
    fn ipv6_that_is_not_mapped_stays_ipv6() {
        // IPv4-compatible (deprecated, ::a.b.c.d) and NAT64 addresses are
        // real IPv6 destinations, and ::/0 covers the mapped range without
        // being written as mapped.
        let list: SubnetList = "::198.18.0.0/111,64:ff9b::/96,::/0".parse().unwrap();
        assert_eq!(list.to_string(), "::/0");
        let list: SubnetList = "::c612:0/111,64:ff9b::/96".parse().unwrap();
        assert_eq!(list.to_string(), "::c612:0/111,64:ff9b::/96");
        assert!(list.v4.is_empty());
    }

    #[test]
    fn refuses_mapped_subnets_wider_than_the_mapped_range_naming_them() {
        for bad in ["::ffff:198.18.0.0/95", "::ffff:0:0/80", "::ffff:1.2.3.4/0"] {
            let err = bad.parse::<SubnetList>().unwrap_err();
            assert_eq!(
                err,
                SpecError::MappedCidrTooWide {
                    input: bad.to_string()
                }
            );
            let message = err.to_string();
            assert!(message.contains(&format!("\"{bad}\"")), "{message}");
            assert!(message.contains("/96"), "{message}");
        }
        // In a list, the bad item is the one named.
        let err = "198.18.0.0/15, ::ffff:10.0.0.0/72"
            .parse::<SubnetList>()
            .unwrap_err();
        assert!(err.to_string().contains("\"::ffff:10.0.0.0/72\""), "{err}");
    }

    #[test]
    fn refuses_malformed_naming_them() {
        for bad in [
            "198.18.0.0/33",
            "10.0.0/8x",
            "fd00::/129",
            "abc",
            "198.18.0.0/",
        ] {
            let err = bad.parse::<SubnetList>().unwrap_err().to_string();
            assert!(err.contains(&format!("\"{bad}\"")), "{bad}: {err}");
        }
    }
}
