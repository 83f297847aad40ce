//! `meshinit cni`: a chained CNI plugin (spec 1.0.0; 0.3.x and 0.4.0 accepted).
//!
//! The runtime runs the plugins of a conflist in order; meshinit comes after
//! the one that creates the pod's interface. The protocol is environment
//! variables (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH`), the network configuration on stdin, and the result
//! or an error object on stdout, so meshinit writes nothing else there: logs
//! go to stderr.
//!
//! - ADD applies the rules inside `CNI_NETNS` and returns `prevResult`
//!   unchanged (we add no interface or address).
//! - DEL removes them, and succeeds when the namespace is already gone. It reads
//!   only what it needs (the version and, when valid, the backend): a bad setting,
//!   a bad annotation or a missing annotations file is logged, never a reason to
//!   leave rules behind.
//! - CHECK compares the installed rules with the expected ones.
//! - VERSION lists [`netconf::SUPPORTED_VERSIONS`].
//!
//! Everything is parsed and validated before the namespace is entered, so a
//! malformed configuration changes nothing. The configuration on stdin is read
//! with bounded memory ([`STDIN_LIMIT`]) and a key given twice in one object is
//! refused, not resolved by "last one wins". ADD refuses the host's own network
//! namespace unless `allow_host_netns` is set.

mod netconf;

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use meshinit_rules::Ruleset;
use serde_json::json;
use thiserror::Error;

use crate::commands::{self, Failure};
use netconf::{NetConf, Pod, SUPPORTED_VERSIONS};

/// The name under which the binary acts as the plugin without a subcommand
/// (a conflist's `"type"` names a file in CNI_PATH; a symlink to `meshinit`).
pub const PLUGIN_NAME: &str = "meshinit-cni";

/// The most the network configuration on stdin may hold. Real ones are a few KiB
/// (a `prevResult` with a handful of interfaces); a runtime that sends more is
/// broken or hostile, and reading it all would let it choose our memory use.
pub const STDIN_LIMIT: u64 = 1024 * 1024;

/// A failure, reported as the spec's error object. Codes 1-11 are the spec's;
/// 100 and up are meshinit's own.
#[derive(Debug, Error)]
pub enum CniError {
    #[error("incompatible CNI version {version:?}")]
    IncompatibleVersion { version: String },
    #[error("unsupported field {key:?} in the network configuration")]
    UnsupportedField { key: String, value: String },
    #[error("invalid environment variable {name}")]
    BadEnv { name: &'static str, problem: String },
    #[error("cannot read the network configuration from stdin")]
    Stdin { source: io::Error },
    #[error("the network configuration on stdin is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot read the annotations file {path}")]
    AnnotationsFile { path: PathBuf, source: io::Error },
    #[error("cannot decode {what}")]
    Decode { what: &'static str, message: String },
    #[error("invalid network configuration")]
    InvalidConfig { message: String },
    #[error("meshinit could not change the pod's rules")]
    Rules { message: String },
    #[error("meshinit's rules in the pod differ from the expected ones")]
    Drift { differences: Vec<String> },
}

impl CniError {
    /// The spec's error code.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => 1,
            CniError::UnsupportedField { .. } => 2,
            CniError::BadEnv { .. } => 4,
            CniError::Stdin { .. } | CniError::TooLarge { .. } => 5,
            CniError::AnnotationsFile { source, .. } if netconf::is_transient(source) => 11,
            CniError::AnnotationsFile { .. } => 5,
            CniError::Decode { .. } => 6,
            CniError::InvalidConfig { .. } => 7,
            CniError::Rules { .. } => 100,
            CniError::Drift { .. } => 101,
        }
    }

    /// The error's specifics, for the `details` field.
    pub fn details(&self) -> String {
        match self {
            CniError::IncompatibleVersion { .. } => {
                format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))
            }
            CniError::UnsupportedField { key, value } => format!(
                "{key} = {value}: not a meshinit setting (keys are the TOML config's, e.g. outbound_ports_to_ignore; netns and dry_run are decided by CNI)"
            ),
            CniError::BadEnv { name, problem } => format!("{name}: {problem}"),
            CniError::Stdin { source } => source.to_string(),
            CniError::TooLarge { limit } => {
                format!("at most {limit} bytes (1 MiB) are read; a network configuration is a few KiB")
            }
            CniError::AnnotationsFile { source, .. } => source.to_string(),
            CniError::Decode { message, .. }
            | CniError::InvalidConfig { message }
            | CniError::Rules { message } => message.clone(),
            CniError::Drift { differences } => differences.join("; "),
        }
    }

    /// Errors in the input, as opposed to failures while changing rules: they
    /// exit 2 like the CLI's bad input, the others 1.
    fn is_bad_input(&self) -> bool {
        matches!(self, CniError::TooLarge { .. }) || matches!(self.code(), 1 | 2 | 4 | 6 | 7)
    }
}

/// Runs one plugin invocation and returns the process's exit code.
pub fn main(env: &HashMap<String, String>, stdin: impl Read) -> ExitCode {
    let mut input = Vec::new();
    let (version, outcome) = match invocation(env, stdin, &mut input) {
        Ok(output) => (None, Ok(output)),
        Err(err) => (netconf::version_of(&input), Err(err)),
    };
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(code = err.code(), "{err}: {}", err.details());
            let version = version
                .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
                .unwrap_or_else(|| "1.0.0".to_string());
            println!(
                "{}",
                json!({
                    "cniVersion": version,
                    "code": err.code(),
                    "msg": err.to_string(),
                    "details": err.details(),
                })
            );
            ExitCode::from(if err.is_bad_input() { 2 } else { 1 })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Add,
    Del,
    Check,
}

/// The invocation: what to print on success (`None` for nothing).
fn invocation(
    env: &HashMap<String, String>,
    stdin: impl Read,
    input: &mut Vec<u8>,
) -> Result<Option<String>, CniError> {
    let verb = match env.get("CNI_COMMAND").map(String::as_str) {
        Some("VERSION") => {
            return Ok(Some(
                json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
            ))
        }
        Some("ADD") => Verb::Add,
        Some("DEL") => Verb::Del,
        Some("CHECK") => Verb::Check,
        Some(other) => {
            return Err(CniError::BadEnv {
                name: "CNI_COMMAND",
                problem: format!("{other:?} is not ADD, DEL, CHECK or VERSION"),
            })
        }
        None => {
            return Err(CniError::BadEnv {
                name: "CNI_COMMAND",
                problem: "not set (meshinit cni is run by a container runtime)".to_string(),
            })
        }
    };
    read_stdin(stdin, STDIN_LIMIT, input)?;
    if verb == Verb::Del {
        return del(env, input);
    }
    let conf = netconf::parse(input)?;
    if verb == Verb::Check && conf.cni_version.starts_with("0.3.") {
        // CHECK was introduced in 0.4.0; a 0.3.x runtime never sends it.
        return Err(CniError::IncompatibleVersion {
            version: conf.cni_version,
        });
    }
    let container = required(env, "CNI_CONTAINERID")?;
    required(env, "CNI_IFNAME")?;
    let Some(netns) = cni_netns(env) else {
        return Err(CniError::BadEnv {
            name: "CNI_NETNS",
            problem: "not set; ADD and CHECK need the pod's namespace".to_string(),
        });
    };
    let args = cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
    let (namespace, pod) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"));

    if verb == Verb::Add && conf.prev_result.is_none() {
        return Err(CniError::InvalidConfig {
            message: "no prevResult: meshinit is a chained plugin and must follow the plugin that creates the pod's interface".to_string(),
        });
    }
    let annotations = pod_annotations(&conf, namespace, pod)?;
    let pod_settings = netconf::for_pod(
        conf.settings.clone(),
        pod.map(String::as_str),
        namespace.map(String::as_str),
        &conf.exclude_namespaces,
        annotations.as_ref(),
    );
    let settings = match pod_settings {
        Pod::Meshed(settings) => *settings,
        Pod::Excluded(why) => {
            tracing::info!(container, "no rules: {why}");
            return Ok(output(verb, &conf));
        }
    };
    let config = netconf::resolve(settings)?;
    let ruleset = Ruleset::from(&config.spec);

    match commands::enter(&netns) {
        Ok(()) => {}
        Err(Failure::BadInput(err)) => {
            return Err(CniError::BadEnv {
                name: "CNI_NETNS",
                problem: format!("{err:#}"),
            })
        }
        Err(Failure::Apply(err)) => return Err(rules_error(err)),
    }
    crate::addrs::warn_if_ipv6_unmeshed(config.spec.ipv6);
    let netns = netns.display().to_string();
    match verb {
        Verb::Add => {
            commands::allowed_here(crate::netns::current(), config.allow_host_netns, HOST_HINT)
                .map_err(|failure| match failure {
                    Failure::BadInput(err) => CniError::BadEnv {
                        name: "CNI_NETNS",
                        problem: format!("{err:#}"),
                    },
                    Failure::Apply(err) => rules_error(err),
                })?;
            commands::install(&config, &ruleset).map_err(failure)?;
            tracing::info!(container, netns, "rules applied");
        }
        // DEL returned above, through `del`.
        Verb::Del => {}
        Verb::Check => {
            let (backend, differences) = commands::drift(&config, &ruleset).map_err(failure)?;
            if !differences.is_empty() {
                return Err(CniError::Drift { differences });
            }
            tracing::info!(container, netns, backend, "rules as expected");
        }
    }
    Ok(output(verb, &conf))
}

/// How to point ADD at a pod, for the host refusal.
const HOST_HINT: &str = "CNI_NETNS must be the pod's namespace";

/// `CNI_NETNS`, when set and not empty.
fn cni_netns(env: &HashMap<String, String>) -> Option<PathBuf> {
    env.get("CNI_NETNS")
        .filter(|n| !n.is_empty())
        .map(PathBuf::from)
}

/// Reads at most `limit` bytes of stdin into `input` (never more than `limit + 1`
/// are held): past the limit the configuration is refused, not truncated.
pub fn read_stdin(stdin: impl Read, limit: u64, input: &mut Vec<u8>) -> Result<(), CniError> {
    stdin
        .take(limit.saturating_add(1))
        .read_to_end(input)
        .map_err(|source| CniError::Stdin { source })?;
    if u64::try_from(input.len()).map_or(true, |len| len > limit) {
        return Err(CniError::TooLarge { limit });
    }
    Ok(())
}

/// The first key given twice in one object of a JSON document (see
/// `netconf::duplicate_key`); public for the fuzz targets.
pub fn duplicate_key(bytes: &[u8]) -> Option<String> {
    netconf::duplicate_key(bytes)
}

/// Parses a network configuration as ADD and CHECK do, up to (not including) the
/// pod's annotations: the settings it gives, or the error the plugin reports.
/// Public for the fuzz targets.
pub fn parse_config(bytes: &[u8]) -> Result<crate::cli::Settings, CniError> {
    netconf::parse(bytes).map(|conf| conf.settings)
}

/// DEL: remove our rules from the pod's namespace, whatever else is wrong.
///
/// The runtime retries a failed DEL and may keep a pod's sandbox (and its IP)
/// until one succeeds, so DEL fails only when it cannot know what it is talking
/// about (a configuration that is not a JSON object of a supported version, or
/// missing CNI variables) or when removing the rules itself fails. Settings are
/// needed only to pick the backend: when they do not resolve (a bad value, an
/// unknown or duplicate key), the problem is logged and our rules are removed
/// from every backend, as `cleanup --backend auto` does. Annotations and
/// exclusions are not read at all: a pod that was meshed before its annotations
/// changed still gets its rules removed.
fn del(env: &HashMap<String, String>, input: &[u8]) -> Result<Option<String>, CniError> {
    netconf::envelope(input)?;
    let container = required(env, "CNI_CONTAINERID")?;
    required(env, "CNI_IFNAME")?;
    let Some(netns) = cni_netns(env) else {
        tracing::info!(container, "DEL without a namespace: nothing to remove");
        return Ok(None);
    };
    let config = match netconf::parse(input).and_then(|conf| netconf::resolve(conf.settings)) {
        Ok(config) => config,
        Err(err) => {
            tracing::warn!(
                container,
                code = err.code(),
                "DEL ignores a settings problem and removes meshinit's rules from every backend: {err}: {}",
                err.details()
            );
            netconf::resolve(Default::default())?
        }
    };
    match commands::enter(&netns) {
        Ok(()) => {}
        // The runtime may call DEL more than once, and after the namespace is gone.
        Err(Failure::BadInput(err)) => {
            tracing::info!(container, "namespace gone, nothing to remove: {err:#}");
            return Ok(None);
        }
        Err(Failure::Apply(err)) => return Err(rules_error(err)),
    }
    commands::cleanup(&config).map_err(failure)?;
    tracing::info!(container, netns = %netns.display(), "rules removed");
    Ok(None)
}

/// ADD prints the previous result unchanged; DEL and CHECK print nothing.
fn output(verb: Verb, conf: &NetConf) -> Option<String> {
    match (verb, &conf.prev_result) {
        (Verb::Add, Some(result)) => Some(result.to_string()),
        _ => None,
    }
}

fn required<'a>(env: &'a HashMap<String, String>, name: &'static str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(CniError::BadEnv {
            name,
            problem: "not set".to_string(),
        })
}

/// `CNI_ARGS`: `K=V` pairs separated by `;` (Kubernetes sets
/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
fn cni_args(text: &str) -> Result<HashMap<String, String>, CniError> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => Ok((key.to_string(), value.to_string())),
            None => Err(CniError::BadEnv {
                name: "CNI_ARGS",
                problem: format!("{pair:?} is not KEY=VALUE"),
            }),
        })
        .collect()
}

/// The pod's annotations: the file's entry when a file is configured, else the
/// inline map's.
fn pod_annotations(
    conf: &NetConf,
    namespace: Option<&String>,
    pod: Option<&String>,
) -> Result<Option<std::collections::BTreeMap<String, String>>, CniError> {
    let (Some(namespace), Some(pod)) = (namespace, pod) else {
        return Ok(None);
    };
    let key = format!("{namespace}/{pod}");
    if let Some(path) = &conf.annotations_file {
        let mut all = netconf::read_annotations_file(path)?;
        if let Some(found) = all.remove(&key) {
            return Ok(Some(found));
        }
    }
    Ok(conf.annotations.get(&key).cloned())
}

fn rules_error(err: anyhow::Error) -> CniError {
    CniError::Rules {
        message: format!("{err:#}"),
    }
}

fn failure(failure: Failure) -> CniError {
    match failure {
        Failure::BadInput(err) => CniError::InvalidConfig {
            message: format!("{err:#}"),
        },
        Failure::Apply(err) => rules_error(err),
    }
}

/// True when `argv0` names the plugin (`…/meshinit-cni`).
pub fn invoked_as_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .and_then(|arg| Path::new(arg).file_name())
        .is_some_and(|name| name == PLUGIN_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(pairs: &[(&str, &str)], stdin: &str) -> Result<Option<String>, CniError> {
        invocation(&env(pairs), stdin.as_bytes(), &mut Vec::new())
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(&[("CNI_COMMAND", "VERSION")], "").unwrap().unwrap();
        let value: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["cniVersion"], "1.0.0");
        assert!(value["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
    }

    #[test]
    fn missing_or_unknown_variables_are_code_4() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","prevResult":{}}"#;
        assert_eq!(run(&[], conf).unwrap_err().code(), 4);
        assert_eq!(run(&[("CNI_COMMAND", "GC")], conf).unwrap_err().code(), 4);
        let err = run(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            conf,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                CniError::BadEnv {
                    name: "CNI_CONTAINERID",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = run(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            conf,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                CniError::BadEnv {
                    name: "CNI_NETNS",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn add_without_prev_result_is_refused() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni"}"#;
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ];
        assert_eq!(run(&vars, conf).unwrap_err().code(), 7);
    }

    #[test]
    fn del_without_namespace_succeeds_silently() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni"}"#;
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(run(&vars, conf).unwrap(), None);
        let gone = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ];
        assert_eq!(run(&gone, conf).unwrap(), None);
    }

    #[test]
    fn stdin_is_read_with_bounded_memory_up_to_the_limit() {
        let mut input = Vec::new();
        read_stdin(&[b'x'; 64][..], 64, &mut input).unwrap();
        assert_eq!(input.len(), 64);
        let mut input = Vec::new();
        let err = read_stdin(&[b'x'; 65][..], 64, &mut input).unwrap_err();
        assert_eq!(err.code(), 5);
        assert!(err.is_bad_input());
        // An endless stdin is cut at limit + 1 bytes, not read to the end.
        let mut input = Vec::new();
        let err = read_stdin(io::repeat(b' '), STDIN_LIMIT, &mut input).unwrap_err();
        assert!(matches!(err, CniError::TooLarge { .. }), "{err:?}");
        assert_eq!(input.len() as u64, STDIN_LIMIT + 1);
        // Through the invocation: a valid config padded past 1 MiB is refused.
        let mut big = r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni"}"#.to_string();
        big.push_str(&" ".repeat(STDIN_LIMIT as usize));
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ];
        assert_eq!(run(&vars, &big).unwrap_err().code(), 5);
    }

    #[test]
    fn a_key_given_twice_at_any_level_is_code_7() {
        for conf in [
            r#"{"cniVersion":"1.0.0","proxy_uid":1,"proxy_uid":2}"#,
            r#"{"cniVersion":"1.0.0","cniVersion":"1.0.0"}"#,
            r#"{"cniVersion":"1.0.0","meshinit":{"outbound_ports_to_ignore":"1","outbound_ports_to_ignore":"2"}}"#,
            r#"{"cniVersion":"1.0.0","annotations":{"ns/p":{"linkerd.io/inject":"enabled","linkerd.io/inject":"disabled"}}}"#,
            r#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"198.18.0.2/24","address":"198.18.0.3/24"}]}}"#,
            // The same key spelled with an escape is the same key.
            r#"{"cniVersion":"1.0.0","proxy_uid":1,"proxy_uid":2}"#,
        ] {
            let err = netconf::parse(conf.as_bytes()).unwrap_err();
            assert_eq!(err.code(), 7, "{conf}: {err:?}");
            assert!(err.details().contains("twice"), "{}", err.details());
        }
        let err =
            netconf::parse(br#"{"cniVersion":"1.0.0","meshinit":{"proxy_uid":1,"proxy_uid":2}}"#)
                .unwrap_err();
        assert!(
            err.details()
                .contains("\"proxy_uid\" is given twice in the object at /meshinit"),
            "{}",
            err.details()
        );
        // Equal keys in different objects are not duplicates.
        netconf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"a":{"name":1},"b":[{"name":2},{"name":3}]}}"#,
        )
        .unwrap();
        assert_eq!(netconf::duplicate_key(b"not json"), None);
    }

    const DEL_GONE: [(&str, &str); 5] = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
    ];

    #[test]
    fn del_succeeds_whatever_is_wrong_with_the_settings() {
        for conf in [
            // A bad value, an unknown key, a duplicate key, a refused setting.
            r#"{"cniVersion":"1.0.0","name":"n","outbound_ports_to_ignore":"70000"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","outbound_prots_to_ignore":"80"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","proxy_uid":1,"proxy_uid":2}"#,
            r#"{"cniVersion":"1.0.0","name":"n","netns":"/x","lock_timeout":"0s"}"#,
            // Annotations DEL does not need: missing file, bad value, bad shape.
            r#"{"cniVersion":"1.0.0","name":"n","annotations_file":"/nonexistent/annotations.json"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","annotations":{"ns/p":{"config.linkerd.io/skip-outbound-ports":"0"}}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","annotations":"nope"}"#,
        ] {
            assert_eq!(run(&DEL_GONE, conf).unwrap(), None, "{conf}");
        }
        // What DEL does need is still checked.
        assert_eq!(run(&DEL_GONE, "{").unwrap_err().code(), 6);
        assert_eq!(
            run(&DEL_GONE, r#"{"cniVersion":"9.9.9"}"#)
                .unwrap_err()
                .code(),
            1
        );
    }

    #[test]
    fn cni_args_parse_and_refuse_garbage() {
        let args = cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p").unwrap();
        assert_eq!(args["K8S_POD_NAME"], "p");
        assert_eq!(cni_args("oops").unwrap_err().code(), 4);
    }

    #[test]
    fn plugin_name_is_recognised_by_basename() {
        assert!(invoked_as_plugin(Some(
            "/opt/cni/bin/meshinit-cni".as_ref()
        )));
        assert!(!invoked_as_plugin(Some("/usr/local/bin/meshinit".as_ref())));
        assert!(!invoked_as_plugin(None));
    }
}
