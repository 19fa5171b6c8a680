//! Palisade: a Kubernetes NetworkPolicy enforcer. The binary is thin; this library holds
//! the dataplane (aya), the sources and the agent loop so tests drive them directly. The
//! NetworkPolicy semantics live in the pure `palisade-policy` crate.

pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod source;

pub use palisade_common as common;
