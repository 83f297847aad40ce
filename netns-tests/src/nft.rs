//! Reading back a namespace's nftables ruleset.

use serde_json::Value;

use crate::netns::Netns;
use crate::process::Run;

/// meshinit's table, as `nft` names it: `family name`.
pub const MESHINIT_TABLE: &str = "inet meshinit";

/// One rule of a table, enough to name it to `nft delete rule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub comment: Option<String>,
}

impl Netns {
    /// `nft ARGS…` inside the namespace, which must succeed.
    pub fn nft(&self, args: &[&str]) -> Run {
        let argv: Vec<&str> = std::iter::once("nft").chain(args.iter().copied()).collect();
        self.exec(&argv).expect_ok()
    }

    /// `nft list ruleset`: the whole ruleset as text, for before/after comparisons.
    pub fn ruleset(&self) -> String {
        self.nft(&["list", "ruleset"]).stdout
    }

    /// `nft list table inet meshinit` as text, or `None` when the table does not exist.
    pub fn meshinit_table(&self) -> Option<String> {
        let run = self.exec(&["nft", "list", "table", "inet", "meshinit"]);
        match run.code {
            Some(0) => Some(run.stdout),
            _ if run.stderr.contains("No such file or directory") => None,
            _ => panic!("cannot list meshinit's table\n{run}"),
        }
    }

    /// Every rule of meshinit's table, in `nft -j` order (empty when there is no table).
    pub fn meshinit_rules(&self) -> Vec<RuleRef> {
        if self.meshinit_table().is_none() {
            return Vec::new();
        }
        let run = self.nft(&["-j", "list", "table", "inet", "meshinit"]);
        let json: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("`nft -j` printed invalid JSON: {e}\n{run}"));
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|object| object.get("rule"))
            .map(|rule| RuleRef {
                family: rule["family"].as_str().unwrap_or_default().to_string(),
                table: rule["table"].as_str().unwrap_or_default().to_string(),
                chain: rule["chain"].as_str().unwrap_or_default().to_string(),
                handle: rule["handle"].as_u64().expect("a rule handle"),
                comment: rule["comment"].as_str().map(str::to_string),
            })
            .collect()
    }

    /// `nft delete rule FAMILY TABLE CHAIN handle N`.
    pub fn delete_rule(&self, rule: &RuleRef) {
        let handle = rule.handle.to_string();
        self.nft(&[
            "delete",
            "rule",
            &rule.family,
            &rule.table,
            &rule.chain,
            "handle",
            &handle,
        ]);
    }
}
