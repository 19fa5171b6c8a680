//! `cargo xtask bench`: Palisade's performance report, measured in one run on this
//! machine and written to BENCHMARKS.md and BENCHMARKS.json.
//!
//! Parts: (1) per-packet cost of the tc programs via BPF_PROG_TEST_RUN against map
//! sizes; (2) real veth traffic against no enforcement, iptables+ipset and nftables;
//! (3) manifest-change-to-wire latency and memory of the real agent; (4) the compiler's
//! scale example; (5) kernel memory of the maps.
//!
//! The command first installs the tools (xtask/setup.sh, xtask/bench-setup.sh) and builds
//! everything it runs in release mode, then re-runs itself from the release build so the
//! traffic and probe loops are not debug code. Everything it creates (namespaces, veths,
//! rules inside those namespaces, pins, child processes, temp files) is removed when it
//! ends, also on failure and on Ctrl-C.

mod agent;
mod cluster;
mod compiler;
mod env;
mod firewall;
mod interrupt;
mod memory;
mod per_packet;
mod proc;
mod report;
mod stats;
mod traffic;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

use report::{Report, Section};

/// Set when running as the release build started by the outer command.
const INNER: &str = "PALISADE_BENCH_INNER";
const BUILD_SECONDS: &str = "PALISADE_BENCH_BUILD_SECONDS";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A ~2 minute smoke run: fewer configurations, rounds and changes.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (comma-separated): per-packet, traffic, agent, compiler, memory.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory for BENCHMARKS.md and BENCHMARKS.json (default: the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
}

const PARTS: [&str; 5] = ["per-packet", "memory", "compiler", "traffic", "agent"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository")
        .to_path_buf()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    for p in &args.only {
        if !PARTS.contains(&p.as_str()) {
            bail!("unknown part {p:?}; parts: {}", PARTS.join(", "));
        }
    }
    if std::env::var_os(INNER).is_some() {
        return inner(args);
    }
    let repo = repo();
    for script in ["setup.sh", "bench-setup.sh"] {
        let status = Command::new("bash")
            .arg(repo.join("xtask").join(script))
            .status()?;
        if !status.success() {
            bail!("xtask/{script} failed: {status}");
        }
    }
    let started = Instant::now();
    let mut build = Command::new("cargo");
    build
        .current_dir(&repo)
        .args(["build", "--release", "-p", "palisade", "-p", "xtask"]);
    eprintln!("==> building the agent and the benchmark (release)");
    if !build.status()?.success() {
        bail!("release build failed");
    }
    if repo.join(compiler::EXAMPLE).exists() {
        let status = Command::new("cargo")
            .current_dir(&repo)
            .args([
                "build",
                "--release",
                "-p",
                "palisade-policy",
                "--example",
                "scale",
            ])
            .status()?;
        if !status.success() {
            bail!("building the compiler's scale example failed");
        }
    }
    let build_s = started.elapsed().as_secs_f64();
    let exe = target_dir(&repo)?.join("release").join("xtask");
    let mut argv = vec!["bench".to_string()];
    if args.quick {
        argv.push("--quick".into());
    }
    if !args.only.is_empty() {
        argv.push(format!("--only={}", args.only.join(",")));
    }
    if let Some(out) = &args.out {
        argv.push(format!("--out={}", out.display()));
    }
    let err = Command::new(&exe)
        .args(&argv)
        .env(INNER, "1")
        .env(BUILD_SECONDS, format!("{build_s:.0}"))
        .exec();
    Err(err).with_context(|| format!("running {}", exe.display()))
}

fn target_dir(repo: &Path) -> anyhow::Result<PathBuf> {
    let out = proc::output(Command::new("cargo").current_dir(repo).args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata without target_directory")
}

/// Niceness of the benchmark and everything it starts (inherited by threads and child
/// processes created after it is set).
const NICE: i32 = -10;

fn inner(args: BenchArgs) -> anyhow::Result<()> {
    interrupt::install();
    palisade_tests::require_root();
    // The machine is shared: at normal priority the traffic tools lose whole time slices
    // to other work and single runs collapse. A higher priority for the benchmark (not
    // for any one configuration) keeps the comparison about the datapath.
    // SAFETY: plain syscall on the calling thread, before any other thread exists.
    let reniced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } == 0;
    let repo = repo();
    let bin = std::env::current_exe()?
        .parent()
        .context("executable without a directory")?
        .join("palisade");
    let mode = if args.quick {
        "quick (smoke run: fewer configurations, rounds and changes)"
    } else {
        "full"
    };
    let mut header = env::describe(mode, &repo);
    header.push((
        "priority".into(),
        if reniced {
            format!("benchmark and the processes it starts at nice {NICE} (shared machine; see the load average)")
        } else {
            "normal (setpriority failed)".into()
        },
    ));
    let wanted = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let started = Instant::now();
    let mut sections: Vec<Section> = Vec::new();
    for part in PARTS.iter().copied().filter(|p| wanted(p)) {
        eprintln!("==> bench: {part}");
        let t = Instant::now();
        let (key, title, result) = match part {
            "per-packet" => (
                "per_packet",
                "1. Per-packet cost of the tc programs",
                per_packet::run(args.quick),
            ),
            "traffic" => (
                "traffic",
                "2. Real traffic over veth",
                traffic::run(args.quick),
            ),
            "agent" => (
                "agent",
                "3. Policy programming latency and agent memory",
                agent::run(args.quick, &bin),
            ),
            "compiler" => ("compiler", "4. Policy compiler", compiler::run(&repo)),
            _ => ("map_memory", "5. Map memory", memory::run()),
        };
        // Guards have already cleaned up by the time an error arrives here.
        let mut section = match result {
            Ok(s) => s,
            Err(e) if interrupt::requested() => return Err(e),
            Err(e) => {
                eprintln!("    {part} failed: {e:#}");
                Section::failed(key, title, &e)
            }
        };
        section.seconds = t.elapsed().as_secs_f64();
        eprintln!("    {part}: {:.0} s", section.seconds);
        sections.push(section);
    }
    sections.sort_by(|a, b| a.title.cmp(&b.title));
    header.push((
        "run time".into(),
        format!("{:.0} s (builds excluded)", started.elapsed().as_secs_f64()),
    ));
    if let Ok(b) = std::env::var(BUILD_SECONDS) {
        header.push(("release build before the run".into(), format!("{b} s")));
    }
    let mut command = String::from("cargo xtask bench");
    if args.quick {
        command += " --quick";
    }
    if !args.only.is_empty() {
        command += &format!(" --only {}", args.only.join(","));
    }
    let r = Report {
        header,
        command,
        sections,
    };
    let out = args.out.unwrap_or(repo);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("BENCHMARKS.md"), report::markdown(&r))?;
    std::fs::write(
        out.join("BENCHMARKS.json"),
        serde_json::to_string_pretty(&report::json(&r))? + "\n",
    )?;
    eprintln!(
        "==> wrote {}/BENCHMARKS.md and BENCHMARKS.json",
        out.display()
    );
    for s in &r.sections {
        for t in &s.targets {
            eprintln!("    [{}] {} — {}", t.verdict.label(), t.what, t.detail);
        }
    }
    let failed = r.sections.iter().any(|s| s.data.get("error").is_some());
    if failed {
        bail!("some parts failed; see the report");
    }
    Ok(())
}
