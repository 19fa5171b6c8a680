//! `ports` of a rule: protocols, numeric ports and ranges, named ports, and the split of a
//! range into the aligned blocks an LPM key can express.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicyPort;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::error::FieldError;

/// What a port spec matches within its protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum PortMatch {
    All,
    /// Inclusive.
    Range(u16, u16),
    /// Resolved on the destination pod's containers.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PortSpec {
    pub proto: u8,
    pub port: PortMatch,
}

/// A named container port of a pod: (name, protocol, number).
pub type NamedPort = (String, u8, u16);

pub(crate) fn parse_protocol(p: Option<&str>) -> Option<u8> {
    match p {
        None | Some("TCP") => Some(PROTO_TCP),
        Some("UDP") => Some(PROTO_UDP),
        Some("SCTP") => Some(PROTO_SCTP),
        Some(_) => None,
    }
}

/// IANA_SVC_NAME as the API server validates it: what a named port may look like.
pub(crate) fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(crate) fn parse(p: &NetworkPolicyPort, path: &str) -> Result<PortSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let proto = parse_protocol(p.protocol.as_deref());
    if proto.is_none() {
        errors.push(FieldError::new(
            format!("{path}.protocol"),
            format!(
                "unknown protocol {:?} (expected TCP, UDP or SCTP)",
                p.protocol.as_deref().unwrap_or_default()
            ),
        ));
    }
    let in_range = |n: i32| (1..=65535).contains(&n);
    let port = match (&p.port, p.end_port) {
        (None, None) => Some(PortMatch::All),
        (None, Some(_)) => {
            errors.push(FieldError::new(
                format!("{path}.endPort"),
                "endPort requires a numeric port",
            ));
            None
        }
        (Some(IntOrString::Int(n)), end) => {
            let mut ok = true;
            if !in_range(*n) {
                errors.push(FieldError::new(
                    format!("{path}.port"),
                    format!("port {n} is out of range 1..=65535"),
                ));
                ok = false;
            }
            let end = match end {
                None => Some(*n),
                Some(e) if !in_range(e) => {
                    errors.push(FieldError::new(
                        format!("{path}.endPort"),
                        format!("endPort {e} is out of range 1..=65535"),
                    ));
                    None
                }
                Some(e) if e < *n => {
                    errors.push(FieldError::new(
                        format!("{path}.endPort"),
                        format!("endPort {e} is less than port {n}"),
                    ));
                    None
                }
                Some(e) => Some(e),
            };
            match end {
                Some(e) if ok => Some(PortMatch::Range(*n as u16, e as u16)),
                _ => None,
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                errors.push(FieldError::new(
                    format!("{path}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
            if !is_port_name(name) {
                errors.push(FieldError::new(
                    format!("{path}.port"),
                    format!("{name:?} is neither a number nor a valid port name"),
                ));
            }
            Some(PortMatch::Named(name.clone()))
        }
    };
    match (proto, port) {
        (Some(proto), Some(port)) if errors.is_empty() => Ok(PortSpec { proto, port }),
        _ => Err(errors),
    }
}

/// The named ports a pod declares on its containers. Invalid entries are skipped: they can
/// only make a named port resolve to nothing, never to a wrong number.
pub(crate) fn named_ports(pod: &Pod) -> Vec<NamedPort> {
    let mut out: Vec<NamedPort> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.as_ref()?;
            let proto = parse_protocol(p.protocol.as_deref())?;
            let port = u16::try_from(p.container_port).ok().filter(|&n| n != 0)?;
            Some((name.clone(), proto, port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Splits `lo..=hi` into the fewest aligned power-of-two blocks, as (first port, prefix bits
/// of the 16-bit port). At most 30 blocks for any range.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest block starting at `lo` that is aligned and stays within the range.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(blocks: &[(u16, u8)]) -> Vec<u32> {
        let mut v: Vec<u32> = blocks
            .iter()
            .flat_map(|&(p, bits)| {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(p) % size, 0, "block {p}/{bits} is not aligned");
                u32::from(p)..u32::from(p) + size
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn port_blocks_cover_exactly_the_range() {
        for (lo, hi) in [
            (1, 65535),
            (0, 65535),
            (80, 80),
            (1000, 2000),
            (32768, 65535),
            (3, 4),
        ] {
            let b = port_blocks(lo, hi);
            assert!(b.len() <= 30, "{lo}..={hi}: {} blocks", b.len());
            assert_eq!(
                expand(&b),
                (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>()
            );
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(8080, 8080), vec![(8080, 16)]);
    }

    #[test]
    fn port_names_follow_iana_svc_name() {
        assert!(is_port_name("http"));
        assert!(is_port_name("web-8080"));
        assert!(!is_port_name("80"));
        assert!(!is_port_name("Http"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("abcdefghijklmnop"));
    }
}
