//! Synthetic cluster manifests for the agent benchmarks: namespaces, pods (local ones
//! with real interfaces, the rest manifest-only on other nodes) and NetworkPolicies, as
//! the manifest files the agent reads. Pure text generation.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

pub const NAMESPACES: usize = 100;
pub const APPS: usize = 10;
/// Namespace of the probe and target pods.
pub const BENCH_NS: &str = "bench";
pub const PROBE_PORT: u16 = 7000;

/// A pod on this node, with the address its interface really has.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub ipv4: Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
}

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:02}")
}

/// Addresses for manifest-only pods, all inside 198.18.0.0/15 and clear of node pod
/// subnets (198.18.1–63.0/24) and the test underlay (198.19.255.0/24). Capacity 114,688.
pub fn remote_ip(i: usize) -> Option<Ipv4Addr> {
    let ranges: [(Ipv4Addr, usize); 3] = [
        (Ipv4Addr::new(198, 19, 0, 0), 255 * 256),
        (Ipv4Addr::new(198, 18, 128, 0), 128 * 256),
        (Ipv4Addr::new(198, 18, 64, 0), 64 * 256),
    ];
    let mut i = i;
    for (base, len) in ranges {
        if i < len {
            return Some(Ipv4Addr::from(u32::from(base) + i as u32));
        }
        i -= len;
    }
    None
}

pub fn namespaces_yaml() -> String {
    let mut s = String::new();
    let names = (0..NAMESPACES).map(ns_name).chain([BENCH_NS.to_string()]);
    for n in names {
        let _ = writeln!(
            s,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, labels: {{name: {n}}}}}"
        );
    }
    s
}

fn pod_doc(
    s: &mut String,
    ns: &str,
    name: &str,
    labels: &[(String, String)],
    node: &str,
    ips: &[String],
) {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    let _ = writeln!(
        s,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: app, ports: [{{name: http, containerPort: 8080, protocol: TCP}}]}}]}}\n\
         status: {{phase: Running, podIP: \"{}\", podIPs: [{}]}}",
        labels.join(", "),
        ips[0],
        pod_ips.join(", ")
    );
}

/// The local pods spread over the namespaces (and the two bench pods).
pub fn local_pods_yaml(pods: &[LocalPod], node: &str) -> String {
    let mut s = String::new();
    for p in pods {
        pod_doc(
            &mut s,
            &p.namespace,
            &p.name,
            &p.labels,
            node,
            &[p.ipv4.to_string(), p.ipv6.to_string()],
        );
    }
    s
}

/// Manifest-only pods `from..to` of the cluster, on 50 other nodes.
pub fn remote_pods_yaml(from: usize, to: usize) -> String {
    let mut s = String::with_capacity((to - from) * 330);
    for i in from..to {
        let ip = remote_ip(i).expect("address plan covers the pod count");
        let labels = [(
            "app".to_string(),
            format!("app-{}", (i / NAMESPACES) % APPS),
        )];
        pod_doc(
            &mut s,
            &ns_name(i % NAMESPACES),
            &format!("r-{i}"),
            &labels,
            &format!("remote-{}", i % 50),
            &[ip.to_string()],
        );
    }
    s
}

/// Two policies per namespace: same-namespace ingress on 8080 for every pod, and app-0
/// open to app-1 of the next namespace on 9000.
pub fn policies_yaml() -> String {
    let mut s = String::new();
    for i in 0..NAMESPACES {
        let ns = ns_name(i);
        let next = ns_name((i + 1) % NAMESPACES);
        let _ = writeln!(
            s,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: allow-same-ns, namespace: {ns}}}\n\
             spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{}}}}], ports: [{{protocol: TCP, port: 8080}}]}}]}}\n\
             ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: allow-app, namespace: {ns}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: app-0}}}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{name: {next}}}}}, podSelector: {{matchLabels: {{app: app-1}}}}}}], ports: [{{protocol: TCP, port: 9000}}]}}]}}"
        );
    }
    s
}

/// The policy the latency benchmark flips: the target pod accepts UDP `PROBE_PORT` from
/// the probe pod (`allow`) or from a label no pod has (still isolated, probe denied).
pub fn probe_policy_yaml(allow: bool) -> String {
    let from = if allow { "probe" } else { "nobody" };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: probe-target, namespace: {BENCH_NS}}}\n\
         spec: {{podSelector: {{matchLabels: {{role: target}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{role: {from}}}}}}}], ports: [{{protocol: UDP, port: {PROBE_PORT}}}]}}]}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_addresses_are_distinct_and_in_range() {
        let net: ipnetwork::Ipv4Network = "198.18.0.0/15".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let ip = remote_ip(i).unwrap();
            assert!(net.contains(ip));
            assert!(seen.insert(ip));
            let o = ip.octets();
            assert!(!(o[0..2] == [198, 19] && o[2] == 255), "{ip} in underlay");
            assert!(
                !(o[0..2] == [198, 18] && o[2] < 64),
                "{ip} in a node subnet"
            );
        }
        assert!(remote_ip(114_688).is_none());
    }

    #[test]
    fn generated_documents_count() {
        assert_eq!(remote_pods_yaml(0, 250).matches("kind: Pod").count(), 250);
        assert_eq!(policies_yaml().matches("kind: NetworkPolicy").count(), 200);
        assert_eq!(namespaces_yaml().matches("kind: Namespace").count(), 101);
        assert!(probe_policy_yaml(true).contains("role: probe"));
        assert!(probe_policy_yaml(false).contains("role: nobody"));
    }

    /// The agent's own loader accepts every generated object, so the benchmark measures
    /// the cluster it claims to.
    #[test]
    fn the_agent_loads_every_generated_object() {
        let dir =
            std::env::temp_dir().join(format!("palisade-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let local = LocalPod {
            namespace: BENCH_NS.into(),
            name: "probe".into(),
            labels: vec![("role".into(), "probe".into())],
            ipv4: Ipv4Addr::new(198, 18, 9, 2),
            ipv6: "fd00:198:18:9::2".parse().unwrap(),
        };
        let files = [
            ("00-namespaces.yaml", namespaces_yaml()),
            ("10-local.yaml", local_pods_yaml(&[local], "n1")),
            ("20-remote.yaml", remote_pods_yaml(0, 500)),
            ("30-policies.yaml", policies_yaml()),
            ("50-probe.yaml", probe_policy_yaml(true)),
        ];
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let snap = palisade::source::load_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(snap.namespaces.len(), 101);
        assert_eq!(snap.pods.len(), 501);
        assert_eq!(snap.policies.len(), 201);
    }
}
