//! Project tasks: `cargo xtask setup | test | demo | image | bench`.

mod bench;
mod demo;
mod image;

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; seconds when already done).
    Setup,
    /// Setup, then every test tier: unit/property, BPF_PROG_TEST_RUN, network namespaces.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build Palisade and walk through enforcement on a local demo node.
    Demo,
    /// Build the container image (Containerfile) with podman, docker or buildah, tagged with
    /// the reference in manifests/image/kustomization.yaml.
    Image {
        /// Use this engine instead of the first usable of podman, docker, buildah.
        #[arg(long)]
        engine: Option<String>,
        /// Tag the image with this reference instead of the manifests' one.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Measure Palisade (and iptables/nftables equivalents) on this machine; writes
    /// BENCHMARKS.md and BENCHMARKS.json.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Setup => setup(),
        Task::Test { args } => {
            setup()?;
            let started = Instant::now();
            let mut cmd = Command::new("cargo");
            cmd.args(["test", "--workspace", "--release"]).args(&args);
            run(&mut cmd)?;
            eprintln!("==> tests took {:.0?}", started.elapsed());
            Ok(())
        }
        Task::Demo => {
            setup()?;
            demo::run()
        }
        Task::Image { engine, tag } => image::run(engine, tag),
        Task::Bench(args) => bench::run(args),
    }
}

fn setup() -> anyhow::Result<()> {
    let started = Instant::now();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/setup.sh");
    run(Command::new("bash").arg(script))?;
    eprintln!("==> setup took {:.0?}", started.elapsed());
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
