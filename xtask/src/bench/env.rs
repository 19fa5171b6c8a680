//! What the figures were measured on: kernel, CPU, memory, date, commit, tool versions.

use std::process::Command;

use super::proc::output;

fn first_line(cmd: &mut Command) -> String {
    output(cmd)
        .ok()
        .and_then(|o| o.lines().next().map(str::trim).map(str::to_string))
        .unwrap_or_else(|| "unavailable".into())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unavailable".into())
}

pub fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unavailable".into())
}

pub fn now_utc() -> String {
    first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]))
}

/// Key/value lines for the report's header.
pub fn describe(mode: &str, repo: &std::path::Path) -> Vec<(String, String)> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let commit =
        first_line(
            Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["log", "-1", "--format=%h %s"]),
        );
    let dirty = output(Command::new("git").arg("-C").arg(repo).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .map(|o| {
        if o.trim().is_empty() {
            ""
        } else {
            " (+ uncommitted changes)"
        }
    })
    .unwrap_or("");
    let load = read("/proc/loadavg");
    vec![
        ("date".into(), now_utc()),
        ("mode".into(), mode.into()),
        ("kernel".into(), read("/proc/version")),
        ("CPU model".into(), cpu_model()),
        ("CPUs".into(), cpus),
        ("memory".into(), mem),
        ("load average at start".into(), load),
        ("commit".into(), format!("{commit}{dirty}")),
        (
            "iperf3".into(),
            first_line(Command::new("iperf3").arg("--version")),
        ),
        (
            "sockperf".into(),
            first_line(Command::new("sockperf").arg("--version")),
        ),
        (
            "iptables".into(),
            first_line(Command::new("iptables").arg("--version")),
        ),
        (
            "ipset".into(),
            first_line(Command::new("ipset").arg("--version")),
        ),
        (
            "nft".into(),
            first_line(Command::new("nft").arg("--version")),
        ),
    ]
}
