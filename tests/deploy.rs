//! The deploy/ examples and the Dockerfile, checked without a cluster or a container
//! engine: the YAML parses, carries the fields the Kubernetes API requires, and the
//! settings in it are ones meshinit accepts.

use std::path::Path;
use std::process::{Command, Stdio};

use yaml_rust2::{Yaml, YamlLoader};

fn documents(file: &str) -> Vec<Yaml> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"))
}

fn str_of<'a>(yaml: &'a Yaml, what: &str) -> &'a str {
    yaml.as_str()
        .unwrap_or_else(|| panic!("{what} must be a string, is {yaml:?}"))
}

fn list<'a>(yaml: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    yaml.as_vec()
        .unwrap_or_else(|| panic!("{what} must be a list, is {yaml:?}"))
}

/// apiVersion, kind and metadata.name (a DNS-1123 name) on every document.
fn check_object(doc: &Yaml) -> (&str, &str) {
    let kind = str_of(&doc["kind"], "kind");
    str_of(&doc["apiVersion"], "apiVersion");
    let name = str_of(&doc["metadata"]["name"], "metadata.name");
    assert!(
        !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
        "{kind} name {name:?} is not a DNS-1123 name"
    );
    (kind, name)
}

/// name and image on every container; capabilities are upper-case names without CAP_.
fn check_pod_spec(spec: &Yaml, what: &str) {
    let containers = list(&spec["containers"], &format!("{what} spec.containers"));
    assert!(
        !containers.is_empty(),
        "{what}: a pod needs at least one container"
    );
    let init = spec["initContainers"].as_vec().cloned().unwrap_or_default();
    let mut names = Vec::new();
    for container in containers.iter().chain(init.iter()) {
        let name = str_of(&container["name"], "container name");
        str_of(&container["image"], "container image");
        assert!(
            !names.contains(&name),
            "{what}: container name {name} used twice"
        );
        names.push(name);
        let caps = &container["securityContext"]["capabilities"];
        for set in ["add", "drop"] {
            for cap in caps[set].as_vec().cloned().unwrap_or_default() {
                let cap = str_of(&cap, "capability").to_string();
                assert!(
                    !cap.starts_with("CAP_") && cap == cap.to_uppercase(),
                    "{what}/{name}: capability {cap:?} must be written like NET_ADMIN"
                );
            }
        }
        let mounts = container["volumeMounts"]
            .as_vec()
            .cloned()
            .unwrap_or_default();
        let volumes = spec["volumes"].as_vec().cloned().unwrap_or_default();
        for mount in mounts {
            let volume = str_of(&mount["name"], "volumeMount name");
            assert!(
                volumes.iter().any(|v| v["name"].as_str() == Some(volume)),
                "{what}/{name}: volumeMount {volume} has no volume"
            );
            assert!(str_of(&mount["mountPath"], "mountPath").starts_with('/'));
        }
    }
}

fn container<'a>(spec: &'a Yaml, field: &str, name: &str) -> &'a Yaml {
    list(&spec[field], field)
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {field} entry named {name}"))
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| str_of(s, "string list item").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn meshinit() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshinit"));
    cmd.env_clear().env("PATH", "/nonexistent");
    cmd
}

#[test]
fn pod_example_has_init_container_validator_and_native_sidecar() {
    let docs = documents("deploy/pod.yaml");
    assert_eq!(docs.len(), 1);
    let pod = &docs[0];
    assert_eq!(check_object(pod), ("Pod", "web"));
    assert_eq!(str_of(&pod["apiVersion"], "apiVersion"), "v1");
    let spec = &pod["spec"];
    check_pod_spec(spec, "pod");

    // Order matters: rules, then the proof, then the proxy (which binds 4140).
    let init: Vec<&str> = list(&spec["initContainers"], "initContainers")
        .iter()
        .map(|c| str_of(&c["name"], "name"))
        .collect();
    assert_eq!(init, ["meshinit", "meshinit-validate", "meshproxy"]);

    let meshinit_c = container(spec, "initContainers", "meshinit");
    let sc = &meshinit_c["securityContext"];
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["NET_ADMIN", "NET_RAW"]
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));

    let validator = container(spec, "initContainers", "meshinit-validate");
    let vsc = &validator["securityContext"];
    assert_eq!(vsc["runAsNonRoot"].as_bool(), Some(true));
    assert!(
        vsc["capabilities"]["add"].is_badvalue(),
        "the validator needs no capability"
    );
    assert_ne!(
        vsc["runAsUser"].as_i64(),
        Some(2102),
        "the validator must not run as the proxy uid"
    );
    assert!(strings(&validator["args"]).contains(&"validate".to_string()));

    let proxy = container(spec, "initContainers", "meshproxy");
    assert_eq!(
        str_of(&proxy["restartPolicy"], "restartPolicy"),
        "Always",
        "the sidecar"
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["port"].as_i64(),
        Some(4191)
    );
    assert_eq!(proxy["securityContext"]["runAsUser"].as_i64(), Some(2102));

    // The annotations and the args agree, and meshinit accepts the args.
    let annotations = &pod["metadata"]["annotations"];
    let args = strings(&meshinit_c["args"]);
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
            .unwrap_or_else(|| panic!("no --{flag} in {args:?}"))
            .to_string()
    };
    let skip_in = str_of(
        &annotations["config.linkerd.io/skip-inbound-ports"],
        "annotation",
    );
    assert_eq!(
        arg("inbound-ports-to-ignore"),
        format!("4190,4191,{skip_in}")
    );
    let skip_out = str_of(
        &annotations["config.linkerd.io/skip-outbound-ports"],
        "annotation",
    );
    assert_eq!(arg("outbound-ports-to-ignore"), skip_out);
    let uid = str_of(&annotations["config.linkerd.io/proxy-uid"], "annotation");
    assert_eq!(arg("proxy-uid"), uid);
    assert_eq!(
        proxy["securityContext"]["runAsUser"]
            .as_i64()
            .map(|u| u.to_string())
            .as_deref(),
        Some(uid)
    );
    let opaque = str_of(&annotations["config.linkerd.io/opaque-ports"], "annotation");
    assert!(strings(&proxy["args"]).contains(&format!("--opaque-ports={opaque}")));

    let mut show: Vec<String> = vec!["show".into()];
    show.extend(args.iter().filter(|a| a.starts_with("--")).cloned());
    let out = meshinit().args(&show).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("4190-4191, 8081") && text.contains("5432"),
        "{text}"
    );
}

#[test]
fn cni_daemonset_installs_a_conflist_that_meshinit_accepts() {
    let docs = documents("deploy/cni-daemonset.yaml");
    let kinds: Vec<(&str, &str)> = docs.iter().map(check_object).collect();
    assert_eq!(
        kinds,
        [
            ("Namespace", "meshinit-system"),
            ("ConfigMap", "meshinit-cni-config"),
            ("DaemonSet", "meshinit-cni")
        ]
    );
    let ds = &docs[2];
    assert_eq!(str_of(&ds["apiVersion"], "apiVersion"), "apps/v1");
    let spec = &ds["spec"];
    // apps/v1 requires a selector, and it must match the template's labels.
    let selector = spec["selector"]["matchLabels"]
        .as_hash()
        .expect("spec.selector.matchLabels");
    assert!(!selector.is_empty());
    let labels = &spec["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(
            &labels[str_of(key, "label")],
            value,
            "selector does not match the template"
        );
    }
    let pod = &spec["template"]["spec"];
    check_pod_spec(pod, "daemonset");
    let volumes = list(&pod["volumes"], "volumes");
    let host_paths: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(host_paths, ["/opt/cni/bin", "/etc/cni/net.d"]);
    let config_map = volumes
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("configMap volume");
    assert_eq!(config_map, check_object(&docs[1]).1);

    // The conflist: JSON, meshinit chained last, and its settings accepted by the plugin
    // (DEL without a namespace validates the whole config and touches nothing).
    let conflist = str_of(&docs[1]["data"]["10-meshinit.conflist"], "conflist");
    let conflist: serde_json::Value = serde_json::from_str(conflist).expect("the conflist is JSON");
    assert_eq!(conflist["cniVersion"], "1.0.0");
    let plugins = conflist["plugins"].as_array().expect("plugins");
    assert!(plugins.len() >= 2, "meshinit must follow a primary plugin");
    let ours = plugins.last().unwrap();
    assert_eq!(ours["type"], "meshinit-cni");
    let mut conf = ours.clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    let out = cni(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf.to_string(),
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let install = strings(&container(pod, "initContainers", "install")["command"]).join(" ");
    assert!(
        install.contains("/host/opt/cni/bin/meshinit-cni"),
        "{install}"
    );
}

fn cni(vars: &[(&str, &str)], stdin: &str) -> std::process::Output {
    let mut child = meshinit()
        .arg("cni")
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    // A plugin may exit without reading stdin (VERSION): a broken pipe is not the story.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// The one command both the image and scripts/demo.sh build with.
const BUILD: &str = "cargo build --release --locked -p meshinit -p meshproxy";

#[test]
fn dockerfile_builds_like_the_scripts_and_ships_both_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let joined = dockerfile.replace("\\\n", " ");
    let instructions: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert_eq!(
        froms,
        ["FROM rust:1-bookworm AS build", "FROM debian:bookworm-slim"]
    );
    assert!(
        instructions.contains(&&*format!("RUN {BUILD}")),
        "the builder must run `{BUILD}`"
    );

    let demo = std::fs::read_to_string(root.join("scripts/demo.sh")).unwrap();
    let normalised = demo.replace(" -q ", " ");
    assert!(
        normalised.contains(BUILD),
        "scripts/demo.sh no longer builds with `{BUILD}`: update the Dockerfile too"
    );

    let runtime = joined.split("FROM debian:bookworm-slim").nth(1).unwrap();
    for package in ["nftables", "iptables", "libcap2-bin"] {
        assert!(runtime.contains(package), "runtime image lacks {package}");
    }
    for binary in ["meshinit", "meshproxy"] {
        assert!(
            runtime.contains(&format!(
                "/src/target/release/{binary} /usr/local/bin/{binary}"
            )),
            "{binary} is not copied into the image"
        );
    }
    assert!(runtime.contains("ln -s meshinit /usr/local/bin/meshinit-cni"));
    assert!(runtime.contains("setcap cap_net_admin,cap_net_raw+ep /usr/local/bin/meshinit "));
    let user = instructions
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(
        !user.contains(" 0") && !user.contains("root"),
        "the image must not run as root: {user}"
    );
}
