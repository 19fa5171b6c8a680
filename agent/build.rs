//! Builds the eBPF crate (`../ebpf`, nightly, bpfel-unknown-none, BTF) and leaves the object
//! at `$OUT_DIR/palisade.bpf.o` for `include_bytes!`, so `palisade` is one self-contained
//! binary. `PALISADE_SKIP_EBPF=1` writes an empty stub instead, for tools that only type-check.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("palisade.bpf.o");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../ebpf");

    println!("cargo:rerun-if-env-changed=PALISADE_SKIP_EBPF");
    for p in [
        "src",
        "common/src",
        "Cargo.toml",
        "Cargo.lock",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    if env::var("PALISADE_SKIP_EBPF").is_ok_and(|v| v == "1") {
        std::fs::write(&object, [])?;
        return Ok(());
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir);
    // The outer cargo's settings describe the host build, not the BPF one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().map_err(|e| {
        anyhow::anyhow!("cannot run `rustup run nightly cargo` (run xtask/setup.sh first): {e}")
    })?;
    anyhow::ensure!(
        status.success(),
        "building the eBPF programs failed ({status}); run xtask/setup.sh to install the nightly toolchain, rust-src and bpf-linker"
    );
    copy(
        &target_dir.join("bpfel-unknown-none/release/palisade"),
        &object,
    )
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .map_err(|e| anyhow::anyhow!("copy {} -> {}: {e}", from.display(), to.display()))?;
    Ok(())
}
