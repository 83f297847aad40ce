//! Port lists: `N` or `LO-HI`, comma-separated, 1-65535.

use std::fmt;
use std::str::FromStr;

use crate::spec::SpecError;

/// An inclusive range of TCP ports; a single port has `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub fn is_single(&self) -> bool {
        self.lo == self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = SpecError;

    fn from_str(input: &str) -> Result<Self, SpecError> {
        let item = input.trim();
        match item.split_once('-') {
            None => parse_port(item).map(PortRange::single),
            Some((lo, hi)) => {
                let (lo, hi) = (parse_port(lo.trim())?, parse_port(hi.trim())?);
                if lo > hi {
                    return Err(SpecError::BadRange {
                        input: item.to_string(),
                    });
                }
                Ok(PortRange { lo, hi })
            }
        }
    }
}

/// Parses one port, 1-65535. Port 0 is refused: it cannot be connected to,
/// so a 0 in a skip list is a typo that would silently exempt nothing.
pub(crate) fn parse_port(input: &str) -> Result<u16, SpecError> {
    match input.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(SpecError::BadPort {
            input: input.to_string(),
        }),
    }
}

/// A set of ports kept as sorted, non-overlapping, non-adjacent ranges.
///
/// Adjacent and overlapping entries are merged (`80,81,82` becomes `80-82`), so
/// 10,000 consecutive skip ports are one interval element in the kernel rather
/// than 10,000: apply time and the per-packet lookup stay flat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    ranges: Vec<PortRange>,
}

impl PortSet {
    pub fn new(ranges: impl IntoIterator<Item = PortRange>) -> Self {
        let mut sorted: Vec<PortRange> = ranges.into_iter().collect();
        sorted.sort_unstable();
        let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            match merged.last_mut() {
                Some(last) if u32::from(range.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(range.hi);
                }
                _ => merged.push(range),
            }
        }
        PortSet { ranges: merged }
    }

    /// The merged ranges, ascending.
    pub fn ranges(&self) -> &[PortRange] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges.iter().any(|range| range.contains(port))
    }

    /// Number of ports covered.
    pub fn port_count(&self) -> usize {
        self.ranges
            .iter()
            .map(|r| usize::from(r.hi - r.lo) + 1)
            .sum()
    }
}

impl FromStr for PortSet {
    type Err = SpecError;

    /// Parses `"4190,4191,9000-9010"`. An empty string is the empty set; an
    /// empty item (`"80,,81"`) is an error because it usually hides a typo.
    fn from_str(input: &str) -> Result<Self, SpecError> {
        if input.trim().is_empty() {
            return Ok(PortSet::default());
        }
        let ranges = input
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<PortRange>, _>>()?;
        Ok(PortSet::new(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_singles_and_ranges() {
        let set: PortSet = "4191, 4190,9000-9010".parse().unwrap();
        assert_eq!(set.to_string(), "4190-4191,9000-9010");
        assert_eq!(set.port_count(), 13);
    }

    #[test]
    fn refuses_bad_ports_naming_them() {
        for (input, bad) in [
            ("0", "0"),
            ("70000", "70000"),
            ("80,abc", "abc"),
            ("65536", "65536"),
            ("-1", ""),
            ("80,,81", ""),
        ] {
            let err = input.parse::<PortSet>().unwrap_err().to_string();
            assert!(err.contains(&format!("\"{bad}\"")), "{input}: {err}");
        }
        let err = "9-3".parse::<PortSet>().unwrap_err().to_string();
        assert!(err.contains("\"9-3\""), "{err}");
    }

    #[test]
    fn empty_string_is_empty_set() {
        assert!("".parse::<PortSet>().unwrap().is_empty());
        assert!("  ".parse::<PortSet>().unwrap().is_empty());
    }

    #[test]
    fn full_range_and_edges() {
        let set: PortSet = "1-65535,65535,1".parse().unwrap();
        assert_eq!(set.ranges(), &[PortRange { lo: 1, hi: 65535 }]);
    }

    proptest! {
        #[test]
        fn merged_set_contains_exactly_the_input(ports in proptest::collection::vec(1u16.., 0..200)) {
            let set = PortSet::new(ports.iter().copied().map(PortRange::single));
            for p in &ports {
                prop_assert!(set.contains(*p));
            }
            let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
            prop_assert_eq!(set.port_count(), distinct.len());
            for pair in set.ranges().windows(2) {
                // Sorted, disjoint and not adjacent: otherwise they would have merged.
                prop_assert!(u32::from(pair[0].hi) + 1 < u32::from(pair[1].lo));
            }
        }

        #[test]
        fn display_round_trips(ports in proptest::collection::vec((1u16.., 0u16..50), 0..50)) {
            let set = PortSet::new(ports.iter().map(|&(lo, len)| PortRange { lo, hi: lo.saturating_add(len) }));
            let again: PortSet = set.to_string().parse().unwrap();
            prop_assert_eq!(again, set);
        }
    }
}
