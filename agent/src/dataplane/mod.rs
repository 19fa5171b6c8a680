//! The kernel side of Palisade, through aya: load the embedded tc programs, pin them and
//! their maps, attach them to pod interfaces with pinned TCX links, and read and write the
//! maps. Pins make enforcement outlive the agent: a restarted agent reopens the same maps
//! and swaps the programs in place (`bpf_link_update`), so no packet sees an empty map or
//! an interface without a program.

mod attach;
mod counters;
mod error;
mod layout;
mod maps;
mod service;
pub mod testrun;

use std::path::Path;

use aya::{programs::SchedClassifier, Ebpf, EbpfLoader};
use palisade_common::maps as names;

pub use attach::{attached_ifindexes, detach, ifindex_of};
pub use counters::{read_counters, CounterRow};
pub use error::DataplaneError;
pub use layout::{Hook, Layout, DEFAULT_BPFFS_DIR};
pub(crate) use maps::open as open_pinned;
pub use maps::Maps;
pub use service::{
    default_route_devices, parse_mark_mask, program_services, MarkedRun, ServiceOptions,
};

/// The programs, compiled from `ebpf/` by `build.rs` and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade.bpf.o"));

/// Settings that shape the maps when they are first created.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the conntrack LRU map (entries).
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: 262_144,
        }
    }
}

/// The loaded programs, their pinned maps, and the links that attach them.
pub struct Dataplane {
    layout: Layout,
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the programs. Maps already pinned under `layout` are reused as they are, so a
    /// restart keeps every entry and every tracked connection.
    pub fn load(layout: Layout, opts: &LoadOptions) -> Result<Self, DataplaneError> {
        preflight(layout.root())?;
        let maps_dir = layout.maps_dir();
        mkdir(&maps_dir)?;
        mkdir(&layout.links_dir())?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::CONNTRACK, opts.conntrack_entries)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        for hook in Hook::ALL {
            let prog = program(&mut ebpf, hook)?;
            prog.load().map_err(|source| DataplaneError::Program {
                name: hook.program(),
                source: Box::new(source),
            })?;
        }
        Ok(Self { layout, ebpf })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Attaches both programs to the interface. An interface that already carries a
    /// Palisade link (from an earlier agent) gets the new programs swapped in atomically.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in Hook::ALL {
            let path = self.layout.link(ifindex, hook);
            let prog = program(&mut self.ebpf, hook)?;
            attach::attach(prog, ifindex, hook, &path)?;
        }
        Ok(())
    }

    /// Opens the pinned maps of this dataplane.
    pub fn maps(&self) -> Result<Maps, DataplaneError> {
        Maps::open(&self.layout)
    }
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

/// Refuses to go on, naming what is missing, when the kernel or filesystem cannot host
/// the dataplane.
fn preflight(root: &Path) -> Result<(), DataplaneError> {
    let bpffs = root
        .ancestors()
        .find(|p| is_bpffs(p))
        .ok_or_else(|| DataplaneError::NoBpffs(root.to_path_buf()))?;
    tracing::debug!(bpffs = %bpffs.display(), "bpffs found");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Removes everything Palisade put in the kernel under `layout`: links (which detaches the
/// programs), pinned maps, and the directories.
pub fn cleanup(layout: &Layout) -> Result<(), DataplaneError> {
    for ifindex in attached_ifindexes(layout) {
        detach(layout, ifindex)?;
    }
    let dir = layout.versioned();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| DataplaneError::Io { path: dir, source })?;
    }
    // Only remove the root when nothing else (another layout version) lives there.
    let _ = std::fs::remove_dir(layout.root());
    Ok(())
}
