//! The native nftables backend: one `nft -j -f -` transaction per apply.
//!
//! We run `nft` ourselves rather than through the `nftables` crate's helper
//! because that helper drops nft's stderr, and nft's own message is the only
//! useful thing to show when a batch is refused.

use meshinit_rules::{nft_json, nft_text, Ruleset};

use super::{run, Backend, BackendError};

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

    fn apply(&self, ruleset: &Ruleset) -> Result<(), BackendError> {
        self.batch(&nft_json::apply_batch(ruleset))
    }

    fn cleanup(&self) -> Result<(), BackendError> {
        self.batch(&nft_json::cleanup_batch())
    }

    fn has_ours(&self) -> Result<bool, BackendError> {
        Ok(self.list_ours()?.is_some())
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
