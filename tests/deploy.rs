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
    check_meshinit_container(spec, meshinit_c);
    no_probes_on_plain_init_containers(spec, "pod");

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
    assert_eq!(
        strings(&validator["command"]),
        ["/usr/local/bin/meshinit"],
        "the image has no separate validator binary"
    );

    let proxy = container(spec, "initContainers", "meshproxy");
    assert_eq!(
        str_of(&proxy["restartPolicy"], "restartPolicy"),
        "Always",
        "the sidecar"
    );
    // A sidecar counts as started once its startupProbe passes: without one the
    // application may start before the proxy listens.
    assert_eq!(
        proxy["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
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

/// meshinit: root with NET_ADMIN only (nft, iptables-nft), read-only root
/// filesystem, and a writable /run (an emptyDir) for its lock file.
fn check_meshinit_container(spec: &Yaml, meshinit_c: &Yaml) {
    let sc = &meshinit_c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["add"]), ["NET_ADMIN"]);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    let run = list(&meshinit_c["volumeMounts"], "meshinit volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/run"))
        .expect("meshinit needs a writable /run for /run/meshinit.lock");
    let volume = list(&spec["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == run["name"])
        .unwrap();
    assert!(
        !volume["emptyDir"].is_badvalue(),
        "/run must be an emptyDir: {volume:?}"
    );
}

/// The API rejects probes on init containers other than native sidecars.
fn no_probes_on_plain_init_containers(spec: &Yaml, what: &str) {
    for c in spec["initContainers"].as_vec().cloned().unwrap_or_default() {
        if c["restartPolicy"].as_str() == Some("Always") {
            continue;
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert!(
                c[probe].is_badvalue(),
                "{what}: init container {:?} has a {probe}",
                c["name"]
            );
        }
    }
}

#[test]
fn classic_pod_runs_the_proxy_first_and_holds_the_app_with_meshproxy_await() {
    let docs = documents("deploy/pod-classic.yaml");
    assert_eq!(docs.len(), 1);
    let pod = &docs[0];
    assert_eq!(check_object(pod), ("Pod", "web"));
    let spec = &pod["spec"];
    check_pod_spec(spec, "classic pod");
    no_probes_on_plain_init_containers(spec, "classic pod");
    let names = |field: &str| -> Vec<String> {
        list(&spec[field], field)
            .iter()
            .map(|c| str_of(&c["name"], "name").to_string())
            .collect()
    };
    assert_eq!(names("initContainers"), ["meshinit", "meshinit-validate"]);
    assert_eq!(names("containers"), ["meshproxy", "app"], "proxy first");
    for c in list(&spec["initContainers"], "initContainers") {
        assert!(c["restartPolicy"].is_badvalue(), "no native sidecars here");
    }
    check_meshinit_container(spec, container(spec, "initContainers", "meshinit"));
    let proxy = container(spec, "containers", "meshproxy");
    let hook = strings(&proxy["lifecycle"]["postStart"]["exec"]["command"]);
    assert_eq!(hook[..2], ["/usr/local/bin/meshproxy", "await"], "{hook:?}");
    assert_eq!(proxy["securityContext"]["runAsUser"].as_i64(), Some(2102));
    assert!(proxy["securityContext"]["capabilities"]["add"].is_badvalue());

    // The same settings as the native-sidecar pod.
    let native = &documents("deploy/pod.yaml")[0];
    assert_eq!(
        pod["metadata"]["annotations"],
        native["metadata"]["annotations"]
    );
    for (name, field) in [("meshinit", "args"), ("meshinit-validate", "args")] {
        assert_eq!(
            container(spec, "initContainers", name)[field],
            container(&native["spec"], "initContainers", name)[field],
            "{name} {field}"
        );
    }
    assert_eq!(
        proxy["args"],
        container(&native["spec"], "initContainers", "meshproxy")["args"]
    );
}

/// kubernetes-validate (PyPI), installed by scripts/test.sh into a venv.
fn kubernetes_validate() -> Command {
    let path = std::env::var_os("KUBERNETES_VALIDATE").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/kubernetes-validate/bin/kubernetes-validate")
        },
        std::path::PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: run scripts/test.sh, or `python3 -m venv target/kubernetes-validate && \
         target/kubernetes-validate/bin/pip install kubernetes-validate`, or set KUBERNETES_VALIDATE",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.arg("--strict");
    cmd
}

/// The newest Kubernetes the validator knows, and the oldest each manifest claims.
const CURRENT_KUBERNETES: &str = "1.37.0";

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut manifests: Vec<_> = std::fs::read_dir(root.join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert_eq!(manifests.len(), 3, "{manifests:?}");
    let validate = |version: &str, files: &[std::path::PathBuf]| {
        let out = kubernetes_validate()
            .args(["--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = validate(CURRENT_KUBERNETES, &manifests);
    assert!(ok, "{text}");
    assert_eq!(text.matches("passed").count(), 5, "{text}");
    // Native sidecars from 1.29 (and the schema before knows no restartPolicy on
    // an init container); the classic variant for older clusters.
    let (ok, text) = validate("1.29.0", &[root.join("deploy/pod.yaml")]);
    assert!(ok, "{text}");
    let (ok, text) = validate("1.27.0", &[root.join("deploy/pod.yaml")]);
    assert!(
        !ok && text.contains("'restartPolicy' was unexpected"),
        "{text}"
    );
    let (ok, text) = validate("1.27.0", &[root.join("deploy/pod-classic.yaml")]);
    assert!(ok, "{text}");

    // --strict rejects a misspelt field: the validator really validates.
    let dir = std::env::temp_dir().join(format!("meshinit-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("pod.yaml");
    let text = std::fs::read_to_string(root.join("deploy/pod-classic.yaml")).unwrap();
    std::fs::write(
        &bad,
        text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )
    .unwrap();
    let (ok, out) = validate(CURRENT_KUBERNETES, &[bad]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok && out.contains("readOnlyRootFileSystem"), "{out}");
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
fn dockerfile_builds_like_the_scripts_and_image_sh_makes_the_same_image() {
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
    // Base images are build arguments (a mirror, a local copy); today's defaults.
    assert_eq!(
        froms,
        ["FROM ${BUILD_IMAGE} AS build", "FROM ${RUNTIME_IMAGE}"]
    );
    assert!(instructions.contains(&"ARG BUILD_IMAGE=rust:1-bookworm"));
    assert!(instructions.contains(&"ARG RUNTIME_IMAGE=debian:bookworm-slim"));
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
    let image_sh = std::fs::read_to_string(root.join("scripts/image.sh")).unwrap();
    assert!(
        image_sh.contains(BUILD),
        "scripts/image.sh must build with `{BUILD}`"
    );

    // `COPY . .` must not send target/ (many GB) to the builder.
    let ignored = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(ignored.lines().any(|l| l.trim() == "target/"), "{ignored}");

    let runtime = joined.split("FROM ${RUNTIME_IMAGE}").nth(1).unwrap();
    for package in ["nftables", "iptables"] {
        assert!(runtime.contains(package), "runtime image lacks {package}");
    }
    // No file capabilities: under `drop: [ALL], add: [NET_ADMIN]` a binary with
    // cap_net_raw in its file capabilities cannot be executed at all.
    assert!(!runtime.contains("setcap") && !runtime.contains("libcap2-bin"));
    assert!(!image_sh.contains("setcap"));
    for binary in ["meshinit", "meshproxy"] {
        assert!(
            runtime.contains(&format!(
                "/src/target/release/{binary} /usr/local/bin/{binary}"
            )),
            "{binary} is not copied into the image"
        );
        assert!(image_sh.contains(&format!("\"$BIN_DIR/{binary}\"")));
    }
    assert!(image_sh
        .contains(r#"cp "$BIN_DIR/meshinit" "$BIN_DIR/meshproxy" "$work/layer/usr/local/bin/""#));
    assert!(runtime.contains("ln -s meshinit /usr/local/bin/meshinit-cni"));
    assert!(image_sh.contains(r#"ln -s meshinit "$work/layer/usr/local/bin/meshinit-cni""#));
    assert!(image_sh.contains("PACKAGES=nftables,iptables,dash,coreutils"));
    // The same user and entrypoint.
    let last = |prefix: &str| {
        *instructions
            .iter()
            .rev()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}"))
    };
    let user = last("USER ");
    assert_eq!(user, "USER 2102:2102", "the image must not run as root");
    let entrypoint = last("ENTRYPOINT ");
    for change in [user, entrypoint] {
        assert!(
            image_sh.contains(&format!("--change '{change}'")),
            "scripts/image.sh lacks --change '{change}'"
        );
    }
}
