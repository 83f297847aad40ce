//! The three ways meshinit writes rules, and reading back what each of them holds.
//!
//! Every behaviour test runs once per [`Backend`] (see [`for_each_backend!`]): the policy is
//! the same whichever tool writes it, so the same assertions must hold for all of them.

use std::fmt;

use crate::netns::Netns;
use crate::pods::Family;
use crate::process::Run;

/// A value of meshinit's `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Native nftables: one `inet meshinit` table.
    Nft,
    /// `iptables-nft`: chains `MESHINIT_*` in the nf_tables `ip nat` / `ip6 nat` tables.
    IptablesNft,
    /// `iptables-legacy`: chains `MESHINIT_*` in the x_tables nat tables.
    IptablesLegacy,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy];

    /// The name meshinit uses for it (`--backend NAME`, the `backend=` field of its logs).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }

    /// `--backend=NAME`.
    pub fn flag(self) -> String {
        format!("--backend={}", self.name())
    }

    pub fn is_iptables(self) -> bool {
        self != Backend::Nft
    }

    /// The iptables tool of this flavour for `family`: `tool("save")` is `iptables-nft-save`
    /// or `ip6tables-legacy-save`, `tool("")` is `iptables-nft` itself. Panics for `Nft`.
    pub fn tool(self, family: Family, tool: &str) -> String {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let flavor = match self {
            Backend::Nft => panic!("the nft backend has no iptables tools"),
            Backend::IptablesNft => "nft",
            Backend::IptablesLegacy => "legacy",
        };
        if tool.is_empty() {
            format!("{prefix}-{flavor}")
        } else {
            format!("{prefix}-{flavor}-{tool}")
        }
    }

    /// `test` prefixed with a short tag of the backend, for [`crate::Pods::new`], so that
    /// `ip netns list` tells the backends apart.
    pub fn test_name(self, test: &str) -> String {
        let tag = match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptn",
            Backend::IptablesLegacy => "iptl",
        };
        format!("{tag}-{test}")
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Instantiates one `#[test]` per backend for each `fn name(backend: Backend)` listed: a
/// module `name` with the tests `nft`, `iptables_nft` and `iptables_legacy`, so that a
/// failure names its backend and the three run in parallel.
#[macro_export]
macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[test]
                fn nft() {
                    super::$test($crate::Backend::Nft)
                }
                #[test]
                fn iptables_nft() {
                    super::$test($crate::Backend::IptablesNft)
                }
                #[test]
                fn iptables_legacy() {
                    super::$test($crate::Backend::IptablesLegacy)
                }
            }
        )*
    };
}

impl Netns {
    /// `meshinit ARGS… --backend=NAME` inside the namespace, to completion.
    pub fn meshinit_on(&self, backend: Backend, args: &[&str]) -> Run {
        Run::of(self.meshinit_command().args(args).arg(backend.flag()))
    }

    /// Every firewall rule of the namespace, normalised so that only rules count: `nft list
    /// ruleset` and the `*-save` output of both iptables flavours and families, without
    /// comment lines and counters (traffic changes those, not meshinit).
    ///
    /// Reading it changes nothing: `*-save` without `-t` lists only the tables that exist
    /// (with `-t nat`, iptables-legacy would create its nat table).
    pub fn firewall(&self) -> String {
        let mut out = String::from("## nft list ruleset\n");
        out.push_str(&normalise_nft(&self.ruleset()));
        for backend in [Backend::IptablesNft, Backend::IptablesLegacy] {
            for family in Family::ALL {
                let tool = backend.tool(family, "save");
                out.push_str(&format!("## {tool}\n"));
                out.push_str(&normalise_save(&self.exec(&[&tool]).expect_ok().stdout));
            }
        }
        out
    }

    /// `iptables-save -t nat` of `backend`'s flavour for `family`, normalised like
    /// [`Netns::firewall`]. Note that this creates iptables-legacy's (empty) nat table when
    /// there was none.
    pub fn nat_save(&self, backend: Backend, family: Family) -> String {
        let tool = backend.tool(family, "save");
        normalise_save(&self.exec(&[&tool, "-t", "nat"]).expect_ok().stdout)
    }

    /// What of meshinit's `backend` holds, one line per item; empty when nothing. nft: the
    /// lines of `table inet meshinit`. iptables: the `*-save` lines (both families, every
    /// table that exists) that declare a `MESHINIT_*` chain, append to one, or jump to one.
    pub fn ours_in(&self, backend: Backend) -> Vec<String> {
        if backend == Backend::Nft {
            return self
                .meshinit_table()
                .map(|table| table.lines().map(str::to_string).collect())
                .unwrap_or_default();
        }
        let mut ours = Vec::new();
        for family in Family::ALL {
            let tool = backend.tool(family, "save");
            let save = self.exec(&[&tool]).expect_ok().stdout;
            ours.extend(
                normalise_save(&save)
                    .lines()
                    .filter(|line| line.contains("MESHINIT_"))
                    .map(|line| format!("{tool}: {line}")),
            );
        }
        ours
    }
}

/// `*-save` output without `#` lines, and with chain counters (`[12:720]`) zeroed.
pub fn normalise_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(at)) if line.ends_with(']') => format!("{} [0:0]", &line[..at]),
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `nft list ruleset` output with `counter packets N bytes M` reduced to `counter`.
pub fn normalise_nft(ruleset: &str) -> String {
    let mut out = String::new();
    for line in ruleset.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let mut words = Vec::new();
        let mut iter = line.split_whitespace().peekable();
        while let Some(word) = iter.next() {
            if (word == "packets" || word == "bytes")
                && iter.peek().is_some_and(|n| n.parse::<u64>().is_ok())
            {
                iter.next();
                continue;
            }
            words.push(word);
        }
        out.push_str(indent);
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_output_loses_comments_and_counters_only() {
        let save = "# Generated by iptables-save v1.8.9 on now\n*nat\n:PREROUTING ACCEPT [3:180]\n\
                    :MESHINIT_OUTPUT - [0:0]\n-A OUTPUT -j MESHINIT_OUTPUT\nCOMMIT\n# Completed\n";
        assert_eq!(
            normalise_save(save),
            "*nat\n:PREROUTING ACCEPT [0:0]\n:MESHINIT_OUTPUT - [0:0]\n\
             -A OUTPUT -j MESHINIT_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn nft_counters_are_dropped() {
        assert_eq!(
            normalise_nft("\t\ttcp dport 2 counter packets 7 bytes 420 accept\n"),
            "\t\ttcp dport 2 counter accept\n"
        );
    }
}
