//! Typed handles on the pinned maps, opened by path so the agent and the CLI (even with no
//! agent running) see the same kernel state. Writers change entries one by one, never by
//! clearing a map, so a packet always sees either the old or the new entry.

use std::net::IpAddr;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use ipnetwork::IpNetwork;
use palisade_common::{
    maps as names, Config, Counter, CtKey, CtValue, Endpoint, FragKey, IdentityValue, PolicyKey,
    PolicyValue,
};

use super::split::SplitLpm;
use super::{DataplaneError, Layout};

/// One family's IP→identity maps: host entries in a hash map, the rest in a trie.
pub type IdentityMaps<const N: usize> = SplitLpm<[u8; N], IdentityValue>;

pub struct Maps {
    pub endpoints: HashMap<MapData, u32, Endpoint>,
    /// IP→identity, per family: host entries in a hash map, the rest in a trie.
    pub identity_v4: IdentityMaps<4>,
    pub identity_v6: IdentityMaps<16>,
    /// Allow entries: exact-port ones in a hash map, wildcards in a trie.
    pub policy: SplitLpm<PolicyKey, PolicyValue>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    /// First fragments a check allowed (value: when), for their later fragments.
    pub fragments: HashMap<MapData, FragKey, u64>,
    pub config: Array<MapData, Config>,
}

pub(crate) fn open<T>(layout: &Layout, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = layout.map(name);
    if !path.exists() {
        return Err(DataplaneError::NotPinned(path));
    }
    let data = MapData::from_pin(&path).map_err(|e| map_err(name, e))?;
    let map = Map::from_map_data(data).map_err(|e| map_err(name, e))?;
    T::try_from(map).map_err(|e| map_err(name, e))
}

impl Maps {
    pub fn open(layout: &Layout) -> Result<Self, DataplaneError> {
        Ok(Self {
            endpoints: open(layout, names::ENDPOINTS)?,
            identity_v4: split(layout, names::IDENTITY4_EXACT, names::IDENTITY4_CIDR)?,
            identity_v6: split(layout, names::IDENTITY6_EXACT, names::IDENTITY6_CIDR)?,
            policy: split(layout, names::POLICY_EXACT, names::POLICY_WILDCARD)?,
            counters: open(layout, names::COUNTERS)?,
            conntrack: open(layout, names::CONNTRACK)?,
            fragments: open(layout, names::FRAGMENTS)?,
            config: open(layout, names::CONFIG)?,
        })
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<(), DataplaneError> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| map_err(names::CONFIG, e))
    }

    pub fn set_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DataplaneError> {
        self.endpoints
            .insert(ifindex, ep, 0)
            .map_err(|e| map_err(names::ENDPOINTS, e))
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        ignore_missing(self.endpoints.remove(&ifindex)).map_err(|e| map_err(names::ENDPOINTS, e))
    }

    /// Writes an identity entry into the map of its family that holds its prefix length.
    pub fn set_identity(&mut self, net: IpNetwork, v: IdentityValue) -> Result<(), DataplaneError> {
        match net {
            IpNetwork::V4(n) => self
                .identity_v4
                .insert(n.prefix().into(), n.network().octets(), v),
            IpNetwork::V6(n) => self
                .identity_v6
                .insert(n.prefix().into(), n.network().octets(), v),
        }
    }

    pub fn remove_identity(&mut self, net: IpNetwork) -> Result<(), DataplaneError> {
        match net {
            IpNetwork::V4(n) => self
                .identity_v4
                .remove(n.prefix().into(), n.network().octets()),
            IpNetwork::V6(n) => self
                .identity_v6
                .remove(n.prefix().into(), n.network().octets()),
        }
    }

    /// The identity the programs would find for `ip`.
    pub fn identity_of(&self, ip: IpAddr) -> Option<IdentityValue> {
        match ip {
            IpAddr::V4(a) => self.identity_v4.get(a.octets()),
            IpAddr::V6(a) => self.identity_v6.get(a.octets()),
        }
    }

    pub fn insert_policy(&mut self, prefix: u32, key: PolicyKey) -> Result<(), DataplaneError> {
        self.policy.insert(prefix, key, PolicyValue { flags: 1 })
    }

    pub fn remove_policy(&mut self, prefix: u32, key: PolicyKey) -> Result<(), DataplaneError> {
        self.policy.remove(prefix, key)
    }

    /// Zeroes the counters of a slot, so a reused slot does not inherit a gone pod's counts.
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })?;
        let zero: Vec<Counter> = vec![Counter::default(); cpus];
        for dir in 0..palisade_common::DIRECTIONS as u8 {
            for reason in 0..palisade_common::REASONS {
                let idx = palisade_common::counter_index(slot, dir, reason);
                let values = aya::maps::PerCpuValues::try_from(zero.clone()).map_err(|e| {
                    DataplaneError::Io {
                        path: "COUNTERS".into(),
                        source: e,
                    }
                })?;
                self.counters
                    .set(idx, values, 0)
                    .map_err(|e| map_err(names::COUNTERS, e))?;
            }
        }
        Ok(())
    }
}

/// The kernel id of every pinned map under `layout`, by name (maps that are not pinned are
/// left out): the same ids before and after a restart prove the maps were adopted.
pub fn map_ids(layout: &Layout) -> std::collections::BTreeMap<&'static str, u32> {
    names::PINNED
        .iter()
        .filter_map(|name| {
            let info = MapData::from_pin(layout.map(name)).ok()?.info().ok()?;
            Some((*name, info.id()))
        })
        .collect()
}

pub(super) fn map_err(name: &'static str, source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        name,
        source: Box::new(source),
    }
}

fn split<K: aya::Pod, V: aya::Pod>(
    layout: &Layout,
    exact: &'static str,
    trie: &'static str,
) -> Result<SplitLpm<K, V>, DataplaneError> {
    Ok(SplitLpm {
        exact: open(layout, exact)?,
        trie: open(layout, trie)?,
        names: (exact, trie),
    })
}

pub(super) fn ignore_missing(
    r: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}
