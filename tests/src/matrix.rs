//! The upstream Kubernetes e2e netpol model: namespaces x, y, z with pods
//! a, b, c each, every pod serving TCP and UDP on 80 and 81, and a 9x9
//! reachability matrix compared against an expected one.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cni::{Flavour, Node, Pod};
use crate::netns;
use crate::probe::{self, Family, ProbeError, Proto, Server};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];

/// How long a probe waits before calling a pair "blocked". Policy drops
/// show up as timeouts, so this bounds a fully denied matrix.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Parallel probes; 72 probes / 36 workers = 2 rounds of PROBE_TIMEOUT worst case.
pub const CONCURRENCY: usize = 36;

/// One model pod plus its servers (declared first: they drop before the pod).
pub struct ModelPod {
    servers: Vec<Server>,
    /// `namespace/pod`, e.g. `x/a`; also what its servers reply.
    pub name: String,
    pub pod: Pod,
}

impl ModelPod {
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }
}

/// 9 pods on one simulated node.
pub struct Model {
    // Pods before the node: fields drop in order, and DEL needs the node.
    pods: Vec<ModelPod>,
    node: Node,
}

impl Model {
    pub fn new(tag: &str, flavour: Flavour) -> Result<Model> {
        Model::on(Node::new(tag, flavour)?)
    }

    /// Builds the model on an existing node (e.g. one joined to another).
    pub fn on(node: Node) -> Result<Model> {
        let mut pods = Vec::with_capacity(9);
        for ns in NAMESPACES {
            for p in PODS {
                let name = format!("{ns}/{p}");
                let pod = node.add_pod(&name)?;
                let mut servers = Vec::with_capacity(4);
                for port in PORTS {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        servers.push(
                            Server::new(pod.ns(), proto, port, &name)
                                .with_context(|| format!("{name} {proto:?}/{port}"))?,
                        );
                    }
                }
                pods.push(ModelPod { servers, name, pod });
            }
        }
        Ok(Model { pods, node })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn pods(&self) -> &[ModelPod] {
        &self.pods
    }

    /// `x/a` style names in matrix order.
    pub fn names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no model pod {name}"))
            .pod
    }

    /// A matrix of `value` over this model's pods, for building expectations.
    pub fn expect(&self, value: bool) -> Matrix {
        Matrix::new(self.names(), value)
    }

    /// IPv4 reachability for `port`/`proto` between every ordered pod pair.
    pub fn probe_matrix(&self, port: u16, proto: Proto) -> Matrix {
        self.probe_matrix_family(Family::V4, port, proto)
    }

    /// Like [`Model::probe_matrix`] for a chosen address family. A pair is
    /// reachable only if the reply names the target pod.
    pub fn probe_matrix_family(&self, family: Family, port: u16, proto: Proto) -> Matrix {
        let n = self.pods.len();
        let jobs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .collect();
        let mut out = Matrix::new(self.names(), false);
        self.probe_pairs(&mut out, &jobs, family, port, proto, None);
        out
    }

    /// Probes `port`/`proto` and asserts the matrix is `want`. Pairs `want` allows are
    /// probed with [`probe::exchange_expecting_reply`] (timeouts retried), the others once.
    pub fn assert_reach(&self, want: &Matrix, port: u16, proto: Proto) {
        let n = self.pods.len();
        let jobs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .collect();
        let mut got = Matrix::new(self.names(), false);
        self.probe_pairs(&mut got, &jobs, Family::V4, port, proto, Some(want));
        assert_matrix(want, &got);
    }

    /// Probes `jobs` (source, destination) in parallel; pairs `want` allows expect a reply.
    fn probe_pairs(
        &self,
        out: &mut Matrix,
        jobs: &[(usize, usize)],
        family: Family,
        port: u16,
        proto: Proto,
        want: Option<&Matrix>,
    ) {
        let fds: Vec<File> = self
            .pods
            .iter()
            .map(|p| p.pod.ns().open().expect("open pod netns"))
            .collect();
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(jobs.len()));
        std::thread::scope(|s| {
            for _ in 0..CONCURRENCY.min(jobs.len()) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, j)) = jobs.get(k) else { return };
                    // Workers hop between source namespaces; setns is per thread.
                    netns::enter(&fds[i]).expect("setns into model pod");
                    let to = self.pods[j].pod.addr(family, port);
                    let r = if want.is_some_and(|w| w.cells[i][j] == Some(true)) {
                        probe::exchange_expecting_reply(proto, to, PROBE_TIMEOUT)
                    } else {
                        probe::exchange(proto, to, PROBE_TIMEOUT)
                    };
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, j, r));
                });
            }
        });
        for (i, j, r) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            let ok = matches!(&r, Ok(reply) if *reply == self.pods[j].name);
            out.cells[i][j] = Some(ok);
            out.notes[i][j] = Some(match r {
                Ok(_) if ok => "ok".into(),
                Ok(reply) => format!("wrong pod replied: {reply:?}"),
                Err(e) => e.to_string(),
            });
        }
    }
}

impl Model {
    /// Adds a pod `namespace/pod` to the model (a pod created later, e.g. after a
    /// policy), with its four servers; matrices then include it.
    pub fn add_pod(&mut self, name: &str) -> Result<&Pod> {
        let pod = self.node.add_pod(name)?;
        let mut servers = Vec::with_capacity(4);
        for port in PORTS {
            for proto in [Proto::Tcp, Proto::Udp] {
                servers.push(
                    Server::new(pod.ns(), proto, port, name)
                        .with_context(|| format!("{name} {proto:?}/{port}"))?,
                );
            }
        }
        self.pods.push(ModelPod {
            servers,
            name: name.to_string(),
            pod,
        });
        Ok(&self.pods.last().expect("just pushed").pod)
    }

    /// Removes a pod from the model: its servers stop and CNI DEL runs.
    pub fn remove_pod(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }

    /// Several matrices at once, `(port, proto)` each, every probe of every matrix in
    /// one parallel pool of `workers` threads with a per-probe `timeout`. Much faster
    /// than one matrix after the other when many pairs are blocked (each blocked pair
    /// costs a whole timeout). Pairs `want[c]` allows expect a reply
    /// ([`probe::expecting_reply`]).
    pub fn probe_many(
        &self,
        family: Family,
        combos: &[(u16, Proto)],
        timeout: Duration,
        workers: usize,
        want: &[Matrix],
    ) -> Vec<Matrix> {
        self.probe_many_at(combos, timeout, workers, want, |p, port| {
            p.pod.addr(family, port)
        })
    }

    /// [`Model::probe_many`] with the address each probe goes to chosen by `dest(target,
    /// port)` (e.g. the target's Service ClusterIP instead of its pod IP). A pair is still
    /// reachable only if the target pod itself replies.
    pub fn probe_many_at(
        &self,
        combos: &[(u16, Proto)],
        timeout: Duration,
        workers: usize,
        want: &[Matrix],
        dest: impl Fn(&ModelPod, u16) -> SocketAddr + Sync,
    ) -> Vec<Matrix> {
        let n = self.pods.len();
        let fds: Vec<File> = self
            .pods
            .iter()
            .map(|p| p.pod.ns().open().expect("open pod netns"))
            .collect();
        let jobs: Vec<(usize, usize, usize)> = (0..combos.len())
            .flat_map(|c| {
                (0..n).flat_map(move |i| (0..n).filter(move |&j| j != i).map(move |j| (c, i, j)))
            })
            .collect();
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(jobs.len()));
        std::thread::scope(|s| {
            for _ in 0..workers.clamp(1, jobs.len().max(1)) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(c, i, j)) = jobs.get(k) else {
                        return;
                    };
                    netns::enter(&fds[i]).expect("setns into model pod");
                    let (port, proto) = combos[c];
                    let to = dest(&self.pods[j], port);
                    let attempt = |t| match proto {
                        Proto::Tcp => probe::exchange(proto, to, t),
                        Proto::Udp => udp_fresh(to, t),
                    };
                    let r = if want.get(c).is_some_and(|w| w.cells[i][j] == Some(true)) {
                        probe::expecting_reply(timeout, attempt)
                    } else {
                        attempt(timeout)
                    };
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((c, i, j, r));
                });
            }
        });
        let mut out: Vec<Matrix> = combos
            .iter()
            .map(|_| Matrix::new(self.names(), false))
            .collect();
        for (c, i, j, r) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            let ok = matches!(&r, Ok(reply) if *reply == self.pods[j].name);
            out[c].cells[i][j] = Some(ok);
            out[c].notes[i][j] = Some(match r {
                Ok(_) if ok => "ok".into(),
                Ok(reply) => format!("wrong pod replied: {reply:?}"),
                Err(e) => e.to_string(),
            });
        }
        out
    }
}

/// A UDP request/reply from a source port no earlier probe of this process used (below
/// the kernel's ephemeral range, cycling through 22k ports): a random ephemeral port can
/// repeat an earlier probe's 5-tuple, which a stateful enforcer rightly treats as that
/// earlier flow (kept for its idle timeout after the destination became isolated), not as
/// a new one.
fn udp_fresh(to: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const FIRST: usize = 10_000;
    const COUNT: usize = 22_000;
    let sport = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
    let local: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = match UdpSocket::bind(SocketAddr::new(local, sport)) {
        Ok(s) => s,
        // Taken by someone else in that namespace: any other port will do.
        Err(_) => UdpSocket::bind(SocketAddr::new(local, 0))?,
    };
    probe::udp_exchange_on(&s, to, Instant::now() + timeout)
}

/// Reachability between named pods; `cells[from][to]`, `None` on the
/// diagonal (self-probes are skipped, as upstream does for pod->itself).
#[derive(Debug, Clone)]
pub struct Matrix {
    names: Vec<String>,
    cells: Vec<Vec<Option<bool>>>,
    /// Probe outcome per cell (observed matrices only), for diagnostics.
    notes: Vec<Vec<Option<String>>>,
}

impl Matrix {
    pub fn new(names: Vec<String>, value: bool) -> Matrix {
        let n = names.len();
        let cells = (0..n)
            .map(|i| (0..n).map(|j| (i != j).then_some(value)).collect())
            .collect();
        Matrix {
            names,
            cells,
            notes: vec![vec![None; n]; n],
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn idx(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no pod {name} in matrix {:?}", self.names))
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.cells[self.idx(from)][self.idx(to)]
    }

    pub fn set(&mut self, from: &str, to: &str, value: bool) -> &mut Self {
        let (i, j) = (self.idx(from), self.idx(to));
        if i != j {
            self.cells[i][j] = Some(value);
        }
        self
    }

    /// Everything `from` sends (an egress rule on `from`).
    pub fn set_from(&mut self, from: &str, value: bool) -> &mut Self {
        for to in self.names.clone() {
            self.set(from, &to, value);
        }
        self
    }

    /// Everything `to` receives (an ingress rule on `to`).
    pub fn set_to(&mut self, to: &str, value: bool) -> &mut Self {
        for from in self.names.clone() {
            self.set(&from, to, value);
        }
        self
    }

    /// Cells where `self` (expected) and `observed` disagree:
    /// `(from, to, expected, observed)`.
    pub fn diff(&self, observed: &Matrix) -> Vec<(String, String, bool, bool)> {
        assert_eq!(self.names, observed.names, "matrices over different pods");
        let mut out = Vec::new();
        for (i, from) in self.names.iter().enumerate() {
            for (j, to) in self.names.iter().enumerate() {
                if let (Some(e), Some(o)) = (self.cells[i][j], observed.cells[i][j]) {
                    if e != o {
                        out.push((from.clone(), to.clone(), e, o));
                    }
                }
            }
        }
        out
    }

    /// Upstream-style table: rows are sources, columns destinations;
    /// `X` reachable, `.` blocked, `-` self.
    pub fn render(&self) -> String {
        self.table(|i, j| match self.cells[i][j] {
            None => '-',
            Some(true) => 'X',
            Some(false) => '.',
        })
    }

    fn table(&self, cell: impl Fn(usize, usize) -> char) -> String {
        let mut s = String::from("from\\to");
        for n in &self.names {
            let _ = write!(s, "\t{n}");
        }
        for (i, from) in self.names.iter().enumerate() {
            let _ = write!(s, "\n{from}");
            for j in 0..self.names.len() {
                let _ = write!(s, "\t{}", cell(i, j));
            }
        }
        s.push('\n');
        s
    }
}

/// Expected, observed and comparison tables (comparison: `.` agrees, `X`
/// differs), followed by each differing cell with the probe's outcome.
pub fn truth_table(expected: &Matrix, observed: &Matrix) -> String {
    let diffs = expected.diff(observed);
    let cmp = expected.table(|i, j| match (expected.cells[i][j], observed.cells[i][j]) {
        (None, _) | (_, None) => '-',
        (Some(e), Some(o)) if e == o => '.',
        _ => 'X',
    });
    let mut s = format!(
        "expected:\n{}\nobserved:\n{}\ncomparison ({} wrong of {}):\n{}",
        expected.render(),
        observed.render(),
        diffs.len(),
        expected.names.len() * (expected.names.len() - 1),
        cmp
    );
    for (from, to, e, _) in &diffs {
        let note = observed.notes[observed.idx(from)][observed.idx(to)]
            .as_deref()
            .unwrap_or("?");
        let want = if *e { "reachable" } else { "blocked" };
        let _ = write!(s, "\n  {from} -> {to}: expected {want}, got {note}");
    }
    s
}

/// Panics with [`truth_table`] unless `observed` matches `expected`.
pub fn assert_matrix(expected: &Matrix, observed: &Matrix) {
    if !expected.diff(observed).is_empty() {
        panic!("reachability mismatch\n{}", truth_table(expected, observed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_and_render() {
        let names: Vec<String> = ["x/a", "x/b", "y/a"].map(String::from).to_vec();
        let mut want = Matrix::new(names.clone(), true);
        want.set_from("x/a", false);
        let got = Matrix::new(names, true);
        let d = want.diff(&got);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], ("x/a".into(), "x/b".into(), false, true));
        let t = truth_table(&want, &got);
        assert!(t.contains("x/a\t-\t.\t."), "{t}");
        assert!(t.contains("comparison (2 wrong of 6)"), "{t}");
        assert_eq!(want.get("x/a", "x/a"), None);
    }
}
