//! The `palisade` binary as users run it: as a kubectl plugin, with completions, and the
//! errors it gives when there is no agent to talk to.

use std::process::{Command, ExitStatus, Output};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");

/// Runs `cmd` to the end: (exit status, stdout, stderr).
fn output(cmd: &mut Command) -> (ExitStatus, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("running palisade");
    (
        status,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// `cmd`: (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let (status, out, err) = output(cmd);
    (status.success(), out, err)
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

/// `palisade ARGS`: (exit code, stdout, stderr).
fn run_code(args: &[&str]) -> (Option<i32>, String, String) {
    let (status, out, err) = output(Command::new(BIN).args(args));
    (status.code(), out, err)
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A status as the agent publishes it, in `run_dir`.
fn publish(run_dir: &std::path::Path) {
    let status = palisade::agent::Status {
        node: "n1".into(),
        source: "manifests:/nonexistent".into(),
        ..Default::default()
    };
    status.write(run_dir).unwrap();
}

#[test]
fn the_agent_keeps_its_run_dir_private_and_replaces_the_status_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    // Created 0700 (with its missing parents), the status 0600.
    let run_dir = tmp.path().join("a/run");
    publish(&run_dir);
    assert_eq!(mode(&run_dir), 0o700);
    assert_eq!(mode(&run_dir.join("status.json")), 0o600);

    // An existing run dir others can read or write is tightened.
    let loose = tmp.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    chmod(&loose, 0o777);
    publish(&loose);
    assert_eq!(mode(&loose), 0o700);

    // A symlink where the temporary file goes is replaced, never written through.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, run_dir.join(".status.json.tmp")).unwrap();
    publish(&run_dir);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert_eq!(mode(&run_dir.join("status.json")), 0o600);
    assert!(!run_dir.join(".status.json.tmp").exists());

    let (code, out, err) = run_code(&["status", "--run-dir", run_dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("node:       n1"), "{out}");
}

#[test]
fn status_refuses_a_world_writable_run_dir_or_status_naming_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    publish(&run_dir);
    let dir = run_dir.to_str().unwrap();

    chmod(&run_dir, 0o777);
    let (code, out, err) = run_code(&["status", "--run-dir", dir]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        err,
        format!(
            "palisade: refusing to trust {dir}: it is world-writable (mode 0777), so any user \
             could have written it; fix: chmod 0700 {dir} (the agent creates it so)\n"
        )
    );
    assert!(out.is_empty(), "{out}");
    // Commands that only name pods from the status refuse it too.
    let (code, _, err) = run_code(&["explain", "--run-dir", dir, "x/a", "x/b", "80"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("refusing to trust {dir}:")), "{err}");

    chmod(&run_dir, 0o700);
    let file = run_dir.join("status.json");
    chmod(&file, 0o666);
    let (code, _, err) = run_code(&["status", "--run-dir", dir]);
    assert_eq!(code, Some(1));
    let f = file.to_str().unwrap();
    assert!(
        err.contains(&format!(
            "refusing to trust {f}: it is world-writable (mode 0666)"
        )) && err.contains(&format!("fix: chmod 0600 {f}")),
        "{err}"
    );

    chmod(&file, 0o600);
    let (code, _, err) = run_code(&["status", "--run-dir", dir]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn status_refuses_a_run_dir_of_another_user() {
    palisade_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    publish(&run_dir);
    let dir = run_dir.to_str().unwrap();
    std::os::unix::fs::chown(&run_dir, Some(4242), None).unwrap();
    let (code, _, err) = run_code(&["status", "--run-dir", dir]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!(
            "refusing to trust {dir}: it is owned by uid 4242, neither root nor you (uid 0); \
             fix: chown root {dir}"
        )),
        "{err}"
    );
    // The agent takes its run dir back.
    publish(&run_dir);
    let (code, _, err) = run_code(&["status", "--run-dir", dir]);
    assert_eq!(code, Some(0), "{err}");
}
