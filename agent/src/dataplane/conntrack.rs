//! Garbage collection of the connection-tracking and fragment maps.
//!
//! Why it never deletes a live flow:
//! - The programs treat a dead entry (last packet older than its timeout, see
//!   `Config::ct_alive`) exactly as an absent one, so deleting a dead entry changes no
//!   verdict.
//! - An entry is only collected once it has been dead for [`GC_GRACE`]. The programs touch
//!   an entry only after reading the clock and finding it alive, and finish within
//!   microseconds; so an entry that was dead `GC_GRACE` ago cannot be in the middle of being
//!   refreshed in place.
//! - The one race left is a packet that finds the dead entry and replaces it with a fresh
//!   one (a new flow on the same tuple, or the same flow after an idle spell) between our
//!   scan and our delete. The delete is therefore `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which
//!   returns the value it removed atomically; a value that turns out alive is put back
//!   (`BPF_NOEXIST`, so a newer entry a packet wrote meanwhile wins). Between the two
//!   syscalls (microseconds) a reply of that just-refreshed flow would be judged as
//!   untracked: TCP is adopted mid-stream (unless `--revoke-untracked`), a UDP reply is
//!   dropped once and counted; no packet is ever let through by this.
//!
//! The agent should call [`Maps::gc_conntrack`] periodically (every [`GC_INTERVAL`]).
//! LRU eviction of a full map is separate: it may evict a live flow (its replies are then
//! judged as new packets, never passed for free), and garbage collection keeps the map
//! from filling with dead entries so that eviction rarely hits live ones.

use std::os::fd::AsFd as _;
use std::time::Duration;

use aya::maps::{IterableMap, MapError};
use palisade_common::{maps as names, Config, CtKey, CtValue, FragKey, FRAGMENT_TIMEOUT_NS};

use super::{sys, DataplaneError, Maps};

/// How long an entry stays dead before it is collected.
pub const GC_GRACE: Duration = Duration::from_secs(5);

/// How often the agent should collect: half the shortest default timeout (UDP, 60 s), so
/// dead entries never linger long enough to crowd out live ones. A pass costs one map scan,
/// two syscalls per entry: 0.6 s for 100,000 entries in a debug build.
pub const GC_INTERVAL: Duration = Duration::from_secs(30);

// The grace must be short against every timeout, and the interval against the UDP one.
const _: () = assert!(GC_GRACE.as_secs() < palisade_common::CT_DEFAULT_CLOSING_TIMEOUT_S as u64);
const _: () = assert!(GC_INTERVAL.as_secs() < palisade_common::CT_DEFAULT_UDP_TIMEOUT_S as u64);

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    /// Entries looked at.
    pub scanned: u64,
    /// Dead entries removed.
    pub deleted: u64,
    /// Entries found dead by the scan but refreshed by a packet before the delete: put back.
    pub restored: u64,
}

impl std::ops::AddAssign for GcStats {
    fn add_assign(&mut self, o: Self) {
        self.scanned += o.scanned;
        self.deleted += o.deleted;
        self.restored += o.restored;
    }
}

/// `bpf_ktime_get_ns()` as user space sees it: CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Maps {
    /// Removes the conntrack and fragment entries that have been dead for [`GC_GRACE`] at
    /// `now_ns` (use [`monotonic_now_ns`]). Never removes an entry a packet may still use.
    pub fn gc_conntrack(&mut self, now_ns: u64) -> Result<GcStats, DataplaneError> {
        let mut stats = GcStats::default();
        let (keys, scanned) = self.conntrack_dead(now_ns)?;
        stats.scanned += scanned;
        stats += self.conntrack_collect(&keys, now_ns)?;
        stats += self.gc_fragments(now_ns)?;
        Ok(stats)
    }

    /// The scan half of a collection: keys of conntrack entries dead for [`GC_GRACE`],
    /// and how many entries were looked at.
    pub fn conntrack_dead(&self, now_ns: u64) -> Result<(Vec<CtKey>, u64), DataplaneError> {
        let cfg = self.config_now()?;
        let horizon = now_ns.saturating_sub(GC_GRACE.as_nanos() as u64);
        let mut scanned = 0;
        let mut dead = Vec::new();
        for item in self.conntrack.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                // Removed (LRU eviction, another collector) while we iterated.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(names::CONNTRACK, e)),
            };
            scanned += 1;
            if !cfg.ct_alive(k.proto, &v, horizon) {
                dead.push(k);
            }
        }
        Ok((dead, scanned))
    }

    /// The delete half: removes each of `keys` unless a packet refreshed it since the scan
    /// (then it is put back). See the module documentation for why this is safe.
    pub fn conntrack_collect(
        &mut self,
        keys: &[CtKey],
        now_ns: u64,
    ) -> Result<GcStats, DataplaneError> {
        let cfg = self.config_now()?;
        let horizon = now_ns.saturating_sub(GC_GRACE.as_nanos() as u64);
        let mut stats = GcStats::default();
        for key in keys {
            let fd = self.conntrack.map().fd();
            let removed: Option<CtValue> =
                sys::lookup_and_delete(fd.as_fd(), key).map_err(|e| io_err(names::CONNTRACK, e))?;
            match removed {
                None => {}
                Some(v) if cfg.ct_alive(key.proto, &v, horizon) => {
                    match self.conntrack.insert(key, v, sys::BPF_NOEXIST) {
                        Ok(()) => stats.restored += 1,
                        // A packet already wrote a newer entry: keep that one.
                        Err(MapError::SyscallError(e))
                            if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                        {
                            stats.restored += 1
                        }
                        Err(e) => return Err(map_err(names::CONNTRACK, e)),
                    }
                }
                Some(_) => stats.deleted += 1,
            }
        }
        Ok(stats)
    }

    /// First-fragment records older than the fragment timeout plus [`GC_GRACE`], removed
    /// the same way.
    fn gc_fragments(&mut self, now_ns: u64) -> Result<GcStats, DataplaneError> {
        let too_old = |seen: u64| {
            now_ns.saturating_sub(seen) >= FRAGMENT_TIMEOUT_NS + GC_GRACE.as_nanos() as u64
        };
        let mut stats = GcStats::default();
        let mut dead: Vec<FragKey> = Vec::new();
        for item in self.fragments.iter() {
            match item {
                Ok((k, seen)) => {
                    stats.scanned += 1;
                    if too_old(seen) {
                        dead.push(k);
                    }
                }
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(names::FRAGMENTS, e)),
            }
        }
        for key in dead {
            let fd = self.fragments.map().fd();
            let removed: Option<u64> = sys::lookup_and_delete(fd.as_fd(), &key)
                .map_err(|e| io_err(names::FRAGMENTS, e))?;
            match removed {
                None => {}
                Some(seen) if !too_old(seen) => {
                    let _ = self.fragments.insert(key, seen, sys::BPF_NOEXIST);
                    stats.restored += 1;
                }
                Some(_) => stats.deleted += 1,
            }
        }
        Ok(stats)
    }

    fn config_now(&self) -> Result<Config, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|e| map_err(names::CONFIG, e))
    }
}

fn map_err(name: &'static str, source: MapError) -> DataplaneError {
    DataplaneError::Map {
        name,
        source: Box::new(source),
    }
}

fn io_err(name: &'static str, e: std::io::Error) -> DataplaneError {
    DataplaneError::Map {
        name,
        source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_and_delete_elem",
            io_error: e,
        })),
    }
}
