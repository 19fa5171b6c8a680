//! The agent refuses to start, with a message naming what is missing, when the machine
//! cannot host the dataplane: no bpffs where the pins go (a plain directory, a tmpfs, even
//! one mounted inside /sys/fs/bpf), or no permission to load tc programs. Nothing is
//! created in either case.

use std::path::{Path, PathBuf};
use std::process::Command;

use palisade_tests::agent::{run_to_end, TempDir};
use palisade_tests::require_root;

const BIN: &str = env!("CARGO_BIN_EXE_palisade");

/// `palisade agent` with every directory under `base` except the pins, which go to `pins`.
fn agent_args(base: &Path, pins: &Path) -> Vec<String> {
    let manifests = base.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    [
        "agent".into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--node-name".into(),
        "n1".into(),
        "--bpffs-dir".into(),
        pins.display().to_string(),
        "--run-dir".into(),
        base.join("run").display().to_string(),
    ]
    .to_vec()
}

fn refused(args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = run_to_end(Path::new(BIN), &args).unwrap();
    assert!(!ok, "the agent started: {out}");
    out
}

#[test]
fn agent_refuses_pins_on_a_plain_directory() {
    require_root();
    let tmp = TempDir::new("pf-plain").unwrap();
    let pins = tmp.path().join("pins");
    let out = refused(&agent_args(tmp.path(), &pins));
    let want = format!(
        "no bpffs for {}: {} is on ",
        pins.display(),
        tmp.path().display()
    );
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("mount -t bpf bpf /sys/fs/bpf"), "{out}");
    assert!(!pins.exists(), "pins were created on a plain directory");
    assert!(!tmp.path().join("run").exists());
}

/// A tmpfs mounted on a directory; unmounted and removed on drop.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(dir: PathBuf) -> TmpfsMount {
        std::fs::create_dir_all(&dir).unwrap();
        let m = TmpfsMount(dir);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "palisade-test", &m.0.display().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", m.0.display());
        m
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn agent_refuses_pins_on_a_tmpfs_even_inside_the_bpffs() {
    require_root();
    let tmp = TempDir::new("pf-tmpfs").unwrap();
    // A tmpfs on a directory of /sys/fs/bpf: the bpffs is an ancestor, but pins would land
    // on the tmpfs.
    let mnt = TmpfsMount::new(PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-pftmpfs-{}",
        std::process::id()
    )));
    let pins = mnt.0.join("pins");
    let out = refused(&agent_args(tmp.path(), &pins));
    let want = format!(
        "no bpffs for {}: {} is on tmpfs",
        pins.display(),
        mnt.0.display()
    );
    assert!(out.contains(&want), "{out}");
    assert!(!pins.exists());
}

#[test]
fn agent_without_privileges_is_told_what_bpf_needs() {
    require_root();
    let tmp = TempDir::new("pf-priv").unwrap();
    // World-readable, so the unprivileged user can reach the manifests.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-pfpriv-{}",
        std::process::id()
    ));
    let mut args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        BIN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(agent_args(tmp.path(), &pins));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = run_to_end(Path::new("setpriv"), &args).unwrap();
    assert!(!ok, "the agent started without privileges: {out}");
    assert!(
        out.contains("bpf() unavailable: not permitted to load a tc program"),
        "{out}"
    );
    assert!(out.contains("CAP_BPF and CAP_NET_ADMIN"), "{out}");
    assert!(!pins.exists());
}
