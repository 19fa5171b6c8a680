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
