//! The `meshinit` binary: parse, log, run (see the library for the layout).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use meshinit::cli::{Cli, Command};
use meshinit::commands::Failure;
use meshinit::config::{Config, LogFormat};
use meshinit::{cni, commands};
use meshinit_settings::{Program, Report};

fn main() -> ExitCode {
    // Run as `meshinit-cni` (the name a conflist's "type" gives, usually a
    // symlink), the binary is the CNI plugin: runtimes pass no arguments, only
    // CNI_* variables and stdin. Otherwise the subcommand decides; a set
    // CNI_COMMAND alone never switches modes, so a leaked variable cannot turn
    // `meshinit apply` into something else.
    if cni::invoked_as_plugin(std::env::args_os().next().as_deref()) {
        return run_cni();
    }
    // `--ipv6 false` (a space, like every other flag) as well as `--ipv6=false`.
    let args = meshinit_settings::join_bool_values(
        std::env::args_os(),
        &meshinit_settings::bool_flags(&Cli::command()),
    );
    let cli = Cli::parse_from(args);
    match cli.command {
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "meshinit", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            let page = clap_mangen::Man::new(Cli::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            };
        }
        Some(Command::Cni) => return run_cni(),
        _ => {}
    }
    let env: HashMap<String, String> = std::env::vars().collect();

    // Logging starts before the config is validated so that a config error
    // is reported in the requested format too.
    let json = cli
        .settings
        .log_format
        .as_deref()
        .or(env.get("MESHINIT_LOG_FORMAT").map(String::as_str))
        == Some("json");
    init_logging(if json {
        LogFormat::Json
    } else {
        LogFormat::Plain
    });

    let outcome = load(&cli, &env)
        .and_then(|config| commands::run(cli.command.clone().unwrap_or(Command::Apply), &config));
    match outcome {
        Ok(code) => code,
        Err(Failure::BadInput(err)) => {
            tracing::error!("{}", Report(err.as_ref()));
            tracing::error!("nothing was changed");
            ExitCode::from(2)
        }
        Err(Failure::Apply(err)) => {
            tracing::error!("{}", Report(err.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// The CNI plugin: settings come from the network config on stdin, not from
/// flags or `MESHINIT_*` variables; only the log format and level are read from
/// the environment. stdout carries the protocol, logs go to stderr.
fn run_cni() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let json = env.get("MESHINIT_LOG_FORMAT").map(String::as_str) == Some("json");
    init_logging(if json {
        LogFormat::Json
    } else {
        LogFormat::Plain
    });
    cni::main(&env, std::io::stdin().lock())
}

fn load(cli: &Cli, env: &HashMap<String, String>) -> Result<Config, Failure> {
    let path = cli
        .settings
        .config
        .clone()
        .or_else(|| env.get("MESHINIT_CONFIG").map(Into::into));
    let file = match path {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(contents) => Some((path, contents)),
            Err(err) => {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "cannot read config file {}: {err}",
                    path.display()
                )))
            }
        },
        None => None,
    };
    Config::load(cli.settings.clone(), env, file).map_err(|err| Failure::BadInput(err.into()))
}

fn init_logging(format: LogFormat) {
    let format = match format {
        LogFormat::Json => meshinit_settings::LogFormat::Json,
        LogFormat::Plain => meshinit_settings::LogFormat::Plain,
    };
    meshinit_settings::init_logging(Program::Meshinit, format);
}
