//! The native nftables backend: one `nft -j -f -` transaction per apply, the only
//! process an apply runs when no other backend holds anything.
//!
//! We run `nft` ourselves rather than through the `nftables` crate's helper
//! because that helper drops nft's stderr, and nft's own message is the only
//! useful thing to show when a batch is refused.

use meshinit_rules::{nft_json, nft_text, Ruleset};

use super::{run, Applied, Backend, BackendError};

pub(super) const HINT: &str = "install the nftables package, or use --backend iptables-nft";

/// Runs the `nft` binary found in PATH.
pub struct Nft;

impl Nft {
    fn batch(&self, batch: &nftables::schema::Nftables<'_>) -> Result<(), BackendError> {
        // Cannot fail: the batch is typed structs, enums and strings only (no maps with
        // non-string keys, no non-finite floats), built by us, not read from input.
        let json = serde_json::to_vec(batch).expect("nft JSON always serialises");
        run("nft", &["-j", "-f", "-"], Some(&json), HINT).map(drop)
    }

    /// Runs `batch` followed by `list tables` in the same `nft` process, and returns
    /// the tables it listed as `table FAMILY NAME` lines. The listing comes from the
    /// cache nft reads before it commits, so it shows every table but ours as it is
    /// (ours is being replaced anyway): enough to know whether iptables-nft may hold
    /// rules, which otherwise took a second `nft` process per apply.
    fn batch_listing_tables(
        &self,
        batch: &nftables::schema::Nftables<'_>,
    ) -> Result<String, BackendError> {
        let mut value = serde_json::to_value(batch).expect("nft JSON always serialises");
        if let Some(commands) = value["nftables"].as_array_mut() {
            commands.push(serde_json::json!({ "list": { "tables": null } }));
        }
        let json = serde_json::to_vec(&value).expect("a JSON value always serialises");
        let output = run("nft", &["-j", "-f", "-"], Some(&json), HINT)?;
        tables(&output).map_err(|message| BackendError::Unreadable {
            command: "nft -j -f - (apply, list tables)".to_string(),
            message,
        })
    }

    /// `nft -j list table inet meshinit`, or `None` when our table is absent.
    pub fn list_ours(&self) -> Result<Option<String>, BackendError> {
        match run(
            "nft",
            &["-j", "list", "table", "inet", nft_json::TABLE],
            None,
            HINT,
        ) {
            Ok(listing) => Ok(Some(listing)),
            Err(BackendError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }
}

impl Backend for Nft {
    fn name(&self) -> &'static str {
        "nft"
    }

    fn render(&self, ruleset: &Ruleset) -> String {
        nft_text::render(ruleset)
    }

    fn apply(&self, ruleset: &Ruleset) -> Result<Applied, BackendError> {
        let listing = self.batch_listing_tables(&nft_json::apply_batch(ruleset))?;
        Ok(Applied {
            nf_tables: Some(listing),
            unchanged: false,
        })
    }

    fn cleanup(&self) -> Result<(), BackendError> {
        self.batch(&nft_json::cleanup_batch())
    }

    fn has_ours(&self) -> Result<bool, BackendError> {
        // The tables are listed in process; only when that fails does `nft` run.
        self.has_ours_after(&Applied::default().with_nf_tables())
    }

    fn has_ours_after(&self, applied: &Applied) -> Result<bool, BackendError> {
        match &applied.nf_tables {
            Some(listing) => Ok(listing
                .lines()
                .any(|line| line.trim() == format!("table inet {}", nft_json::TABLE))),
            None => Ok(self.list_ours()?.is_some()),
        }
    }

    fn diff(&self, ruleset: &Ruleset) -> Result<Vec<String>, BackendError> {
        let Some(listing) = self.list_ours()? else {
            return Ok(vec![format!(
                "table inet {} is not installed",
                nft_json::TABLE
            )]);
        };
        nft_json::diff(ruleset, &listing).map_err(|err| BackendError::Unreadable {
            command: "nft -j list table inet meshinit".to_string(),
            message: err.to_string(),
        })
    }
}

/// The `table FAMILY NAME` lines of the tables in `nft -j` output.
fn tables(output: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(output).map_err(|err| err.to_string())?;
    let objects = value["nftables"]
        .as_array()
        .ok_or("no \"nftables\" array")?;
    let mut lines = String::new();
    for table in objects.iter().filter_map(|object| object.get("table")) {
        let (Some(family), Some(name)) = (table["family"].as_str(), table["name"].as_str()) else {
            return Err(format!("a table without family or name: {table}"));
        };
        lines.push_str(&format!("table {family} {name}\n"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_read_from_nft_json_output() {
        let output = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "nat", "handle": 2}},
            {"table": {"family": "inet", "name": "meshinit", "handle": 0}}]}"#;
        assert_eq!(
            tables(output).unwrap(),
            "table ip nat\ntable inet meshinit\n"
        );
        assert!(tables("{}").is_err());
        assert!(tables(r#"{"nftables": [{"table": {"family": "ip"}}]}"#).is_err());
    }
}
