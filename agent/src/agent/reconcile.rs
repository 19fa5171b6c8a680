//! Applying the compiler's diffs to the kernel, and the bookkeeping the compiler leaves to
//! the dataplane: which slot and which interface each local pod has, and the quarantine of
//! interfaces that cannot be told apart yet.
//!
//! Order of writes, so that every packet sees a consistent state:
//! 1. new allow entries, 2. identity updates (longest prefix first), 3. endpoint headers,
//! 4. removed allow entries, 5. removed identities, 6. gone endpoints,
//! 7. interfaces: bind found ones, quarantine unknown ones (see below).
//!
//! A pod's interface gets its ENDPOINTS entry (isolation flags) only after all its allow
//! entries are in, and the programs only after that, so its first judged packet already
//! sees its complete policy.
//!
//! # Full maps
//!
//! A write a full map refuses is left out, not fatal: the rest of the diff is applied in
//! the same order, the entry is remembered in [`Shortfall`] and written again at the end
//! of every later [`Reconciler::apply`] (after its removals freed room), and the status and
//! metrics name the map until then. Leaving entries out only ever allows less: a missing
//! allow entry is a drop; identity prefixes that a missing prefix would fall back on with
//! more rights are withheld ([`super::shortfall`]); the isolation header does not depend on
//! the allow entries. A pod that gets no slot or no ENDPOINTS entry is not bound: while it
//! would be isolated its interface stays in quarantine (isolated, nothing allowed), if the
//! quarantine entry itself fits.
//!
//! # Fail closed from the first packet: quarantine
//!
//! The CNI creates a pod's interface (and gives it its IP) before the source reports the
//! pod's IP, and the pod may send as soon as CNI ADD returns. So the agent does not wait
//! to know whose an interface is:
//!
//! * **Awaiting pods** are the live local pods (`spec.nodeName` is this node, not
//!   hostNetwork, not terminated) not bound to an interface: no IP reported yet, or no
//!   interface found for it yet, or their interface vanished.
//! * The **quarantine flags** are the union of the isolation that the policies of their
//!   namespaces give the awaiting pods (by podSelector and policyTypes, as the compiler
//!   does; a rejected policy counts). Zero when no awaiting pod would be isolated.
//! * Every pod-like interface ([`super::netdev`]) that is not bound to a pod is, while the
//!   quarantine flags are not zero, attached at once (on its `RTM_NEWLINK`) with the
//!   ENDPOINTS entry `{slot: QUARANTINE_SLOT, flags: quarantine flags}`: isolated in those
//!   directions with no allow entry at all (traffic from the node's own addresses still
//!   passes, as for every isolated pod). Its drops are counted under that slot.
//! * It is **released** when it is identified (it holds the IP of a local pod the compiler
//!   planned): its pod's entry replaces the quarantine entry in one map update; or when
//!   no awaiting pod would be isolated any more: the entry and programs are removed.
//! * **IP reuse**: a pod whose interface vanished and that has not been updated by the
//!   source since keeps its IP only as a stale claim: while another local pod is still
//!   waiting for its IP, a new interface holding that IP stays quarantined (it may be the
//!   new pod's, reusing the IP) until the source says who holds it; otherwise it is bound
//!   back to the pod (its sandbox was recreated).
//!
//! The window left open: an interface that appears while no awaiting pod would be
//! isolated, or before the source has told the agent about its pod at all, is not
//! quarantined; and the agent must see `RTM_NEWLINK` before the pod's first packet (the
//! CNI still has to configure addresses and routes after creating the interface, and the
//! pod's process starts only after CNI ADD returns, but nothing makes the kernel wait for
//! the agent). Measured on a loaded 2-core machine (debug build, `first_packet_race_*` in
//! `tests/tests/e2e_netpol_interfaces.rs`): the agent's entry lands ~2 ms (p50) after the
//! interface appears; a sender already running in the pod namespace *before* CNI ADD got
//! a datagram through in 2-18% of attempts; a sender started when ADD returns, never.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use palisade_common::{maps as names, Endpoint, MAX_ENDPOINTS};
use palisade_policy::{Change, LocalPods, Plan, PlanDiff, PodRef};

use super::links::{NetlinkError, Query};
use super::netdev::{Event, HostNet};
use super::shortfall::{self, Shortfall};
use crate::dataplane::{
    attached_ifindexes, identity_map, policy_map, Dataplane, DataplaneError, Maps,
};

/// The maps the reconciler writes, whose fill and shortfall the status reports.
pub const WRITTEN_MAPS: [&str; 7] = [
    names::ENDPOINTS,
    names::IDENTITY4_EXACT,
    names::IDENTITY4_CIDR,
    names::IDENTITY6_EXACT,
    names::IDENTITY6_CIDR,
    names::POLICY_EXACT,
    names::POLICY_WILDCARD,
];

/// The slot of quarantined interfaces: no allow entry ever uses it, so everything an
/// isolated direction sees there is dropped (and counted under it).
pub const QUARANTINE_SLOT: u32 = MAX_ENDPOINTS - 1;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

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
    /// Interfaces in quarantine: ifindex -> the isolation flags written for it.
    pub quarantined: BTreeMap<u32, u32>,
    /// The namespace's interfaces, routes and veth peers' addresses (netlink).
    pub net: HostNet,
    query: Query,
    /// Every local pod, IP or not, and the policies' selectors.
    local: LocalPods,
    /// Pods whose interface vanished and that the source has not updated since.
    lost: BTreeSet<PodRef>,
    /// ENDPOINTS as an earlier agent left them (ifindex -> endpoint): slots are reused so
    /// the allow entries already in the kernel stay valid through a restart.
    inherited: BTreeMap<u32, Endpoint>,
    used_slots: BTreeSet<u32>,
    /// What full maps could not take.
    pub shortfall: Shortfall,
}

/// Whether a write went in: `Ok(false)` when a full map refused it (counted), any other
/// error as it is.
fn written(sf: &mut Shortfall, r: Result<(), DataplaneError>) -> Result<bool, DataplaneError> {
    match r {
        Ok(()) => Ok(true),
        Err(e) => match e.full_map() {
            Some(map) => {
                sf.failed(map);
                Ok(false)
            }
            None => Err(e),
        },
    }
}

impl Reconciler {
    /// The policies isolating a local pod, by direction: (ingress, egress), as
    /// `namespace/name`.
    pub fn isolating(&self, pod: &PodRef) -> (Vec<String>, Vec<String>) {
        let mut out = (Vec::new(), Vec::new());
        for (r, iso) in self.local.isolating_policies(pod) {
            let name = format!("{}/{}", r.namespace, r.name);
            if iso[0] {
                out.0.push(name.clone());
            }
            if iso[1] {
                out.1.push(name);
            }
        }
        out
    }

    /// `node` is this node's name. Open the netlink [`super::links::Watch`] before this,
    /// which takes the first snapshot of the namespace.
    pub fn new(dp: Dataplane, maps: Maps, node: &str) -> Result<Self, ReconcileError> {
        let inherited: BTreeMap<u32, Endpoint> =
            maps.endpoints.iter().filter_map(Result::ok).collect();
        let used_slots = inherited.values().map(|e| e.slot).collect();
        let mut rec = Self {
            dp,
            maps,
            endpoints: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            net: HostNet::default(),
            query: Query::open()?,
            local: LocalPods::new(node),
            lost: BTreeSet::new(),
            inherited,
            used_slots,
            shortfall: Shortfall::default(),
        };
        rec.resync()?;
        Ok(rec)
    }

    /// Rebuilds the model of the namespace from dumps.
    fn resync(&mut self) -> Result<(), NetlinkError> {
        self.net = self.query.host_net()?;
        let peers: Vec<_> = self.net.peers().collect();
        for p in peers {
            self.query_peer(p);
        }
        Ok(())
    }

    fn query_peer(&mut self, p: super::netdev::Peer) {
        match self.query.peer_addrs(p) {
            Ok(ips) => self.net.set_peer_addrs(p, ips),
            // The namespace can be gone already; its link's deletion follows.
            Err(e) => {
                tracing::debug!(nsid = p.nsid, ifindex = p.ifindex, error = %e, "peer addresses")
            }
        }
    }

    /// Follows the source's changes (before the compiler gets them): local pods without
    /// IPs and the policies' selectors, for the quarantine; and the end of a stale claim.
    pub fn observe(&mut self, changes: &[Change]) {
        for c in changes {
            self.local.observe(c);
            match c {
                Change::UpsertPod(p) => {
                    let r = PodRef::new(
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    );
                    self.lost.remove(&r);
                }
                Change::DeletePod(r) => {
                    self.lost.remove(r);
                }
                _ => {}
            }
        }
    }

    /// Applies netlink events; returns whether any pod or interface changed state.
    pub fn on_netlink(&mut self, events: Vec<Event>) -> Result<bool, ReconcileError> {
        if events.contains(&Event::Overflow) {
            self.resync()?;
            return self.sync_interfaces();
        }
        let mut new_peers = Vec::new();
        for ev in events {
            new_peers.extend(self.net.apply(ev));
        }
        // A new interface is quarantined before anything else is asked: the pod may
        // send within milliseconds of its interface appearing.
        let mut changed = self.sync_interfaces()?;
        if !new_peers.is_empty() {
            for p in new_peers {
                self.query_peer(p);
            }
            changed |= self.sync_interfaces()?;
        }
        Ok(changed)
    }

    /// A free slot; `None` when all are taken.
    fn alloc_slot(&mut self, ifindex: Option<u32>) -> Result<Option<u32>, DataplaneError> {
        if let Some(ep) = ifindex.and_then(|i| self.inherited.remove(&i)) {
            if ep.slot != QUARANTINE_SLOT {
                return Ok(Some(ep.slot));
            }
        }
        let Some(slot) = (0..QUARANTINE_SLOT).find(|s| !self.used_slots.contains(s)) else {
            return Ok(None);
        };
        self.used_slots.insert(slot);
        self.maps.reset_counters(slot)?;
        Ok(Some(slot))
    }

    /// Gives `pod` a slot and a (not yet bound) endpoint; false when no slot is free.
    fn add_endpoint(&mut self, pod: &PodRef, ips: Vec<IpAddr>) -> Result<bool, DataplaneError> {
        let hint = ips.iter().find_map(|ip| self.net.resolve(*ip));
        let Some(slot) = self.alloc_slot(hint)? else {
            self.shortfall.failed(names::ENDPOINTS);
            self.shortfall.no_slot.insert(pod.clone());
            return Ok(false);
        };
        self.shortfall.no_slot.remove(pod);
        self.endpoints.insert(
            pod.clone(),
            LocalEndpoint {
                slot,
                ifindex: None,
                flags: 0,
                ips,
            },
        );
        Ok(true)
    }

    /// Applies `diff`, which took the compiler to `plan`.
    pub fn apply(&mut self, diff: &PlanDiff, plan: &Plan) -> Result<(), ReconcileError> {
        // Slots for new endpoints first; an interface an earlier agent enforced keeps its
        // slot, so the entries already in the kernel stay right.
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
        for (pod, ips) in new {
            self.add_endpoint(pod, ips)?;
        }

        // 1. New allow entries.
        for (pod, d) in &diff.endpoints {
            let Some(ep) = self.endpoints.get(pod) else {
                continue;
            };
            for e in &d.added {
                let (prefix, key) = e.lpm_key(ep.slot);
                let sf = &mut self.shortfall;
                if !written(sf, self.maps.insert_policy(prefix, key))? {
                    sf.policy.entry(pod.clone()).or_default().insert(*e);
                }
            }
        }
        // 2. Identity updates, longest prefix first: a prefix that a missing one inside it
        // would fall back on with more rights is withheld before it is ever written.
        let mut ups: Vec<_> = identity_changes(diff)
            .filter_map(|(n, v)| Some((n, v?)))
            .collect();
        ups.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix()));
        for (net, v) in ups {
            let sf = &mut self.shortfall;
            if sf.withheld.contains(&net) {
                continue;
            }
            if !sf.identities.is_empty()
                && shortfall::gains(plan, net, &sf.identities, &sf.withheld)
            {
                sf.withheld.insert(net);
                self.maps.remove_identity(net)?;
                continue;
            }
            self.write_identity(net, v)?;
        }
        self.settle_identities(plan)?;
        // 3. Endpoint headers of bound endpoints (new ones are bound in step 7).
        for (pod, d) in &diff.endpoints {
            let Some(h) = &d.header else { continue };
            let mut moved = false;
            if let Some(ep) = self.endpoints.get_mut(pod) {
                ep.flags = h.flags;
                moved = ep.ips != h.ips;
                ep.ips = h.ips.clone();
            }
            if moved {
                // Its interface is found again for the new IPs.
                self.unbind(pod, false)?;
            }
            self.program_endpoint(pod)?;
        }
        // 4. Removed allow entries.
        for (pod, d) in &diff.endpoints {
            let Some(ep) = self.endpoints.get(pod) else {
                continue;
            };
            let missing = self.shortfall.policy.get_mut(pod);
            if let Some(m) = missing {
                for e in &d.removed {
                    m.remove(e);
                }
            }
            for e in &d.removed {
                let (prefix, key) = e.lpm_key(ep.slot);
                self.maps.remove_policy(prefix, key)?;
            }
        }
        // 5. Removed identities.
        for (net, v) in identity_changes(diff) {
            if v.is_none() {
                self.shortfall.identities.remove(&net);
                self.maps.remove_identity(net)?;
            }
        }
        // 6. Gone endpoints.
        for (pod, d) in &diff.endpoints {
            if d.header.is_none() {
                self.unbind(pod, false)?;
                self.shortfall.forget_pod(pod);
                if let Some(ep) = self.endpoints.remove(pod) {
                    self.used_slots.remove(&ep.slot);
                }
            }
        }
        // What full maps refused before may fit now.
        self.retry(plan)?;
        // 7. Interfaces.
        self.sync_interfaces()?;
        Ok(())
    }

    /// Writes an identity entry; one a full map refuses is remembered, and whatever an
    /// older value left at that prefix is removed (on kernels that refuse in-place updates
    /// of a full trie it would keep the old class's rights).
    fn write_identity(
        &mut self,
        net: IpNetwork,
        v: palisade_common::IdentityValue,
    ) -> Result<bool, DataplaneError> {
        let map = match self.maps.set_identity(net, v) {
            Ok(()) => {
                self.shortfall.identities.remove(&net);
                return Ok(true);
            }
            Err(e) => e.full_map().ok_or(e)?,
        };
        self.shortfall.failed(map);
        self.shortfall.identities.insert(net, map);
        self.maps.remove_identity(net)?;
        Ok(false)
    }

    /// Brings the withheld prefixes in line with the missing ones: removes the prefixes a
    /// missing one would fall back on with more rights, writes back those that are safe
    /// again (which may fail in turn: repeated until nothing changes).
    fn settle_identities(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        let sf = &mut self.shortfall;
        sf.identities
            .retain(|n, _| shortfall::wanted(plan, *n).is_some());
        loop {
            let w = shortfall::withheld(plan, &self.shortfall.identities);
            for &f in w.difference(&self.shortfall.withheld) {
                self.maps.remove_identity(f)?;
            }
            let restore: Vec<IpNetwork> = self.shortfall.withheld.difference(&w).copied().collect();
            self.shortfall.withheld = w;
            let mut failed = false;
            for f in restore {
                if let Some(v) = shortfall::wanted(plan, f) {
                    failed |= !self.write_identity(f, v)?;
                }
            }
            if !failed {
                return Ok(());
            }
        }
    }

    /// Writes again what full maps refused, in the usual order (allow entries before
    /// identities), stopping at a map's first refusal: it is still full.
    fn retry(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        // Pods without a slot: a slot now, and all their entries to write.
        for pod in self.shortfall.no_slot.clone() {
            let Some(p) = plan.endpoints.get(&pod) else {
                self.shortfall.no_slot.remove(&pod);
                continue;
            };
            if !self.add_endpoint(&pod, p.ips.clone())? {
                break;
            }
            if let Some(ep) = self.endpoints.get_mut(&pod) {
                ep.flags = p.flags;
            }
            if !p.entries.is_empty() {
                self.shortfall.policy.insert(pod, p.entries.clone());
            }
        }
        let mut full = false;
        for (pod, entries) in std::mem::take(&mut self.shortfall.policy) {
            let (Some(ep), Some(p)) = (self.endpoints.get(&pod), plan.endpoints.get(&pod)) else {
                continue;
            };
            let mut left = BTreeSet::new();
            for e in entries.into_iter().filter(|e| p.entries.contains(e)) {
                let (prefix, key) = e.lpm_key(ep.slot);
                if full || !written(&mut self.shortfall, self.maps.insert_policy(prefix, key))? {
                    full = true;
                    left.insert(e);
                }
            }
            if !left.is_empty() {
                self.shortfall.policy.insert(pod, left);
            }
        }
        for net in self.shortfall.identities.clone().into_keys() {
            let Some(v) = shortfall::wanted(plan, net) else {
                continue;
            };
            if self.shortfall.withheld.contains(&net) {
                continue;
            }
            if !self.write_identity(net, v)? {
                break;
            }
        }
        self.settle_identities(plan)
    }

    /// Entries the plan wants that the maps do not hold, by map (every written map, if
    /// only with 0).
    pub fn missing_by_map(&self, plan: &Plan) -> BTreeMap<&'static str, usize> {
        let sf = &self.shortfall;
        let mut out = BTreeMap::from(WRITTEN_MAPS.map(|m| (m, 0)));
        let slotless = sf
            .no_slot
            .iter()
            .filter_map(|p| plan.endpoints.get(p))
            .flat_map(|e| &e.entries);
        for e in sf.policy.values().flatten().chain(slotless) {
            *out.entry(policy_map(e.lpm_key(0).0)).or_default() += 1;
        }
        // Left out: under the map that refused them; withheld: under the map they belong in.
        let refused = sf.identities.values().copied();
        for map in refused.chain(sf.withheld.iter().map(|n| identity_map(*n))) {
            *out.entry(map).or_default() += 1;
        }
        // Interfaces of those pods that quarantine could not take either count once.
        let pods_ifs: BTreeSet<u32> = sf
            .no_endpoint
            .iter()
            .filter_map(|p| self.endpoints.get(p))
            .flat_map(|e| e.ips.iter())
            .chain(
                sf.no_slot
                    .iter()
                    .filter_map(|p| plan.endpoints.get(p))
                    .flat_map(|e| e.ips.iter()),
            )
            .filter_map(|ip| self.net.resolve(*ip))
            .collect();
        let strays = sf.unquarantined.difference(&pods_ifs).count();
        out.insert(
            names::ENDPOINTS,
            sf.no_slot.len() + sf.no_endpoint.len() + strays,
        );
        out
    }

    /// The status of each map that lacks entries; `missing`: [`Reconciler::missing_by_map`],
    /// `caps`: the maps' sizes.
    pub fn map_errors(
        &self,
        plan: &Plan,
        missing: &BTreeMap<&'static str, usize>,
        caps: &BTreeMap<&'static str, u32>,
    ) -> Vec<super::status::MapError> {
        let sf = &self.shortfall;
        missing
            .iter()
            .map(|(&map, &missing)| (map, missing))
            .filter(|(_, missing)| *missing > 0)
            .map(|(map, missing)| {
                let capacity = caps.get(map).copied().unwrap_or(0);
                let pods: BTreeSet<&PodRef> = self.short_pods(map).collect();
                let mut policies = BTreeSet::new();
                // An identity shortfall concerns the policies naming those pods as peers,
                // which only the compiler could tell: none listed.
                if matches!(
                    map,
                    names::POLICY_EXACT | names::POLICY_WILDCARD | names::ENDPOINTS
                ) {
                    for p in &pods {
                        let (i, e) = self.isolating(p);
                        policies.extend(i.into_iter().chain(e));
                    }
                }
                let mut prefixes = Vec::new();
                let error = match map {
                    names::POLICY_EXACT | names::POLICY_WILDCARD => format!(
                        "{map} is full ({capacity} entries): {missing} allow entries of {} pods \
                         are not programmed; they stay isolated but allow fewer flows than \
                         their policies say",
                        pods.len()
                    ),
                    names::ENDPOINTS => {
                        let isolated =
                            sf.no_slot
                                .iter()
                                .filter(|p| plan.endpoints.get(*p).is_some_and(|e| e.flags != 0))
                                .chain(sf.no_endpoint.iter().filter(|p| {
                                    self.endpoints.get(*p).is_some_and(|e| e.flags != 0)
                                }))
                                .count();
                        format!(
                            "{map} is full ({capacity} entries) or no slot is free: {isolated} \
                             isolated pods are not enforced (their interfaces are quarantined if \
                             that entry fits, else not judged), {} pods nothing isolates pass \
                             unjudged, {} interfaces no pod is bound to could not be quarantined",
                            pods.len() - isolated,
                            missing - sf.no_slot.len() - sf.no_endpoint.len()
                        )
                    }
                    _ => {
                        let nets: Vec<&IpNetwork> = self.short_prefixes(map).collect();
                        prefixes = nets.iter().take(20).map(|n| n.to_string()).collect();
                        let withheld = sf
                            .withheld
                            .iter()
                            .filter(|n| identity_map(**n) == map)
                            .count();
                        format!(
                            "{map} is full ({capacity} entries): {missing} prefixes are not \
                             programmed ({withheld} withheld so that no address gains rights \
                             from a wider prefix); their addresses get a wider prefix's identity \
                             with no more rights, or the world's: fewer flows are allowed than \
                             the policies say"
                        )
                    }
                };
                super::status::MapError {
                    map: map.to_string(),
                    capacity,
                    missing,
                    error,
                    pods: pods.iter().map(|p| p.to_string()).collect(),
                    policies: policies.into_iter().collect(),
                    prefixes,
                }
            })
            .collect()
    }

    /// The local pods whose entries in `map` are missing.
    pub fn short_pods(&self, map: &str) -> impl Iterator<Item = &PodRef> + '_ {
        let sf = &self.shortfall;
        let pods: Vec<&PodRef> = match map {
            names::POLICY_EXACT | names::POLICY_WILDCARD => sf
                .policy
                .iter()
                .filter(|(_, entries)| entries.iter().any(|e| policy_map(e.lpm_key(0).0) == map))
                .map(|(p, _)| p)
                .chain(&sf.no_slot)
                .collect(),
            names::ENDPOINTS => sf.no_slot.iter().chain(&sf.no_endpoint).collect(),
            _ => {
                let short: BTreeSet<&IpNetwork> = self.short_prefixes(map).collect();
                self.endpoints
                    .iter()
                    .filter(|(_, e)| e.ips.iter().any(|ip| short.contains(&IpNetwork::from(*ip))))
                    .map(|(p, _)| p)
                    .collect()
            }
        };
        pods.into_iter()
    }

    /// The identity prefixes that `map` lacks: left out there, or withheld (tries).
    fn short_prefixes<'a>(&'a self, map: &'a str) -> impl Iterator<Item = &'a IpNetwork> + 'a {
        let sf = &self.shortfall;
        let refused = sf.identities.iter().filter(move |(_, m)| **m == map);
        let withheld = sf.withheld.iter().filter(move |n| identity_map(**n) == map);
        refused.map(|(n, _)| n).chain(withheld)
    }

    /// Removes a pod's interface binding: its ENDPOINTS entry and programs. `vanished`:
    /// the interface itself is gone (the pod's IP claim becomes stale).
    fn unbind(&mut self, pod: &PodRef, vanished: bool) -> Result<(), DataplaneError> {
        let Some(ep) = self.endpoints.get_mut(pod) else {
            return Ok(());
        };
        let Some(ifindex) = ep.ifindex.take() else {
            return Ok(());
        };
        self.maps.remove_endpoint(ifindex)?;
        self.dp.detach(ifindex)?;
        if vanished {
            tracing::info!(pod = %pod, ifindex, "pod interface gone");
            self.lost.insert(pod.clone());
        }
        Ok(())
    }

    /// Writes the ENDPOINTS entry and attaches the programs, if the interface is known.
    /// An interface that vanished meanwhile is unbound (its deletion event follows).
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
        if !self.write_endpoint(ifindex, entry)? {
            // No entry, no enforcement: not bound (so not attached).
            if self.shortfall.no_endpoint.insert(pod.clone()) && entry.flags != 0 {
                tracing::error!(pod = %pod, ifindex, "ENDPOINTS full: an isolated pod's interface cannot be enforced");
            }
            if let Some(ep) = self.endpoints.get_mut(pod) {
                ep.ifindex = None;
            }
            return Ok(());
        }
        self.shortfall.no_endpoint.remove(pod);
        if let Err(e) = self.dp.attach(ifindex) {
            tracing::warn!(pod = %pod, ifindex, error = %e, "attaching to the pod's interface");
            self.unbind(pod, false)?;
            return Ok(());
        }
        tracing::debug!(pod = %pod, ifindex, slot = entry.slot, flags = entry.flags, "endpoint programmed");
        Ok(())
    }

    /// Writes an ENDPOINTS entry; when the map is full and the entry isolates, a bound pod
    /// that nothing isolates gives up its entry first (without it its packets pass
    /// unjudged and uncounted, which is what its policies allow). False: refused.
    fn write_endpoint(&mut self, ifindex: u32, entry: Endpoint) -> Result<bool, DataplaneError> {
        loop {
            if written(&mut self.shortfall, self.maps.set_endpoint(ifindex, entry))? {
                return Ok(true);
            }
            if entry.flags == 0 {
                return Ok(false);
            }
            let open = self
                .endpoints
                .iter()
                .find(|(_, e)| e.flags == 0 && e.ifindex.is_some_and(|i| i != ifindex))
                .map(|(p, _)| p.clone());
            let Some(open) = open else {
                return Ok(false);
            };
            tracing::warn!(pod = %open, "ENDPOINTS full: a pod nothing isolates gives its entry to an isolating one");
            self.unbind(&open, false)?;
            self.shortfall.no_endpoint.insert(open);
        }
    }

    /// The union of the isolation the awaiting pods (local, live, not bound) will get.
    fn quarantine_flags(&self) -> u32 {
        let mut flags = 0;
        for (pod, lp) in self.local.iter() {
            let bound = self.endpoints.get(pod).is_some_and(|e| e.ifindex.is_some());
            if !bound {
                flags |= match self.endpoints.get(pod) {
                    Some(ep) if !lp.ips.is_empty() => ep.flags,
                    _ => self.local.isolation_of(pod),
                };
            }
        }
        flags
    }

    /// Brings bindings and quarantine in line with the interfaces and the pods; returns
    /// whether anything changed.
    pub fn sync_interfaces(&mut self) -> Result<bool, ReconcileError> {
        let mut changed = false;
        // Bindings whose interface vanished, or that another interface now holds the
        // pod's IP for (the old one was reassigned).
        let stale: Vec<(PodRef, bool)> = self
            .endpoints
            .iter()
            .filter_map(|(p, e)| {
                let i = e.ifindex?;
                if !self.net.exists(i) {
                    return Some((p.clone(), true));
                }
                let moved = e
                    .ips
                    .iter()
                    .filter_map(|ip| self.net.resolve(*ip))
                    .any(|j| j != i);
                moved.then(|| (p.clone(), false))
            })
            .collect();
        for (pod, vanished) in stale {
            self.unbind(&pod, vanished)?;
            changed = true;
        }

        // Bind pods to the interfaces that hold their IPs.
        let waiting_for_ip = self.local.iter().any(|(_, lp)| lp.ips.is_empty());
        let mut bound: BTreeSet<u32> = self.endpoints.values().filter_map(|e| e.ifindex).collect();
        let unbound: Vec<PodRef> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.ifindex.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        for pod in unbound {
            let ips = self.endpoints[&pod].ips.clone();
            let Some(ifindex) = ips.iter().find_map(|ip| self.net.resolve(*ip)) else {
                continue;
            };
            if bound.contains(&ifindex) {
                continue;
            }
            if self.lost.contains(&pod) && waiting_for_ip {
                // Maybe a new pod reusing the IP: not this pod's rules until the source
                // says who holds the IP.
                tracing::info!(pod = %pod, ifindex, "interface holds the IP of a pod whose interface vanished while another pod awaits its IP: kept in quarantine");
                continue;
            }
            self.endpoints.get_mut(&pod).expect("listed above").ifindex = Some(ifindex);
            self.lost.remove(&pod);
            self.quarantined.remove(&ifindex);
            self.program_endpoint(&pod)?;
            if self.endpoints[&pod].ifindex.is_some() {
                tracing::info!(pod = %pod, ifindex, "pod interface found");
                bound.insert(ifindex);
                changed = true;
            }
        }

        // Quarantine the pod-like interfaces nobody is bound to.
        let q = self.quarantine_flags();
        // Interfaces of pods nothing isolates that ENDPOINTS had no room for: known, and
        // open as their policies say.
        let open_known: BTreeSet<u32> = self
            .shortfall
            .no_endpoint
            .iter()
            .filter_map(|p| self.endpoints.get(p))
            .filter(|e| e.flags == 0)
            .flat_map(|e| e.ips.iter().filter_map(|ip| self.net.resolve(*ip)))
            .collect();
        let candidates: BTreeSet<u32> = self
            .net
            .pod_like()
            .filter(|i| !bound.contains(i) && !open_known.contains(i))
            .collect();
        for &ifindex in &candidates {
            if q == 0 || self.quarantined.get(&ifindex) == Some(&q) {
                continue;
            }
            let entry = Endpoint {
                slot: QUARANTINE_SLOT,
                flags: q,
            };
            if !self.write_endpoint(ifindex, entry)? {
                if self.shortfall.unquarantined.insert(ifindex) {
                    tracing::error!(
                        ifindex,
                        "ENDPOINTS full: a pod interface no pod is bound to cannot be quarantined"
                    );
                }
                continue;
            }
            self.shortfall.unquarantined.remove(&ifindex);
            match self.dp.attach(ifindex) {
                Ok(()) => {
                    let name = self
                        .net
                        .link(ifindex)
                        .map(|l| l.name.as_str())
                        .unwrap_or("");
                    tracing::info!(ifindex, name, flags = q, "interface quarantined");
                    self.quarantined.insert(ifindex, q);
                    changed = true;
                }
                Err(e) => {
                    tracing::warn!(ifindex, error = %e, "attaching to a new interface");
                    self.maps.remove_endpoint(ifindex)?;
                }
            }
        }
        self.shortfall
            .unquarantined
            .retain(|i| q != 0 && candidates.contains(i));
        let release: Vec<u32> = self
            .quarantined
            .keys()
            .copied()
            .filter(|i| q == 0 || !candidates.contains(i))
            .collect();
        for ifindex in release {
            self.quarantined.remove(&ifindex);
            if bound.contains(&ifindex) {
                continue; // its pod's entry replaced the quarantine one
            }
            self.maps.remove_endpoint(ifindex)?;
            self.dp.detach(ifindex)?;
            tracing::info!(ifindex, "interface released from quarantine");
            changed = true;
        }
        Ok(changed)
    }

    /// After the first full sync: removes what an earlier agent left that the current plan
    /// does not want (entries of deleted pods and policies, links of gone interfaces).
    pub fn collect_garbage(&mut self, plan: &Plan) -> Result<(), ReconcileError> {
        let ours: BTreeSet<u32> = self
            .endpoints
            .values()
            .filter_map(|e| e.ifindex)
            .chain(self.quarantined.keys().copied())
            .collect();
        for (ifindex, _) in std::mem::take(&mut self.inherited) {
            if !ours.contains(&ifindex) {
                self.maps.remove_endpoint(ifindex)?;
            }
        }
        for ifindex in attached_ifindexes(self.dp.layout()) {
            if !ours.contains(&ifindex) {
                self.dp.detach(ifindex)?;
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
        // The room just freed may take what full maps refused.
        self.retry(plan)?;
        self.sync_interfaces()?;
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
