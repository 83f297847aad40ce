//! The plugin's network configuration (stdin) and the pod's annotations, turned
//! into the same [`Settings`] the flags and the TOML file give.
//!
//! Settings are keys of a `"meshinit"` object or top-level keys, named like
//! the TOML file's (`"outbound_ports_to_ignore": "5432"`). Pod annotations
//! (Linkerd's names) are looked up by `K8S_POD_NAMESPACE/K8S_POD_NAME` in an
//! inline `"annotations"` map or an `"annotations_file"` (JSON or TOML), and
//! win over the config. Everything here is pure apart from reading that file.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::CniError;
use crate::cli::Settings;
use crate::config::Config;

/// The versions of the CNI spec whose ADD/DEL/CHECK we implement. CHECK exists
/// from 0.4.0 on; 0.3.x runtimes never send it.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Keys of the network configuration that belong to the CNI spec or the runtime
/// (passed through untouched, never read as settings).
const STANDARD_KEYS: [&str; 10] = [
    "cniVersion",
    "name",
    "type",
    "args",
    "ipMasq",
    "ipam",
    "dns",
    "prevResult",
    "runtimeConfig",
    "capabilities",
];

/// Settings that the CNI protocol itself decides: the namespace is CNI_NETNS,
/// and a dry run would print rules where the runtime expects the result JSON.
const REFUSED_SETTINGS: [&str; 2] = ["netns", "dry_run"];

/// Annotations per pod, keyed `namespace/name`.
pub type Annotations = BTreeMap<String, BTreeMap<String, String>>;

/// The parts of the network configuration meshinit reads.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    /// The previous plugin's result, returned unchanged by ADD.
    pub prev_result: Option<Value>,
    /// meshinit's settings from the config (before annotations).
    pub settings: Settings,
    /// Inline annotations.
    pub annotations: Annotations,
    /// A JSON or TOML file of annotations, read at each invocation.
    pub annotations_file: Option<PathBuf>,
    /// Pods of these Kubernetes namespaces get no rules (e.g. kube-system).
    pub exclude_namespaces: Vec<String>,
}

/// The `cniVersion` of a config that may be otherwise invalid, for the error JSON.
pub fn version_of(bytes: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_string)
}

/// The part of the network configuration every verb needs: a JSON object with a
/// supported `cniVersion` (returned).
pub fn envelope(bytes: &[u8]) -> Result<String, CniError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|err| CniError::Decode {
        what: "the network configuration (stdin)",
        message: err.to_string(),
    })?;
    let Some(object) = value.as_object() else {
        return Err(invalid("the network configuration must be a JSON object"));
    };
    let Some(Value::String(version)) = object.get("cniVersion") else {
        return Err(invalid("\"cniVersion\" (a string) is required"));
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::IncompatibleVersion {
            version: version.clone(),
        });
    }
    Ok(version.clone())
}

/// Parses the network configuration. Refuses unknown keys: a typo in a skip
/// list must not silently redirect traffic the user meant to exempt.
pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|err| CniError::Decode {
        what: "the network configuration (stdin)",
        message: err.to_string(),
    })?;
    // serde_json keeps the last of two equal keys; which one a user meant is a
    // guess, and a guess about a skip list is a security bug.
    if let Some(duplicate) = duplicate_key(bytes) {
        return Err(invalid(&duplicate));
    }
    let Value::Object(mut object) = value else {
        return Err(invalid("the network configuration must be a JSON object"));
    };
    let cni_version = match object.get("cniVersion") {
        Some(Value::String(version)) => version.clone(),
        _ => return Err(invalid("\"cniVersion\" (a string) is required")),
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::IncompatibleVersion {
            version: cni_version,
        });
    }
    let prev_result = object.remove("prevResult");
    let annotations = match object.remove("annotations") {
        None => Annotations::new(),
        Some(value) => serde_json::from_value(value).map_err(|err| {
            invalid(&format!(
                "\"annotations\" must map \"namespace/pod\" to {{annotation: string}}: {err}"
            ))
        })?,
    };
    let annotations_file = match object.remove("annotations_file") {
        None => None,
        Some(Value::String(path)) => Some(PathBuf::from(path)),
        Some(other) => {
            return Err(invalid(&format!(
                "\"annotations_file\" must be a path, not {other}"
            )))
        }
    };
    let exclude_namespaces = match object.remove("exclude_namespaces") {
        None => Vec::new(),
        Some(value) => serde_json::from_value(value).map_err(|err| {
            invalid(&format!(
                "\"exclude_namespaces\" must be a list of strings: {err}"
            ))
        })?,
    };

    // Settings: top-level keys that are not the spec's, then the "meshinit"
    // object. One key in both places is refused rather than guessed.
    let nested = match object.remove("meshinit") {
        None => Map::new(),
        Some(Value::Object(nested)) => nested,
        Some(other) => {
            return Err(invalid(&format!(
                "\"meshinit\" must be an object, not {other}"
            )))
        }
    };
    let mut settings: Map<String, Value> = object
        .into_iter()
        .filter(|(key, _)| !STANDARD_KEYS.contains(&key.as_str()))
        .collect();
    for (key, value) in nested {
        if settings.contains_key(&key) {
            return Err(invalid(&format!(
                "{key:?} is given both at the top level and in \"meshinit\": give it once"
            )));
        }
        settings.insert(key, value);
    }
    let known = Settings::keys();
    for (key, value) in &settings {
        if !known.contains(key) || REFUSED_SETTINGS.contains(&key.as_str()) {
            return Err(CniError::UnsupportedField {
                key: key.clone(),
                value: value.to_string(),
            });
        }
    }
    let settings: Settings = serde_json::from_value(Value::Object(settings))
        .map_err(|err| invalid(&format!("meshinit settings: {err}")))?;
    Ok(NetConf {
        cni_version,
        prev_result,
        settings,
        annotations,
        annotations_file,
        exclude_namespaces,
    })
}

/// Where the network configuration names one key twice in one object, at any depth
/// (`key "proxy_uid" is given twice in /meshinit`); `None` when no key is, or when
/// `bytes` is not JSON at all (that is reported by the parse proper).
pub fn duplicate_key(bytes: &[u8]) -> Option<String> {
    let found = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let _ = Walk {
        path: String::new(),
        found: &found,
    }
    .deserialize(&mut deserializer);
    found.into_inner()
}

/// Visits every value of a JSON document, remembering the first duplicate key.
struct Walk<'a> {
    /// JSON-pointer-like path of the value ("" for the document itself).
    path: String,
    found: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let child = Walk {
                path: format!("{}/{index}", self.path),
                found: self.found,
            };
            if seq.next_element_seed(child)?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = format!("{}/{key}", self.path);
            if seen.contains(&key) {
                let at = if self.path.is_empty() {
                    "the top level".to_string()
                } else {
                    self.path.clone()
                };
                *self.found.borrow_mut() = Some(format!(
                    "key {key:?} is given twice in the object at {at}: give it once"
                ));
                // Stop here: one duplicate is enough to refuse the document.
                return Err(de::Error::custom("duplicate key"));
            }
            seen.insert(key);
            map.next_value_seed(Walk {
                path,
                found: self.found,
            })?;
        }
        Ok(())
    }
}

fn invalid(message: &str) -> CniError {
    CniError::InvalidConfig {
        message: message.to_string(),
    }
}

/// Reads an annotations file: JSON when it starts with `{`, TOML otherwise.
/// A missing file is "try again later": the process that writes it (a node
/// agent watching the API server) may simply not have caught up yet.
pub fn read_annotations_file(path: &PathBuf) -> Result<Annotations, CniError> {
    let text = std::fs::read_to_string(path).map_err(|source| CniError::AnnotationsFile {
        path: path.clone(),
        source,
    })?;
    let decoded = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|err| err.to_string())
    } else {
        toml::from_str(&text).map_err(|err| err.message().to_string())
    };
    decoded.map_err(|message| CniError::Decode {
        what: "the annotations file",
        message: format!("{}: {message}", path.display()),
    })
}

/// The Linkerd annotations meshinit understands.
pub mod annotation {
    /// Inbound ports added to `inbound_ports_to_ignore` (which keeps 4190,4191).
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    /// Outbound ports added to `outbound_ports_to_ignore`.
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    /// CIDRs added to `subnets_to_ignore`.
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    /// Replaces `proxy_uid`.
    pub const PROXY_UID: &str = "config.linkerd.io/proxy-uid";
    /// The proxy's business (no detection on these ports); rules are unchanged.
    pub const OPAQUE_PORTS: &str = "config.linkerd.io/opaque-ports";
    /// `disabled`: the pod has no proxy, so it gets no rules.
    pub const INJECT: &str = "linkerd.io/inject";
}

/// What a pod's annotations ask for.
#[derive(Debug)]
pub enum Pod {
    /// No proxy in this pod: install nothing.
    Excluded(String),
    /// Install rules with these settings (boxed: the enum is returned by value).
    Meshed(Box<Settings>),
}

/// Overlays a pod's annotations on the config's settings.
///
/// Skip lists are *added* to the config's (as Linkerd's injector does), so a
/// cluster-wide exemption cannot be dropped by one pod's annotation; the proxy
/// UID is replaced.
pub fn for_pod(
    mut settings: Settings,
    pod: Option<&str>,
    namespace: Option<&str>,
    exclude_namespaces: &[String],
    annotations: Option<&BTreeMap<String, String>>,
) -> Pod {
    if let Some(namespace) = namespace {
        if exclude_namespaces
            .iter()
            .any(|excluded| excluded == namespace)
        {
            return Pod::Excluded(format!("namespace {namespace} is in exclude_namespaces"));
        }
    }
    let Some(annotations) = annotations else {
        return Pod::Meshed(Box::new(settings));
    };
    let name = pod.unwrap_or("?");
    if annotations.get(annotation::INJECT).map(String::as_str) == Some("disabled") {
        return Pod::Excluded(format!("pod {name} has {}: disabled", annotation::INJECT));
    }
    let value = |key: &str| {
        annotations
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if let Some(ports) = value(annotation::SKIP_INBOUND_PORTS) {
        let base = settings.inbound_ports_to_ignore.take().unwrap_or_else(|| {
            meshinit_rules::Spec::default()
                .inbound_ports_to_ignore
                .to_string()
        });
        settings.inbound_ports_to_ignore = Some(join(&base, &ports));
    }
    if let Some(ports) = value(annotation::SKIP_OUTBOUND_PORTS) {
        let base = settings.outbound_ports_to_ignore.take().unwrap_or_default();
        settings.outbound_ports_to_ignore = Some(join(&base, &ports));
    }
    if let Some(subnets) = value(annotation::SKIP_SUBNETS) {
        let base = settings.subnets_to_ignore.take().unwrap_or_default();
        settings.subnets_to_ignore = Some(join(&base, &subnets));
    }
    if let Some(uid) = value(annotation::PROXY_UID) {
        settings.proxy_uid = Some(uid);
    }
    if let Some(ports) = value(annotation::OPAQUE_PORTS) {
        tracing::debug!(
            pod = name,
            opaque_ports = ports,
            "opaque ports are the proxy's concern; rules unchanged"
        );
    }
    Pod::Meshed(Box::new(settings))
}

fn join(base: &str, more: &str) -> String {
    if base.trim().is_empty() {
        more.to_string()
    } else {
        format!("{base},{more}")
    }
}

/// Validates the merged settings exactly as the CLI does (flags' parsers).
pub fn resolve(settings: Settings) -> Result<Config, CniError> {
    Config::from_cni(settings).map_err(|err| CniError::InvalidConfig {
        message: err.to_string(),
    })
}

/// True when a read error means "not there yet".
pub fn is_transient(source: &io::Error) -> bool {
    source.kind() == io::ErrorKind::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Result<NetConf, CniError> {
        parse(json.as_bytes())
    }

    #[test]
    fn top_level_and_nested_settings_are_read() {
        let c = conf(r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni",
            "outbound_ports_to_ignore":"5432","meshinit":{"proxy_uid":7,"inbound_ports_to_ignore":[4190,"9000-9001"]}}"#)
        .unwrap();
        assert_eq!(c.settings.outbound_ports_to_ignore.as_deref(), Some("5432"));
        assert_eq!(c.settings.proxy_uid.as_deref(), Some("7"));
        assert_eq!(
            c.settings.inbound_ports_to_ignore.as_deref(),
            Some("4190,9000-9001")
        );
    }

    #[test]
    fn the_mode_and_its_settings_are_keys_of_the_network_config() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni",
            "meshinit":{"mode":"tproxy","tproxy_table":77,"tproxy_mark":"0x10"}}"#,
        )
        .unwrap();
        let config = crate::config::Config::from_cni(c.settings).unwrap();
        assert_eq!(
            config.spec.mode,
            meshinit_rules::Mode::Tproxy(meshinit_rules::Tproxy {
                mark: 0x10,
                table: 77,
                rule_priority: meshinit_rules::Tproxy::DEFAULT.rule_priority,
            })
        );
        let c =
            conf(r#"{"cniVersion":"1.0.0","name":"n","type":"meshinit-cni","mode":"transparent"}"#)
                .unwrap();
        let err = crate::config::Config::from_cni(c.settings)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"transparent\"") && err.contains("CNI network configuration"),
            "{err}"
        );
    }

    #[test]
    fn errors_have_the_spec_codes() {
        assert_eq!(conf("{").unwrap_err().code(), 6);
        assert_eq!(conf(r#"{"cniVersion":"9.9.9"}"#).unwrap_err().code(), 1);
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","outbound_ports":"1"}"#)
                .unwrap_err()
                .code(),
            2
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","netns":"/x"}"#)
                .unwrap_err()
                .code(),
            2
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","meshinit":{"dry_run":true}}"#)
                .unwrap_err()
                .code(),
            2
        );
        assert_eq!(conf(r#"{"name":"x"}"#).unwrap_err().code(), 7);
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","proxy_uid":1,"meshinit":{"proxy_uid":2}}"#)
                .unwrap_err()
                .code(),
            7
        );
        let bad_port =
            conf(r#"{"cniVersion":"1.0.0","outbound_ports_to_ignore":"70000"}"#).unwrap();
        let err = resolve(bad_port.settings).unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(err.details().contains("70000"), "{}", err.details());
    }

    #[test]
    fn annotations_add_to_skip_lists_and_replace_the_uid() {
        let annotations: BTreeMap<String, String> = [
            (annotation::SKIP_INBOUND_PORTS, "8080"),
            (annotation::SKIP_OUTBOUND_PORTS, "5432"),
            (annotation::PROXY_UID, "3000"),
            (annotation::OPAQUE_PORTS, "mysql,3306"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let base = Settings {
            outbound_ports_to_ignore: Some("25".into()),
            ..Settings::default()
        };
        let Pod::Meshed(settings) = for_pod(base, Some("p"), Some("ns"), &[], Some(&annotations))
        else {
            panic!("excluded");
        };
        let config = resolve(*settings).unwrap();
        assert_eq!(
            config.spec.inbound_ports_to_ignore.to_string(),
            "4190-4191,8080"
        );
        assert_eq!(config.spec.outbound_ports_to_ignore.to_string(), "25,5432");
        assert_eq!(config.spec.proxy_uid, Some(3000));
    }

    #[test]
    fn excluded_namespaces_and_disabled_injection_get_no_rules() {
        let disabled: BTreeMap<String, String> =
            [(annotation::INJECT.to_string(), "disabled".to_string())].into();
        assert!(matches!(
            for_pod(
                Settings::default(),
                Some("p"),
                Some("ns"),
                &[],
                Some(&disabled)
            ),
            Pod::Excluded(_)
        ));
        assert!(matches!(
            for_pod(
                Settings::default(),
                Some("p"),
                Some("kube-system"),
                &["kube-system".into()],
                None
            ),
            Pod::Excluded(_)
        ));
    }
}
