//! The kernel side of Palisade, through aya: load the embedded tc programs, pin them and
//! their maps, attach them to pod interfaces with pinned TCX links, and read and write the
//! maps. Pins make enforcement outlive the agent: a restarted agent reopens the same maps
//! and swaps the programs in place (`bpf_link_update`), so no packet sees an empty map or
//! an interface without a program. An agent of another layout version upgrades the pins
//! beside the old ones and moves each link over (`upgrade`). Before anything, `preflight`
//! refuses a machine that cannot host the dataplane, naming what is missing; `conntrack`
//! collects dead flows.

mod attach;
mod conntrack;
mod counters;
mod error;
mod layout;
mod maps;
mod preflight;
mod repin;
mod service;
mod split;
mod sys;
pub mod testrun;
pub mod upgrade;

use std::path::Path;

use aya::{programs::SchedClassifier, Ebpf, EbpfLoader};
use palisade_common::maps as names;

use attach::detach;
pub use attach::{attached_ifindexes, ifindex_of, link_ids, pinned_link_ids, LinkIds};
pub use conntrack::{monotonic_now_ns, GcStats, GC_GRACE, GC_INTERVAL};
pub use counters::{read_counters, CounterRow};
pub use error::DataplaneError;
pub use layout::{Hook, Layout, DEFAULT_BPFFS_DIR};
pub(crate) use maps::open as open_pinned;
pub use maps::{map_ids, IdentityMaps, Maps};
pub use preflight::{fs_magic, BPF_FS_MAGIC, TCX_SINCE};
pub use repin::PinReport;
pub use service::{
    default_route_devices, parse_mark_mask, program_services, MarkedRun, ServiceOptions,
};
pub use split::{identity_map, policy_map, SplitLpm};

/// The programs, compiled from `ebpf/` by `build.rs` and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade.bpf.o"));

/// Settings that shape the maps when they are first created.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the conntrack LRU map (entries).
    pub conntrack_entries: u32,
    /// Other maps' sizes, by map name, instead of the object's: tests shrink
    /// `IDENTITY4_CIDR`, `POLICY_EXACT` or `ENDPOINTS` to fill them with a handful of pods.
    pub max_entries: std::collections::BTreeMap<&'static str, u32>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: 262_144,
            max_entries: Default::default(),
        }
    }
}

/// The loaded programs, their pinned maps, and the links that attach them.
pub struct Dataplane {
    layout: Layout,
    ebpf: Ebpf,
    /// An fd of every map and link pinned under `layout`, to pin them again if their pins
    /// go (see `repin`); links attached by this dataplane stay attached while it lives.
    pins: repin::Keeper,
}

impl Dataplane {
    /// Loads the programs. Maps already pinned under `layout` are reused as they are, so a
    /// restart keeps every entry and every tracked connection. Pins of another layout
    /// version are upgraded from (see `upgrade`): compatible maps shared, resized ones
    /// copied, the rest rebuilt; its links move to the new programs in [`Dataplane::attach`].
    pub fn load(layout: Layout, opts: &LoadOptions) -> Result<Self, DataplaneError> {
        preflight::preflight(layout.root())?;
        let maps_dir = layout.maps_dir();
        mkdir(&maps_dir)?;
        mkdir(&layout.links_dir())?;
        let previous = previous_layout(&layout);
        let copies = match &previous {
            Some(prev) => upgrade::prepare(&layout, prev, OBJECT, opts.conntrack_entries)?,
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::CONNTRACK, opts.conntrack_entries);
        for (&name, &n) in &opts.max_entries {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        if let Ok(info) = aya::maps::MapInfo::from_pin(layout.map(names::CONNTRACK)) {
            if info.max_entries() != opts.conntrack_entries {
                // A pinned map keeps its size: changing it takes a new layout version (an
                // upgrade copies the entries) or `--cleanup`.
                tracing::warn!(
                    pinned = info.max_entries(),
                    requested = opts.conntrack_entries,
                    "conntrack map already pinned with another size; keeping it"
                );
            }
        }
        if let Some(prev) = &previous {
            // Before any interface runs the new programs: they never see a half-copied map.
            for name in copies {
                let n = upgrade::copy_map(prev, &layout, name, false)?;
                tracing::info!(map = name, entries = n, "copied from the previous layout");
            }
        }
        for hook in Hook::ALL {
            let prog = program(&mut ebpf, hook)?;
            prog.load().map_err(|source| DataplaneError::Program {
                name: hook.program(),
                source: Box::new(source),
            })?;
        }
        repin::raise_fd_limit();
        let mut dp = Self {
            layout,
            ebpf,
            pins: repin::Keeper::default(),
        };
        for name in names::PINNED {
            dp.hold(dp.layout.map(name))?;
        }
        dp.retire_unlinked()?;
        Ok(dp)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Attaches both programs to the interface. An interface that already carries a
    /// Palisade link (from an earlier agent, of this layout version or another) gets the
    /// new programs swapped into that link atomically.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in Hook::ALL {
            let prog = program(&mut self.ebpf, hook)?;
            attach::attach(prog, ifindex, hook, &self.layout)?;
            self.hold(self.layout.link(ifindex, hook))?;
        }
        self.retire_unlinked()
    }

    /// Detaches Palisade from the interface (its link pins, in every layout version),
    /// letting go of the links this dataplane held.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in Hook::ALL {
            self.pins.release(&self.layout.link(ifindex, hook));
        }
        detach(&self.layout, ifindex)
    }

    /// Keeps the object pinned at `path` (see `repin`).
    fn hold(&mut self, path: std::path::PathBuf) -> Result<(), DataplaneError> {
        self.pins
            .hold(path.clone())
            .map_err(|source| DataplaneError::Io { path, source })
    }

    /// Puts back every pin of this dataplane that went missing, mounting bpffs again if
    /// it was unmounted (see `repin`).
    pub fn check_pins(&mut self) -> PinReport {
        self.pins.check(self.layout.root())
    }

    /// Retires the other layout versions that no longer have links.
    fn retire_unlinked(&self) -> Result<(), DataplaneError> {
        for other in self.layout.others() {
            if !attach::has_links(&other) {
                upgrade::retire(&other, &self.layout)?;
            }
        }
        Ok(())
    }

    /// Opens the pinned maps of this dataplane.
    pub fn maps(&self) -> Result<Maps, DataplaneError> {
        Maps::open(&self.layout)
    }
}

/// The layout version to upgrade from: of the others with pinned maps, the newest one that
/// still has links (it is the one enforcing), else the newest.
fn previous_layout(layout: &Layout) -> Option<Layout> {
    let with_maps: Vec<Layout> = layout
        .others()
        .into_iter()
        .filter(|l| l.maps_dir().exists())
        .collect();
    with_maps
        .iter()
        .rev()
        .find(|l| attach::has_links(l))
        .or(with_maps.last())
        .cloned()
}

fn program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DataplaneError> {
    let name = hook.program();
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name,
            source: Box::new(source),
        })
}

fn mkdir(dir: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes everything Palisade put in the kernel under `layout`'s root, of every layout
/// version: links (which detaches the programs), pinned maps, and the directories.
pub fn cleanup(layout: &Layout) -> Result<(), DataplaneError> {
    for version in layout.all_versions() {
        for ifindex in attached_ifindexes(&version) {
            detach(&version, ifindex)?;
        }
        let dir = version.versioned();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| DataplaneError::Io { path: dir, source })?;
        }
    }
    // Only remove the root when nothing else lives there.
    let _ = std::fs::remove_dir(layout.root());
    Ok(())
}
