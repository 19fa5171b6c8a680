//! TCX links, pinned per interface and hook. A pinned link keeps the program attached when
//! the agent exits; replacing the program of a pinned link is atomic, and so is moving a
//! link from another layout version's directory (see `upgrade`).

use std::path::{Path, PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, SchedClassifier, TcAttachType,
};

use super::{DataplaneError, Hook, Layout};

pub(super) fn attach(
    prog: &mut SchedClassifier,
    ifindex: u32,
    hook: Hook,
    layout: &Layout,
) -> Result<(), DataplaneError> {
    let attach_type = match hook {
        Hook::FromPod => TcAttachType::Ingress,
        Hook::ToPod => TcAttachType::Egress,
    };
    attach_at(prog, ifindex, attach_type, layout, |l| {
        l.link(ifindex, hook)
    })
}

/// Puts `prog` on `ifindex`'s `attach_type` hook through the TCX link pinned at
/// `pin_of(layout)`: swapped into the link pinned there (atomic); else into the link
/// another layout version pinned (an upgrade: the same link gets the new program, then
/// moves to this version's directory, so the old version can retire); else attached anew
/// and the new link pinned. Pod hooks and uplinks share it, so both follow an upgrade.
pub(super) fn attach_at(
    prog: &mut SchedClassifier,
    ifindex: u32,
    attach_type: TcAttachType,
    layout: &Layout,
    pin_of: impl Fn(&Layout) -> PathBuf,
) -> Result<(), DataplaneError> {
    let pin = pin_of(layout);
    if pin.exists() {
        return swap(prog, &pin, None);
    }
    if let Some(old) = layout.others().iter().map(&pin_of).find(|p| p.exists()) {
        return swap(prog, &old, Some(&pin));
    }
    let link_err = |e: &dyn std::fmt::Display| DataplaneError::Link {
        path: pin.clone(),
        reason: e.to_string(),
    };
    let id = prog
        .attach_with_options(
            &ifname_of(ifindex)?,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| link_err(&e))?;
    let link = prog.take_link(id).map_err(|e| link_err(&e))?;
    let fd = FdLink::try_from(link).map_err(|e| link_err(&e))?;
    fd.pin(&pin).map_err(|e| link_err(&e))?;
    Ok(())
}

/// Swaps `prog` into the link pinned at `pin` (`bpf_link_update`: atomic, the hook is
/// never empty); with `move_to`, pins the link there and then removes the old pin, so the
/// link is never without a pin.
fn swap(
    prog: &mut SchedClassifier,
    pin: &Path,
    move_to: Option<&Path>,
) -> Result<(), DataplaneError> {
    let link_err = |e: &dyn std::fmt::Display| DataplaneError::Link {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    };
    let old = PinnedLink::from_pin(pin).map_err(|e| link_err(&e))?;
    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| link_err(&e))?;
    let id = prog.attach_to_link(link).map_err(|e| link_err(&e))?;
    let link = prog.take_link(id).map_err(|e| link_err(&e))?;
    if let Some(to) = move_to {
        let fd = FdLink::try_from(link).map_err(|e| link_err(&e))?;
        drop(fd.pin(to).map_err(|e| link_err(&e))?);
        std::fs::remove_file(pin).map_err(|source| DataplaneError::Io {
            path: pin.to_path_buf(),
            source,
        })?;
    }
    // Otherwise the pin holds the link and our fd can go.
    Ok(())
}

/// Detaches Palisade from an interface by removing its link pins, in every layout version
/// under the root. A previous version left without links is retired. Private to the
/// dataplane: callers detach through `Dataplane::detach`, which also closes the link fds
/// it keeps (with those open, removing the pins alone leaves the programs attached).
pub(super) fn detach(layout: &Layout, ifindex: u32) -> Result<(), DataplaneError> {
    for version in layout.all_versions() {
        unpin_links(&version, ifindex)?;
        if version != *layout && version.links_dir().exists() && !has_links(&version) {
            super::upgrade::retire(&version, layout)?;
        }
    }
    Ok(())
}

fn unpin_links(layout: &Layout, ifindex: u32) -> Result<(), DataplaneError> {
    for hook in Hook::ALL {
        let path = layout.link(ifindex, hook);
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                let fd = link.unpin().map_err(|source| DataplaneError::Io {
                    path: path.clone(),
                    source,
                })?;
                drop(fd);
            }
            Err(_) if !path.exists() => {}
            Err(e) => {
                return Err(DataplaneError::Link {
                    path,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Whether any link is pinned under this layout version.
pub(super) fn has_links(layout: &Layout) -> bool {
    std::fs::read_dir(layout.links_dir())
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// The kernel ids of the link pinned for (`ifindex`, `hook`) and of the program it runs:
/// a restart or an upgrade keeps the link id and changes the program id.
pub fn link_ids(layout: &Layout, ifindex: u32, hook: Hook) -> Option<LinkIds> {
    pinned_link_ids(&layout.link(ifindex, hook))
}

/// The ids of the link pinned at `pin` (a pod hook's or an uplink's), if there is one.
pub fn pinned_link_ids(pin: &std::path::Path) -> Option<LinkIds> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    let info = link.info().ok()?;
    Some(LinkIds {
        link: info.id(),
        program: info.program_id(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkIds {
    pub link: u32,
    pub program: u32,
}

/// Interfaces that carry a pinned Palisade link, of this layout version or another one
/// under the same root (links an upgrade has not moved yet).
pub fn attached_ifindexes(layout: &Layout) -> Vec<u32> {
    let mut out: Vec<u32> = layout
        .all_versions()
        .iter()
        .flat_map(|l| {
            std::fs::read_dir(l.links_dir())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|e| {
            let name = e.file_name();
            let (idx, _) = name.to_str()?.split_once('-')?;
            idx.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub fn ifindex_of(ifname: &str) -> Result<u32, DataplaneError> {
    let c = std::ffi::CString::new(ifname).map_err(|_| DataplaneError::Interface {
        name: ifname.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DataplaneError::Interface {
            name: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

fn ifname_of(ifindex: u32) -> Result<String, DataplaneError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(DataplaneError::Interface {
            name: format!("ifindex {ifindex}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}
