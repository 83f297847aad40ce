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

use super::{run, Applied, Backend, BackendError};

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

/// What tables of a flavour may exist, per [`Iptables::may_have_tables`].
struct Tables {
    /// Any table at all, of either family.
    any: bool,
    /// A nat table, IPv4 and IPv6.
    nat: [bool; 2],
}

impl Tables {
    fn has_nat(&self, family: Family) -> bool {
        // Constant indices into a [bool; 2]: checked at compile time.
        match family {
            Family::V4 => self.nat[0],
            Family::V6 => self.nat[1],
        }
    }
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

    /// Puts one family back to `before`; failures are logged, the caller is
    /// already reporting the error that made the rollback necessary.
    fn roll_back(&self, family: Family, before: &Installed) {
        let result = self
            .installed(family)
            .and_then(|now| self.restore(family, &before.rollback_text(&now)));
        match result {
            Ok(()) => tracing::warn!(family = ?family, "rolled back to the previous rules"),
            Err(err) => tracing::error!(family = ?family, "rolling back failed: {err}"),
        }
    }

    fn families(ipv6: bool) -> &'static [Family] {
        if ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }

    /// Whether this flavour may hold a nat table for `family` (or, with
    /// `None`, any table at all), found without spawning `*-save`: that costs
    /// two processes per family, and `*-save -t nat` would itself create an
    /// empty nat table, touching a family we were told to leave alone.
    ///
    /// Legacy tables are listed in `/proc/net/ip{,6}_tables_names` (per
    /// namespace; absent when the module is not loaded). iptables-nft tables
    /// are nf_tables tables of family `ip` / `ip6`; when `nft` cannot tell, we
    /// assume they may exist.
    fn may_have_tables(&self) -> Tables {
        self.may_have_tables_given(None)
    }

    /// [`Iptables::may_have_tables`], taking `nft list tables` (lines `table FAMILY
    /// NAME`) from `nf_tables` when this run already has it instead of running `nft`.
    fn may_have_tables_given(&self, nf_tables: Option<&str>) -> Tables {
        match self.flavor {
            Flavor::Legacy => {
                let names = |path| std::fs::read_to_string(path).unwrap_or_default();
                let (v4, v6) = (
                    names("/proc/net/ip_tables_names"),
                    names("/proc/net/ip6_tables_names"),
                );
                let nat = |names: &str| names.lines().any(|name| name.trim() == "nat");
                Tables {
                    any: !v4.trim().is_empty() || !v6.trim().is_empty(),
                    nat: [nat(&v4), nat(&v6)],
                }
            }
            Flavor::Nft => match nf_tables.map_or_else(
                || run("nft", &["list", "tables"], None, super::nft::HINT),
                |listing| Ok(listing.to_string()),
            ) {
                Ok(tables) => {
                    let has = |prefix: &str| tables.lines().any(|l| l.trim().starts_with(prefix));
                    let (v4, v6) = (has("table ip "), has("table ip6 "));
                    Tables {
                        any: v4 || v6,
                        nat: [v4, v6],
                    }
                }
                Err(_) => Tables {
                    any: true,
                    nat: [true, true],
                },
            },
        }
    }

    /// True when `*-save` of this flavour lists any rule at all, ours or
    /// anyone's, in any table of this namespace.
    pub fn has_any_rule(&self) -> Result<bool, BackendError> {
        if !self.may_have_tables().any {
            return Ok(false);
        }
        for family in [Family::V4, Family::V6] {
            let save = run(&self.binary(family, "save"), &[], None, HINT)?;
            // A rule of anyone's, or a chain of ours (even empty).
            if save
                .lines()
                .any(|line| line.starts_with("-A ") || line.starts_with(":MESHINIT_"))
            {
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

    fn apply(&self, ruleset: &Ruleset) -> Result<Applied, BackendError> {
        // Read every family first: the states to roll back to.
        let mut steps = Vec::new();
        for &family in Self::families(ruleset.ipv6) {
            let before = self.installed(family)?;
            let document = before.apply_text(ruleset, family);
            steps.push((family, before, document));
        }
        // With --ipv6=false, IPv6 rules of ours left by an earlier run are
        // removed: they would keep redirecting IPv6 against the flags (the nft
        // backend gets the same result by replacing its table). A host without
        // ip6tables has none to remove.
        if !ruleset.ipv6 && self.may_have_tables().has_nat(Family::V6) {
            if let Ok(before) = self.installed(Family::V6) {
                if !before.is_empty() {
                    let document = before.cleanup_text();
                    steps.push((Family::V6, before, document));
                }
            }
        }
        for (i, (family, _, document)) in steps.iter().enumerate() {
            if let Err(err) = self.restore(*family, document) {
                for (done, before, _) in &steps[..i] {
                    self.roll_back(*done, before);
                }
                return Err(err);
            }
        }
        Ok(Applied::default())
    }

    fn cleanup(&self) -> Result<(), BackendError> {
        let tables = self.may_have_tables();
        for family in [Family::V4, Family::V6] {
            if !tables.has_nat(family) {
                continue;
            }
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
        if !ruleset.ipv6
            && self.may_have_tables().has_nat(Family::V6)
            && self.installed(Family::V6).is_ok_and(|v6| !v6.is_empty())
        {
            differences.push("IPv6: rules of ours are installed although --ipv6=false".to_string());
        }
        Ok(differences)
    }

    fn has_ours(&self) -> Result<bool, BackendError> {
        self.has_ours_after(&Applied::default())
    }

    fn has_ours_after(&self, applied: &Applied) -> Result<bool, BackendError> {
        let tables = self.may_have_tables_given(applied.nf_tables.as_deref());
        for family in [Family::V4, Family::V6] {
            if tables.has_nat(family) && !self.installed(family)?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
