//! Palisade's NetworkPolicy compiler: Kubernetes objects in, dataplane map entries out.
//! Pure: no IO, no async, no clock.
//!
//! # Identities
//!
//! The tc programs do exactly two LPM lookups per check: peer IP → identity, then
//! (slot, identity, direction, protocol, port) → allow. The compiler gathers every prefix
//! that matters, S = {pod IPs (/32, /128), this node's IPs, every valid ipBlock cidr and
//! except}. For any address, the members of S containing it are exactly the members
//! containing its longest match in S, so the identity stored at a prefix p can stand for a
//! *class*: everything a policy can observe about addresses whose longest match is p —
//!
//! * if p is a pod IP: the pod's namespace, namespace labels, pod labels and named
//!   container ports (the latter resolve egress named ports on the destination);
//! * whether p is one of this node's addresses (`IDENTITY_FLAG_HOST`);
//! * the set of ipBlock peers (cidr minus excepts, deduplicated across policies) containing p.
//!
//! Classes are interned to u32 ids. The empty class is the world, id 0 — also what an
//! address covered by no prefix gets. Pods with identical labels share an id, so a new pod
//! like an existing one costs one identity entry and nothing else. Ids are stable: an id is
//! released only when its class has no member left (then reused from a free list).
//!
//! Per local pod, entries = for every rule of every policy selecting it, for every identity
//! the rule's peers match, the rule's port entries. That grows with policies × local pods ×
//! matched identities, not with the pods of the cluster. A rule without peers (`from`/`to`
//! absent or empty) matches every identity including the world: the POLICY key cannot
//! wildcard the identity, so it expands to one entry set per identity.
//!
//! # Incremental compilation
//!
//! [`Compiler`] keeps the objects plus indexes: prefix → sources and class, ipBlocks by
//! cidr, and per rule the set of identities its peers match (kept current as classes are
//! born and die, computed only for policies that select a local pod). A change marks the
//! prefixes whose class may change and the local endpoints that must be recomputed; class
//! births and deaths then reach the other endpoints as single-identity deltas.
//! [`Compiler::apply`] returns the [`PlanDiff`] to write to the maps.
//!
//! # Semantics choices
//!
//! * **Named ports** resolve on the destination pod: the local pod for ingress, the peer
//!   for egress. For egress, a named port resolves whenever the destination address is a
//!   pod IP declaring that port, however the peer was matched — also via an ipBlock or a
//!   rule without peers. Addresses that are not pods never match a named port. Only
//!   `spec.containers[].ports` are considered.
//! * **hostNetwork pods** are not enforced (they have no pod interface) and are not pod
//!   peers: their IP is the node's IP, and traffic from them is node traffic (always let
//!   into pods of their own node; matched by ipBlocks only elsewhere).
//! * **Terminated pods** (Succeeded/Failed) are neither peers nor enforced; pods without an
//!   IP get no identity and no plan (the dataplane fails closed for them on its own).
//! * **Two live pods with one IP** (inconsistent input): the first by namespace/name wins.
//!
//! # Fail closed
//!
//! A policy with any invalid field is rejected as a whole ([`Rejection`]s name the object
//! and JSON path). It still isolates the pods it selects, in the directions its
//! `policyTypes` give (both if those are invalid; every pod of its namespace if its
//! podSelector is invalid), and allows nothing. Other policies are unaffected.

mod compile;
mod error;
pub mod explain;
mod identity;
mod local;
mod model;
mod net;
mod plan;
mod policy;
mod ports;
pub mod reference;
mod selector;

pub use compile::{compile, Change, Compiler};
pub use error::Rejection;
pub use identity::{IdentityClass, PodAttrs};
pub use local::{LocalPod, LocalPods};
pub use model::{ObjectRef, PodRef, PolicyRef};
pub use plan::{
    CanonicalPlan, Check, EndpointDiff, EndpointHeader, EndpointPlan, Plan, PlanDiff, PolicyEntry,
};
pub use policy::IpBlock;
pub use ports::{port_blocks, NamedPort};
pub use selector::NAMESPACE_NAME_LABEL;
