//! One logging set-up for both binaries: lines on stderr, plain or JSON, filtered by the
//! program's own variable (`MESHINIT_LOG`, `MESHPROXY_LOG`) or else `RUST_LOG`, in
//! tracing's `EnvFilter` syntax (`debug`, `info,meshproxy=trace`); `info` when neither
//! is set.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, fields at the top level, for log collectors.
    Json,
}

/// Which binary logs: names its filter variable and how its plain lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Run once: plain lines without a timestamp or target (the caller's log has them).
    Meshinit,
    /// Long-running: plain lines with a timestamp and the module.
    Meshproxy,
}

impl Program {
    /// The variable holding this program's log filter.
    pub fn log_var(self) -> &'static str {
        match self {
            Program::Meshinit => "MESHINIT_LOG",
            Program::Meshproxy => "MESHPROXY_LOG",
        }
    }
}

/// The filter: the program's variable, else `RUST_LOG`, else `info`. A value that does
/// not parse is reported on stderr, naming the variable, and `info` is used: a typo in
/// a log level is no reason to refuse to start.
pub fn filter(program: Program, env: &dyn Fn(&str) -> Option<String>) -> EnvFilter {
    for var in [program.log_var(), "RUST_LOG"] {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            match EnvFilter::try_new(&value) {
                Ok(filter) => return filter,
                Err(error) => {
                    eprintln!("{var}={value:?} is not a log filter ({error}); logging at info");
                    break;
                }
            }
        }
    }
    EnvFilter::new("info")
}

/// Installs the process's logger. Call once, first thing.
pub fn init_logging(program: Program, format: LogFormat) {
    let filter = filter(program, &|var| std::env::var(var).ok());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match (format, program) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Plain, Program::Meshinit) => builder.without_time().with_target(false).init(),
        (LogFormat::Plain, Program::Meshproxy) => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_programs_variable_wins_over_rust_log() {
        let f = filter(
            Program::Meshproxy,
            &env(&[("MESHPROXY_LOG", "debug"), ("RUST_LOG", "error")]),
        );
        assert_eq!(f.to_string(), "debug");
        let f = filter(Program::Meshinit, &env(&[("RUST_LOG", "warn")]));
        assert_eq!(f.to_string(), "warn");
        let f = filter(Program::Meshinit, &env(&[("MESHPROXY_LOG", "trace")]));
        assert_eq!(f.to_string(), "info");
    }

    #[test]
    fn a_bad_filter_falls_back_to_info() {
        let f = filter(Program::Meshinit, &env(&[("MESHINIT_LOG", "debug=[")]));
        assert_eq!(f.to_string(), "info");
    }
}
