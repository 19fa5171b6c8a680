//! The install manifests (`manifests/`), checked without a cluster.
//!
//! 1. Every object, rendered the way `kubectl apply -k` renders it (base, uninstall, and the
//!    routed-cni component), validates against the official Kubernetes OpenAPI schemas of
//!    the oldest and the newest Kubernetes versions covered, with the pinned
//!    `kubernetes-validate` that `xtask/setup.sh` installs. No validator is a failure.
//! 2. Deserialized into k8s-openapi types, the objects say what the agent's contract needs:
//!    one image reference, the documented capabilities and no privileged agent, probes on the
//!    named port and paths, the host's bpffs, NODE_NAME from the downward API, flags and
//!    environment variables that `palisade agent` accepts and the README documents.
//! 3. In the kernel: the agent run with exactly the DaemonSet's capability set enforces on a
//!    routed and on a bridged node, fails without any one of them, and the uninstall
//!    container's capability set removes everything it pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::CommandFactory as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use palisade::agent::{run_until, AgentConfig, Status};
use palisade_tests::pins::PinDir;
use palisade_tests::{require_root, tcp_connect, wait_until, Family, Flavour, Node, Pod, Server};

/// The agent container's capabilities, each justified in manifests/daemonset.yaml and
/// README.md, and each shown necessary by the kernel tests below.
const AGENT_CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "NET_BROADCAST"];
/// The uninstall DaemonSet's cleanup container: none. The kernel lets root open its own
/// pins and unpin them without capabilities (shown by the kernel tests below); the
/// container is seccomp-unconfined instead, as runtimes' default profiles refuse bpf(2)
/// to a container holding neither CAP_BPF nor CAP_SYS_ADMIN.
const CLEANUP_CAPS: [&str; 0] = [];

/// The agent's HTTP contract.
const HTTP_PORT_NAME: &str = "http-metrics";
const HTTP_PORT: i32 = 9977;

/// Kubernetes versions the manifests must validate against: the oldest README.md claims
/// (1.30: `appArmorProfile` became a field), the API the agent is built against
/// (k8s-openapi's `v1_33`) and the newest schema the pinned validator ships.
const KUBERNETES_VERSIONS: [&str; 3] = ["1.30.0", "1.33.0", "1.37.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn manifests() -> PathBuf {
    repo().join("manifests")
}

// ---------------------------------------------------------------------------------------
// A renderer for the subset of kustomize these manifests use (resources, components,
// images, JSON 6902 patches), strict about anything else, so a kustomization feature it
// does not model fails here instead of being silently skipped.

fn read_yaml_docs(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kustomization(dir: &Path) -> Value {
    let mut docs = read_yaml_docs(&dir.join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "{}: one document", dir.display());
    docs.remove(0)
}

struct Kustomize {
    /// Every file read as a resource, to find manifests no kustomization includes.
    files: BTreeSet<PathBuf>,
}

impl Kustomize {
    fn new() -> Self {
        Kustomize {
            files: BTreeSet::new(),
        }
    }

    /// Renders the kustomization in `dir`, plus `extra_components` as if listed there.
    fn build(&mut self, dir: &Path, extra_components: &[PathBuf]) -> Vec<Value> {
        let k = kustomization(dir);
        assert_eq!(k["kind"], "Kustomization", "{}", dir.display());
        for key in k.as_object().unwrap().keys() {
            assert!(
                [
                    "apiVersion",
                    "kind",
                    "resources",
                    "components",
                    "images",
                    "patches"
                ]
                .contains(&key.as_str()),
                "{}: kustomization field `{key}` is not modelled by this test's renderer; \
                 extend Kustomize::build",
                dir.display()
            );
        }
        let mut docs = Vec::new();
        for r in k["resources"].as_array().into_iter().flatten() {
            let path = dir.join(r.as_str().unwrap());
            if path.is_dir() {
                docs.extend(self.build(&path, &[]));
            } else {
                self.files.insert(path.canonicalize().unwrap());
                docs.extend(read_yaml_docs(&path));
            }
        }
        let components: Vec<PathBuf> = k["components"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| dir.join(c.as_str().unwrap()))
            .chain(extra_components.iter().cloned())
            .collect();
        for c in components {
            let ck = kustomization(&c);
            assert_eq!(
                ck["kind"],
                "Component",
                "{} is not a Component",
                c.display()
            );
            docs = self.build_component(&c, std::mem::take(&mut docs));
        }
        apply_patches(&k, dir, &mut docs);
        apply_images(&k, &mut docs);
        docs
    }

    fn build_component(&mut self, dir: &Path, mut docs: Vec<Value>) -> Vec<Value> {
        let k = kustomization(dir);
        assert!(
            k.get("resources").is_none() && k.get("components").is_none(),
            "{}: components with resources are not modelled",
            dir.display()
        );
        apply_patches(&k, dir, &mut docs);
        apply_images(&k, &mut docs);
        docs
    }
}

fn apply_patches(k: &Value, dir: &Path, docs: &mut [Value]) {
    for p in k["patches"].as_array().into_iter().flatten() {
        let target = &p["target"];
        let ops: serde_yaml::Value = serde_yaml::from_str(p["patch"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{}: patch is not YAML: {e}", dir.display()));
        let ops: json_patch::Patch = serde_json::from_value(serde_json::to_value(ops).unwrap())
            .unwrap_or_else(|e| panic!("{}: not a JSON 6902 patch: {e}", dir.display()));
        let mut hits = 0;
        for d in docs.iter_mut() {
            let kind_ok = d["kind"] == target["kind"];
            let name_ok = d["metadata"]["name"] == target["name"];
            if kind_ok && name_ok {
                json_patch::patch(d, &ops.0)
                    .unwrap_or_else(|e| panic!("{}: patch does not apply: {e}", dir.display()));
                hits += 1;
            }
        }
        assert_eq!(
            hits,
            1,
            "{}: patch target {target} matched {hits} objects",
            dir.display()
        );
    }
}

fn apply_images(k: &Value, docs: &mut [Value]) {
    for img in k["images"].as_array().into_iter().flatten() {
        let name = img["name"].as_str().unwrap();
        let reference = format!(
            "{}:{}",
            img["newName"].as_str().unwrap(),
            img["newTag"].as_str().unwrap()
        );
        for d in docs.iter_mut() {
            for list in ["initContainers", "containers"] {
                let cs = d.pointer_mut(&format!("/spec/template/spec/{list}"));
                for c in cs.and_then(Value::as_array_mut).into_iter().flatten() {
                    if c["image"] == name {
                        c["image"] = Value::String(reference.clone());
                    }
                }
            }
        }
    }
}

/// The two things a user can apply, rendered.
struct Rendered {
    install: Vec<Value>,
    uninstall: Vec<Value>,
    files: BTreeSet<PathBuf>,
}

fn render() -> Rendered {
    let mut k = Kustomize::new();
    let install = k.build(&manifests(), &[]);
    let uninstall = k.build(&manifests().join("uninstall"), &[]);
    Rendered {
        install,
        uninstall,
        files: k.files,
    }
}

fn typed<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str, name: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"));
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{kind}/{name} does not deserialize into k8s-openapi: {e}"))
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

fn added_caps(c: &Container) -> Vec<String> {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .unwrap_or_else(|| panic!("container {} sets no capabilities", c.name));
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "container {} must drop ALL capabilities before adding",
        c.name
    );
    caps.add.clone().unwrap_or_default()
}

fn privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// 1. Schema validation.

fn validator() -> PathBuf {
    let pinned = std::fs::read_to_string(repo().join("xtask/setup.sh"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VALIDATE_VERSION="))
        .expect("xtask/setup.sh pins KUBERNETES_VALIDATE_VERSION")
        .trim()
        .to_string();
    let path = std::env::var_os("PALISADE_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/palisade-venv/bin/kubernetes-validate"));
    let out = Command::new(&path).arg("--version").output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => panic!(
            "the Kubernetes schema validator is not installed at {} ({other:?}). \
             Run ./xtask/setup.sh (it installs kubernetes-validate=={pinned} into \
             /opt/palisade-venv), or point PALISADE_KUBERNETES_VALIDATE at it. \
             This test fails rather than skips: unvalidated manifests must not pass CI.",
            path.display()
        ),
    };
    assert_eq!(
        version,
        pinned,
        "{} is kubernetes-validate {version}, xtask/setup.sh pins {pinned}; rerun ./xtask/setup.sh",
        path.display()
    );
    path
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let validator = validator();
    let r = render();
    let dir = std::env::temp_dir().join(format!("palisade-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut expected = 0;
    let mut files = Vec::new();
    for (name, docs) in [("install", &r.install), ("uninstall", &r.uninstall)] {
        let path = dir.join(format!("{name}.yaml"));
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        std::fs::write(&path, text).unwrap();
        expected += docs.len();
        files.push(path);
    }
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "manifests do not validate against Kubernetes {version}:\n{log}"
        );
        // The validator only warns about kinds it has no schema for: demand a pass per object.
        let passed = log
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, expected,
            "Kubernetes {version}: {passed} of {expected} objects validated:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 2. What the objects say.

#[test]
fn every_manifest_file_is_part_of_a_kustomization() {
    let r = render();
    let mut orphans = Vec::new();
    let mut stack = vec![manifests()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && p.file_name().unwrap() != "kustomization.yaml"
                && !r.files.contains(&p.canonicalize().unwrap())
            {
                orphans.push(p);
            }
        }
    }
    assert!(
        orphans.is_empty(),
        "not listed in any kustomization: {orphans:?}"
    );
}

#[test]
fn the_image_reference_is_written_in_exactly_one_place() {
    let component = kustomization(&manifests().join("image"));
    let images = component["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let name = images[0]["newName"].as_str().unwrap();
    let tag = images[0]["newTag"].as_str().unwrap();
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "the image tag must match the crate version the image is built from"
    );
    let reference = format!("{name}:{tag}");

    // Textually: the registry/name appears once in the whole manifests tree.
    let mut places = Vec::new();
    let mut stack = vec![manifests()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let n = std::fs::read_to_string(&p).unwrap().matches(name).count();
                places.extend(std::iter::repeat_n(p.clone(), n));
            }
        }
    }
    assert_eq!(
        places,
        vec![manifests().join("image/kustomization.yaml")],
        "`{name}` must appear only in manifests/image/kustomization.yaml"
    );

    // Every container names the placeholder, which renders to the reference everywhere.
    let r = render();
    for docs in [&r.install, &r.uninstall] {
        for d in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
            let ds: DaemonSet = serde_json::from_value(d.clone()).unwrap();
            for c in all_containers(pod_spec(&ds)) {
                assert_eq!(
                    c.image.as_deref(),
                    Some(reference.as_str()),
                    "container {} of {:?}",
                    c.name,
                    ds.metadata.name
                );
            }
        }
    }
}

#[test]
fn the_agent_daemonset_runs_everywhere_and_upgrades_one_node_at_a_time() {
    let r = render();
    let ds: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let spec = ds.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        ru.max_surge,
        Some(IntOrString::Int(0)),
        "two agents must never share a node"
    );

    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerates_all =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(
        tolerates_all,
        "the agent must tolerate every taint (control plane included)"
    );
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        (10..=120).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );

    // Token only for the read-only ClusterRole.
    assert_eq!(pod.service_account_name.as_deref(), Some("palisade"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    let role: ClusterRole = typed(&r.install, "ClusterRole", "palisade");
    for rule in role.rules.iter().flatten() {
        for verb in &rule.verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "ClusterRole palisade grants `{verb}`"
            );
        }
    }
    let binding: ClusterRoleBinding = typed(&r.install, "ClusterRoleBinding", "palisade");
    assert_eq!(binding.role_ref.name, "palisade");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    let namespace = ds.metadata.namespace.as_deref().unwrap();
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "palisade", Some(namespace))
    );
    // Every namespaced object lives in the namespace the install creates.
    for d in &r.install {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert_eq!(ns, namespace, "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }
    let _: k8s_openapi::api::core::v1::Namespace = typed(&r.install, "Namespace", namespace);
}

#[test]
fn the_agent_is_not_privileged_and_has_exactly_the_documented_capabilities() {
    let r = render();
    let ds: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let pod = pod_spec(&ds);
    let agent = container(pod, "agent");
    assert!(
        !privileged(agent),
        "the agent container must not be privileged"
    );
    assert_eq!(added_caps(agent), AGENT_CAPS, "agent capabilities");
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    let seccomp = sc.seccomp_profile.as_ref().or(pod
        .security_context
        .as_ref()
        .and_then(|p| p.seccomp_profile.as_ref()));
    assert_eq!(seccomp.map(|s| s.type_.as_str()), Some("RuntimeDefault"));

    // The only privileged container anywhere is the init container that mounts bpffs.
    for docs in [&r.install, &r.uninstall] {
        for d in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
            let ds: DaemonSet = serde_json::from_value(d.clone()).unwrap();
            for c in all_containers(pod_spec(&ds)) {
                assert_eq!(
                    privileged(c),
                    c.name == "mount-bpffs",
                    "container {} privileged={}",
                    c.name,
                    privileged(c)
                );
                check_api_server_rules(c);
                let sc = c.security_context.as_ref();
                let seccomp = sc.and_then(|s| s.seccomp_profile.as_ref());
                if seccomp.is_some_and(|p| p.type_ == "Unconfined") {
                    assert!(
                        added_caps(c).is_empty() && !privileged(c),
                        "{}: only a container without capabilities may run unconfined",
                        c.name
                    );
                }
            }
        }
    }

    let agent: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let agent_c = container(pod_spec(&agent), "agent");
    let asc = agent_c.security_context.as_ref().unwrap();
    assert_eq!(asc.allow_privilege_escalation, Some(false));
    assert_eq!(
        asc.app_armor_profile.as_ref().map(|a| a.type_.as_str()),
        Some("RuntimeDefault")
    );

    let cleanup: DaemonSet = typed(&r.uninstall, "DaemonSet", "palisade-cleanup");
    assert_eq!(
        added_caps(container(pod_spec(&cleanup), "cleanup")),
        CLEANUP_CAPS
    );
    assert!(added_caps(container(pod_spec(&cleanup), "done")).is_empty());

    // Each capability is explained where the user reads it.
    let daemonset_text = std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap();
    let readme = install_section();
    for cap in AGENT_CAPS {
        assert!(
            daemonset_text.contains(&format!("#   {cap} ")),
            "manifests/daemonset.yaml does not justify {cap} in its capability comment"
        );
        assert!(
            readme.contains(&format!("CAP_{cap}")),
            "README.md (Install on a cluster) does not explain CAP_{cap}"
        );
    }
}

/// Pod rules the API server enforces beyond the OpenAPI schema.
fn check_api_server_rules(c: &Container) {
    let sc = c.security_context.as_ref();
    // "Bidirectional mount propagation is available only to privileged containers".
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_propagation.as_deref() == Some("Bidirectional") {
            assert!(
                privileged(c),
                "{}: Bidirectional mount needs privileged",
                c.name
            );
        }
    }
    // "cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN"
    // (the API server compares the literal string; the runtime adds CAP_ to SYS_ADMIN, so
    // either spelling grants it and both are refused here).
    if sc.and_then(|s| s.allow_privilege_escalation) == Some(false) {
        assert!(
            !privileged(c),
            "{}: privileged with allowPrivilegeEscalation=false",
            c.name
        );
        let caps = sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone());
        for cap in caps.unwrap_or_default() {
            assert!(
                cap != "SYS_ADMIN" && cap != "CAP_SYS_ADMIN",
                "{}: allowPrivilegeEscalation=false with SYS_ADMIN",
                c.name
            );
        }
    }
}

#[test]
fn probes_and_metrics_use_the_named_port_and_the_agent_paths() {
    let r = render();
    let ds: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let pod = pod_spec(&ds);
    let agent = container(pod, "agent");
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(HTTP_PORT_NAME))
        .expect("a container port named http-metrics");
    assert_eq!(port.container_port, HTTP_PORT);
    for (probe, path) in [
        (&agent.liveness_probe, "/healthz"),
        (&agent.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String(HTTP_PORT_NAME.into()));
    }
    let annotations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&HTTP_PORT.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );

    // The agent listens on the node address (not 0.0.0.0, not its 127.0.0.1 default, which
    // kubelet cannot reach), on the probed port.
    let flags = agent_flags(agent);
    assert_eq!(
        flags.get("http-addr").map(String::as_str),
        Some(format!("$(HOST_IP):{HTTP_PORT}").as_str())
    );
    assert_eq!(
        env_field(agent, "HOST_IP").as_deref(),
        Some("status.hostIP")
    );
}

#[test]
fn bpffs_and_node_name_come_from_the_host() {
    let r = render();
    let ds: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let pod = pod_spec(&ds);
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume of /sys/fs/bpf");
    let mount_of = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == bpffs.name)
            .map(|m| (m.mount_path.clone(), m.mount_propagation.clone()))
    };
    // The init container's mount must reach the host (Bidirectional); the agent must see
    // it (HostToContainer; Bidirectional is refused for unprivileged containers).
    let init = container(pod, "mount-bpffs");
    assert_eq!(
        mount_of(init),
        Some(("/sys/fs/bpf".into(), Some("Bidirectional".into())))
    );
    let script = init.command.as_ref().unwrap().join(" ");
    assert!(
        script.contains("/proc/mounts") && script.contains("mount -t bpf bpf /sys/fs/bpf"),
        "the init container must mount bpffs only when it is not mounted: {script}"
    );
    let agent = container(pod, "agent");
    assert_eq!(
        mount_of(agent),
        Some(("/sys/fs/bpf".into(), Some("HostToContainer".into())))
    );
    let flags = agent_flags(agent);
    assert!(flags["bpffs-dir"].starts_with("/sys/fs/bpf/"));
    // The run dir is a mounted volume: the root filesystem is read-only.
    let run_dir = &flags["run-dir"];
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| &m.mount_path == run_dir),
        "--run-dir {run_dir} is not a volume"
    );
    assert_eq!(
        env_field(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );

    // The uninstall cleans exactly what the agent pins, and never next to a live agent.
    let cleanup_ds: DaemonSet = typed(&r.uninstall, "DaemonSet", "palisade-cleanup");
    let cpod = pod_spec(&cleanup_ds);
    let cleanup = container(cpod, "cleanup");
    let cflags = agent_flags(cleanup);
    assert!(cflags.contains_key("cleanup"));
    assert_eq!(cflags["bpffs-dir"], flags["bpffs-dir"]);
    assert_eq!(cflags["run-dir"], flags["run-dir"]);
    let anti = cpod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("the cleanup pods avoid nodes with an agent");
    let agent_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(anti.iter().any(|t| {
        t.topology_key == "kubernetes.io/hostname"
            && t.namespaces.as_deref() == Some(&[ds.metadata.namespace.clone().unwrap()][..])
            && t.label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| m.iter().all(|(k, v)| agent_labels.get(k) == Some(v)))
    }));
}

/// `--name=value` / `--name` arguments after the `agent` subcommand.
fn agent_flags(c: &Container) -> BTreeMap<String, String> {
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("agent"),
        "container {} must run `palisade agent` (the image's entrypoint is palisade)",
        c.name
    );
    args[1..]
        .iter()
        .map(|a| {
            let a = a
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("{}: write flags as --name=value: {a}", c.name));
            let (k, v) = a.split_once('=').unwrap_or((a, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn env_field(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

/// The README section a platform engineer follows.
fn install_section() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("## Install on a cluster")
        .expect("README.md has an `## Install on a cluster` section");
    let rest = &readme[start + 3..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

#[test]
fn daemonset_flags_and_env_are_accepted_by_the_agent_and_documented() {
    let mut cli = palisade::cli::Cli::command();
    cli.build();
    let agent_cmd = cli.find_subcommand("agent").expect("`palisade agent`");
    let longs: BTreeSet<String> = agent_cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let envs: BTreeSet<String> = agent_cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let help = agent_cmd.clone().render_long_help().to_string();
    let readme = install_section();

    let r = render();
    let install: DaemonSet = typed(&r.install, "DaemonSet", "palisade");
    let cleanup: DaemonSet = typed(&r.uninstall, "DaemonSet", "palisade-cleanup");
    let containers = [
        container(pod_spec(&install), "agent"),
        container(pod_spec(&cleanup), "cleanup"),
    ];
    for c in containers {
        let args = c.args.clone().unwrap_or_default().join(" ");
        for flag in agent_flags(c).keys() {
            assert!(
                longs.contains(flag),
                "container {}: `palisade agent` has no --{flag} (has {longs:?})",
                c.name
            );
            assert!(help.contains(&format!("--{flag}")));
            assert!(
                readme.contains(&format!("--{flag}")),
                "README.md (Install on a cluster) does not document --{flag}"
            );
        }
        for e in c.env.iter().flatten() {
            if args.contains(&format!("$({})", e.name)) {
                continue; // only substituted into the arguments by kubelet
            }
            assert!(
                envs.contains(&e.name),
                "container {}: env {} is not read by `palisade agent` (reads {envs:?})",
                c.name,
                e.name
            );
            assert!(
                readme.contains(&e.name),
                "README.md (Install on a cluster) does not document {}",
                e.name
            );
        }
    }
}

#[test]
fn the_image_provides_what_the_manifests_execute() {
    let containerfile = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    assert!(
        containerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/palisade"]"#),
        "the manifests pass `agent ...` as arguments to the image's palisade entrypoint"
    );
    let r = render();
    for docs in [&r.install, &r.uninstall] {
        for d in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
            let ds: DaemonSet = serde_json::from_value(d.clone()).unwrap();
            for c in all_containers(pod_spec(&ds)) {
                if let Some(program) = c.command.as_ref().and_then(|c| c.first()) {
                    assert!(
                        containerfile.contains(&format!(" {program}")),
                        "container {} runs {program}, which the Containerfile does not install",
                        c.name
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. The capability sets, in the kernel.

fn cap_number(name: &str) -> u32 {
    match name {
        "NET_BROADCAST" => 11,
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number to cap_number()"),
    }
}

/// Gives the calling thread the credentials a container runtime gives root in a container
/// with `capabilities: {drop: [ALL], add: caps}` and allowPrivilegeEscalation false: the
/// bounding, permitted and effective sets are `caps`, inheritable and ambient are empty,
/// no_new_privs is set. Threads and processes it starts inherit them (capabilities are
/// per thread on Linux, so the rest of the test process keeps its own).
fn confine_thread_to(caps: &[String]) -> std::io::Result<()> {
    let caps: Vec<u32> = caps.iter().map(|c| cap_number(c)).collect();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(std::io::Error::other)?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut data = [Data::default(); 2];
    for &c in &caps {
        let d = &mut data[(c / 32) as usize];
        d.effective |= 1 << (c % 32);
        d.permitted |= 1 << (c % 32);
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    // SAFETY: prctl/capset on the calling thread with valid arguments and buffers.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        for c in (0..=last).filter(|c| !caps.contains(c)) {
            if libc::prctl(libc::PR_CAPBSET_DROP, c, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A node with pods x/a and x/b (both serving TCP 80) and a policy that isolates x/b for
/// ingress, for an agent run with a given capability set.
struct Scene {
    node: Node,
    a: Pod,
    b: Pod,
    _servers: [Server; 2],
    pins: PinDir,
    base: PathBuf,
}

impl Scene {
    fn new(tag: &str, flavour: Flavour) -> Scene {
        let node = Node::new(tag, flavour).unwrap();
        let a = node.add_pod("x/a").unwrap();
        let b = node.add_pod("x/b").unwrap();
        let servers = [
            Server::tcp(a.ns(), 80, "x/a").unwrap(),
            Server::tcp(b.ns(), 80, "x/b").unwrap(),
        ];
        let base = std::env::temp_dir().join(format!("palisade-caps-{tag}-{}", std::process::id()));
        let manifests = base.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n");
        for p in [&a, &b] {
            let (_, n) = p.name().split_once('/').unwrap();
            y += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: x, labels: {{pod: {n}}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}\n\
                 status: {{phase: Running, podIP: {v4}, podIPs: [{{ip: {v4}}}, {{ip: {v6}}}]}}\n",
                v4 = p.ipv4(),
                v6 = p.ipv6()
            );
        }
        y += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
              metadata: {name: isolate-b, namespace: x}\nspec: {podSelector: {matchLabels: {pod: b}}}\n";
        std::fs::write(manifests.join("objects.yaml"), y).unwrap();
        Scene {
            node,
            a,
            b,
            _servers: servers,
            pins: PinDir::new(tag),
            base,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    /// Runs the agent with `caps` until x/b's interface is enforced or `patience` passes.
    fn run_agent(&self, caps: &[String], patience: Duration) -> Outcome {
        let cfg = AgentConfig {
            node_name: "n1".into(),
            source: palisade::source::SourceSpec::Manifests(self.base.join("manifests")),
            layout: self.pins.layout(),
            run_dir: self.run_dir(),
            conntrack_entries: 4096,
            revoke_untracked: false,
            http_addr: None,
            services: Default::default(),
            max_entries: Default::default(),
        };
        let caps = caps.to_vec();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = self
            .node
            .ns()
            .spawn(move || {
                confine_thread_to(&caps)?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                rt.block_on(run_until(cfg, async {
                    let _ = stopped.await;
                }))
            })
            .unwrap();
        let want = self.b.host_ifindex();
        let enforced_ifindex = || {
            Status::read(&self.run_dir()).is_ok_and(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.pod == "x/b" && e.ifindex == Some(want))
            })
        };
        wait_until(patience, || agent.is_finished() || enforced_ifindex());
        let found = enforced_ifindex();
        let endpoints = Status::read(&self.run_dir())
            .map(|s| {
                let ends = s.endpoints.iter();
                ends.map(|e| format!("{}@{:?}:{}", e.pod, e.ifindex, e.isolation))
                    .collect()
            })
            .unwrap_or_default();
        // A drop shows as a timeout, so the isolated direction gets a short deadline; the
        // allowed one a generous deadline, for loaded machines.
        let a_to_b = tcp_connect(
            self.a.ns(),
            self.b.ip(Family::V4),
            80,
            Duration::from_secs(1),
        );
        let b_to_a = tcp_connect(
            self.b.ns(),
            self.a.ip(Family::V4),
            80,
            Duration::from_secs(5),
        );
        let _ = stop.send(());
        let result = agent.join().expect("agent thread panicked");
        Outcome {
            found,
            endpoints,
            interfaces: [self.a.host_ifindex(), self.b.host_ifindex()],
            a_to_b,
            b_to_a,
            error: result.err().map(|e| short_error(&format!("{e:#}"))),
        }
    }
}

/// The agent's error without the verifier's full log: its first line and the verdict.
fn short_error(e: &str) -> String {
    let Some((head, log)) = e.split_once("Verifier output:") else {
        return e.to_string();
    };
    let verdict = log
        .lines()
        .find(|l| l.contains("prohibited") || l.contains("invalid") || l.contains("denied"))
        .unwrap_or("");
    format!("{head}[verifier: {}]", verdict.trim())
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[derive(Debug)]
struct Outcome {
    /// The status reports x/b enforced on its host interface.
    found: bool,
    /// What the status says, `pod@ifindex:isolation`, against the real host interfaces of
    /// x/a and x/b.
    endpoints: Vec<String>,
    interfaces: [u32; 2],
    a_to_b: Result<String, palisade_tests::ProbeError>,
    b_to_a: Result<String, palisade_tests::ProbeError>,
    error: Option<String>,
}

impl Outcome {
    fn assert_enforced(&self, what: &str) {
        assert!(
            self.error.is_none() && self.found,
            "{what}: agent did not enforce: {self:?}"
        );
        let [a, b] = self.interfaces;
        for want in [
            format!("x/a@Some({a}):open"),
            format!("x/b@Some({b}):ingress-isolated"),
        ] {
            assert!(
                self.endpoints.contains(&want),
                "{what}: status does not show {want}: {self:?}"
            );
        }
        assert_eq!(
            self.a_to_b,
            Err(palisade_tests::ProbeError::Timeout),
            "{what}: isolated x/b still reachable"
        );
        assert_eq!(
            self.b_to_a.as_deref(),
            Ok("x/a"),
            "{what}: allowed flow broken"
        );
    }

    fn assert_not_enforced(&self, what: &str) {
        assert!(!self.found, "{what}: agent enforced anyway: {self:?}");
        assert_eq!(self.a_to_b.as_deref(), Ok("x/b"), "{what}: {self:?}");
    }
}

fn agent_caps(docs: &[Value]) -> Vec<String> {
    let ds: DaemonSet = typed(docs, "DaemonSet", "palisade");
    added_caps(container(pod_spec(&ds), "agent"))
}

fn cleanup_caps() -> Vec<String> {
    let r = render();
    let ds: DaemonSet = typed(&r.uninstall, "DaemonSet", "palisade-cleanup");
    added_caps(container(pod_spec(&ds), "cleanup"))
}

/// The uninstall container's capabilities remove everything: x/b reachable again, no pins.
fn assert_cleanup_restores(scene: &Scene) {
    let caps = cleanup_caps();
    let layout = scene.pins.layout();
    let root = layout.root().to_path_buf();
    let result = scene.node.ns().run(move || {
        confine_thread_to(&caps)?;
        palisade::dataplane::cleanup(&layout).map_err(std::io::Error::other)
    });
    result.expect("cleanup with the uninstall container's capabilities");
    assert!(!root.exists(), "{} left behind", root.display());
    let back = tcp_connect(
        scene.a.ns(),
        scene.b.ip(Family::V4),
        80,
        Duration::from_secs(1),
    );
    assert_eq!(
        back.as_deref(),
        Ok("x/b"),
        "x/b unreachable after the uninstall cleanup"
    );
}

/// With only the DaemonSet's capabilities the agent enforces on a `flavour` node, and the
/// uninstall cleanup restores it.
fn daemonset_capabilities_enforce_then_uninstall(tag: &str, flavour: Flavour, node: &str) {
    require_root();
    let caps = agent_caps(&render().install);
    let scene = Scene::new(tag, flavour);
    scene
        .run_agent(&caps, Duration::from_secs(15))
        .assert_enforced(&format!("{node} node, capabilities {caps:?}"));
    assert_cleanup_restores(&scene);
}

#[test]
fn daemonset_capabilities_enforce_on_a_bridged_node_and_the_uninstall_removes_it() {
    daemonset_capabilities_enforce_then_uninstall("dcbr", Flavour::Bridged, "bridged");
}

#[test]
fn daemonset_capabilities_enforce_on_a_routed_node_and_the_uninstall_removes_it() {
    daemonset_capabilities_enforce_then_uninstall("dcrt", Flavour::Routed, "routed");
}

#[test]
fn each_capability_is_necessary() {
    require_root();
    let r = render();
    // Each one removed: the agent refuses to start, naming what the kernel refused.
    let base = agent_caps(&r.install);
    for (cap, says) in [
        ("BPF", "bpf() unavailable"),
        ("NET_ADMIN", "not permitted to load a tc program"),
        ("PERFMON", "pointer arithmetic"),
        ("NET_BROADCAST", "netlink"),
    ] {
        assert!(base.iter().any(|c| c == cap));
        let without: Vec<String> = base.iter().filter(|c| *c != cap).cloned().collect();
        let scene = Scene::new(
            &format!(
                "dcn{}",
                cap.to_lowercase()
                    .replace('_', "")
                    .chars()
                    .take(6)
                    .collect::<String>()
            ),
            Flavour::Routed,
        );
        let out = scene.run_agent(&without, Duration::from_secs(10));
        out.assert_not_enforced(&format!("routed node without {cap}"));
        let error = out.error.as_deref().unwrap_or_default();
        assert!(
            error.contains(says),
            "without {cap} the agent should fail saying `{says}`: {out:?}"
        );
    }
}
