//! The iptables backends: `iptables-nft` and `iptables-legacy`.
//!
//! Each family is one `*-restore --noflush` call with a single COMMIT. The
//! two families cannot share a transaction, so apply reads each family's
//! state first (the reads, and then the two restores, run at the same time)
//! and, when one family's restore fails while the other's succeeded,
//! restores the state it read for the one that succeeded: a failed apply
//! never leaves one family on the new rules and the other on the old ones.
//!
//! Only the work there is gets done: a table that does not exist (listed in
//! `/proc` for legacy, over netlink for iptables-nft) is not read, so a first
//! apply in a new pod runs just the two restores; and a family whose rules are
//! already exactly what its document would leave is not written, so re-applying
//! the rules in place runs just the two reads and churns no rule.
//!
//! In `tproxy` mode one family's document has two sections, mangle (the
//! TPROXY chain and the replies chain) then nat (outbound); iptables commits
//! each table on its own, so a failure in the second section also rolls the
//! first one back.
//!
//! The binaries are called by their explicit names (`iptables-nft-restore`,
//! `iptables-legacy-restore`, ...) so the host's alternatives setting cannot
//! silently pick the other flavour, the most common failure of init tools.

use meshinit_rules::iptables::{chains_in, Table};
use meshinit_rules::{iptables, Family, Installed, Jumps, Ruleset};

use super::{run, start, Applied, Backend, BackendError, Running};

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
    /// A mangle table, IPv4 and IPv6.
    mangle: [bool; 2],
}

impl Tables {
    fn has(&self, table: Table, family: Family) -> bool {
        let tables = match table {
            Table::Nat => &self.nat,
            Table::Mangle => &self.mangle,
        };
        // Constant indices into a [bool; 2]: checked at compile time.
        match family {
            Family::V4 => tables[0],
            Family::V6 => tables[1],
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
        self.installed_in(family, Table::Nat)
    }

    /// What of ours `table` of `family` holds.
    fn installed_in(&self, family: Family, table: Table) -> Result<Installed, BackendError> {
        let save = self.start_save(family, table)?.output()?;
        Ok(Installed::parse_table(&save, table))
    }

    /// Starts `*-save -t TABLE` of `family`, for [`Installed::parse_table`].
    fn start_save(&self, family: Family, table: Table) -> Result<Running, BackendError> {
        start(
            &self.binary(family, "save"),
            &["-t", table.name()],
            None,
            HINT,
        )
    }

    /// The tables of `family` to read (and rewrite) for `ruleset`: nat always;
    /// mangle when the ruleset has chains there or the table may hold ours. A
    /// mangle table that does not exist is not created by reading it.
    fn tables_for(&self, ruleset: Option<&Ruleset>, family: Family, tables: &Tables) -> Vec<Table> {
        Table::ALL
            .into_iter()
            .filter(|&table| {
                table == Table::Nat
                    || tables.has(table, family)
                    || ruleset.is_some_and(|r| !chains_in(r, table).is_empty())
            })
            .collect()
    }

    fn restore(&self, family: Family, document: &str) -> Result<(), BackendError> {
        self.start_restore(family, document)?.output().map(drop)
    }

    /// Starts `*-restore --noflush` of `family` with `document`.
    fn start_restore(&self, family: Family, document: &str) -> Result<Running, BackendError> {
        tracing::debug!(family = ?family, document, "restoring");
        start(
            &self.binary(family, "restore"),
            // -w: wait for the xtables lock that kube-proxy and other
            // iptables writers hold, instead of failing at once.
            &["--noflush", "-w", "10"],
            Some(document.as_bytes()),
            HINT,
        )
    }

    /// Puts one family back to `before`; failures are logged, the caller is
    /// already reporting the error that made the rollback necessary.
    fn roll_back(&self, family: Family, before: &[Installed]) {
        let result = before
            .iter()
            .map(|before| {
                self.installed_in(family, before.table)
                    .map(|now| before.rollback_text(&now))
            })
            .collect::<Result<String, _>>()
            .and_then(|document| self.restore(family, &document));
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
    /// are nf_tables tables of family `ip` / `ip6` named like the iptables table
    /// (`table ip nat`), listed in process (`nf_tables_listing`); when that
    /// fails, we assume they may exist.
    fn may_have_tables(&self) -> Tables {
        self.may_have_tables_given(None)
    }

    /// [`Iptables::may_have_tables`], taking the nf_tables listing (lines `table
    /// FAMILY NAME`) from `nf_tables` when this run already has it.
    fn may_have_tables_given(&self, nf_tables: Option<&str>) -> Tables {
        match self.flavor {
            Flavor::Legacy => {
                let names = |path| std::fs::read_to_string(path).unwrap_or_default();
                let (v4, v6) = (
                    names("/proc/net/ip_tables_names"),
                    names("/proc/net/ip6_tables_names"),
                );
                let has = |names: &str, table: &str| names.lines().any(|name| name.trim() == table);
                Tables {
                    any: !v4.trim().is_empty() || !v6.trim().is_empty(),
                    nat: [has(&v4, "nat"), has(&v6, "nat")],
                    mangle: [has(&v4, "mangle"), has(&v6, "mangle")],
                }
            }
            Flavor::Nft => match nf_tables
                .map_or_else(super::nf_tables_listing, |listing| Ok(listing.to_string()))
            {
                Ok(tables) => {
                    // Reading a mangle table that is not there costs a `*-save` each.
                    let has = |family: &str, name: Option<&str>| {
                        tables.lines().any(|line| {
                            let mut words = line.split_whitespace();
                            words.next() == Some("table")
                                && words.next() == Some(family)
                                && name.is_none_or(|name| words.next() == Some(name))
                        })
                    };
                    Tables {
                        any: has("ip", None) || has("ip6", None),
                        nat: [has("ip", Some("nat")), has("ip6", Some("nat"))],
                        mangle: [has("ip", Some("mangle")), has("ip6", Some("mangle"))],
                    }
                }
                Err(_) => Tables {
                    any: true,
                    nat: [true, true],
                    mangle: [true, true],
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
        // Which tables exist (mangle too, for the other mode's chains): legacy's from
        // /proc, iptables-nft's from the nf_tables listing, read in this process and
        // handed on in `Applied` so the leftover checks after the apply list nothing
        // again (the restore below changes only `ip`/`ip6` tables, which no other
        // backend's check reads). A table that does not exist holds nothing of ours
        // and is not read: in a new pod that is every table, so a first apply runs
        // only the restores.
        let nf_tables = match self.flavor {
            Flavor::Nft => super::nf_tables_listing().ok(),
            Flavor::Legacy => None,
        };
        let tables = self.may_have_tables_given(nf_tables.as_deref());
        // Read every family first: the states to roll back to, and what is already
        // in place. The reads run at the same time: a process's start-up, not its
        // work, is most of an apply.
        let reads = Self::families(ruleset.ipv6)
            .iter()
            .map(|&family| {
                let tables = self
                    .tables_for(Some(ruleset), family, &tables)
                    .into_iter()
                    .map(|table| {
                        let read = tables
                            .has(table, family)
                            .then(|| self.start_save(family, table));
                        (table, read)
                    })
                    .collect::<Vec<_>>();
                (family, tables)
            })
            .collect::<Vec<_>>();
        let mut steps = Vec::new();
        for (family, reads) in reads {
            let mut before = Vec::new();
            let mut document = String::new();
            let mut in_place = true;
            for (table, read) in reads {
                let installed = match read {
                    Some(read) => Installed::parse_table(&read?.output()?, table),
                    None => Installed {
                        table,
                        ..Installed::default()
                    },
                };
                // Nothing of ours in a table the ruleset does not use: leave it be.
                if chains_in(ruleset, table).is_empty() && installed.is_empty() {
                    continue;
                }
                in_place &= installed.is_exactly(ruleset, family);
                document.push_str(&installed.apply_text(ruleset, family));
                before.push(installed);
            }
            // Exactly what the document would leave is there already: writing it
            // would delete and re-add the same rules (and, with iptables-nft, wait
            // for the commit's RCU grace period) for nothing.
            if in_place {
                tracing::debug!(family = ?family, "rules already in place; not rewritten");
                continue;
            }
            steps.push((family, before, document));
        }
        // With --ipv6=false, IPv6 rules of ours left by an earlier run are
        // removed: they would keep redirecting IPv6 against the flags (the nft
        // backend gets the same result by replacing its table). A host without
        // ip6tables has none to remove.
        if !ruleset.ipv6 {
            let mut before = Vec::new();
            let mut document = String::new();
            for table in Table::ALL {
                if !tables.has(table, Family::V6) {
                    continue;
                }
                if let Ok(installed) = self.installed_in(Family::V6, table) {
                    if !installed.is_empty() {
                        document.push_str(&installed.cleanup_text());
                        before.push(installed);
                    }
                }
            }
            if !document.is_empty() {
                steps.push((Family::V6, before, document));
            }
        }
        // The families' restores run at the same time. Each commits on its own
        // either way; running them together saves a process's start-up and, with
        // iptables-nft, a wait: a commit that deletes rules (replacing ours does)
        // waits for an RCU grace period when its netlink socket closes, and two
        // commits at once wait for the same one. (iptables-nft retries a commit
        // that raced another; iptables-legacy's take turns on the xtables lock.)
        let results = steps
            .iter()
            .map(|(family, _, document)| self.start_restore(*family, document))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|started| started.and_then(Running::output).map(drop))
            .collect::<Vec<_>>();
        let unchanged = steps.is_empty();
        if results.iter().all(Result::is_ok) {
            return Ok(Applied {
                nf_tables,
                unchanged,
            });
        }
        let mut first_error = None;
        for ((family, before, _), result) in steps.iter().zip(results) {
            // A family that committed goes back to what it had; so does one whose
            // document of two tables failed, which may have committed the first.
            match result {
                Ok(()) => self.roll_back(*family, before),
                Err(err) => {
                    if before.len() > 1 {
                        self.roll_back(*family, before);
                    }
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(
            Ok(Applied {
                nf_tables,
                unchanged,
            }),
            Err,
        )
    }

    fn cleanup(&self) -> Result<(), BackendError> {
        let tables = self.may_have_tables();
        for family in [Family::V4, Family::V6] {
            let mut document = String::new();
            for table in Table::ALL {
                if !tables.has(table, family) {
                    continue;
                }
                let installed = self.installed_in(family, table)?;
                if !installed.is_empty() {
                    document.push_str(&installed.cleanup_text());
                }
            }
            if !document.is_empty() {
                self.restore(family, &document)?;
            }
        }
        Ok(())
    }

    fn diff(&self, ruleset: &Ruleset) -> Result<Vec<String>, BackendError> {
        let tables = self.may_have_tables();
        let mut differences = Vec::new();
        for &family in Self::families(ruleset.ipv6) {
            let name = match family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            for table in self.tables_for(Some(ruleset), family, &tables) {
                let prefix = match table {
                    Table::Nat => name.to_string(),
                    Table::Mangle => format!("{name} mangle"),
                };
                for difference in self.installed_in(family, table)?.diff(ruleset, family) {
                    differences.push(format!("{prefix}: {difference}"));
                }
            }
        }
        if !ruleset.ipv6
            && Table::ALL.into_iter().any(|table| {
                tables.has(table, Family::V6)
                    && self
                        .installed_in(Family::V6, table)
                        .is_ok_and(|v6| !v6.is_empty())
            })
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
            for table in Table::ALL {
                if tables.has(table, family) && !self.installed_in(family, table)?.is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mangle tables are read only where nft lists one: each read is a `*-save`
    /// process, and redirect mode has none.
    #[test]
    fn the_nft_listing_says_which_iptables_nft_tables_to_read() {
        let iptables = Iptables::new(Flavor::Nft);
        let listing = "table ip nat\ntable ip6 filter\ntable inet meshinit\ntable ip mangler\n";
        let tables = iptables.may_have_tables_given(Some(listing));
        assert!(tables.any);
        assert_eq!(tables.nat, [true, false]);
        assert_eq!(tables.mangle, [false, false]);
        let tables = iptables.may_have_tables_given(Some("table ip6 mangle\n"));
        assert_eq!((tables.nat, tables.mangle), ([false, false], [false, true]));
        let tables = iptables.may_have_tables_given(Some("table inet meshinit\n"));
        assert!(!tables.any);
    }
}
