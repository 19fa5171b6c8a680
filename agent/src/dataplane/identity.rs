//! The IP→identity mapping of one address family, as the programs read it: two kernel maps.
//! Host entries (/32, /128: pod and node IPs, nearly all of them) live in an exact-match
//! hash map, whose lookup cost does not grow with its size; shorter prefixes (ipBlock CIDRs
//! and their except holes) in an LPM trie. The programs probe the hash map first and walk
//! the trie only on a miss (`check::identity` in `ebpf/`).
//!
//! That answers what one trie of every entry would: a host entry is the longest prefix of
//! its address, so when the hash map has the address nothing in the trie could win, and
//! when it has not, the trie holds every entry covering the address. It only needs each
//! entry to live in exactly one map, chosen by its prefix length alone ([`holds_exact`]),
//! which every write and delete here does. To the agent the pair reads as one map of LPM
//! keys ([`IdentityMaps::keys`], [`IdentityMaps::iter`]), so the reconciler's sweep and
//! the dumps see both halves.

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, MapData, MapError,
};
use palisade_common::IdentityValue;

/// Whether an entry of `prefix` bits of an `N`-byte address family belongs in the exact
/// hash map (a host prefix) rather than the trie.
pub const fn holds_exact<const N: usize>(prefix: u32) -> bool {
    prefix as usize == N * 8
}

/// One family's identity maps: `N` is 4 (IPv4) or 16 (IPv6).
pub struct IdentityMaps<const N: usize> {
    /// Host addresses (`IDENTITY_EXACT_V4` / `_V6`).
    pub exact: HashMap<MapData, [u8; N], IdentityValue>,
    /// Every shorter prefix (`IDENTITY_CIDR_V4` / `_V6`).
    pub cidr: LpmTrie<MapData, [u8; N], IdentityValue>,
}

/// Which map an operation failed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Exact,
    Cidr,
}

impl<const N: usize> IdentityMaps<N> {
    /// Writes the entry `addr/prefix` into the map that holds its prefix length.
    pub fn insert(
        &mut self,
        prefix: u32,
        addr: [u8; N],
        v: IdentityValue,
    ) -> Result<(), (Half, MapError)> {
        if holds_exact::<N>(prefix) {
            self.exact.insert(addr, v, 0).map_err(|e| (Half::Exact, e))
        } else {
            self.cidr
                .insert(&Key::new(prefix, addr), v, 0)
                .map_err(|e| (Half::Cidr, e))
        }
    }

    /// Deletes the entry `addr/prefix` from the map that holds its prefix length.
    pub fn remove(&mut self, prefix: u32, addr: [u8; N]) -> Result<(), (Half, MapError)> {
        if holds_exact::<N>(prefix) {
            self.exact.remove(&addr).map_err(|e| (Half::Exact, e))
        } else {
            self.cidr
                .remove(&Key::new(prefix, addr))
                .map_err(|e| (Half::Cidr, e))
        }
    }

    /// The identity the programs find for the address `addr`, probing as they do.
    pub fn get(&self, addr: [u8; N]) -> Option<IdentityValue> {
        self.exact
            .get(&addr, 0)
            .or_else(|_| self.cidr.get(&Key::new((N * 8) as u32, addr), 0))
            .ok()
    }

    /// Every entry's key, as an LPM key (host entries with the full prefix length).
    pub fn keys(&self) -> impl Iterator<Item = Result<Key<[u8; N]>, MapError>> + '_ {
        let exact = self
            .exact
            .keys()
            .map(|k| k.map(|a| Key::new((N * 8) as u32, a)));
        exact.chain(self.cidr.keys())
    }

    /// Every entry, keyed like [`IdentityMaps::keys`].
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = Result<(Key<[u8; N]>, IdentityValue), MapError>> + '_ {
        let exact = self
            .exact
            .iter()
            .map(|r| r.map(|(a, v)| (Key::new((N * 8) as u32, a), v)));
        exact.chain(self.cidr.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny model of both layouts over 8-bit addresses split like the real ones: entries
    /// are (prefix, network, id).
    fn longest(entries: &[(u32, u8, u32)], a: u8) -> Option<u32> {
        entries
            .iter()
            .filter(|(p, net, _)| *p == 0 || (a ^ net) >> (8 - p) == 0)
            .max_by_key(|(p, _, _)| *p)
            .map(|(_, _, id)| *id)
    }

    fn split_lookup(entries: &[(u32, u8, u32)], a: u8) -> Option<u32> {
        let (exact, cidr): (Vec<_>, Vec<_>) = entries
            .iter()
            .copied()
            .partition(|(p, _, _)| holds_exact::<1>(*p));
        exact
            .iter()
            .find(|(_, net, _)| *net == a)
            .map(|(_, _, id)| *id)
            .or_else(|| longest(&cidr, a))
    }

    #[test]
    fn host_prefixes_go_to_the_hash_map_and_nothing_else_does() {
        assert!(holds_exact::<4>(32));
        assert!(holds_exact::<16>(128));
        for p in 0..32 {
            assert!(!holds_exact::<4>(p), "/{p}");
        }
        for p in 0..128 {
            assert!(!holds_exact::<16>(p), "/{p}");
        }
        assert!(!holds_exact::<16>(32), "an IPv6 /32 is a CIDR");
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
                    "address {a:#010b} in {entries:?}"
                );
            }
        }
    }
}
