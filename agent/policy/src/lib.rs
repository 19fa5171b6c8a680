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
//! cidr, live identities by namespace and by the ipBlocks containing them, and per distinct
//! peer set (the `from`/`to` of a rule; shared by every rule with equal peers) the identities
//! it matches — built from the indexes, kept current as classes are born and die. Each
//! local pod's entries are a multiset of contributions, one per (rule, identity, port
//! entry): an entry is in the plan while some rule contributes it. A change then costs what
//! it changes, not what the endpoints hold:
//!
//! * a pod elsewhere whose labels match an existing identity: one identity entry;
//! * an identity born or dying: its own entries on the endpoints whose rules match it;
//! * a policy edited: the rules that differ between the two versions, withdrawn and granted
//!   on the endpoints it selects (equal rules are left alone);
//! * a local pod relabelled: the policies it leaves and joins; added or deleted: its entries.
//!
//! [`Compiler::apply`] returns the [`PlanDiff`] to write to the maps; a property test checks
//! that the diffs, applied one after the other, equal a full compile at every step.

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
pub mod net;
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
