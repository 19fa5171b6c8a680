use std::path::PathBuf;

/// What can go wrong between Palisade and the kernel. Each variant names the object.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "no bpffs for {dir}: {found} is on {fs}; mount one with `mount -t bpf bpf /sys/fs/bpf` \
         or pass a --bpffs-dir on bpffs"
    )]
    NoBpffs {
        dir: PathBuf,
        found: PathBuf,
        fs: &'static str,
    },
    #[error("{feature} unavailable: {detail}")]
    Unsupported {
        feature: &'static str,
        detail: String,
    },
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("pinned map {0} not found: is the agent running on this node? (or pass --bpffs-dir)")]
    NotPinned(PathBuf),
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
    #[error("link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("layout upgrade: {reason}")]
    Upgrade { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DataplaneError {
    /// The map a write failed on because it holds as many entries as it can (the kernel's
    /// E2BIG for hash maps, ENOSPC for LPM tries): the one failure the agent survives by
    /// leaving the entry out and reporting it.
    pub fn full_map(&self) -> Option<&'static str> {
        let DataplaneError::Map { name, source } = self else {
            return None;
        };
        match source.as_ref() {
            aya::maps::MapError::SyscallError(e)
                if matches!(
                    e.io_error.raw_os_error(),
                    Some(libc::E2BIG) | Some(libc::ENOSPC)
                ) =>
            {
                Some(name)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall(errno: i32) -> DataplaneError {
        DataplaneError::Map {
            name: "POLICY",
            source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            })),
        }
    }

    #[test]
    fn only_a_full_map_is_full() {
        assert_eq!(syscall(libc::E2BIG).full_map(), Some("POLICY"));
        assert_eq!(syscall(libc::ENOSPC).full_map(), Some("POLICY"));
        assert_eq!(syscall(libc::EPERM).full_map(), None);
        assert_eq!(syscall(libc::ENOMEM).full_map(), None);
        assert_eq!(DataplaneError::MissingProgram("x").full_map(), None);
    }
}
