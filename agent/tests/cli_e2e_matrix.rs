//! `palisade matrix --json` (the real binary) on the upstream e2e netpol model — namespaces
//! x, y, z labelled `ns: <name>`, pods a, b, c labelled `pod: <name>` serving TCP and UDP on
//! 80 and 81 — gives the matrix the e2e suite expects, for every policy case of
//! tests/tests/e2e_agent.rs and some more (named ports, endPort, ipBlock except, namespace
//! AND pod selectors). For every pair, `explain` reaches the verdict of the matrix cell.
//!
//! The e2e cases' policies come from `palisade_tests::cases`, which e2e_agent.rs applies
//! on the wire; the expectations are restated here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use palisade::cli::explain::load_manifests;
use palisade_policy::explain::{explain, Subject, Traffic};
use palisade_policy::ObjectRef;
use palisade_tests::cases::{ALLOW_A_FROM_Y_ON_NAMED_80, DENY_EGRESS_Z_C, DENY_INGRESS_X};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn names() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// The model pod's IPv4 address: 198.18.0.10 (x/a) .. 198.18.0.18 (z/c).
fn ipv4(name: &str) -> String {
    let i = names().iter().position(|n| n == name).unwrap();
    format!("198.18.0.{}", 10 + i)
}

fn model_yaml() -> String {
    let mut s = String::new();
    for ns in NAMESPACES {
        s += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    ns: {ns}\n");
    }
    for (i, name) in names().iter().enumerate() {
        let (ns, p) = name.split_once('/').unwrap();
        s += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {p}\n  namespace: {ns}\n  labels:\n    pod: {p}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: \"fd00:198:18::{:x}\"}}]\n",
            0x10 + i,
            v4 = ipv4(name),
        );
    }
    s
}

/// An expected matrix with the e2e harness's vocabulary (`palisade_tests::Matrix`);
/// the diagonal is not judged, as upstream.
#[derive(Clone)]
struct Expect(BTreeMap<(String, String), bool>);

impl Expect {
    fn all(value: bool) -> Expect {
        let mut m = BTreeMap::new();
        for a in names() {
            for b in names() {
                if a != b {
                    m.insert((a.clone(), b), value);
                }
            }
        }
        Expect(m)
    }
    fn set(&mut self, from: &str, to: &str, value: bool) -> &mut Self {
        if from != to {
            self.0.insert((from.into(), to.into()), value);
        }
        self
    }
    fn set_to(&mut self, to: &str, value: bool) -> &mut Self {
        for from in names() {
            self.set(&from, to, value);
        }
        self
    }
    fn set_from(&mut self, from: &str, value: bool) -> &mut Self {
        for to in names() {
            self.set(from, &to, value);
        }
        self
    }
}

/// A manifest directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str, files: &[(&str, &str)]) -> Dir {
        let d = std::env::temp_dir().join(format!("palisade-cli-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("00-model.yaml"), model_yaml()).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Got {
    pods: Vec<String>,
    allowed: Vec<Vec<bool>>,
}

fn matrix(dir: &Path, port: &str) -> Got {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["matrix", "--json", "--port", port, "--manifests"])
        .arg(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "palisade matrix failed: {stderr}");
    // The manifests are valid: nothing to warn about.
    assert_eq!(stderr, "", "unexpected warnings");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t: Traffic = port.parse().unwrap();
    assert_eq!(v["port"], t.port);
    assert_eq!(v["protocol"], t.protocol.as_str());
    let pods: Vec<String> = serde_json::from_value(v["pods"].clone()).unwrap();
    let allowed: Vec<Vec<bool>> = serde_json::from_value(v["allowed"].clone()).unwrap();
    assert_eq!(pods, names(), "pods in ns/name order");
    assert_eq!(allowed.len(), pods.len());
    assert!(allowed.iter().all(|r| r.len() == pods.len()));
    Got { pods, allowed }
}

fn table(cell: impl Fn(usize, usize) -> char) -> String {
    let n = names();
    let mut s = format!("from\\to\t{}\n", n.join("\t"));
    for (i, from) in n.iter().enumerate() {
        s += from;
        for j in 0..n.len() {
            s += &format!("\t{}", cell(i, j));
        }
        s += "\n";
    }
    s
}

/// The matrix equals `want` off the diagonal, and `explain` agrees with every cell.
fn check(case: &str, dir: &Dir, port: &str, want: &Expect) {
    let got = matrix(&dir.0, port);
    let n = got.pods.len();
    let wrong: Vec<String> = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .filter(|&(i, j)| {
            let key = (got.pods[i].clone(), got.pods[j].clone());
            want.0.get(&key).is_some_and(|&w| w != got.allowed[i][j])
        })
        .map(|(i, j)| format!("{} -> {}", got.pods[i], got.pods[j]))
        .collect();
    if !wrong.is_empty() {
        let names = names();
        let expected = table(
            |i, j| match want.0.get(&(names[i].clone(), names[j].clone())) {
                None => '-',
                Some(true) => 'X',
                Some(false) => '.',
            },
        );
        let observed = table(|i, j| if got.allowed[i][j] { 'X' } else { '.' });
        panic!(
            "case {case}, {port}: {} cells differ: {wrong:?}\nexpected:\n{expected}\nmatrix:\n{observed}",
            wrong.len()
        );
    }
    let m = load_manifests(&dir.0, None).unwrap();
    let traffic: Traffic = port.parse().unwrap();
    for (i, from) in got.pods.iter().enumerate() {
        for (j, to) in got.pods.iter().enumerate() {
            let subject = |s: &String| {
                let (ns, name) = s.split_once('/').unwrap();
                Subject::Pod(ObjectRef::new(ns, name))
            };
            let e = explain(&m.cluster, None, &subject(from), &subject(to), traffic).unwrap();
            assert_eq!(
                e.allowed,
                Some(got.allowed[i][j]),
                "case {case}, {port}: explain {from} -> {to} disagrees with the matrix: {e:#?}"
            );
        }
    }
}

/// The sequence of e2e_agent.rs's `policies_change_the_matrix`, state by state.
#[test]
fn matrix_matches_the_e2e_agent_cases() {
    let none = Dir::new("none", &[]);
    check("no policies", &none, "80/TCP", &Expect::all(true));

    let deny = Dir::new("deny", &[("10-deny.yaml", DENY_INGRESS_X)]);
    let mut want = Expect::all(true);
    for p in ["x/a", "x/b", "x/c"] {
        want.set_to(p, false);
    }
    check("deny ingress in x", &deny, "80/TCP", &want);

    let allow = Dir::new(
        "allow",
        &[
            ("10-deny.yaml", DENY_INGRESS_X),
            ("20-allow.yaml", ALLOW_A_FROM_Y_ON_NAMED_80),
        ],
    );
    let mut want80 = want.clone();
    for p in ["y/a", "y/b", "y/c"] {
        want80.set(p, "x/a", true);
    }
    check("+ allow x/a from y on named 80", &allow, "80/TCP", &want80);
    check("+ allow x/a from y on named 80", &allow, "81/TCP", &want);

    let after = Dir::new("after", &[("20-allow.yaml", ALLOW_A_FROM_Y_ON_NAMED_80)]);
    let mut want_after = Expect::all(true);
    want_after.set_to("x/a", false);
    for p in ["y/a", "y/b", "y/c"] {
        want_after.set(p, "x/a", true);
    }
    check("- deny", &after, "80/TCP", &want_after);

    let egress = Dir::new(
        "egress",
        &[
            ("20-allow.yaml", ALLOW_A_FROM_Y_ON_NAMED_80),
            ("30-egress.yaml", DENY_EGRESS_Z_C),
        ],
    );
    want_after.set_from("z/c", false);
    check("+ deny egress z/c", &egress, "80/TCP", &want_after);
}

/// x/a takes UDP on its named port serve-81-udp from everyone: 81/UDP only.
#[test]
fn named_udp_port() {
    let d = Dir::new(
        "named-udp",
        &[(
            "p.yaml",
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: serve-81-udp, protocol: UDP}]
"#,
        )],
    );
    let mut denied = Expect::all(true);
    denied.set_to("x/a", false);
    check("named udp", &d, "81/UDP", &Expect::all(true));
    check("named udp", &d, "80/UDP", &denied);
    check("named udp", &d, "81/TCP", &denied);
}

/// Egress to a named port resolves on each destination pod: z/a may reach port 80
/// (serve-80-tcp) of every pod, and nothing on 81.
#[test]
fn named_port_for_egress_resolves_on_the_destination() {
    let d = Dir::new(
        "named-egress",
        &[(
            "p.yaml",
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-only, namespace: z}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: serve-80-tcp}]
"#,
        )],
    );
    check("named egress", &d, "80/TCP", &Expect::all(true));
    let mut want = Expect::all(true);
    want.set_from("z/a", false);
    check("named egress", &d, "81/TCP", &want);
}

/// x/b takes 80-81 (endPort) from its own namespace only.
#[test]
fn end_port_range() {
    let d = Dir::new(
        "endport",
        &[(
            "p.yaml",
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 80, endPort: 81}]
"#,
        )],
    );
    let mut want = Expect::all(true);
    want.set_to("x/b", false);
    want.set("x/a", "x/b", true).set("x/c", "x/b", true);
    check("endPort", &d, "80/TCP", &want);
    check("endPort", &d, "81/TCP", &want);
    let mut udp = Expect::all(true);
    udp.set_to("x/b", false);
    check("endPort", &d, "80/UDP", &udp);
}

/// y/a may send to the model's /24 except z/b's address.
#[test]
fn ip_block_except() {
    let d = Dir::new(
        "except",
        &[(
            "p.yaml",
            &format!(
                r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: egress-block, namespace: y}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 198.18.0.0/24, except: ["{}/32"]}}}}]
"#,
                ipv4("z/b")
            ),
        )],
    );
    let mut want = Expect::all(true);
    want.set("y/a", "z/b", false);
    check("ipBlock except", &d, "80/TCP", &want);
}

/// One peer with both selectors is an AND (only y/b reaches x/c); two peers are an OR
/// (all of y, and x/b).
#[test]
fn namespace_and_pod_selector() {
    let and = Dir::new(
        "and",
        &[(
            "p.yaml",
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
"#,
        )],
    );
    let mut want = Expect::all(true);
    want.set_to("x/c", false).set("y/b", "x/c", true);
    check("AND", &and, "80/TCP", &want);

    let or = Dir::new(
        "or",
        &[(
            "p.yaml",
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
"#,
        )],
    );
    let mut want = Expect::all(true);
    want.set_to("x/c", false).set("x/b", "x/c", true);
    for p in ["y/a", "y/b", "y/c"] {
        want.set(p, "x/c", true);
    }
    check("OR", &or, "80/TCP", &want);
}
