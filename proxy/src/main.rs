//! The `meshproxy` binary: flags, logging, signals; everything else is the library.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use meshinit_settings::{Program, Report};
use meshproxy::{Config, LogFormat, ProxyArgs};

/// Sidecar proxy for meshinit: forwards redirected TCP connections to their original
/// destination, detects their protocol and counts them for Prometheus.
///
/// Every flag can also be set with an env var `MESHPROXY_<FLAG>` (for example
/// `MESHPROXY_DETECT_TIMEOUT=1s`) or a key in the `--config` TOML file; flags win over
/// env vars, env vars over the file.
#[derive(Parser, Debug)]
#[command(name = "meshproxy", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

// Parsed once at start-up: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (what a bare `meshproxy` does).
    Run(ProxyArgs),
    /// Make a throwaway CA and identities for demos and tests (not for production).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Work with the --discovery file.
    #[command(subcommand)]
    Discovery(DiscoveryCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from these flags.
    Man,
    /// Wait until the proxy answers /ready with 200 (exit 0), or give up after
    /// --timeout (exit 1). With a command after `--`, then run it in place of this
    /// process. Use it as the proxy container's postStart hook, or to wrap the
    /// application's command, so the application never starts before the proxy.
    Await {
        /// The proxy's admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4191")]
        admin_addr: std::net::SocketAddr,
        /// How long to wait (`120s`, `2m`).
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// The command to run once the proxy is ready.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand, Debug)]
enum DiscoveryCommand {
    /// Validate FILE as `--discovery` would: exit 0 and print its services when it is
    /// valid, exit 2 with the problem and where it is otherwise. Endpoints with an
    /// identity are accepted (the proxy that reads the file needs an identity of its
    /// own for them).
    Check {
        /// The discovery file (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Create a CA in DIR: ca.crt (give it to --trust-anchors) and ca.key. An
    /// existing CA there is not replaced (exit 2) unless --force is given.
    NewCa {
        /// Directory to write to; created if missing.
        dir: PathBuf,
        /// Replace a CA already in DIR (identities it issued will no longer be trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue NAME.crt and NAME.key (ECDSA P-256, DNS SAN = NAME) signed by a CA made
    /// by `new-ca`. NAME must be an exact DNS name (no wildcard): exit 2 otherwise.
    Issue {
        /// The CA directory (holding ca.crt and ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The identity, a DNS name such as web.default.mesh.local.
        name: String,
        /// Where to write NAME.crt and NAME.key [default: the CA directory].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Give both files to this numeric owner (needs root): the key is mode 0600,
        /// so the proxy reads it only as its owner, e.g. `--owner 2102:2102`.
        #[arg(long, value_name = "UID[:GID]")]
        owner: Option<meshproxy::Owner>,
    },
}

fn main() -> ExitCode {
    // A boolean setting takes `true`/`false` after a space too, as in meshinit.
    let args = meshinit_settings::join_bool_values(
        std::env::args_os(),
        &meshinit_settings::bool_flags(&Cli::command()),
    );
    let cli = Cli::parse_from(args);
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        Some(Command::Identity(command)) => return identity(command),
        Some(Command::Discovery(DiscoveryCommand::Check { file })) => {
            return discovery_check(&file)
        }
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "meshproxy", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Await {
            admin_addr,
            timeout,
            command,
        }) => return await_then_exec(admin_addr, timeout, command),
        Some(Command::Man) => {
            let page = clap_mangen::Man::new(Cli::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            };
        }
        None => cli.proxy,
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match load_config(&args, &env) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("meshproxy: {}", Report(error.as_ref()));
            // Bad input: like meshinit, exit 2 and start nothing.
            return ExitCode::from(2);
        }
    };
    // An invalid discovery file is bad input like a bad flag: exit 2, start nothing.
    if let Some(path) = &config.discovery {
        if let Err(error) = meshproxy::Balancer::check(path, config.identity.is_some()) {
            eprintln!("meshproxy: {error}");
            return ExitCode::from(2);
        }
    }
    init_tracing(config.log_format);
    raise_nofile_limit(config.descriptors_needed());
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{}", Report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `meshproxy await`: a timeout exits 1; the command, if any, replaces this
/// process (its exit status is the container's), and one that cannot be run
/// exits 127 like a shell's.
fn await_then_exec(
    admin_addr: std::net::SocketAddr,
    timeout: std::time::Duration,
    command: Vec<std::ffi::OsString>,
) -> ExitCode {
    if let Err(error) = meshproxy::await_ready(admin_addr, timeout) {
        eprintln!("meshproxy await: {error}");
        return ExitCode::FAILURE;
    }
    let Some((program, args)) = command.split_first() else {
        return ExitCode::SUCCESS;
    };
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(program).args(args).exec();
    eprintln!("meshproxy await: cannot run {program:?}: {error}");
    ExitCode::from(127)
}

/// `meshproxy discovery check FILE`.
fn discovery_check(file: &std::path::Path) -> ExitCode {
    match meshproxy::Balancer::check(file, true) {
        Ok(discovery) => {
            for service in &discovery.services {
                let endpoints: usize = service.backends.iter().map(|b| b.endpoints.len()).sum();
                println!(
                    "service {:?}: {} address(es), {} backend(s), {} endpoint(s)",
                    service.name,
                    service.addrs.len(),
                    service.backends.len(),
                    endpoints
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("meshproxy: {error}");
            ExitCode::from(2)
        }
    }
}

fn identity(command: IdentityCommand) -> ExitCode {
    let result = match command {
        IdentityCommand::NewCa { dir, force } => {
            let made = if force {
                meshproxy::new_ca_replacing(&dir)
            } else {
                meshproxy::new_ca(&dir)
            };
            made.map(|anchors| {
                println!("{}", anchors.display());
                println!("{}", dir.join("ca.key").display());
            })
        }
        IdentityCommand::Issue {
            ca,
            name,
            out,
            owner,
        } => {
            let out = out.unwrap_or_else(|| ca.clone());
            meshproxy::issue_owned(&ca, &name, &out, owner).map(|issued| {
                println!("{}", issued.cert.display());
                println!("{}", issued.key.display());
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshproxy: {error}");
            match error {
                // Bad input, as for the proxy's flags: exit 2, nothing written.
                meshproxy::DevCaError::BadName(_)
                | meshproxy::DevCaError::CaExists { .. }
                | meshproxy::DevCaError::UnsafeFileName { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn load_config(args: &ProxyArgs, env: &HashMap<String, String>) -> anyhow::Result<Config> {
    let Some(path) = Config::file_path(args, env) else {
        return Ok(Config::from_sources(args, env, None)?);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    // The error names the file and the key itself.
    Ok(Config::from_sources(args, env, Some(&text))?)
}

fn init_tracing(format: LogFormat) {
    let format = match format {
        LogFormat::Plain => meshinit_settings::LogFormat::Plain,
        LogFormat::Json => meshinit_settings::LogFormat::Json,
    };
    meshinit_settings::init_logging(Program::Meshproxy, format);
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and warns when even that cannot
/// hold `needed` descriptors.
///
/// The soft limit is often 1024 (systemd, many container runtimes), far below what
/// `--max-connections` allows: past it `accept` fails with EMFILE and the proxy stops
/// taking connections at a fraction of its cap. The hard limit is what the
/// administrator granted, so we take all of it; we cannot go higher without
/// CAP_SYS_RESOURCE, and do not try.
fn raise_nofile_limit(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the file descriptor limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the file descriptor limit");
                hard
            }
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the file descriptor limit");
                soft
            }
        }
    } else {
        soft
    };
    if soft < needed {
        tracing::warn!(
            limit = soft,
            needed,
            "the file descriptor limit (RLIMIT_NOFILE) is below what --max-connections \
             needs (two descriptors per connection, inbound and outbound, plus a margin): \
             connections will fail with EMFILE before the cap; raise the hard limit \
             (ulimit -Hn, LimitNOFILE=) or lower --max-connections"
        );
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    // One core (the default) is a current-thread runtime: every task runs on this
    // thread, so no event ever has to wake another one (see `Config::cores`). The
    // blocking pool (metrics encoding) exists either way.
    let mut builder = if config.cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.cores);
        builder
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::debug!(
        workers = runtime.metrics().num_workers(),
        "async runtime started"
    );
    runtime.block_on(async {
        meshproxy::run(config, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Connections still open after the grace period are dropped with the runtime.
    runtime.shutdown_background();
    Ok(())
}

/// Completes on SIGTERM (the kubelet stopping the pod) or SIGINT (Ctrl-C).
///
/// Without a SIGTERM handler (the runtime could not register one, which does not
/// happen on Linux short of running out of descriptors) SIGTERM keeps its default
/// action and ends the process at once, without draining: logged, not a panic.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot handle SIGTERM: it will stop meshproxy without draining");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
