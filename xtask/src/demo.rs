//! `cargo xtask demo`: a node made by the CNI bridge plugin with real pods in network
//! namespaces, the Palisade agent on a manifest directory, and the traffic that passes and
//! is dropped as policies arrive. Everything is removed at the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::bail;
use palisade_tests::{tcp_connect, wait_until, Family, Node, Pod, Server};

const NODE: &str = "demo-node";
const T: Duration = Duration::from_millis(400);

struct Agent {
    child: Child,
    bin: PathBuf,
    bpffs: PathBuf,
    run_dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc_kill(self.child.id() as i32) };
        let _ = self.child.wait();
        let _ = Command::new(&self.bin)
            .args(["agent", "--cleanup", "--bpffs-dir"])
            .arg(&self.bpffs)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 15);
}

pub fn run() -> anyhow::Result<()> {
    println!("==> building palisade (release)");
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "palisade"])
        .status()?;
    if !status.success() {
        bail!("build failed");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/release/palisade");

    println!("==> creating node {NODE} (CNI bridge plugin) with pods in network namespaces");
    let node = Node::bridged("demo")?;
    let frontend = node.add_pod("web/frontend")?;
    let backend = node.add_pod("web/backend")?;
    let db = node.add_pod("data/db")?;
    let prom = node.add_pod("monitoring/prom")?;
    let _servers = [
        Server::tcp(backend.ns(), 80, "backend:80")?,
        Server::tcp(backend.ns(), 81, "backend:81")?,
        Server::tcp(db.ns(), 443, "db:443")?,
        Server::tcp(frontend.ns(), 80, "frontend:80")?,
    ];

    let dir = std::env::temp_dir().join(format!("palisade-demo-{}", std::process::id()));
    let _dir_guard = DirGuard(dir.clone());
    std::fs::create_dir_all(&dir)?;
    let pods = [&frontend, &backend, &db, &prom];
    std::fs::write(dir.join("00-cluster.yaml"), cluster_yaml(&pods))?;

    let bpffs = PathBuf::from(format!("/sys/fs/bpf/palisade-demo-{}", std::process::id()));
    let run_dir = PathBuf::from(format!("/run/palisade-demo-{}", std::process::id()));
    println!("==> starting the agent in the node's network namespace");
    let child = Command::new(&bin)
        .args([
            "--netns",
            node.ns().name(),
            "agent",
            "--node-name",
            NODE,
            "--manifests",
        ])
        .arg(&dir)
        .arg("--bpffs-dir")
        .arg(&bpffs)
        .arg("--run-dir")
        .arg(&run_dir)
        .stderr(Stdio::null())
        .spawn()?;
    let agent = Agent {
        child,
        bin: bin.clone(),
        bpffs,
        run_dir,
    };
    wait_programmed(&agent, &["Pod/web/backend"])?;

    let probes: [(&str, &Pod, &Pod, u16); 6] = [
        ("frontend -> backend:80", &frontend, &backend, 80),
        ("frontend -> backend:81", &frontend, &backend, 81),
        ("prom     -> backend:81", &prom, &backend, 81),
        ("backend  -> db:443    ", &backend, &db, 443),
        ("backend  -> frontend:80", &backend, &frontend, 80),
        ("db       -> backend:80", &db, &backend, 80),
    ];
    let show = |title: &str| {
        println!("\n--- {title}");
        for (label, from, to, port) in &probes {
            let r = tcp_connect(from.ns(), to.ip(Family::V4), *port, T);
            let verdict = if r.is_ok() { "PASS" } else { "DROP" };
            println!("  {label:<26} {verdict}");
        }
    };
    show("no policies: all traffic open");

    std::fs::write(dir.join("10-default-deny.yaml"), DEFAULT_DENY)?;
    wait_programmed(&agent, &["NetworkPolicy/web/default-deny"])?;
    show("default-deny (ingress and egress) in namespace web");

    std::fs::write(dir.join("20-backend.yaml"), BACKEND_POLICY)?;
    wait_programmed(&agent, &["NetworkPolicy/web/backend"])?;
    show(
        "backend: ingress 80 from anywhere, 81 from namespace monitoring; egress 443 to tier=data",
    );

    println!("\n--- palisade drops");
    Command::new(&bin)
        .arg("drops")
        .arg("--bpffs-dir")
        .arg(&agent.bpffs)
        .arg("--run-dir")
        .arg(&agent.run_dir)
        .status()?;
    println!("\n==> cleaning up");
    drop(agent);
    Ok(())
}

struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until the agent's status says every key is programmed (the verdicts are live).
fn wait_programmed(agent: &Agent, keys: &[&str]) -> anyhow::Result<()> {
    let status = agent.run_dir.join("status.json");
    let ok = wait_until(Duration::from_secs(20), || {
        let Ok(bytes) = std::fs::read(&status) else {
            return false;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return false;
        };
        v["synced"] == true && keys.iter().all(|k| v["programmed"].get(*k).is_some())
    });
    if !ok {
        bail!(
            "the agent did not program {keys:?} in time (status: {})",
            show_file(&status)
        );
    }
    Ok(())
}

fn show_file(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| e.to_string())
}

fn cluster_yaml(pods: &[&Pod]) -> String {
    let mut s = String::new();
    for (ns, labels) in [
        ("web", "tier: web"),
        ("data", "tier: data"),
        ("monitoring", "tier: monitoring"),
    ] {
        s += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    {labels}\n");
    }
    for p in pods {
        let (ns, name) = p.name().split_once('/').expect("ns/name");
        s += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {name}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: main\n    image: demo\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs:\n  - ip: {v4}\n  - ip: {v6}\n",
            v4 = p.ipv4(),
            v6 = p.ipv6()
        );
    }
    s
}

const DEFAULT_DENY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: web
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#;

const BACKEND_POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend
  namespace: web
spec:
  podSelector:
    matchLabels:
      app: backend
  ingress:
  - ports:
    - port: 80
  - from:
    - namespaceSelector:
        matchLabels:
          tier: monitoring
    ports:
    - port: 81
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          tier: data
    ports:
    - port: 443
"#;
