//! The `palisade` binary as users run it: as a kubectl plugin, with completions, and the
//! errors it gives when there is no agent to talk to.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");

fn run(cmd: &mut Command) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("running palisade");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn works_as_a_kubectl_plugin_under_its_plugin_name() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-palisade");
    std::os::unix::fs::symlink(BIN, &plugin).unwrap();

    let (ok, out, _) = run(Command::new(&plugin).arg("version"));
    assert!(ok);
    assert!(out.starts_with("palisade "), "{out}");

    let (ok, out, _) = run(Command::new(&plugin).arg("--help"));
    assert!(ok);
    assert!(out.contains("Usage: kubectl palisade"), "{out}");
}

#[test]
fn prints_completions_naming_every_command() {
    let (ok, out, err) = run(Command::new(BIN).args(["completions", "bash"]));
    assert!(ok, "{err}");
    for cmd in ["agent", "drops", "monitor", "status"] {
        assert!(out.contains(cmd), "bash completions lack {cmd}");
    }
}

#[test]
fn drops_without_an_agent_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(Command::new(BIN).args([
        "drops",
        "--bpffs-dir",
        dir.path().to_str().unwrap(),
        "--run-dir",
        dir.path().to_str().unwrap(),
    ]));
    assert!(!ok);
    assert!(err.contains("is the agent running on this node?"), "{err}");
    assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
}

#[test]
fn status_without_an_agent_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) =
        run(Command::new(BIN).args(["status", "--run-dir", dir.path().to_str().unwrap()]));
    assert!(!ok);
    assert!(err.contains("is the agent running on this node?"), "{err}");
}

#[test]
fn rejects_a_bad_http_address_naming_the_flag() {
    let (ok, _, err) = run(Command::new(BIN).args([
        "agent",
        "--http-addr",
        "localhost",
        "--manifests",
        "/nonexistent",
    ]));
    assert!(!ok);
    assert!(err.contains("--http-addr"), "{err}");
    assert!(err.contains("IP:PORT"), "{err}");
}
