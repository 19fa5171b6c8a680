//! An LPM map as the programs read it: two kernel maps. Entries of the full key length
//! (host addresses /32 and /128 of the identity maps, exact-port allow entries) live in an
//! exact-match hash map, whose lookup cost does not grow with its size; every shorter
//! prefix (ipBlock CIDRs and their except holes; any-protocol, any-port and port-range
//! entries) in an LPM trie. The programs probe the hash map with the packet's full key
//! first and walk the trie only on a miss (`check::identity`, `check::policy_allows` in
//! `ebpf/`).
//!
//! That answers what one trie of every entry would: a full-length entry is the longest
//! prefix of its key, so when the hash map has the key nothing in the trie could win, and
//! when it has not, the trie holds every entry covering the key. It only needs each entry
//! to live in exactly one map, chosen by its prefix length alone ([`is_full_prefix`]),
//! which every write and delete here does. To the agent the pair reads as one map of LPM
//! keys ([`SplitLpm::keys`], [`SplitLpm::iter`]), so the reconciler's sweep and the dumps
//! see both halves.

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, MapData, MapError,
};
use aya::Pod;
use ipnetwork::IpNetwork;
use palisade_common::{maps as names, PolicyKey};

use super::maps::{ignore_missing, map_err};
use super::DataplaneError;

/// The prefix length of a full key `K`: every bit.
pub const fn full_prefix<K>() -> u32 {
    (size_of::<K>() * 8) as u32
}

/// Whether an entry of `prefix` bits of key `K` belongs in the exact hash map rather than
/// the trie.
pub const fn is_full_prefix<K>(prefix: u32) -> bool {
    prefix == full_prefix::<K>()
}

/// The pinned map an identity entry for `net` lives in. With [`policy_map`], the one
/// statement of which map holds an entry: the writers below follow it, and the agent's
/// fill and shortfall accounting count by it.
pub fn identity_map(net: IpNetwork) -> &'static str {
    match net {
        IpNetwork::V4(n) if is_full_prefix::<[u8; 4]>(n.prefix().into()) => names::IDENTITY4_EXACT,
        IpNetwork::V4(_) => names::IDENTITY4_CIDR,
        IpNetwork::V6(n) if is_full_prefix::<[u8; 16]>(n.prefix().into()) => names::IDENTITY6_EXACT,
        IpNetwork::V6(_) => names::IDENTITY6_CIDR,
    }
}

/// The pinned map an allow entry of `prefix` bits lives in: exact ports in the hash map,
/// the rest in the trie.
pub fn policy_map(prefix: u32) -> &'static str {
    if is_full_prefix::<PolicyKey>(prefix) {
        names::POLICY_EXACT
    } else {
        names::POLICY_WILDCARD
    }
}

/// One split map: the hash map of full-length entries and the trie of the others.
pub struct SplitLpm<K: Pod, V: Pod> {
    pub exact: HashMap<MapData, K, V>,
    pub trie: LpmTrie<MapData, K, V>,
    /// The pinned names of `exact` and `trie`, for errors.
    pub names: (&'static str, &'static str),
}

impl<K: Pod, V: Pod> SplitLpm<K, V> {
    /// Writes the entry `data/prefix` into the map that holds its prefix length.
    pub fn insert(&mut self, prefix: u32, data: K, v: V) -> Result<(), DataplaneError> {
        if is_full_prefix::<K>(prefix) {
            self.exact
                .insert(data, v, 0)
                .map_err(|e| map_err(self.names.0, e))
        } else {
            self.trie
                .insert(&Key::new(prefix, data), v, 0)
                .map_err(|e| map_err(self.names.1, e))
        }
    }

    /// Deletes the entry `data/prefix` from the map that holds its prefix length; an
    /// absent entry is already deleted.
    pub fn remove(&mut self, prefix: u32, data: K) -> Result<(), DataplaneError> {
        if is_full_prefix::<K>(prefix) {
            ignore_missing(self.exact.remove(&data)).map_err(|e| map_err(self.names.0, e))
        } else {
            ignore_missing(self.trie.remove(&Key::new(prefix, data)))
                .map_err(|e| map_err(self.names.1, e))
        }
    }

    /// The value the programs find for the full key `data`, probing as they do.
    pub fn get(&self, data: K) -> Option<V> {
        self.exact
            .get(&data, 0)
            .or_else(|_| self.trie.get(&Key::new(full_prefix::<K>(), data), 0))
            .ok()
    }

    /// Every entry's key, as an LPM key (exact entries with the full prefix length).
    pub fn keys(&self) -> impl Iterator<Item = Result<Key<K>, MapError>> + '_ {
        let exact = self
            .exact
            .keys()
            .map(|k| k.map(|d| Key::new(full_prefix::<K>(), d)));
        exact.chain(self.trie.keys())
    }

    /// Every entry, keyed like [`SplitLpm::keys`].
    pub fn iter(&self) -> impl Iterator<Item = Result<(Key<K>, V), MapError>> + '_ {
        let exact = self
            .exact
            .iter()
            .map(|r| r.map(|(d, v)| (Key::new(full_prefix::<K>(), d), v)));
        exact.chain(self.trie.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::POLICY_PREFIX_FULL;

    /// A model of both layouts over 8-bit keys split like the real ones: entries are
    /// (prefix, network, value).
    fn longest(entries: &[(u32, u8, u32)], a: u8) -> Option<u32> {
        entries
            .iter()
            .filter(|(p, net, _)| *p == 0 || (a ^ net) >> (8 - p) == 0)
            .max_by_key(|(p, _, _)| *p)
            .map(|(_, _, id)| *id)
    }

    fn split_lookup(entries: &[(u32, u8, u32)], a: u8) -> Option<u32> {
        let (exact, trie): (Vec<_>, Vec<_>) = entries
            .iter()
            .copied()
            .partition(|(p, _, _)| is_full_prefix::<u8>(*p));
        exact
            .iter()
            .find(|(_, net, _)| *net == a)
            .map(|(_, _, id)| *id)
            .or_else(|| longest(&trie, a))
    }

    #[test]
    fn full_length_entries_go_to_the_hash_map_and_nothing_else_does() {
        assert!(is_full_prefix::<[u8; 4]>(32));
        assert!(is_full_prefix::<[u8; 16]>(128));
        assert!(!(0..32).any(is_full_prefix::<[u8; 4]>));
        assert!(!(0..128).any(is_full_prefix::<[u8; 16]>));
        assert!(!is_full_prefix::<[u8; 16]>(32), "an IPv6 /32 is a CIDR");
        assert_eq!(full_prefix::<PolicyKey>(), POLICY_PREFIX_FULL);
        assert!(!(0..POLICY_PREFIX_FULL).any(is_full_prefix::<PolicyKey>));
    }

    #[test]
    fn entries_are_named_by_the_map_their_prefix_length_selects() {
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        assert_eq!(identity_map(net("198.18.0.1/32")), names::IDENTITY4_EXACT);
        assert_eq!(identity_map(net("198.18.0.0/24")), names::IDENTITY4_CIDR);
        assert_eq!(
            identity_map(net("fd00:198:18::1/128")),
            names::IDENTITY6_EXACT
        );
        assert_eq!(identity_map(net("fd00:198:18::/48")), names::IDENTITY6_CIDR);
        assert_eq!(policy_map(POLICY_PREFIX_FULL), names::POLICY_EXACT);
        assert_eq!(policy_map(POLICY_PREFIX_FULL - 16), names::POLICY_WILDCARD);
    }

    #[test]
    fn split_lookup_equals_one_trie_of_every_entry_for_random_sets() {
        let mut seed = 0x1d3a_5eedu64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            // One entry per (prefix, network), as in a map; networks canonical.
            let mut entries = std::collections::BTreeMap::new();
            for _ in 0..(next() % 12) {
                let p = if next() % 2 == 0 {
                    8
                } else {
                    (next() % 9) as u32
                };
                let mask = if p == 0 { 0 } else { u8::MAX << (8 - p) };
                entries.insert((p, next() as u8 & mask), (next() % 5) as u32 + 1);
            }
            let entries: Vec<_> = entries.into_iter().map(|((p, n), id)| (p, n, id)).collect();
            for a in 0..=u8::MAX {
                assert_eq!(
                    split_lookup(&entries, a),
                    longest(&entries, a),
                    "key {a:#010b} in {entries:?}"
                );
            }
        }
    }
}
