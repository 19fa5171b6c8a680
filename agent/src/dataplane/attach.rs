//! TCX links, pinned per interface and hook. A pinned link keeps the program attached when
//! the agent exits; replacing the program of a pinned link is atomic.

use std::path::Path;

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
    pin: &Path,
) -> Result<(), DataplaneError> {
    let link_err = |e: &dyn std::fmt::Display| DataplaneError::Link {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    };
    if let Ok(old) = PinnedLink::from_pin(pin) {
        // Swap the program behind the existing link: the hook is never empty.
        let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| link_err(&e))?;
        let id = prog.attach_to_link(link).map_err(|e| link_err(&e))?;
        // The pin holds the link; our fd can go.
        drop(prog.take_link(id).map_err(|e| link_err(&e))?);
        return Ok(());
    }
    let ifname = ifname_of(ifindex)?;
    let attach_type = match hook {
        Hook::FromPod => TcAttachType::Ingress,
        Hook::ToPod => TcAttachType::Egress,
    };
    let id = prog
        .attach_with_options(
            &ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| link_err(&e))?;
    let link = prog.take_link(id).map_err(|e| link_err(&e))?;
    let fd = FdLink::try_from(link).map_err(|e| link_err(&e))?;
    fd.pin(pin).map_err(|e| link_err(&e))?;
    Ok(())
}

/// Detaches Palisade from an interface by removing its link pins.
pub fn detach(layout: &Layout, ifindex: u32) -> Result<(), DataplaneError> {
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

/// The kernel ids of the link pinned for (`ifindex`, `hook`) and of the program it runs:
/// a restart or an upgrade keeps the link id and changes the program id.
pub fn link_ids(layout: &Layout, ifindex: u32, hook: Hook) -> Option<LinkIds> {
    let link = FdLink::from(PinnedLink::from_pin(layout.link(ifindex, hook)).ok()?);
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

/// Interfaces that carry a pinned Palisade link.
pub fn attached_ifindexes(layout: &Layout) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .flatten()
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
