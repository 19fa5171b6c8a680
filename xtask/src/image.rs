//! `cargo xtask image`: build the container image from `Containerfile` with whichever
//! engine this machine has (podman, docker, buildah), tagged with the reference the
//! manifests deploy (`manifests/image/kustomization.yaml`), so the image reference is
//! written in exactly one place.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Engines in order of preference: podman and buildah need no daemon.
const ENGINES: [&str; 3] = ["podman", "docker", "buildah"];

/// What we found out about one engine.
enum Probe {
    Missing,
    /// Installed but unusable (e.g. the docker client without a reachable daemon).
    Broken(String),
    Ready,
}

pub fn run(engine: Option<String>, tag: Option<String>) -> anyhow::Result<()> {
    let root = repo_root();
    let reference = match tag {
        Some(t) => t,
        None => manifest_image(&root.join("manifests/image/kustomization.yaml"))?,
    };
    let engine = match engine {
        Some(e) => match probe(&e) {
            Probe::Ready => e,
            Probe::Missing => bail!("container engine `{e}` is not installed"),
            Probe::Broken(why) => bail!("container engine `{e}` is not usable: {why}"),
        },
        None => pick_engine()?,
    };
    eprintln!("==> building {reference} with {engine} (Containerfile, static musl binary)");
    let mut cmd = Command::new(&engine);
    // buildah's Dockerfile build is `bud` in every release (`build` only in newer ones).
    cmd.arg(if engine == "buildah" { "bud" } else { "build" })
        .args(["--file", "Containerfile", "--tag", &reference, "."])
        .current_dir(&root);
    crate::run(&mut cmd)?;
    eprintln!("==> built {reference}; deploy it with `kubectl apply -k manifests/`");
    Ok(())
}

fn pick_engine() -> anyhow::Result<String> {
    let mut report = Vec::new();
    for e in ENGINES {
        match probe(e) {
            Probe::Ready => return Ok(e.to_string()),
            Probe::Missing => report.push(format!("  {e}: not installed")),
            Probe::Broken(why) => report.push(format!("  {e}: installed but not usable: {why}")),
        }
    }
    bail!(
        "no container engine on this machine, so no image was built:\n{}\n\
         Install one (e.g. `apt-get install podman`) and rerun `cargo xtask image`, or build \
         `Containerfile` on a machine that has one.",
        report.join("\n")
    )
}

fn probe(engine: &str) -> Probe {
    let out = Command::new(engine)
        .arg(if engine == "buildah" {
            "version"
        } else {
            "info"
        })
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Probe::Missing,
        Err(e) => Probe::Broken(e.to_string()),
        Ok(o) if o.status.success() => Probe::Ready,
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let line = err
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no error message");
            Probe::Broken(format!("`{engine} info` failed: {line}"))
        }
    }
}

/// `newName:newTag` of the `palisade` entry of the kustomize image component.
fn manifest_image(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let entry = doc["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|i| i["name"].as_str() == Some("palisade"))
        .with_context(|| format!("{}: no `images` entry named palisade", path.display()))?;
    let (Some(name), Some(tag)) = (entry["newName"].as_str(), entry["newTag"].as_str()) else {
        bail!(
            "{}: the palisade image entry needs newName and newTag",
            path.display()
        );
    };
    Ok(format!("{name}:{tag}"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository root")
        .to_path_buf()
}
