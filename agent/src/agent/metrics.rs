//! What the agent exports on `/metrics` (Prometheus text): how fast changes reach the
//! kernel, what is programmed, how full the maps are, and the verdict counters of every
//! local pod by namespace/pod/direction/reason — the same numbers `palisade drops` shows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use ipnetwork::IpNetwork;
use palisade_common::maps as map_names;
use palisade_policy::Plan;

use super::reconcile::{Reconciler, WRITTEN_MAPS};
use super::status::{MapFill, Status};
use crate::dataplane::{identity_map, policy_map, read_counters, Layout, Maps};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Each map's maximum entries, read from the pins (the object file is the only place the
/// sizes are written down, and `--conntrack-entries` changes one at load time).
pub fn map_capacities(layout: &Layout) -> BTreeMap<&'static str, u32> {
    WRITTEN_MAPS
        .into_iter()
        .chain([map_names::CONNTRACK])
        .filter_map(
            |name| match aya::maps::MapInfo::from_pin(layout.map(name)) {
                Ok(info) => Some((name, info.max_entries())),
                Err(e) => {
                    tracing::warn!(map = name, error = %e, "reading map size");
                    None
                }
            },
        )
        .collect()
}

/// The fill level of the maps the agent writes: (entries, capacity) by map name.
/// `missing`: what the maps lack ([`Reconciler::missing_by_map`]).
pub fn map_fill(
    plan: &Plan,
    rec: &Reconciler,
    missing: &BTreeMap<&'static str, usize>,
    caps: &BTreeMap<&'static str, u32>,
) -> BTreeMap<String, MapFill> {
    // ENDPOINTS holds an entry per bound pod and per quarantined interface.
    let bound = rec
        .endpoints
        .values()
        .filter(|e| e.ifindex.is_some())
        .count();
    fill_levels(plan, missing, bound + rec.quarantined.len(), caps)
}

/// What the plan puts in each map, by the rule the writers follow, minus what a full map
/// did not take; ENDPOINTS holds `endpoints` (counted as held, not as planned).
fn fill_levels(
    plan: &Plan,
    missing: &BTreeMap<&'static str, usize>,
    endpoints: usize,
    caps: &BTreeMap<&'static str, u32>,
) -> BTreeMap<String, MapFill> {
    let mut held = BTreeMap::from(WRITTEN_MAPS.map(|m| (m, 0usize)));
    let v4 = plan.identities_v4.keys().map(|n| IpNetwork::V4(*n));
    for net in v4.chain(plan.identities_v6.keys().map(|n| IpNetwork::V6(*n))) {
        *held.entry(identity_map(net)).or_default() += 1;
    }
    for e in plan.endpoints.values().flat_map(|e| &e.entries) {
        *held.entry(policy_map(e.lpm_key(0).0)).or_default() += 1;
    }
    for (map, n) in &mut held {
        *n = n.saturating_sub(missing.get(map).copied().unwrap_or(0));
    }
    held.insert(map_names::ENDPOINTS, endpoints);
    held.into_iter()
        .map(|(name, entries)| {
            let capacity = caps.get(name).copied().unwrap_or(0);
            (name.to_string(), MapFill { entries, capacity })
        })
        .collect()
}

/// Handles the agent loop updates; the HTTP server encodes them.
pub struct Metrics {
    registry: Registry,
    pub programming_latency: Histogram,
    pub objects: Family<KindLabel, Gauge>,
    pub rejected: Gauge,
    pub local_pods: Family<StateLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub map_write_failures: Family<MapLabel, Counter>,
    pub map_entries_missing: Family<MapLabel, Gauge>,
    pub source_errors: Gauge,
    pub reconcile_errors: Counter,
    pub synced: Gauge,
    pub pin_problems: Gauge,
    health: Health,
    pods: Arc<Mutex<BTreeMap<u32, (String, String)>>>,
}

/// Liveness and readiness as the HTTP probes see them.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// Pins are missing and could not be put back (see `dataplane::repin`).
    pins_broken: Arc<AtomicBool>,
    /// Milliseconds since `epoch` of the agent loop's last turn.
    heartbeat_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: Arc::default(),
            pins_broken: Arc::default(),
            heartbeat_ms: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

impl Health {
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn set_pins_broken(&self, broken: bool) {
        self.pins_broken.store(broken, Ordering::Release);
    }

    /// Why the agent is not ready, if it is not: ready once the first full sync is
    /// programmed, while the pins are in place.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Acquire) {
            Some("first sync not programmed yet")
        } else if self.pins_broken.load(Ordering::Acquire) {
            Some("pins missing and not repairable (see palisade status)")
        } else {
            None
        }
    }

    /// Alive while the agent loop keeps turning (it ticks several times a second).
    pub fn alive(&self, max_silence: Duration) -> bool {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) <= max_silence
    }
}

impl Metrics {
    /// `maps` is the agent's own handle set, opened from the pins, read at scrape time
    /// for the packet counters.
    pub fn new(maps: Maps) -> Self {
        let mut registry = Registry::with_prefix("palisade");
        let programming_latency = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
        ]);
        registry.register(
            "programming_latency_seconds",
            "Time from a batch of source changes reaching the agent to the maps reflecting it",
            programming_latency.clone(),
        );
        let objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "objects",
            "Objects currently programmed, by kind",
            objects.clone(),
        );
        let rejected = Gauge::default();
        registry.register(
            "rejected_objects",
            "Policies the compiler rejected (they isolate but allow nothing)",
            rejected.clone(),
        );
        let local_pods = Family::<StateLabel, Gauge>::default();
        registry.register(
            "local_pods",
            "Pods of this node by state (enforced, or awaiting their interface)",
            local_pods.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_entries",
            "Entries the agent has written to each map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_capacity",
            "Maximum entries of each map",
            map_capacity.clone(),
        );
        let map_write_failures = Family::<MapLabel, Counter>::default();
        registry.register(
            "map_write_failures",
            "Map writes refused because the map was full (or, for ENDPOINTS, no slot was free)",
            map_write_failures.clone(),
        );
        let map_entries_missing = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_entries_missing",
            "Entries the policies need that a full map does not hold (fewer flows allowed)",
            map_entries_missing.clone(),
        );
        let source_errors = Gauge::default();
        registry.register(
            "source_errors",
            "Problems the source currently reports (unparsable files, failing watches)",
            source_errors.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Batches whose map writes failed",
            reconcile_errors.clone(),
        );
        let synced = Gauge::default();
        registry.register(
            "synced",
            "1 once the first full sync is programmed",
            synced.clone(),
        );
        let pin_problems = Gauge::default();
        registry.register(
            "pin_problems",
            "Pins on bpffs that are missing and could not be put back",
            pin_problems.clone(),
        );
        let pods = Arc::new(Mutex::new(BTreeMap::new()));
        registry.register_collector(Box::new(PacketCollector {
            maps: Mutex::new(maps),
            pods: Arc::clone(&pods),
        }));
        Self {
            registry,
            programming_latency,
            objects,
            rejected,
            local_pods,
            map_entries,
            map_capacity,
            map_write_failures,
            map_entries_missing,
            source_errors,
            reconcile_errors,
            synced,
            pin_problems,
            health: Health::default(),
            pods,
        }
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    pub fn observe_programming(&self, since: Instant) {
        self.programming_latency
            .observe(since.elapsed().as_secs_f64());
    }

    /// Live conntrack entries as the last GC pass counted them.
    pub fn set_conntrack_entries(&self, n: u64) {
        self.map_entries
            .get_or_create(&MapLabel {
                map: map_names::CONNTRACK.to_string(),
            })
            .set(n as i64);
    }

    /// CONNTRACK's fill as the last GC pass counted it (`None` before the first pass).
    pub fn conntrack_fill(&self, caps: &BTreeMap<&'static str, u32>) -> Option<(String, MapFill)> {
        let label = MapLabel {
            map: map_names::CONNTRACK.to_string(),
        };
        let entries = self.map_entries.get(&label)?.get();
        let fill = MapFill {
            entries: usize::try_from(entries).unwrap_or(0),
            capacity: caps.get(map_names::CONNTRACK).copied().unwrap_or(0),
        };
        Some((label.map, fill))
    }

    /// slot -> (namespace, pod) of every local pod with a slot, for the packet counters.
    pub fn set_pods(&self, pods: BTreeMap<u32, (String, String)>) {
        *self.pods.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    /// Records each map's size, as read from the kernel by [`map_capacities`].
    pub fn capacities(&self, caps: &BTreeMap<&'static str, u32>) {
        for (&map, &n) in caps {
            self.map_capacity
                .get_or_create(&MapLabel {
                    map: map.to_string(),
                })
                .set(i64::from(n));
        }
    }

    /// Brings the gauges in line with what was just published.
    pub fn record(&self, status: &Status, rec: &Reconciler) {
        let mut by_kind: BTreeMap<String, i64> = ["Namespace", "Pod", "NetworkPolicy"]
            .into_iter()
            .map(|k| (k.to_string(), 0))
            .collect();
        for key in status.programmed.keys() {
            let kind = key.split('/').next().unwrap_or_default();
            *by_kind.entry(kind.to_string()).or_default() += 1;
        }
        for (kind, n) in by_kind {
            self.objects.get_or_create(&KindLabel { kind }).set(n);
        }
        self.rejected.set(status.rejected.len() as i64);
        self.source_errors.set(status.source_errors.len() as i64);
        self.synced.set(i64::from(status.synced));
        self.pin_problems.set(status.pin_problems.len() as i64);
        let wired = rec
            .endpoints
            .values()
            .filter(|e| e.ifindex.is_some())
            .count();
        for (state, n) in [
            ("enforced", wired),
            ("awaiting_interface", rec.endpoints.len() - wired),
        ] {
            self.local_pods
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        for (map, fill) in &status.maps {
            self.map_entries
                .get_or_create(&MapLabel { map: map.clone() })
                .set(fill.entries as i64);
            let missing = status
                .map_errors
                .iter()
                .find(|e| &e.map == map)
                .map_or(0, |e| e.missing);
            self.map_entries_missing
                .get_or_create(&MapLabel { map: map.clone() })
                .set(missing as i64);
        }
        for (&map, &total) in &rec.shortfall.failures {
            let c = self.map_write_failures.get_or_create(&MapLabel {
                map: map.to_string(),
            });
            // The reconciler keeps the totals; the counter catches up with them.
            c.inc_by(total.saturating_sub(c.get()));
        }
        self.set_pods(
            rec.endpoints
                .iter()
                .map(|(p, e)| (e.slot, (p.namespace.clone(), p.name.clone())))
                .collect(),
        );
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    namespace: String,
    pod: String,
    direction: &'static str,
    reason: &'static str,
    verdict: &'static str,
}

/// Reads the per-CPU verdict counters at scrape time, so the numbers are the kernel's own.
struct PacketCollector {
    maps: Mutex<Maps>,
    pods: Arc<Mutex<BTreeMap<u32, (String, String)>>>,
}

impl std::fmt::Debug for PacketCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketCollector").finish_non_exhaustive()
    }
}

impl Collector for PacketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let slots: Vec<u32> = pods.keys().copied().collect();
        let rows = {
            let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            match read_counters(&maps, Some(&slots)) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "reading counters for /metrics");
                    return Ok(());
                }
            }
        };
        let labels = |row: &crate::dataplane::CounterRow| {
            let (namespace, pod) = pods.get(&row.slot).cloned().unwrap_or_default();
            PacketLabels {
                namespace,
                pod,
                direction: row.direction,
                reason: row.reason,
                verdict: if row.drop { "drop" } else { "allow" },
            }
        };
        for (name, help, bytes) in [
            ("packets", "Packets judged on local pods' interfaces", false),
            ("bytes", "Bytes judged on local pods' interfaces", true),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for row in &rows {
                let value = if bytes { row.bytes } else { row.packets };
                ConstCounter::new(value).encode(family.encode_family(&labels(row))?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::{IdentityValue, DIR_INGRESS, PROTO_TCP};
    use palisade_policy::{EndpointPlan, PodRef, PolicyEntry};

    #[test]
    fn fill_is_the_plan_minus_what_is_missing_and_endpoints_as_held() {
        let mut plan = Plan::default();
        for n in ["198.18.0.1/32", "198.18.0.2/32", "198.18.0.0/24"] {
            plan.identities_v4
                .insert(n.parse().unwrap(), IdentityValue::default());
        }
        plan.identities_v6.insert(
            "fd00:198:18::1/128".parse().unwrap(),
            IdentityValue::default(),
        );
        let entry = |proto, port_prefix_bits| PolicyEntry {
            identity: 1,
            dir: DIR_INGRESS,
            proto,
            port: 80,
            port_prefix_bits,
        };
        plan.endpoints.insert(
            PodRef::new("x", "srv"),
            EndpointPlan {
                entries: [entry(Some(PROTO_TCP), 16), entry(None, 0)].into(),
                ..Default::default()
            },
        );
        let missing = BTreeMap::from([
            (map_names::IDENTITY4_CIDR, 1),
            (map_names::POLICY_WILDCARD, 1),
            // A pod left out of ENDPOINTS is not among the entries it holds already.
            (map_names::ENDPOINTS, 1),
        ]);
        let caps = BTreeMap::from([(map_names::ENDPOINTS, 2)]);
        let fill = fill_levels(&plan, &missing, 2, &caps);
        let entries: Vec<(&str, usize)> =
            fill.iter().map(|(m, f)| (m.as_str(), f.entries)).collect();
        assert_eq!(
            entries,
            [
                (map_names::ENDPOINTS, 2),
                (map_names::IDENTITY4_CIDR, 0),
                (map_names::IDENTITY4_EXACT, 2),
                (map_names::IDENTITY6_CIDR, 0),
                (map_names::IDENTITY6_EXACT, 1),
                (map_names::POLICY_EXACT, 1),
                (map_names::POLICY_WILDCARD, 0),
            ]
        );
        assert_eq!(fill[map_names::ENDPOINTS].capacity, 2);
        assert_eq!(fill[map_names::POLICY_EXACT].capacity, 0);
    }
}
