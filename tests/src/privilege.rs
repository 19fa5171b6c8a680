const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Panics unless the process can create namespaces, veths and BPF programs.
///
/// Kernel tests must fail loudly rather than skip: a silently skipped
/// enforcement suite looks exactly like a passing one in CI.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    let missing: Vec<&str> = match effective_caps() {
        Some(caps) => [
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
            (CAP_BPF, "CAP_BPF"),
        ]
        .into_iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, name)| name)
        .collect(),
        None => vec!["(could not read CapEff from /proc/self/status)"],
    };
    if euid != 0 || !missing.is_empty() {
        panic!(
            "these tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF) to create network \
             namespaces, veths and load eBPF programs; euid={euid}, missing: {missing:?}. \
             Run them as root (e.g. `sudo -E cargo test -p palisade-tests`) instead of skipping."
        );
    }
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Drops CAP_SYS_ADMIN from the calling thread's effective set, as the DaemonSet's agent
/// runs. Threads it starts inherit that; the rest of the process keeps the capability
/// (capabilities are per thread on Linux).
pub fn drop_cap_sys_admin_from_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset of the calling thread with version-3 buffers.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0,
            "capget"
        );
        data[0].effective &= !(1 << CAP_SYS_ADMIN);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0,
            "capset"
        );
    }
}
