//! The subcommands: apply (the default), cleanup, show, check, validate.
//!
//! The steps that change or read rules (`install`, `cleanup`, `drift`) print
//! nothing on stdout, so the CNI plugin (`cni`), whose stdout is the protocol,
//! reuses them.

use std::process::ExitCode;

use anyhow::anyhow;
use meshinit_rules::{Family, Mode, Ruleset, Spec, Tproxy};

use crate::backend::{self, Backend, Nft};
use crate::caps::{self, Cap};
use crate::cli::Command;
use crate::config::{BackendChoice, Config};
use crate::{lock, netns, routing};

/// How a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Exit 2: the input was wrong and nothing was changed.
    BadInput(anyhow::Error),
    /// Exit 1: applying failed; the previous ruleset is intact.
    Apply(anyhow::Error),
}

fn apply_failure(err: backend::BackendError, what: &'static str) -> Failure {
    Failure::Apply(anyhow!(err).context(what))
}

pub fn run(command: Command, config: &Config) -> Result<ExitCode, Failure> {
    let ruleset = Ruleset::from(&config.spec);

    // `show` renders only: no namespace, no probing, no privileges.
    if command == Command::Show {
        let backend = backend::named(config.backend).unwrap_or_else(|| Box::new(Nft));
        print!("{}", backend.render(&ruleset));
        print!("{}", routing_note(&config.spec));
        return Ok(ExitCode::SUCCESS);
    }

    if let Some(path) = &config.netns {
        enter(path)?;
    }

    let changes = match &command {
        Command::Apply => !config.dry_run,
        Command::Check { repair } => *repair,
        _ => false,
    };
    if changes {
        allowed_here(netns::current(), config.allow_host_netns, HOST_HINT)?;
    }
    if matches!(command, Command::Apply | Command::Check { .. }) {
        crate::addrs::warn_if_ipv6_unmeshed(config.spec.ipv6);
    }

    match command {
        Command::Cleanup => cleanup(config),
        Command::Check { repair } => check(config, &ruleset, repair),
        Command::Validate => crate::validate::run(config),
        // Show returned above; completions, man pages and cni are handled in main.
        _ => apply(config, &ruleset),
    }
}

/// How to point the CLI at a pod, for the refusal message.
const HOST_HINT: &str = "name the pod's namespace with --netns /var/run/netns/NAME or --netns /proc/PID/ns/net (or run meshinit inside it)";

/// Refuses to change the host's own network namespace unless `allow`ed.
///
/// A bare `meshinit` run as root on a host would send all of the host's outbound
/// TCP to a port where nothing listens (the proxy runs in pods), cutting the host
/// off. That is never what "run the pod's init by hand" means, so it takes an
/// explicit `--allow-host-netns`. When it cannot be told whether this is the host
/// (init's namespace is unreadable and the kernel has no fixed inode for it) the
/// run goes ahead with a warning: refusing would make meshinit unusable in every
/// named namespace on such hosts. `hint` says how to name a pod's namespace.
pub fn allowed_here(target: netns::Target, allow: bool, hint: &str) -> Result<(), Failure> {
    match target {
        netns::Target::Host(why) if !allow => Err(Failure::BadInput(anyhow!(
            "refusing to redirect the host: the target is the host's initial network namespace ({why}), and redirecting it would send all of the host's outbound TCP to the proxy port; {hint}, or pass --allow-host-netns (MESHINIT_ALLOW_HOST_NETNS=true, allow_host_netns = true) if the host is really meant"
        ))),
        netns::Target::Host(why) => {
            tracing::warn!("changing the host's initial network namespace ({why}), as --allow-host-netns allows");
            Ok(())
        }
        netns::Target::Other => Ok(()),
        netns::Target::Unknown(why) => {
            tracing::warn!("cannot tell whether this is the host's network namespace ({why}); going ahead");
            Ok(())
        }
    }
}

/// Enters the namespace at `path`: a missing or wrong file is bad input.
pub fn enter(path: &std::path::Path) -> Result<(), Failure> {
    netns::enter(path).map_err(|err| {
        if err.is_bad_input() {
            Failure::BadInput(err.into())
        } else {
            Failure::Apply(err.into())
        }
    })?;
    tracing::debug!(netns = %path.display(), "entered network namespace");
    Ok(())
}

/// Refuses to start without the capabilities the work needs, naming them,
/// instead of failing later on an nft or iptables error.
fn require(needed: &[Cap], what: &str) -> Result<(), Failure> {
    caps::require(needed, what).map_err(|message| Failure::Apply(anyhow!(message)))
}

/// The iptables-legacy tools also need CAP_NET_RAW (they reach x_tables
/// through a raw socket); nft and iptables-nft need only CAP_NET_ADMIN.
fn require_for(backend: &dyn Backend, what: &str) -> Result<(), Failure> {
    if backend.name() == "iptables-legacy" {
        require(&[Cap::NetAdmin, Cap::NetRaw], what)
    } else {
        Ok(())
    }
}

/// The lock file around every change (see `lock`); a refused or busy lock exits 1.
fn take_lock(config: &Config) -> Result<lock::Lock, Failure> {
    lock::acquire(std::path::Path::new(lock::PATH), config.lock_timeout)
        .map_err(|err| Failure::Apply(err.into()))
}

fn choose(config: &Config) -> Result<Box<dyn Backend>, backend::BackendError> {
    match backend::named(config.backend) {
        Some(backend) => Ok(backend),
        None => backend::auto(),
    }
}

fn apply(config: &Config, ruleset: &Ruleset) -> Result<ExitCode, Failure> {
    if config.dry_run {
        // A dry run shows what this namespace would get; when no backend is
        // usable (e.g. not root) it still shows the default nft rendering.
        let backend = choose(config).unwrap_or_else(|err| {
            tracing::warn!("{err}; showing the nft rendering");
            Box::new(Nft)
        });
        print!("{}", backend.render(ruleset));
        print!("{}", routing_note(&config.spec));
        return Ok(ExitCode::SUCCESS);
    }
    install(config, ruleset)?;
    Ok(ExitCode::SUCCESS)
}

/// The policy routing `spec` needs: its tproxy numbers (the defaults in
/// `redirect` mode, to find ours left by an earlier `tproxy` run) and the
/// families that need it (none in `redirect` mode).
fn routing_wanted(spec: &Spec) -> (Tproxy, Vec<Family>) {
    match spec.mode {
        Mode::Redirect => (Tproxy::DEFAULT, vec![]),
        Mode::Tproxy(tproxy) if spec.ipv6 => (tproxy, vec![Family::V4, Family::V6]),
        Mode::Tproxy(tproxy) => (tproxy, vec![Family::V4]),
    }
}

/// What `show` and `--dry-run` add in `tproxy` mode: the policy routing,
/// as comments (valid in nft and iptables-restore input alike).
fn routing_note(spec: &Spec) -> String {
    let (tproxy, families) = routing_wanted(spec);
    let mut out = String::new();
    for family in families {
        let flag = match family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        out.push_str(&format!(
            "# policy routing (rtnetlink): ip {flag} rule add fwmark {:#x} lookup {} priority {}\n# policy routing (rtnetlink): ip {flag} route add local default dev lo table {}\n",
            tproxy.mark, tproxy.table, tproxy.rule_priority, tproxy.table
        ));
    }
    out
}

/// Replaces our rules with `ruleset` in the current namespace (one transaction),
/// with the policy routing of `tproxy` mode (or without ours in `redirect`
/// mode), then removes ours from any other backend. Prints nothing on stdout.
///
/// All or nothing: the routing is changed first, and taken back when the rules
/// fail to apply, so a failure leaves the previous rules and routing.
pub fn install(config: &Config, ruleset: &Ruleset) -> Result<(), Failure> {
    require(&[Cap::NetAdmin], "applying rules")?;
    let _lock = take_lock(config)?;
    let backend = choose(config).map_err(|err| apply_failure(err, "no backend"))?;
    require_for(backend.as_ref(), "applying rules")?;
    let (tproxy, families) = routing_wanted(&config.spec);
    let undo = match routing::apply(&tproxy, &families) {
        Ok(undo) => undo,
        // In redirect mode ours are only looked for; a namespace whose routing
        // cannot be read (no IPv6 in the kernel) has none to remove.
        Err(err) if families.is_empty() => {
            tracing::debug!("policy routing not checked: {err}");
            routing::Undo::default()
        }
        Err(err) => {
            return Err(Failure::Apply(anyhow!(err).context(
                "apply failed; the previous rules and routing are intact",
            )))
        }
    };
    let applied = match backend.apply(ruleset) {
        Ok(applied) => applied,
        Err(err) => {
            if !undo.is_empty() {
                if let Err(undo_err) = routing::undo(undo) {
                    tracing::error!("taking back the policy routing failed: {undo_err}");
                }
            }
            return Err(apply_failure(
                err,
                "apply failed; the previous ruleset is intact",
            ));
        }
    };
    tracing::info!(
        backend = backend.name(),
        rules = ruleset.rule_count(),
        ipv6 = ruleset.ipv6,
        mode = if ruleset.tproxy.is_some() {
            "tproxy"
        } else {
            "redirect"
        },
        // True when the rules were already exactly in place and nothing was written.
        unchanged = applied.unchanged,
        "applied redirect rules"
    );
    // Rules of ours left by another backend would keep redirecting (or stop
    // redirecting when removed later): clean them now that ours are in place.
    // The check costs no process where there is nothing to find: legacy tables are
    // listed in /proc, and nf_tables ones by the nft apply itself (after an iptables
    // apply, by one `nft list tables` that both nf_tables checks share).
    let applied = applied.with_nf_tables();
    for other in backend::all() {
        if other.name() == backend.name() {
            continue;
        }
        match other.has_ours_after(&applied) {
            Ok(true) => {
                other.cleanup().map_err(|err| {
                    apply_failure(err, "removing our rules from the previous backend failed")
                })?;
                tracing::info!(
                    removed_from = other.name(),
                    backend = backend.name(),
                    "removed our stale rules left by another backend"
                );
            }
            Ok(false) => {}
            Err(err) => tracing::debug!("{} not checked: {err}", other.name()),
        }
    }
    Ok(())
}

/// Removes our rules (every backend with `auto`). Prints on stdout only for a dry run.
pub fn cleanup(config: &Config) -> Result<ExitCode, Failure> {
    // With auto, ours are removed from every backend that has them: cleanup
    // must not depend on guessing which backend an earlier run chose.
    require(&[Cap::NetAdmin], "removing rules")?;
    let _lock = take_lock(config)?;
    let backends = match backend::named(config.backend) {
        Some(backend) => vec![backend],
        None => backend::all(),
    };
    for backend in backends {
        let present = match backend.has_ours() {
            Ok(present) => present,
            Err(err) if config.backend == BackendChoice::Auto => {
                tracing::debug!("{} not checked: {err}", backend.name());
                continue;
            }
            Err(err) => return Err(apply_failure(err, "cleanup failed")),
        };
        if !present {
            continue;
        }
        if config.dry_run {
            println!("would remove meshinit's rules from {}", backend.name());
            continue;
        }
        backend
            .cleanup()
            .map_err(|err| apply_failure(err, "cleanup failed"))?;
        tracing::info!(backend = backend.name(), "removed meshinit's rules");
    }
    // The policy routing of `tproxy` mode: ours (our priority looking up our
    // table, and the routes in our table) go, nothing else is touched.
    let (tproxy, _) = routing_wanted(&config.spec);
    let present = routing::drift(&tproxy, &[]).map_err(|err| {
        Failure::Apply(anyhow!(err).context("cleanup failed reading the policy routing"))
    })?;
    if !present.is_empty() {
        if config.dry_run {
            println!(
                "would remove meshinit's policy routing: {}",
                present.join("; ")
            );
        } else {
            routing::apply(&tproxy, &[]).map_err(|err| {
                Failure::Apply(anyhow!(err).context("cleanup failed removing the policy routing"))
            })?;
            tracing::info!(table = tproxy.table, "removed meshinit's policy routing");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The backend `check` compares with, and how the installed rules differ from
/// `ruleset` (empty when they are equal). Prints nothing on stdout.
pub fn drift(config: &Config, ruleset: &Ruleset) -> Result<(&'static str, Vec<String>), Failure> {
    require(&[Cap::NetAdmin], "reading rules")?;
    let backend = choose(config).map_err(|err| apply_failure(err, "no backend"))?;
    require_for(backend.as_ref(), "reading rules")?;
    let mut differences = backend
        .diff(ruleset)
        .map_err(|err| apply_failure(err, "check failed"))?;
    for other in backend::all() {
        if other.name() != backend.name() && other.has_ours().unwrap_or(false) {
            differences.push(format!("stale rules of ours in {}", other.name()));
        }
    }
    let (tproxy, families) = routing_wanted(&config.spec);
    match routing::drift(&tproxy, &families) {
        Ok(routing) => differences.extend(routing),
        Err(err) if families.is_empty() => tracing::debug!("policy routing not checked: {err}"),
        Err(err) => {
            return Err(Failure::Apply(
                anyhow!(err).context("check failed reading the policy routing"),
            ))
        }
    }
    Ok((backend.name(), differences))
}

fn check(config: &Config, ruleset: &Ruleset, repair: bool) -> Result<ExitCode, Failure> {
    let (backend, differences) = drift(config, ruleset)?;
    if differences.is_empty() {
        println!("ok: installed rules match the expected ones ({backend})");
        return Ok(ExitCode::SUCCESS);
    }
    println!("drift: installed rules differ from the expected ones ({backend}):");
    for difference in &differences {
        println!("  {difference}");
    }
    tracing::warn!(differences = differences.len(), "rules drifted");
    if !repair {
        return Ok(ExitCode::from(1));
    }
    // A repair is a full apply: the same one-transaction replace as `apply`, so
    // a probe that repairs never leaves a half-fixed ruleset. It is verified by
    // reading the rules back, not assumed.
    install(config, ruleset)?;
    let (backend, left) = drift(config, ruleset)?;
    if !left.is_empty() {
        return Err(Failure::Apply(anyhow!(
            "repair applied but the rules still differ ({backend}): {}",
            left.join("; ")
        )));
    }
    for difference in &differences {
        tracing::info!(backend, repaired = %difference, "repaired drift");
    }
    println!("repaired: the expected rules are installed again ({backend})");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::Target;

    fn message(result: Result<(), Failure>) -> String {
        match result {
            Err(Failure::BadInput(err)) => format!("{err:#}"),
            Err(Failure::Apply(err)) => panic!("expected bad input, got a failure: {err:#}"),
            Ok(()) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn the_host_is_refused_as_bad_input_saying_how_to_target_a_pod() {
        let text = message(allowed_here(Target::Host("fixed inode"), false, HOST_HINT));
        for needle in [
            "refusing to redirect the host",
            "fixed inode",
            "--netns /var/run/netns/NAME",
            "--allow-host-netns",
        ] {
            assert!(text.contains(needle), "{needle:?} missing: {text}");
        }
    }

    #[test]
    fn allowed_or_not_the_host_goes_ahead() {
        assert!(allowed_here(Target::Host("fixed inode"), true, HOST_HINT).is_ok());
        assert!(allowed_here(Target::Other, false, HOST_HINT).is_ok());
        assert!(allowed_here(Target::Unknown("EACCES".into()), false, HOST_HINT).is_ok());
    }
}
