//! Golden files of `palisade explain` and `palisade matrix` (human and JSON output, warnings,
//! errors, exit status) on the scenario in tests/golden/scenario: a shop namespace under
//! default deny with named ports, an endPort range, an ipBlock with except and a
//! namespace-AND-pod peer; a rejected policy, a broken document, a host-network, a
//! terminated and an unscheduled pod.
//!
//! `UPDATE_GOLDEN=1 cargo test -p palisade --test cli_golden` rewrites the files; review
//! the diff like code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Runs the binary in tests/golden, so paths in warnings are relative and stable.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(golden_dir())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .output()
        .unwrap()
}

fn transcript(args: &[&str], out: &Output) -> String {
    format!(
        "$ palisade {}\n{}[stderr]\n{}[exit {}]\n",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code().map_or("signal".into(), |c| c.to_string()),
    )
}

fn golden(file: &str, args: &[&str]) {
    let got = transcript(args, &run(args));
    let path = golden_dir().join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "{file} differs from line {}\n--- expected\n{want}\n--- got\n{got}\n\
             (UPDATE_GOLDEN=1 rewrites it if the change is intended)",
            first + 1
        );
    }
}

const M: [&str; 2] = ["--manifests", "scenario"];

fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter().copied().chain(M).collect()
}

#[test]
fn matrix_human() {
    golden("matrix-9000.txt", &with(&["matrix", "--port", "9000"]));
}

#[test]
fn matrix_json() {
    golden(
        "matrix-5432.json.txt",
        &with(&["matrix", "--port", "5432/TCP", "--json"]),
    );
}

#[test]
fn matrix_ipv6_only() {
    golden(
        "matrix-ipv6.txt",
        &with(&["matrix", "--port", "9000", "--family", "ipv6"]),
    );
}

#[test]
fn explain_allowed_by_end_port_both_ways() {
    golden(
        "explain-end-port.txt",
        &with(&["explain", "shop/web", "shop/api", "9005"]),
    );
}

#[test]
fn explain_denied_by_ip_block_except() {
    golden(
        "explain-except.txt",
        &with(&["explain", "dev/debug", "shop/web", "8080"]),
    );
}

#[test]
fn explain_namespace_and_pod_selector_json() {
    golden(
        "explain-ns-and-pod.json.txt",
        &with(&["explain", "ops/monitor", "shop/db", "5432", "--json"]),
    );
}

#[test]
fn explain_from_the_node() {
    golden(
        "explain-from-node.txt",
        &with(&["explain", "198.18.0.1", "shop/web", "8080"]),
    );
}

#[test]
fn explain_rejected_policy_and_missing_named_port() {
    golden(
        "explain-rejected.txt",
        &with(&["explain", "shop/web", "dev/debug", "80"]),
    );
}

#[test]
fn explain_pod_without_ip() {
    golden(
        "explain-no-ip.txt",
        &with(&["explain", "dev/pending", "shop/web", "8080"]),
    );
}

#[test]
fn explain_terminated_pod() {
    golden(
        "explain-terminated.txt",
        &with(&["explain", "dev/old-job", "shop/web", "8080"]),
    );
}

#[test]
fn explain_one_nodes_view() {
    golden(
        "explain-node-view.txt",
        &with(&[
            "explain",
            "shop/web",
            "shop/db",
            "5432",
            "--node-name",
            "node-2",
        ]),
    );
}

#[test]
fn explain_protocol_mismatch_to_an_outside_address() {
    golden(
        "explain-outside.txt",
        &with(&["explain", "shop/api", "203.0.113.7", "443/UDP"]),
    );
}

#[test]
fn explain_unknown_pod_lists_the_pods() {
    golden(
        "explain-unknown-pod.txt",
        &with(&["explain", "shop/web", "shop/nope", "80"]),
    );
}

#[test]
fn help_has_examples() {
    for cmd in ["explain", "matrix"] {
        let out = run(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd} --help failed");
        assert!(help.contains("Examples:"), "{cmd} --help:\n{help}");
        assert!(
            help.contains(&format!("palisade {cmd} ")),
            "{cmd} --help:\n{help}"
        );
    }
    let help = String::from_utf8_lossy(&run(&["matrix", "--help"]).stdout).to_string();
    assert!(help.contains("to itself"), "{help}");
}

#[test]
fn missing_directory_says_what_to_do() {
    let out = run(&["matrix", "--manifests", "no-such-dir"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("is no-such-dir a directory of *.yaml/*.json files?"),
        "{err}"
    );
}

/// Colour only on a terminal, and never with NO_COLOR or --json. `script` (util-linux)
/// gives the command a pseudo-terminal.
#[test]
fn colour_only_on_a_terminal() {
    let bin = env!("CARGO_BIN_EXE_palisade");
    let tty = |cmd: &str, no_color: bool| {
        let mut c = Command::new("script");
        c.args([
            "-qec",
            &format!("{bin} {cmd} --manifests scenario"),
            "/dev/null",
        ])
        .current_dir(golden_dir())
        .env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c
            .output()
            .expect("script (util-linux) runs the command on a pty");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let esc = "\x1b[";
    let grid = tty("matrix --port 9000", false);
    assert!(grid.contains(&format!("{esc}32mX")), "{grid:?}");
    assert!(!tty("matrix --port 9000", true).contains(esc));
    assert!(!tty("matrix --port 9000 --json", false).contains(esc));
    let why = tty("explain shop/web shop/api 9005", false);
    assert!(why.contains(&format!("{esc}1;32mALLOWED")), "{why:?}");
    assert!(!tty("explain shop/web shop/api 9005 --json", false).contains(esc));
    // Through a pipe: none.
    let piped = run(&with(&["matrix", "--port", "9000"]));
    assert!(!String::from_utf8_lossy(&piped.stdout).contains(esc));
}
