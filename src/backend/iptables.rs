//! The iptables backends: `iptables-nft` and `iptables-legacy`.
//!
//! Each family is one `*-restore --noflush` call with a single COMMIT. The
//! two families cannot share a transaction, so apply reads each family's
//! state first and, when the IPv6 restore fails after the IPv4 one
//! succeeded, restores the IPv4 state it read: a failed apply never leaves
//! one family on the new rules and the other on the old ones.
//!
//! The binaries are called by their explicit names (`iptables-nft-restore`,
//! `iptables-legacy-restore`, ...) so the host's alternatives setting cannot
//! silently pick the other flavour, the most common failure of init tools.

use meshinit_rules::{iptables, Family, Installed, Jumps, Ruleset};

use super::{run, Backend, BackendError};

/// Which iptables implementation writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// iptables over the kernel's nf_tables (`iptables-nft`).
    Nft,
    /// The old x_tables kernel interface (`iptables-legacy`).
    Legacy,
}

pub struct Iptables {
    pub flavor: Flavor,
}

const HINT: &str = "install the iptables package";

impl Iptables {
    pub fn new(flavor: Flavor) -> Self {
        Iptables { flavor }
    }

    fn binary(&self, family: Family, tool: &str) -> String {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let flavor = match self.flavor {
            Flavor::Nft => "nft",
            Flavor::Legacy => "legacy",
        };
        format!("{prefix}-{flavor}-{tool}")
    }

    /// What of ours the nat table of `family` holds.
    pub fn installed(&self, family: Family) -> Result<Installed, BackendError> {
        let save = run(&self.binary(family, "save"), &["-t", "nat"], None, HINT)?;
        Ok(Installed::parse(&save))
    }

    fn restore(&self, family: Family, document: &str) -> Result<(), BackendError> {
        tracing::debug!(family = ?family, document, "restoring");
        run(
            &self.binary(family, "restore"),
            // -w: wait for the xtables lock that kube-proxy and other
            // iptables writers hold, instead of failing at once.
            &["--noflush", "-w", "10"],
            Some(document.as_bytes()),
            HINT,
        )
        .map(drop)
    }

    fn families(ipv6: bool) -> &'static [Family] {
        if ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }

    /// Whether this flavour may hold tables in this namespace, found without
    /// spawning `*-save` (two processes per call, which would dominate the
    /// run time of an apply that only needs to know "nothing here").
    ///
    /// Legacy tables are listed in `/proc/net/ip{,6}_tables_names` (per
    /// namespace; absent when the module is not loaded). iptables-nft tables
    /// are nf_tables tables named `ip nat` / `ip6 nat`; when `nft` cannot tell,
    /// we assume they may exist.
    fn may_have_tables(&self) -> bool {
        match self.flavor {
            Flavor::Legacy => ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
                .iter()
                .any(|path| std::fs::read_to_string(path).is_ok_and(|names| !names.trim().is_empty())),
            Flavor::Nft => match run("nft", &["list", "tables"], None, super::nft::HINT) {
                Ok(tables) => tables.lines().any(|line| {
                    let line = line.trim();
                    line.starts_with("table ip ") || line.starts_with("table ip6 ")
                }),
                Err(_) => true,
            },
        }
    }

    /// True when `*-save` of this flavour lists any rule at all, ours or
    /// anyone's, in any table of this namespace.
    pub fn has_any_rule(&self) -> Result<bool, BackendError> {
        if !self.may_have_tables() {
            return Ok(false);
        }
        for family in [Family::V4, Family::V6] {
            let save = run(&self.binary(family, "save"), &[], None, HINT)?;
            if save.lines().any(|line| line.starts_with("-A ")) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::Nft => "iptables-nft",
            Flavor::Legacy => "iptables-legacy",
        }
    }

    fn render(&self, ruleset: &Ruleset) -> String {
        let mut out = String::new();
        for &family in Self::families(ruleset.ipv6) {
            out.push_str(&format!("# {} --noflush\n", self.binary(family, "restore")));
            out.push_str(&iptables::restore_text(ruleset, family, Jumps::BOTH));
        }
        out
    }

    fn apply(&self, ruleset: &Ruleset) -> Result<(), BackendError> {
        let families = Self::families(ruleset.ipv6);
        let before = families
            .iter()
            .map(|&family| self.installed(family))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, &family) in families.iter().enumerate() {
            let present = before[i].jumps();
            let missing = Jumps {
                prerouting: !present.prerouting,
                output: !present.output,
            };
            let document = iptables::restore_text(ruleset, family, missing);
            if let Err(err) = self.restore(family, &document) {
                for (j, &done) in families[..i].iter().enumerate() {
                    let added = Jumps {
                        prerouting: !before[j].jumps().prerouting,
                        output: !before[j].jumps().output,
                    };
                    if let Err(rollback) = self.restore(done, &before[j].rollback_text(added)) {
                        tracing::error!(family = ?done, "rolling back failed: {rollback}");
                    } else {
                        tracing::warn!(family = ?done, "rolled back to the previous rules");
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    fn cleanup(&self) -> Result<(), BackendError> {
        for family in [Family::V4, Family::V6] {
            let installed = self.installed(family)?;
            if !installed.is_empty() {
                self.restore(family, &installed.cleanup_text())?;
            }
        }
        Ok(())
    }

    fn diff(&self, ruleset: &Ruleset) -> Result<Vec<String>, BackendError> {
        let mut differences = Vec::new();
        for &family in Self::families(ruleset.ipv6) {
            let name = match family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            for difference in self.installed(family)?.diff(ruleset, family) {
                differences.push(format!("{name}: {difference}"));
            }
        }
        Ok(differences)
    }

    fn has_ours(&self) -> Result<bool, BackendError> {
        if !self.may_have_tables() {
            return Ok(false);
        }
        for family in [Family::V4, Family::V6] {
            if !self.installed(family)?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
