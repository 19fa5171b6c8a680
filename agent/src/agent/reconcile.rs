//! Applying the compiler's diffs to the kernel, and the bookkeeping the compiler leaves to
//! the dataplane: which slot and which interface each local pod has.
//!
//! Order of writes, so that every packet sees a consistent state:
//! 1. new allow entries, 2. identity updates, 3. endpoint headers and attachment,
//! 4. removed allow entries, 5. removed identities, 6. gone endpoints.
//!
//! A pod's interface gets its ENDPOINTS entry (isolation flags) only after all its allow
//! entries are in, and the programs only after that, so its first judged packet already
//! sees its complete policy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use palisade_common::{Endpoint, MAX_ENDPOINTS};
use palisade_policy::{PlanDiff, PodRef};

use super::netdev;
use crate::dataplane::{attached_ifindexes, detach, Dataplane, DataplaneError, Maps};

/// A local pod as the dataplane knows it.
#[derive(Clone, Debug)]
pub struct LocalEndpoint {
    pub slot: u32,
    pub ifindex: Option<u32>,
    pub flags: u32,
    pub ips: Vec<IpAddr>,
}

pub struct Reconciler {
    pub dp: Dataplane,
    pub maps: Maps,
    pub endpoints: BTreeMap<PodRef, LocalEndpoint>,
    /// ENDPOINTS as an earlier agent left them (ifindex -> endpoint): slots are reused so
    /// the allow entries already in the kernel stay valid through a restart.
    inherited: BTreeMap<u32, Endpoint>,
    used_slots: BTreeSet<u32>,
}

impl Reconciler {
    pub fn new(dp: Dataplane, maps: Maps) -> Self {
        let inherited: BTreeMap<u32, Endpoint> =
            maps.endpoints.iter().filter_map(Result::ok).collect();
        let used_slots = inherited.values().map(|e| e.slot).collect();
        Self {
            dp,
            maps,
            endpoints: BTreeMap::new(),
            inherited,
            used_slots,
        }
    }

    fn alloc_slot(&mut self, ifindex: Option<u32>) -> Result<u32, DataplaneError> {
        if let Some(ep) = ifindex.and_then(|i| self.inherited.remove(&i)) {
            return Ok(ep.slot);
        }
        let slot = (0..MAX_ENDPOINTS)
            .find(|s| !self.used_slots.contains(s))
            .ok_or(DataplaneError::Map {
                name: palisade_common::maps::ENDPOINTS,
                source: Box::new(aya::maps::MapError::OutOfBounds {
                    index: MAX_ENDPOINTS,
                    max_entries: MAX_ENDPOINTS,
                }),
            })?;
        self.used_slots.insert(slot);
        self.maps.reset_counters(slot)?;
        Ok(slot)
    }

    pub fn apply(&mut self, diff: &PlanDiff) -> Result<(), DataplaneError> {
        // Slots (and, where possible, interfaces) for new endpoints first.
        let new: Vec<(&PodRef, Vec<IpAddr>)> = diff
            .endpoints
            .iter()
            .filter(|(pod, d)| d.header.is_some() && !self.endpoints.contains_key(*pod))
            .map(|(pod, d)| {
                (
                    pod,
                    d.header.as_ref().map(|h| h.ips.clone()).unwrap_or_default(),
                )
            })
            .collect();
        let all_ips: Vec<IpAddr> = new.iter().flat_map(|(_, ips)| ips.clone()).collect();
        let wired = if all_ips.is_empty() {
            BTreeMap::new()
        } else {
            netdev::resolve(&all_ips)
        };
        for (pod, ips) in new {
            let ifindex = ips.iter().find_map(|ip| wired.get(ip).copied());
            let slot = self.alloc_slot(ifindex)?;
            self.endpoints.insert(
                pod.clone(),
                LocalEndpoint {
                    slot,
                    ifindex,
                    flags: 0,
                    ips,
                },
            );
        }

        // 1. New allow entries.
        for (pod, d) in &diff.endpoints {
            let Some(ep) = self.endpoints.get(pod) else {
                continue;
            };
            for e in &d.added {
                let (prefix, key) = e.lpm_key(ep.slot);
                self.maps.insert_policy(prefix, key)?;
            }
        }
        // 2. Identity updates.
        for (net, v) in identity_changes(diff) {
            if let Some(v) = v {
                self.maps.set_identity(net, v)?;
            }
        }
        // 3. Endpoint headers, then programs.
        for (pod, d) in &diff.endpoints {
            let Some(h) = &d.header else { continue };
            if let Some(ep) = self.endpoints.get_mut(pod) {
                ep.flags = h.flags;
                ep.ips = h.ips.clone();
            }
            self.program_endpoint(pod)?;
        }
        // 4. Removed allow entries.
        for (pod, d) in &diff.endpoints {
            let Some(ep) = self.endpoints.get(pod) else {
                continue;
            };
            for e in &d.removed {
                let (prefix, key) = e.lpm_key(ep.slot);
                self.maps.remove_policy(prefix, key)?;
            }
        }
        // 5. Removed identities.
        for (net, v) in identity_changes(diff) {
            if v.is_none() {
                self.maps.remove_identity(net)?;
            }
        }
        // 6. Gone endpoints.
        for (pod, d) in &diff.endpoints {
            if d.header.is_none() {
                if let Some(ep) = self.endpoints.remove(pod) {
                    if let Some(ifindex) = ep.ifindex {
                        self.maps.remove_endpoint(ifindex)?;
                        detach(self.dp.layout(), ifindex)?;
                    }
                    self.used_slots.remove(&ep.slot);
                }
            }
        }
        Ok(())
    }

    /// Writes the ENDPOINTS entry and attaches the programs, if the interface is known.
    fn program_endpoint(&mut self, pod: &PodRef) -> Result<(), DataplaneError> {
        let Some(ep) = self.endpoints.get(pod) else {
            return Ok(());
        };
        let Some(ifindex) = ep.ifindex else {
            return Ok(());
        };
        let entry = Endpoint {
            slot: ep.slot,
            flags: ep.flags,
        };
        self.maps.set_endpoint(ifindex, entry)?;
        self.dp.attach(ifindex)?;
        tracing::debug!(pod = %pod, ifindex, slot = entry.slot, flags = entry.flags, "endpoint programmed");
        Ok(())
    }

    /// Looks again for the interfaces of local pods not wired yet; returns how many were
    /// found and programmed.
    pub fn resolve_pending(&mut self) -> Result<usize, DataplaneError> {
        let pending: Vec<(PodRef, Vec<IpAddr>)> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.ifindex.is_none() && !e.ips.is_empty())
            .map(|(p, e)| (p.clone(), e.ips.clone()))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let ips: Vec<IpAddr> = pending.iter().flat_map(|(_, ips)| ips.clone()).collect();
        let wired = netdev::resolve(&ips);
        let mut n = 0;
        for (pod, ips) in pending {
            if let Some(ifindex) = ips.iter().find_map(|ip| wired.get(ip).copied()) {
                if let Some(ep) = self.endpoints.get_mut(&pod) {
                    ep.ifindex = Some(ifindex);
                }
                tracing::info!(pod = %pod, ifindex, "pod interface found");
                self.program_endpoint(&pod)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// After the first full sync: removes what an earlier agent left that the current plan
    /// does not want (entries of deleted pods and policies, links of gone interfaces).
    pub fn collect_garbage(&mut self, plan: &palisade_policy::Plan) -> Result<(), DataplaneError> {
        let ours: BTreeSet<u32> = self.endpoints.values().filter_map(|e| e.ifindex).collect();
        for (ifindex, _) in std::mem::take(&mut self.inherited) {
            if !ours.contains(&ifindex) {
                self.maps.remove_endpoint(ifindex)?;
            }
        }
        for ifindex in attached_ifindexes(self.dp.layout()) {
            if !ours.contains(&ifindex) {
                detach(self.dp.layout(), ifindex)?;
            }
        }
        self.used_slots = self.endpoints.values().map(|e| e.slot).collect();

        let mut wanted = BTreeSet::new();
        for (pod, ep) in &self.endpoints {
            if let Some(p) = plan.endpoints.get(pod) {
                for e in &p.entries {
                    let (prefix, key) = e.lpm_key(ep.slot);
                    wanted.insert((prefix, key));
                }
            }
        }
        let stale: Vec<_> = self
            .maps
            .policy
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .filter(|k| !wanted.contains(k))
            .collect();
        for (prefix, key) in stale {
            self.maps.remove_policy(prefix, key)?;
        }
        let stale4: Vec<IpNetwork> = self
            .maps
            .identity_v4
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let net =
                    ipnetwork::Ipv4Network::new(k.data().into(), k.prefix_len() as u8).ok()?;
                (!plan.identities_v4.contains_key(&net)).then_some(IpNetwork::V4(net))
            })
            .collect();
        let stale6: Vec<IpNetwork> = self
            .maps
            .identity_v6
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let net =
                    ipnetwork::Ipv6Network::new(k.data().into(), k.prefix_len() as u8).ok()?;
                (!plan.identities_v6.contains_key(&net)).then_some(IpNetwork::V6(net))
            })
            .collect();
        for net in stale4.into_iter().chain(stale6) {
            self.maps.remove_identity(net)?;
        }
        Ok(())
    }
}

/// Both identity tries' changes as one sequence: the writes are the same for either family.
fn identity_changes(
    diff: &PlanDiff,
) -> impl Iterator<Item = (IpNetwork, Option<palisade_common::IdentityValue>)> + '_ {
    let v4 = diff
        .identities_v4
        .iter()
        .map(|(n, v)| (IpNetwork::V4(*n), *v));
    let v6 = diff
        .identities_v6
        .iter()
        .map(|(n, v)| (IpNetwork::V6(*n), *v));
    v4.chain(v6)
}
