//! What the dataplane maps must contain, and a simulator of the programs' lookups.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::{
    IdentityValue, PolicyKey, DIR_EGRESS, DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS,
    IDENTITY_FLAG_HOST, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};

use crate::error::Rejection;
use crate::identity::IdentityClass;
use crate::model::{PodRef, PolicyRef};
use crate::net;

/// One allow entry of a local pod, independent of the slot the dataplane gives the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// Peer identity (first, so all entries of one identity are one range).
    pub identity: u32,
    pub dir: u8,
    /// `None` = every protocol and port.
    pub proto: Option<u8>,
    /// First port of an aligned block; 0 when the block is all ports or `proto` is None.
    pub port: u16,
    /// How many leading bits of `port` are fixed: 0 = all ports, 16 = exactly `port`.
    pub port_prefix_bits: u8,
}

impl PolicyEntry {
    /// The POLICY map key (prefix length, key) of this entry for the pod in `slot`.
    pub fn lpm_key(&self, slot: u32) -> (u32, PolicyKey) {
        match self.proto {
            None => (
                POLICY_PREFIX_ANY_PROTO,
                PolicyKey::new(slot, self.identity, self.dir, 0, 0),
            ),
            Some(p) => (
                POLICY_PREFIX_ANY_PORT + u32::from(self.port_prefix_bits),
                PolicyKey::new(slot, self.identity, self.dir, p, self.port),
            ),
        }
    }
}

/// The enforcement plan of one local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPlan {
    pub ips: Vec<IpAddr>,
    /// `EP_ISOLATED_*` bits.
    pub flags: u32,
    pub entries: BTreeSet<PolicyEntry>,
}

impl EndpointPlan {
    pub fn header(&self) -> EndpointHeader {
        EndpointHeader {
            ips: self.ips.clone(),
            flags: self.flags,
        }
    }
}

/// Everything the dataplane maps of one node must hold.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub identities_v4: BTreeMap<Ipv4Network, IdentityValue>,
    pub identities_v6: BTreeMap<Ipv6Network, IdentityValue>,
    pub endpoints: BTreeMap<PodRef, EndpointPlan>,
    /// Problems of rejected policies, by policy.
    pub rejections: BTreeMap<PolicyRef, Vec<Rejection>>,
    /// What each identity id in use stands for (id 0, the world, is not listed).
    pub classes: BTreeMap<u32, Arc<IdentityClass>>,
}

/// An endpoint's header (ENDPOINTS map value minus the slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointHeader {
    pub ips: Vec<IpAddr>,
    pub flags: u32,
}

/// Changes to one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointDiff {
    /// New header; `None` = the endpoint is gone (its removed entries are all listed).
    pub header: Option<EndpointHeader>,
    /// The header differs from before (or the endpoint is new).
    pub header_changed: bool,
    pub added: Vec<PolicyEntry>,
    pub removed: Vec<PolicyEntry>,
}

/// The map updates that take the previous plan to the current one. Values `None` delete.
#[derive(Clone, Debug, Default)]
pub struct PlanDiff {
    pub identities_v4: BTreeMap<Ipv4Network, Option<IdentityValue>>,
    pub identities_v6: BTreeMap<Ipv6Network, Option<IdentityValue>>,
    pub endpoints: BTreeMap<PodRef, EndpointDiff>,
    /// New rejections of a policy (`None` = it has none any more).
    pub rejections: BTreeMap<PolicyRef, Option<Vec<Rejection>>>,
    /// Identity classes created (`Some`) or released (`None`).
    pub classes: BTreeMap<u32, Option<Arc<IdentityClass>>>,
}

impl PlanDiff {
    pub fn is_empty(&self) -> bool {
        self.identities_v4.is_empty()
            && self.identities_v6.is_empty()
            && self.endpoints.is_empty()
            && self.rejections.is_empty()
            && self.classes.is_empty()
    }

    /// Number of map writes (identity entries + endpoint headers + policy entries).
    pub fn len(&self) -> usize {
        self.identities_v4.len()
            + self.identities_v6.len()
            + self
                .endpoints
                .values()
                .map(|e| usize::from(e.header_changed) + e.added.len() + e.removed.len())
                .sum::<usize>()
    }
}

/// Result of one simulated enforcement check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    NotIsolated,
    FromHost,
    Allowed,
    Denied,
}

impl Check {
    pub fn passes(self) -> bool {
        !matches!(self, Check::Denied)
    }
}

fn key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    // The fields already hold big-endian values; their memory order is the wire order.
    b[0..4].copy_from_slice(&k.slot.to_ne_bytes());
    b[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    b[8] = k.dir;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.port.to_ne_bytes());
    b
}

fn prefix_matches(prefix_len: u32, entry: &[u8; 12], key: &[u8; 12]) -> bool {
    let full = (prefix_len / 8) as usize;
    if entry[..full] != key[..full] {
        return false;
    }
    let rest = prefix_len % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        entry[full] & mask == key[full] & mask
    }
}

impl Plan {
    /// Total entries over all maps (identities + endpoints + policy entries).
    pub fn map_entries(&self) -> usize {
        self.identities_v4.len()
            + self.identities_v6.len()
            + self.endpoints.len()
            + self
                .endpoints
                .values()
                .map(|e| e.entries.len())
                .sum::<usize>()
    }

    /// Longest-prefix match of `ip` in the identity tries, as the programs do it.
    pub fn identity_of(&self, ip: IpAddr) -> IdentityValue {
        for len in (0..=net::max_len(ip)).rev() {
            let hit = match net::truncate(ip, len) {
                IpNetwork::V4(n) => self.identities_v4.get(&n),
                IpNetwork::V6(n) => self.identities_v6.get(&n),
            };
            if let Some(v) = hit {
                return *v;
            }
        }
        IdentityValue::default()
    }

    /// The local endpoint owning `ip` (what the programs learn from the interface).
    pub fn endpoint_of(&self, ip: IpAddr) -> Option<(&PodRef, &EndpointPlan)> {
        self.endpoints.iter().find(|(_, e)| e.ips.contains(&ip))
    }

    /// One check of `ep` in `dir` against `peer`, exactly as the programs perform it: one
    /// identity LPM lookup and one POLICY LPM lookup at full length.
    pub fn check(&self, ep: &EndpointPlan, dir: u8, peer: IpAddr, proto: u8, port: u16) -> Check {
        let bit = if dir == DIR_INGRESS {
            EP_ISOLATED_INGRESS
        } else {
            EP_ISOLATED_EGRESS
        };
        if ep.flags & bit == 0 {
            return Check::NotIsolated;
        }
        let id = self.identity_of(peer);
        if dir == DIR_INGRESS && id.flags & IDENTITY_FLAG_HOST != 0 {
            return Check::FromHost;
        }
        // Any slot will do: the map is per slot, and the simulation looks at one endpoint.
        let key = key_bytes(&PolicyKey::new(0, id.id, dir, proto, port));
        let hit = ep.entries.iter().any(|e| {
            let (len, k) = e.lpm_key(0);
            debug_assert!(len <= POLICY_PREFIX_FULL);
            prefix_matches(len, &key_bytes(&k), &key)
        });
        if hit {
            Check::Allowed
        } else {
            Check::Denied
        }
    }

    /// Whether this node lets a connection from `src` to `dst` through: the egress check of
    /// the source if it is a local pod and the ingress check of the destination if it is.
    /// `port` is 0 for protocols without ports.
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        let egress = self
            .endpoint_of(src)
            .is_none_or(|(_, ep)| self.check(ep, DIR_EGRESS, dst, proto, port).passes());
        let ingress = self
            .endpoint_of(dst)
            .is_none_or(|(_, ep)| self.check(ep, DIR_INGRESS, src, proto, port).passes());
        egress && ingress
    }

    /// Applies `diff` as the dataplane would; `plan.apply_diff(&c.apply(x))` keeps a copy in
    /// step with the compiler.
    pub fn apply_diff(&mut self, diff: &PlanDiff) {
        for (k, v) in &diff.identities_v4 {
            match v {
                Some(v) => self.identities_v4.insert(*k, *v),
                None => self.identities_v4.remove(k),
            };
        }
        for (k, v) in &diff.identities_v6 {
            match v {
                Some(v) => self.identities_v6.insert(*k, *v),
                None => self.identities_v6.remove(k),
            };
        }
        for (pod, d) in &diff.endpoints {
            let Some(h) = &d.header else {
                self.endpoints.remove(pod);
                continue;
            };
            let ep = self.endpoints.entry(pod.clone()).or_default();
            ep.ips.clone_from(&h.ips);
            ep.flags = h.flags;
            for e in &d.removed {
                ep.entries.remove(e);
            }
            ep.entries.extend(d.added.iter().copied());
        }
        for (p, r) in &diff.rejections {
            match r {
                Some(r) => self.rejections.insert(p.clone(), r.clone()),
                None => self.rejections.remove(p),
            };
        }
        for (id, c) in &diff.classes {
            match c {
                Some(c) => self.classes.insert(*id, c.clone()),
                None => self.classes.remove(id),
            };
        }
    }

    /// The plan with identity ids replaced by what they stand for, so plans that number
    /// identities differently compare equal when they enforce the same thing.
    pub fn canonical(&self) -> CanonicalPlan {
        let class = |id: u32| -> Option<Arc<IdentityClass>> {
            if id == palisade_common::IDENTITY_WORLD {
                None
            } else {
                Some(
                    self.classes
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| panic!("identity {id} has no class")),
                )
            }
        };
        let mut identities = BTreeMap::new();
        for (k, v) in &self.identities_v4 {
            identities.insert(IpNetwork::V4(*k), (class(v.id), v.flags));
        }
        for (k, v) in &self.identities_v6 {
            identities.insert(IpNetwork::V6(*k), (class(v.id), v.flags));
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|(p, e)| {
                let entries = e
                    .entries
                    .iter()
                    .map(|x| {
                        (
                            class(x.identity),
                            x.dir,
                            x.proto,
                            x.port,
                            x.port_prefix_bits,
                        )
                    })
                    .collect();
                (p.clone(), (e.ips.clone(), e.flags, entries))
            })
            .collect();
        CanonicalPlan {
            identities,
            endpoints,
            rejections: self.rejections.clone(),
        }
    }
}

type CanonicalEntry = (Option<Arc<IdentityClass>>, u8, Option<u8>, u16, u8);

/// See [`Plan::canonical`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalPlan {
    pub identities: BTreeMap<IpNetwork, (Option<Arc<IdentityClass>>, u32)>,
    #[allow(clippy::type_complexity)]
    pub endpoints: BTreeMap<PodRef, (Vec<IpAddr>, u32, BTreeSet<CanonicalEntry>)>,
    pub rejections: BTreeMap<PolicyRef, Vec<Rejection>>,
}

pub(crate) const DIRS: [u8; 2] = [DIR_INGRESS, DIR_EGRESS];
