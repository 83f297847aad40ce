//! The subcommands: apply (the default), cleanup, show, check.

use std::process::ExitCode;

use anyhow::anyhow;
use meshinit_rules::Ruleset;

use crate::backend::{Backend, Nft};
use crate::cli::Command;
use crate::config::{BackendChoice, Config};
use crate::netns;

/// How a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Exit 2: the input was wrong and nothing was changed.
    BadInput(anyhow::Error),
    /// Exit 1: applying failed; the previous ruleset is intact.
    Apply(anyhow::Error),
}

pub fn run(command: Command, config: &Config) -> Result<ExitCode, Failure> {
    let ruleset = Ruleset::from(&config.spec);
    let backend = choose(config)?;

    if command == Command::Show || (config.dry_run && command == Command::Apply) {
        print!("{}", backend.render(&ruleset));
        return Ok(ExitCode::SUCCESS);
    }

    if let Some(path) = &config.netns {
        netns::enter(path).map_err(|err| {
            if err.is_bad_input() {
                Failure::BadInput(err.into())
            } else {
                Failure::Apply(err.into())
            }
        })?;
        tracing::debug!(netns = %path.display(), "entered network namespace");
    }

    match command {
        Command::Apply | Command::Show => {
            backend.apply(&ruleset).map_err(|err| {
                Failure::Apply(anyhow!(err).context("apply failed; the previous ruleset is intact"))
            })?;
            tracing::info!(
                backend = backend.name(),
                rules = ruleset.rule_count(),
                ipv6 = ruleset.ipv6,
                "applied redirect rules"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup => {
            if config.dry_run {
                println!("would remove meshinit's rules ({})", backend.name());
                return Ok(ExitCode::SUCCESS);
            }
            backend
                .cleanup()
                .map_err(|err| Failure::Apply(anyhow!(err).context("cleanup failed")))?;
            tracing::info!(backend = backend.name(), "removed meshinit's rules");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let differences = backend
                .diff(&ruleset)
                .map_err(|err| Failure::Apply(anyhow!(err).context("check failed")))?;
            if differences.is_empty() {
                println!("ok: installed rules match the expected ones ({})", backend.name());
                return Ok(ExitCode::SUCCESS);
            }
            println!("drift: installed rules differ from the expected ones ({}):", backend.name());
            for difference in &differences {
                println!("  {difference}");
            }
            tracing::warn!(differences = differences.len(), "rules drifted");
            Ok(ExitCode::from(1))
        }
    }
}

fn choose(config: &Config) -> Result<Box<dyn Backend>, Failure> {
    match config.backend {
        BackendChoice::Auto | BackendChoice::Nft => Ok(Box::new(Nft)),
        BackendChoice::IptablesNft | BackendChoice::IptablesLegacy => Err(Failure::Apply(anyhow!(
            "the iptables backends are not available yet; use --backend nft"
        ))),
    }
}
