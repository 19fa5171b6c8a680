//! What the dataplane needs from the machine, checked before anything is created, so the
//! agent refuses to start with one sentence naming the missing piece instead of failing
//! half-way through loading:
//! - a bpffs where the pins go (the nearest existing directory of `--bpffs-dir` must be on
//!   one: pins elsewhere would not survive the agent, and `mount -t bpf` fixes it);
//! - bpf(2) allowed to load a tc program (kernel with CONFIG_BPF_SYSCALL, and CAP_BPF +
//!   CAP_NET_ADMIN or root);
//! - TCX links (Linux 6.6): programs are attached and atomically replaced through them.
//!
//! Kernel BTF (`/sys/kernel/btf/vmlinux`) is only reported: the programs use no CO-RE
//! relocation or kfunc, so a kernel without it runs them the same.

use std::path::Path;

use aya::util::KernelVersion;

use super::{sys, DataplaneError};

/// First kernel with TCX (`BPF_TCX_INGRESS`/`EGRESS` links).
pub const TCX_SINCE: KernelVersion = KernelVersion::new(6, 6, 0);

/// `f_type` of bpffs in statfs(2).
pub const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Runs every check, in the order a person would fix them.
pub fn preflight(root: &Path) -> Result<(), DataplaneError> {
    bpffs(root)?;
    bpf_syscall()?;
    tcx(KernelVersion::current().ok(), &kernel_release())?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        tracing::info!("kernel BTF not available; Palisade's programs do not need it");
    }
    Ok(())
}

/// The nearest existing directory at or above `root` must be on bpffs.
fn bpffs(root: &Path) -> Result<(), DataplaneError> {
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    match fs_magic(existing) {
        Some(BPF_FS_MAGIC) => {
            tracing::debug!(bpffs = %existing.display(), "bpffs found");
            Ok(())
        }
        other => Err(DataplaneError::NoBpffs {
            dir: root.to_path_buf(),
            found: existing.to_path_buf(),
            fs: other.map(fs_name).unwrap_or("an unknown filesystem"),
        }),
    }
}

/// The filesystem type (statfs `f_type`) of `path`.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

fn fs_name(magic: i64) -> &'static str {
    match magic {
        0x0102_1994 => "tmpfs",
        0xef53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x794c_7630 => "overlayfs",
        0x6265_6572 => "sysfs",
        _ => "a filesystem that is not bpffs",
    }
}

fn bpf_syscall() -> Result<(), DataplaneError> {
    sys::probe_tc_program().map_err(|e| {
        let detail = match e.raw_os_error() {
            Some(libc::ENOSYS) => {
                "the kernel has no bpf() system call (built without CONFIG_BPF_SYSCALL)".into()
            }
            Some(libc::EPERM | libc::EACCES) => format!(
                "not permitted to load a tc program ({e}); run as root or with CAP_BPF and \
                 CAP_NET_ADMIN"
            ),
            _ => format!("loading a trivial tc program failed: {e}"),
        };
        DataplaneError::Unsupported {
            feature: "bpf()",
            detail,
        }
    })
}

fn tcx(kernel: Option<KernelVersion>, release: &str) -> Result<(), DataplaneError> {
    match kernel {
        Some(v) if v >= TCX_SINCE => Ok(()),
        _ => Err(DataplaneError::Unsupported {
            feature: "TCX",
            detail: format!(
                "tc programs are attached with TCX links, which need Linux 6.6 or later; this kernel is {release}"
            ),
        }),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_needs_6_6() {
        assert!(tcx(Some(KernelVersion::new(6, 6, 0)), "6.6.0").is_ok());
        assert!(tcx(Some(KernelVersion::new(6, 12, 3)), "6.12.3").is_ok());
        let e = tcx(Some(KernelVersion::new(6, 1, 90)), "6.1.90-amd64").unwrap_err();
        assert_eq!(
            e.to_string(),
            "TCX unavailable: tc programs are attached with TCX links, which need Linux 6.6 \
             or later; this kernel is 6.1.90-amd64"
        );
        assert!(tcx(None, "?").is_err());
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let e = bpffs(Path::new("/proc/palisade-preflight-test/pins")).unwrap_err();
        assert!(e.to_string().contains("/proc is on"), "{e}");
    }
}
