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
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
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
    if item.contains('/') {
        item.parse::<IpNet>().map_err(|_| bad())
    } else {
        item.parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| bad())
    }
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
