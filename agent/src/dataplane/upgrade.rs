//! Moving from one layout version's pins to another's (an upgrade, or a downgrade) without
//! an instant of lost enforcement.
//!
//! Every version pins its maps and links under `<bpffs-dir>/v<N>/`. When an agent whose
//! layout is `vN` starts and finds another version's pins, before it loads its programs:
//! - each map whose kernel definition (type, key size, value size, flags, size) is the same
//!   in both versions is **shared**: the old map is pinned again under `vN`, so the new
//!   programs use the very map the old ones use (conntrack, counters and allow entries
//!   carry over, nothing to migrate, nothing half-migrated);
//! - a map that only changed size (e.g. `--conntrack-entries`) is **copied**: a new map of
//!   the new size beside the old one, filled with the old entries before any new program
//!   runs, and topped up with what the old programs tracked meanwhile when the last old
//!   link is gone;
//! - any other map is **rebuilt**: new and empty, filled by the agent's first sync before
//!   any interface gets the new programs. Maps keyed by endpoint slot (conntrack, counters,
//!   fragments) are rebuilt too when ENDPOINTS is, since slots would change meaning.
//!   TCP connections then continue through mid-stream adoption (unless
//!   `--revoke-untracked`); UDP flows are judged afresh.
//!
//! Then each interface's link is moved, not recreated: the new program replaces the old one
//! in the same TCX link (`bpf_link_update`, atomic: every packet runs exactly one of them,
//! each reading complete maps), the link is pinned under `vN` and its old pin removed.
//! When the old version has no links left, its pins are removed. A map's meaning may only
//! change with its name or its definition (see `palisade_common::LAYOUT_VERSION`).

use std::path::Path;

use aya::maps::{MapData, MapInfo};
use palisade_common::maps as names;

use super::maps::map_err;
use super::{sys, DataplaneError, Layout};

/// A map's kernel definition, as the object declares it or as a pinned map reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// What to do with one map of the previous layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapPlan {
    Share,
    Copy,
    Rebuild,
}

// bpf_map_type values of the maps Palisade pins.
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LPM_TRIE: u32 = 11;

/// The plan for one map, from its old and new definitions.
pub fn plan_map(old: &MapSpec, new: &MapSpec) -> MapPlan {
    if old == new {
        return MapPlan::Share;
    }
    let same_but_size = MapSpec {
        max_entries: new.max_entries,
        ..*old
    } == *new;
    let copyable = matches!(
        new.map_type,
        HASH | ARRAY | PERCPU_ARRAY | LRU_HASH | LPM_TRIE
    );
    if same_but_size && copyable {
        MapPlan::Copy
    } else {
        MapPlan::Rebuild
    }
}

/// Maps whose keys hold endpoint slots: only carried over when ENDPOINTS is.
const SLOT_KEYED: [&str; 3] = [names::CONNTRACK, names::COUNTERS, names::FRAGMENTS];

/// The plan of every pinned map, given each one's old and new definitions (`None`: the
/// map does not exist on that side).
pub fn plan(
    specs: &[(&'static str, Option<MapSpec>, Option<MapSpec>)],
) -> Vec<(&'static str, MapPlan)> {
    let mut out: Vec<(&'static str, MapPlan)> = specs
        .iter()
        .map(|(name, old, new)| {
            let p = match (old, new) {
                (Some(o), Some(n)) => plan_map(o, n),
                _ => MapPlan::Rebuild,
            };
            (*name, p)
        })
        .collect();
    let endpoints_kept = out
        .iter()
        .any(|(n, p)| *n == names::ENDPOINTS && *p != MapPlan::Rebuild);
    if !endpoints_kept {
        for (n, p) in &mut out {
            if SLOT_KEYED.contains(n) {
                *p = MapPlan::Rebuild;
            }
        }
    }
    out
}

/// The object's map definitions, with the sizes the loader will override.
pub fn object_specs(
    object: &[u8],
    conntrack_entries: u32,
) -> Result<Vec<(&'static str, MapSpec)>, DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DataplaneError::Upgrade {
        reason: format!("parsing the embedded object: {e}"),
    })?;
    Ok(names::PINNED
        .iter()
        .filter_map(|name| {
            let m = obj.maps.get(*name)?;
            let max_entries = if *name == names::CONNTRACK {
                conntrack_entries
            } else {
                m.max_entries()
            };
            Some((
                *name,
                MapSpec {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    flags: m.map_flags(),
                },
            ))
        })
        .collect())
}

pub fn pinned_spec(path: &Path) -> Option<MapSpec> {
    let info = MapInfo::from_pin(path).ok()?;
    Some(MapSpec {
        map_type: info.map_type().ok()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Prepares `layout`'s map directory from `previous`'s pins, before the programs load:
/// shares what can be shared (pins the old map under the new path). Returns the maps to
/// copy after loading. Maps already pinned under `layout` (an upgrade that was
/// interrupted) are left as they are.
pub fn prepare(
    layout: &Layout,
    previous: &Layout,
    object: &[u8],
    conntrack_entries: u32,
) -> Result<Vec<&'static str>, DataplaneError> {
    let new_specs = object_specs(object, conntrack_entries)?;
    let specs: Vec<(&'static str, Option<MapSpec>, Option<MapSpec>)> = names::PINNED
        .iter()
        .map(|name| {
            let old = pinned_spec(&previous.map(name));
            let new = new_specs.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
            (*name, old, new)
        })
        .collect();
    let mut copies = Vec::new();
    for (name, p) in plan(&specs) {
        if layout.map(name).exists() {
            continue;
        }
        tracing::info!(
            map = name,
            plan = ?p,
            from = previous.version(),
            to = layout.version(),
            "layout change"
        );
        match p {
            MapPlan::Share => {
                let old = MapData::from_pin(previous.map(name)).map_err(|e| map_err(name, e))?;
                old.pin(layout.map(name))
                    .map_err(|e| DataplaneError::Upgrade {
                        reason: format!(
                            "pinning {name} under {}: {e}",
                            layout.maps_dir().display()
                        ),
                    })?;
            }
            MapPlan::Copy => copies.push(name),
            MapPlan::Rebuild => {}
        }
    }
    Ok(copies)
}

/// Copies every entry of `name` from `previous` into `layout`'s map of the same definition
/// but another size. With `only_missing`, entries the new map already has are kept (a top
/// up: the new programs' entries are newer). Returns how many entries were written.
pub fn copy_map(
    previous: &Layout,
    layout: &Layout,
    name: &'static str,
    only_missing: bool,
) -> Result<u64, DataplaneError> {
    let (Some(spec), Ok(old), Ok(new)) = (
        pinned_spec(&previous.map(name)),
        MapData::from_pin(previous.map(name)),
        MapData::from_pin(layout.map(name)),
    ) else {
        return Ok(0);
    };
    let value_size = if spec.map_type == PERCPU_ARRAY {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })?;
        (spec.value_size as usize).div_ceil(8) * 8 * cpus
    } else {
        spec.value_size as usize
    };
    fn raw(m: &MapData, key_size: usize, value_size: usize) -> sys::RawMap<'_> {
        sys::RawMap {
            fd: std::os::fd::AsFd::as_fd(m.fd()),
            key_size,
            value_size,
        }
    }
    let key_size = spec.key_size as usize;
    let (from, to) = (
        raw(&old, key_size, value_size),
        raw(&new, key_size, value_size),
    );
    let io = |e: std::io::Error| DataplaneError::Upgrade {
        reason: format!("copying {name}: {e}"),
    };
    let mut written = 0;
    let flags = if only_missing && matches!(spec.map_type, HASH | LRU_HASH | LPM_TRIE) {
        sys::BPF_NOEXIST
    } else if only_missing {
        // Array cells always exist: a top up has nothing to add.
        return Ok(0);
    } else {
        sys::BPF_ANY
    };
    for key in from.keys().map_err(io)? {
        let Some(value) = from.get(&key).map_err(io)? else {
            continue;
        };
        match to.set(&key, &value, flags) {
            Ok(()) => written += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // A smaller new map: array indexes beyond it, or a full hash map.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                tracing::warn!(map = name, "new map smaller than the old one's entries");
                break;
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(written)
}

/// Removes a layout version's pins once its links are gone. Maps shared with `current`
/// live on through their other pin; maps that were copied into `current` are first topped
/// up with the entries the old programs added after the copy (flows they tracked until
/// their link moved).
pub fn retire(previous: &Layout, current: &Layout) -> Result<(), DataplaneError> {
    for name in names::PINNED {
        let (old, new) = (previous.map(name), current.map(name));
        let (Some(o), Some(n)) = (pinned_spec(&old), pinned_spec(&new)) else {
            continue;
        };
        let shared = match (MapInfo::from_pin(&old), MapInfo::from_pin(&new)) {
            (Ok(a), Ok(b)) => a.id() == b.id(),
            _ => true,
        };
        if !shared && plan_map(&o, &n) == MapPlan::Copy {
            let n = copy_map(previous, current, name, true)?;
            tracing::info!(
                map = name,
                entries = n,
                "topped up from the previous layout"
            );
        }
    }
    let dir = previous.versioned();
    std::fs::remove_dir_all(&dir).map_err(|source| DataplaneError::Io { path: dir, source })?;
    tracing::info!(version = previous.version(), "previous layout retired");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(map_type: u32, value_size: u32, max_entries: u32) -> MapSpec {
        MapSpec {
            map_type,
            key_size: 44,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn identical_maps_are_shared_resized_ones_copied_others_rebuilt() {
        let ct = spec(LRU_HASH, 16, 1024);
        assert_eq!(plan_map(&ct, &ct), MapPlan::Share);
        assert_eq!(plan_map(&ct, &spec(LRU_HASH, 16, 4096)), MapPlan::Copy);
        assert_eq!(plan_map(&ct, &spec(LRU_HASH, 24, 1024)), MapPlan::Rebuild);
        assert_eq!(plan_map(&ct, &spec(HASH, 16, 1024)), MapPlan::Rebuild);
        let flags = MapSpec { flags: 1, ..ct };
        assert_eq!(plan_map(&ct, &flags), MapPlan::Rebuild);
        // A ring buffer cannot be copied entry by entry.
        let ring = spec(27, 0, 1 << 18);
        assert_eq!(plan_map(&ring, &spec(27, 0, 1 << 19)), MapPlan::Rebuild);
    }

    #[test]
    fn slot_keyed_maps_follow_endpoints() {
        let ep = spec(HASH, 8, 2048);
        let ct = spec(LRU_HASH, 16, 1024);
        let kept = plan(&[
            (names::ENDPOINTS, Some(ep), Some(ep)),
            (names::CONNTRACK, Some(ct), Some(ct)),
            (names::POLICY_WILDCARD, None, Some(ep)),
        ]);
        assert_eq!(
            kept,
            vec![
                (names::ENDPOINTS, MapPlan::Share),
                (names::CONNTRACK, MapPlan::Share),
                (names::POLICY_WILDCARD, MapPlan::Rebuild),
            ]
        );
        let new_ep = MapSpec {
            value_size: 12,
            ..ep
        };
        let rebuilt = plan(&[
            (names::ENDPOINTS, Some(ep), Some(new_ep)),
            (names::CONNTRACK, Some(ct), Some(ct)),
            (names::IDENTITY4_CIDR, Some(ct), Some(ct)),
        ]);
        assert_eq!(
            rebuilt,
            vec![
                (names::ENDPOINTS, MapPlan::Rebuild),
                (names::CONNTRACK, MapPlan::Rebuild),
                (names::IDENTITY4_CIDR, MapPlan::Share),
            ]
        );
    }
}
