//! Policies of the upstream netpol model (namespaces x, y, z with label `ns`; pods a, b, c
//! with label `pod`) that more than one tier applies: the e2e agent test enforces them on
//! the wire, the `palisade matrix` test computes them offline, and both must agree.

pub const DENY_INGRESS_X: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {}
"#;

pub const ALLOW_A_FROM_Y_ON_NAMED_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    ports:
    - port: serve-80-tcp
"#;

pub const DENY_EGRESS_Z_C: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress-c, namespace: z}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
"#;
