//! One way to read settings, for both binaries: each setting is declared once (with
//! [`settings!`](crate::settings)), and its value comes from the first of these that
//! gives it — the flag, the environment variable `<PREFIX>_<KEY_IN_CAPS>`, the
//! `--config` TOML file's key — or else the caller's default. A bad value is an error
//! that names the value and exactly where it came from (`--outbound-ports-to-ignore`,
//! `MESHINIT_OUTBOUND_PORTS_TO_IGNORE`, `meshinit.toml: outbound_ports_to_ignore`), so
//! the user knows what to fix.
//!
//! Everything here is pure: the environment is passed in as a map and the file as its
//! text, so tests never touch the process's environment or the disk.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// One declared setting. `key` is the TOML key (snake_case); the flag and the
/// environment variable are derived from it, so they cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// `outbound_ports_to_ignore`.
    pub key: &'static str,
    /// The flag's help text, its first line a summary.
    pub doc: &'static str,
}

impl Setting {
    /// `--outbound-ports-to-ignore`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }

    /// `MESHINIT_OUTBOUND_PORTS_TO_IGNORE` for the prefix `MESHINIT`.
    pub fn env_var(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.key.to_ascii_uppercase())
    }
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--outbound-ports-to-ignore`.
    Flag(String),
    /// `MESHINIT_OUTBOUND_PORTS_TO_IGNORE`.
    Env(String),
    /// `meshinit.toml: outbound_ports_to_ignore`.
    File { path: String, key: String },
    /// A document that is the only source, such as the CNI network configuration:
    /// `the CNI network configuration: outbound_ports_to_ignore`.
    Document { what: &'static str, key: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Env(var) => f.write_str(var),
            Origin::File { path, key } => write!(f, "{path}: {key}"),
            Origin::Document { what, key } => write!(f, "{what}: {key}"),
        }
    }
}

/// A value that does not parse, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct SettingError {
    pub origin: Origin,
    pub input: String,
    /// Names the input and what would be valid.
    pub message: String,
}

impl SettingError {
    /// `problem` is what the parser said: what was expected (`expected 1-65535`), or a
    /// sentence that already quotes the input (`invalid port "70000": …`).
    pub fn new(origin: Origin, input: &str, problem: &str) -> SettingError {
        let quoted = format!("{input:?}");
        let message = if problem.contains(&quoted) {
            problem.to_string()
        } else {
            format!("invalid value {quoted}: {problem}")
        };
        SettingError {
            origin,
            input: input.to_string(),
            message,
        }
    }
}

/// A `--config` file that cannot be used as a whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("config file {path}: {message}")]
    Toml { path: String, message: String },
    #[error("config file {path}: unknown key {key:?} (known keys: {known})")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
    #[error("config file {path}: key {key:?}: {message}")]
    BadValue {
        path: String,
        key: String,
        message: String,
    },
}

/// The `--config` TOML file: each key's value in the form the flag takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct File {
    path: String,
    values: HashMap<String, String>,
}

impl File {
    /// Parses `text`, read from `path`, where `settings` are the keys allowed. An
    /// unknown key is an error (a typo in a skip list would silently redirect
    /// traffic the user meant to exempt), and so is a value that is not a string, a
    /// number, a boolean or an array of those (arrays join with commas: `[5555,
    /// "9000-9010"]` is `5555,9000-9010`).
    pub fn parse(path: &str, text: &str, settings: &[Setting]) -> Result<File, FileError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| FileError::Toml {
            path: path.to_string(),
            message: e.message().to_string(),
        })?;
        let mut values = HashMap::new();
        for (key, value) in table {
            if !settings.iter().any(|s| s.key == key) {
                return Err(FileError::UnknownKey {
                    path: path.to_string(),
                    known: settings
                        .iter()
                        .map(|s| s.key)
                        .collect::<Vec<_>>()
                        .join(", "),
                    key,
                });
            }
            let text = flag_text(&value).ok_or_else(|| FileError::BadValue {
                path: path.to_string(),
                key: key.clone(),
                message: format!(
                    "{value} is not a string, a number, a boolean or an array of those"
                ),
            })?;
            values.insert(key, text);
        }
        Ok(File {
            path: path.to_string(),
            values,
        })
    }
}

/// A TOML value as a flag would spell it; `None` for tables, floats and dates.
fn flag_text(value: &toml::Value) -> Option<String> {
    let scalar = |value: &toml::Value| match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        toml::Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        other => scalar(other),
    }
}

/// The sources of one program's settings, looked up setting by setting.
#[derive(Clone, Debug)]
pub struct Sources<'a> {
    layers: Layers<'a>,
}

#[derive(Clone, Debug)]
enum Layers<'a> {
    /// Flag > env > file.
    Stacked {
        prefix: &'static str,
        flags: HashMap<&'static str, &'a str>,
        env: &'a HashMap<String, String>,
        file: Option<File>,
    },
    /// One document holds every value.
    Document {
        what: &'static str,
        values: HashMap<&'static str, &'a str>,
    },
}

impl<'a> Sources<'a> {
    /// Flags (each setting's key with the flag's value, if given), the environment
    /// (read as `<prefix>_<KEY>`), and the `--config` file if there is one.
    pub fn new(
        prefix: &'static str,
        flags: impl IntoIterator<Item = (&'static str, Option<&'a str>)>,
        env: &'a HashMap<String, String>,
        file: Option<File>,
    ) -> Sources<'a> {
        Sources {
            layers: Layers::Stacked {
                prefix,
                flags: given(flags),
                env,
                file,
            },
        }
    }

    /// Every value from one document `what` (e.g. "the CNI network configuration").
    pub fn document(
        what: &'static str,
        values: impl IntoIterator<Item = (&'static str, Option<&'a str>)>,
    ) -> Sources<'a> {
        Sources {
            layers: Layers::Document {
                what,
                values: given(values),
            },
        }
    }

    /// The value of `key` and where it came from, by precedence; `None` when no
    /// source gives it.
    pub fn raw(&self, key: &'static str) -> Option<(Origin, String)> {
        let setting = Setting { key, doc: "" };
        match &self.layers {
            Layers::Stacked {
                prefix,
                flags,
                env,
                file,
            } => {
                if let Some(value) = flags.get(key) {
                    return Some((Origin::Flag(setting.flag()), value.to_string()));
                }
                let var = setting.env_var(prefix);
                if let Some(value) = env.get(&var) {
                    return Some((Origin::Env(var), value.clone()));
                }
                let file = file.as_ref()?;
                let value = file.values.get(key)?;
                Some((
                    Origin::File {
                        path: file.path.clone(),
                        key: key.to_string(),
                    },
                    value.clone(),
                ))
            }
            Layers::Document { what, values } => values.get(key).map(|value| {
                (
                    Origin::Document {
                        what,
                        key: key.to_string(),
                    },
                    value.to_string(),
                )
            }),
        }
    }

    /// The value of `key`, parsed; `None` when no source gives it. `parse` says what is
    /// wrong with a bad value; the error adds the value and where it came from.
    pub fn get<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, SettingError> {
        let Some((origin, input)) = self.raw(key) else {
            return Ok(None);
        };
        parse(&input)
            .map(Some)
            .map_err(|problem| SettingError::new(origin, &input, &problem))
    }
}

fn given<'a>(
    values: impl IntoIterator<Item = (&'static str, Option<&'a str>)>,
) -> HashMap<&'static str, &'a str> {
    values
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?)))
        .collect()
}

/// Deserialises a value of a document (TOML, the CNI network configuration's JSON)
/// that may be a string, a number, a boolean, or an array of those, into the string a
/// flag would take. For `#[serde(deserialize_with)]` on the fields [`settings!`]
/// declares.
///
/// [`settings!`]: crate::settings
pub fn document_value<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Text(String),
        Number(i64),
        Bool(bool),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        One(Item),
        List(Vec<Item>),
    }
    let text = |item: Item| match item {
        Item::Text(text) => text,
        Item::Number(number) => number.to_string(),
        Item::Bool(flag) => flag.to_string(),
    };
    Ok(Some(match Value::deserialize(deserializer)? {
        Value::One(item) => text(item),
        Value::List(items) => items.into_iter().map(text).collect::<Vec<_>>().join(","),
    }))
}

/// Declares a program's settings once: a clap `Args` struct with one
/// `Option<String>` flag per setting (plus `--config FILE`), deserialisable from a
/// document with unknown keys refused, and `ALL`, the list [`Sources`] and
/// [`File::parse`] read. "Not given" stays distinguishable from "given the default",
/// so the environment and the file can fill the gaps; values are parsed in one
/// place, by the program, with [`Sources::get`].
///
/// `#[config(...)]` gives the clap `arg` attributes of `--config` besides `long`. Each
/// setting is its doc comment (the `--help` text), `#[setting(...)]` (clap `arg`
/// attributes besides `long`), and its key. Adding a setting is one entry:
///
/// ```text
/// meshinit_settings::settings! {
///     #[config(value_name = "FILE", help_heading = "Configuration")]
///     pub struct Settings {
///         /// Outbound ports that are reached directly [default: none]
///         #[setting(value_name = "PORTS", help_heading = "Exemptions")]
///         outbound_ports_to_ignore,
///     }
/// }
/// ```
#[macro_export]
macro_rules! settings {
    (
        #[config($($config_arg:tt)*)]
        $(#[$struct_attr:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                #[setting($($arg:tt)*)]
                $key:ident,
            )*
        }
    ) => {
        $(#[$struct_attr])*
        #[derive(Debug, Default, Clone, PartialEq, Eq, clap::Args, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $vis struct $name {
            $(
                $(#[doc = $doc])*
                #[arg(long, $($arg)*)]
                #[serde(default, deserialize_with = "meshinit_settings::document_value")]
                pub $key: Option<String>,
            )*
            /// TOML file with the same settings as the flags, keys in snake_case
            /// (`outbound_ports_to_ignore = "5555"`; lists may be TOML arrays)
            #[arg(long, $($config_arg)*)]
            #[serde(skip)]
            pub config: Option<std::path::PathBuf>,
        }

        impl $name {
            /// Every setting, in declaration order.
            pub const ALL: &'static [$crate::Setting] = &[
                $($crate::Setting {
                    key: stringify!($key),
                    doc: concat!($($doc, "\n",)* ""),
                },)*
            ];

            /// Each setting's key with the value given here, if any.
            pub fn values(&self) -> Vec<(&'static str, Option<&str>)> {
                vec![$((stringify!($key), self.$key.as_deref()),)*]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &[Setting] = &[
        Setting {
            key: "outbound_ports_to_ignore",
            doc: "",
        },
        Setting {
            key: "lock_timeout",
            doc: "",
        },
    ];

    fn port(text: &str) -> Result<u16, String> {
        text.parse().map_err(|_| "expected 1-65535".to_string())
    }

    #[test]
    fn flag_then_env_then_file_and_errors_name_the_source() {
        let file = File::parse(
            "meshinit.toml",
            "outbound_ports_to_ignore = [1, 2]\nlock_timeout = \"x\"",
            SETTINGS,
        )
        .unwrap();
        let env: HashMap<String, String> = [("MESHINIT_LOCK_TIMEOUT".to_string(), "y".to_string())]
            .into_iter()
            .collect();
        let flags = [("outbound_ports_to_ignore", Some("70000"))];
        let s = Sources::new("MESHINIT", flags, &env, Some(file.clone()));
        let err = s.get("outbound_ports_to_ignore", port).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--outbound-ports-to-ignore: invalid value \"70000\": expected 1-65535"
        );
        let err = s.get("lock_timeout", port).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MESHINIT_LOCK_TIMEOUT: invalid value \"y\": expected 1-65535"
        );

        let s = Sources::new("MESHINIT", [], &env, Some(file));
        assert_eq!(
            s.raw("outbound_ports_to_ignore"),
            Some((
                Origin::File {
                    path: "meshinit.toml".into(),
                    key: "outbound_ports_to_ignore".into()
                },
                "1,2".into()
            ))
        );
        let no_env = HashMap::new();
        let s = Sources::new(
            "MESHINIT",
            [],
            &no_env,
            Some(File::parse("m.toml", "lock_timeout = \"x\"", SETTINGS).unwrap()),
        );
        let err = s.get("lock_timeout", port).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.toml: lock_timeout: invalid value \"x\": expected 1-65535"
        );
        assert_eq!(s.get("outbound_ports_to_ignore", port), Ok(None));
    }

    #[test]
    fn a_problem_that_quotes_the_input_is_not_repeated() {
        let err = SettingError::new(
            Origin::Flag("--p".into()),
            "70000",
            "invalid port \"70000\": expected 1-65535",
        );
        assert_eq!(
            err.to_string(),
            "--p: invalid port \"70000\": expected 1-65535"
        );
    }

    #[test]
    fn the_file_refuses_unknown_keys_and_tables() {
        let err = File::parse("m.toml", "outbound_port_to_ignore = 1", SETTINGS).unwrap_err();
        assert!(
            err.to_string().contains("\"outbound_port_to_ignore\""),
            "{err}"
        );
        assert!(err.to_string().contains("m.toml"), "{err}");
        let err = File::parse("m.toml", "[lock_timeout]\na = 1", SETTINGS).unwrap_err();
        assert!(err.to_string().contains("lock_timeout"), "{err}");
        let file = File::parse("m.toml", "lock_timeout = true", SETTINGS).unwrap();
        assert_eq!(file.values["lock_timeout"], "true");
    }

    #[test]
    fn a_document_is_the_only_source() {
        let s = Sources::document(
            "the CNI network configuration",
            [("lock_timeout", Some("0"))],
        );
        let err = s.get("lock_timeout", |_| Err::<(), _>("too short".into()));
        assert_eq!(
            err.unwrap_err().to_string(),
            "the CNI network configuration: lock_timeout: invalid value \"0\": too short"
        );
    }
}

/// Joins a boolean flag and a separate `true`/`false` after it (`--ipv6 false`) into
/// `--ipv6=false`, so a boolean takes its value with a space like every other flag.
///
/// The boolean flags also stand alone (`--dry-run` means `--dry-run=true`), so clap
/// is told that their value must follow an `=`: otherwise `meshinit --dry-run apply`
/// would read `apply` as the value. Only a word that is a boolean is joined, so that
/// case still works.
pub fn join_bool_values<I, T>(args: I, flags: &[String]) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    const BOOLS: &[&str] = &["true", "false", "yes", "no", "1", "0"];
    let mut out: Vec<std::ffi::OsString> = Vec::new();
    let mut joinable = false;
    let mut rest = false;
    for arg in args {
        let arg: std::ffi::OsString = arg.into();
        let text = arg.to_str();
        if joinable {
            let value = text.filter(|t| BOOLS.contains(&t.to_ascii_lowercase().as_str()));
            if let (Some(value), Some(last)) = (value, out.last_mut()) {
                last.push("=");
                last.push(value);
                joinable = false;
                continue;
            }
        }
        // After `--`, everything is an argument.
        rest |= text == Some("--");
        joinable = !rest && text.is_some_and(|t| flags.iter().any(|f| f == t));
        out.push(arg);
    }
    out
}

/// The flags of `command` (and its subcommands) that stand alone as `true` and take a
/// value only after `=`: the booleans [`join_bool_values`] joins. Read from the clap
/// definition, so a boolean setting declared like the others needs nothing more.
pub fn bool_flags(command: &clap::Command) -> Vec<String> {
    let mut flags = Vec::new();
    let mut todo = vec![command];
    while let Some(command) = todo.pop() {
        for arg in command.get_arguments() {
            let optional_value = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
            if arg.is_require_equals_set() && optional_value {
                let long = arg.get_long_and_visible_aliases().unwrap_or_default();
                let hidden = arg.get_all_aliases().unwrap_or_default();
                for name in long.into_iter().chain(hidden) {
                    let flag = format!("--{name}");
                    if !flags.contains(&flag) {
                        flags.push(flag);
                    }
                }
            }
        }
        todo.extend(command.get_subcommands());
    }
    flags
}

#[cfg(test)]
mod join_tests {
    use super::join_bool_values;

    fn join(args: &[&str]) -> Vec<String> {
        join_bool_values(args.iter().copied(), &["--ipv6".into(), "--dry-run".into()])
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn a_boolean_takes_its_value_after_a_space() {
        assert_eq!(
            join(&["m", "--ipv6", "false", "show"]),
            ["m", "--ipv6=false", "show"]
        );
        assert_eq!(join(&["m", "--ipv6", "FALSE"]), ["m", "--ipv6=FALSE"]);
        assert_eq!(
            join(&["m", "--dry-run", "apply"]),
            ["m", "--dry-run", "apply"]
        );
        assert_eq!(
            join(&["m", "--ipv6=true", "false"]),
            ["m", "--ipv6=true", "false"]
        );
        assert_eq!(join(&["m", "--netns", "false"]), ["m", "--netns", "false"]);
        assert_eq!(
            join(&["m", "--", "--ipv6", "false"]),
            ["m", "--", "--ipv6", "false"]
        );
    }
}

#[cfg(test)]
mod bool_flag_tests {
    use super::bool_flags;

    #[test]
    fn booleans_are_found_in_the_clap_definition() {
        let command = clap::Command::new("m")
            .arg(
                clap::Arg::new("ipv6")
                    .long("ipv6")
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true"),
            )
            .arg(
                clap::Arg::new("dry")
                    .long("dry-run")
                    .alias("simulate")
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true"),
            )
            .arg(clap::Arg::new("netns").long("netns"))
            .subcommand(
                clap::Command::new("check").arg(
                    clap::Arg::new("repair")
                        .long("repair")
                        .action(clap::ArgAction::SetTrue),
                ),
            );
        assert_eq!(bool_flags(&command), ["--ipv6", "--dry-run", "--simulate"]);
    }
}
