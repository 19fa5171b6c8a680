//! Part 2: real traffic between two pods of a node built by the CNI ptp plugin (client
//! pod → node namespace, routed → server pod), with no enforcement, with Palisade, with
//! a kube-router-style iptables+ipset rule set and with a kube-network-policies-style
//! nftables rule set, each holding the same 10 / 1,000 / 10,000 allow entries for the
//! server pod.
//!
//! Every configuration has its own node, built once; rounds then visit the nodes in a
//! rotating order, so slow drift of the shared machine's load hits all configurations
//! alike, and each configuration's ratio is taken against the baseline of the same round.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use ipnetwork::IpNetwork;
use palisade::dataplane::{Dataplane, LoadOptions};
use palisade_common::{
    Config, Endpoint, IdentityValue, PolicyKey, DIR_INGRESS, EP_ISOLATED_EGRESS,
    EP_ISOLATED_INGRESS, POLICY_PREFIX_FULL, PROTO_TCP,
};
use palisade_tests::pins::PinDir;
use palisade_tests::probe::tcp_exchange;
use palisade_tests::{tcp_connect, wait_until, Node, Pod, Server};
use serde_json::json;

use super::firewall::{self, Entry};
use super::interrupt;
use super::proc::{in_ns, output, with_stdin, ChildGuard};
use super::report::{int, num, times, Section, Table, Target, Verdict};
use super::stats::Summary;

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const CRR_PORT: u16 = 8080;
/// A port that serves but no rule allows: proves enforcement is live.
const DENIED_PORT: u16 = 8081;
const ALLOW_PORTS: [u16; 3] = [IPERF_PORT, SOCKPERF_PORT, CRR_PORT];

const CLIENT_SLOT: u32 = 0;
const SERVER_SLOT: u32 = 1;
const CLIENT_ID: u32 = 100;
const SERVER_ID: u32 = 101;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Enforcer {
    None,
    Palisade,
    Iptables,
    Nftables,
}

impl Enforcer {
    fn name(self) -> &'static str {
        match self {
            Enforcer::None => "no enforcement",
            Enforcer::Palisade => "Palisade",
            Enforcer::Iptables => "iptables+ipset (kube-router style)",
            Enforcer::Nftables => "nftables sets (kube-network-policies style)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Enforcer::None => "baseline",
            Enforcer::Palisade => "palisade",
            Enforcer::Iptables => "iptables",
            Enforcer::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Setup {
    pub enforcer: Enforcer,
    pub rules: usize,
}

impl Setup {
    fn label(&self) -> String {
        match self.enforcer {
            Enforcer::None => "no enforcement (baseline)".into(),
            e => format!("{}, {} rules", e.name(), int(self.rules)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Stream,
    Rr,
    Crr,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Stream, Workload::Rr, Workload::Crr];

    fn title(self) -> &'static str {
        match self {
            Workload::Stream => "TCP stream throughput (iperf3), Gbit/s",
            Workload::Rr => "TCP request/response rate on one connection (sockperf ping-pong), transactions/s",
            Workload::Crr => "TCP connect/request/response/close rate (one new connection per transaction), connections/s",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Workload::Stream => "tcp_stream_gbps",
            Workload::Rr => "tcp_rr_per_s",
            Workload::Crr => "tcp_crr_per_s",
        }
    }
}

pub struct Opts {
    pub rounds: usize,
    /// Seconds per stream and ping-pong run.
    pub seconds: u64,
    /// Seconds per connection-rate run.
    pub crr_seconds: u64,
    pub rule_counts: Vec<usize>,
}

impl Opts {
    pub fn new(quick: bool) -> Opts {
        if quick {
            Opts {
                rounds: 2,
                seconds: 1,
                crr_seconds: 1,
                rule_counts: vec![10, 10_000],
            }
        } else {
            Opts {
                rounds: 7,
                seconds: 1,
                crr_seconds: 1,
                rule_counts: vec![10, 1_000, 10_000],
            }
        }
    }

    fn setups(&self) -> Vec<Setup> {
        let mut v = vec![Setup {
            enforcer: Enforcer::None,
            rules: 0,
        }];
        for e in [Enforcer::Palisade, Enforcer::Iptables, Enforcer::Nftables] {
            for &n in &self.rule_counts {
                v.push(Setup {
                    enforcer: e,
                    rules: n,
                });
            }
        }
        v
    }
}

/// One node with a client and a server pod, the traffic servers and the enforcement.
/// Fields drop in order: servers, Palisade (links and pins), pods, node (and with its
/// namespace every iptables/ipset/nft rule loaded into it).
struct Bed {
    setup: Setup,
    load_s: f64,
    procs: Vec<ChildGuard>,
    _servers: Vec<Server>,
    palisade: Option<(Dataplane, PinDir)>,
    client: Pod,
    server: Pod,
    node: Node,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        if let Some((dp, pins)) = self.palisade.take() {
            drop(dp);
            drop(pins);
        }
    }
}

fn server_ip(bed: &Bed) -> Ipv4Addr {
    bed.server.ipv4()
}

fn build(setup: Setup) -> anyhow::Result<Bed> {
    let node = Node::routed("benchtr")?;
    let client = node.add_pod("bench/client")?;
    let server = node.add_pod("bench/server")?;
    let mut bed = Bed {
        setup,
        load_s: 0.0,
        procs: Vec::new(),
        _servers: Vec::new(),
        palisade: None,
        client,
        server,
        node,
    };
    let sns = bed.server.ns().name().to_string();
    bed.procs.push(ChildGuard::spawn(
        in_ns(&sns, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "iperf3 server",
    )?);
    bed.procs.push(ChildGuard::spawn(
        in_ns(
            &sns,
            &[
                "sockperf",
                "sr",
                "--tcp",
                "-i",
                "0.0.0.0",
                "-p",
                &SOCKPERF_PORT.to_string(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
        "sockperf server",
    )?);
    bed._servers = vec![
        Server::tcp(bed.server.ns(), CRR_PORT, "crr")?,
        Server::tcp(bed.server.ns(), DENIED_PORT, "denied")?,
    ];
    for port in [IPERF_PORT, SOCKPERF_PORT] {
        let listening = wait_until(Duration::from_secs(10), || {
            output(&mut in_ns(
                &sns,
                &["ss", "-Hltn", &format!("sport = :{port}")],
            ))
            .is_ok_and(|o| !o.trim().is_empty())
        });
        ensure!(listening, "nothing listens on {port} in {sns}");
    }
    for p in &mut bed.procs {
        p.ensure_running()?;
    }

    let entries = firewall::entries(bed.client.ipv4(), &ALLOW_PORTS, setup.rules);
    let started = Instant::now();
    let nns = bed.node.ns().name().to_string();
    match setup.enforcer {
        Enforcer::None => {}
        Enforcer::Palisade => bed.palisade = Some(palisade(&bed, &entries)?),
        Enforcer::Iptables => {
            with_stdin(
                &mut in_ns(&nns, &["ipset", "restore"]),
                &firewall::ipset_restore(server_ip(&bed), &entries),
            )?;
            with_stdin(
                &mut in_ns(&nns, &["iptables-restore"]),
                &firewall::iptables_restore(server_ip(&bed), &entries),
            )?;
        }
        Enforcer::Nftables => {
            with_stdin(
                &mut in_ns(&nns, &["nft", "-f", "-"]),
                &firewall::nft_ruleset(server_ip(&bed), &entries),
            )?;
        }
    }
    bed.load_s = started.elapsed().as_secs_f64();
    verify(&bed)?;
    Ok(bed)
}

/// Palisade with the same entries: client and server registered as endpoints (the
/// server isolated both ways, the client open, as every local pod carries the programs),
/// one identity per peer, one exact-port POLICY entry per (peer, port).
fn palisade(bed: &Bed, entries: &[Entry]) -> anyhow::Result<(Dataplane, PinDir)> {
    let pins = PinDir::new("benchtr");
    let _ = palisade::dataplane::cleanup(&pins.layout());
    let mut dp = Dataplane::load(pins.layout(), &LoadOptions::default())?;
    let mut maps = dp.maps()?;
    maps.set_config(Config {
        events_per_sec: 1000,
        ..Default::default()
    })?;
    let client = bed.client.ipv4();
    let id_of = |i: usize, e: &Entry| {
        if e.peer == client {
            CLIENT_ID
        } else {
            1000 + i as u32
        }
    };
    for (ip, id) in [(client, CLIENT_ID), (server_ip(bed), SERVER_ID)] {
        maps.set_identity(
            IpNetwork::new(IpAddr::V4(ip), 32)?,
            IdentityValue { id, flags: 0 },
        )?;
    }
    for (i, e) in entries.iter().enumerate() {
        let id = id_of(i, e);
        if e.peer != client {
            maps.set_identity(
                IpNetwork::new(IpAddr::V4(e.peer), 32)?,
                IdentityValue { id, flags: 0 },
            )?;
        }
        maps.insert_policy(
            POLICY_PREFIX_FULL,
            PolicyKey::new(SERVER_SLOT, id, DIR_INGRESS, PROTO_TCP, e.port),
        )?;
    }
    maps.set_endpoint(
        bed.client.host_ifindex(),
        Endpoint {
            slot: CLIENT_SLOT,
            flags: 0,
        },
    )?;
    maps.set_endpoint(
        bed.server.host_ifindex(),
        Endpoint {
            slot: SERVER_SLOT,
            flags: EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS,
        },
    )?;
    // TCX attaches by interface name in the caller's namespace: the node's.
    let ifindexes = [bed.client.host_ifindex(), bed.server.host_ifindex()];
    bed.node.ns().run(|| -> anyhow::Result<()> {
        for i in ifindexes {
            dp.attach(i)?;
        }
        Ok(())
    })?;
    Ok((dp, pins))
}

/// The allowed port answers; the denied one answers only without enforcement.
fn verify(bed: &Bed) -> anyhow::Result<()> {
    let t = Duration::from_millis(500);
    let dst = IpAddr::V4(server_ip(bed));
    tcp_connect(bed.client.ns(), dst, CRR_PORT, t)
        .map_err(|e| anyhow::anyhow!("{}: allowed port {CRR_PORT}: {e}", bed.setup.label()))?;
    let denied = tcp_connect(bed.client.ns(), dst, DENIED_PORT, t);
    match (bed.setup.enforcer, denied) {
        (Enforcer::None, Err(e)) => bail!("baseline: port {DENIED_PORT} failed: {e}"),
        (Enforcer::None, Ok(_)) | (_, Err(_)) => Ok(()),
        (_, Ok(_)) => bail!(
            "{}: port {DENIED_PORT} is not allowed but connected: enforcement is not live",
            bed.setup.label()
        ),
    }
}

fn stream(bed: &Bed, secs: u64) -> anyhow::Result<f64> {
    let out = output(&mut in_ns(
        bed.client.ns().name(),
        &[
            "iperf3",
            "-c",
            &server_ip(bed).to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "--connect-timeout",
            "3000",
            "-J",
        ],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no end.sum_received in iperf3 output: {}", v["error"]))
}

/// Transactions per second from sockperf ping-pong's `[Valid Duration]` line.
pub fn parse_sockperf(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("[Valid Duration]"))?;
    let field = |name: &str| -> Option<f64> {
        let rest = &line[line.find(name)? + name.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let secs = field("RunTime=")?;
    let received = field("ReceivedMessages=")?;
    (secs > 0.0).then(|| received / secs)
}

fn rr(bed: &Bed, secs: u64) -> anyhow::Result<f64> {
    let out = output(&mut in_ns(
        bed.client.ns().name(),
        &[
            "sockperf",
            "pp",
            "--tcp",
            "-i",
            &server_ip(bed).to_string(),
            "-p",
            &SOCKPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-m",
            "64",
        ],
    ))?;
    parse_sockperf(&out).with_context(|| format!("unexpected sockperf output: {out}"))
}

/// New connection, request, reply, close, back to back for `secs`.
fn crr(bed: &Bed, secs: u64) -> anyhow::Result<f64> {
    let to = SocketAddr::new(IpAddr::V4(server_ip(bed)), CRR_PORT);
    let (ok, failed, elapsed) = bed.client.ns().run(|| {
        let started = Instant::now();
        let end = started + Duration::from_secs(secs);
        let (mut ok, mut failed) = (0u64, 0u64);
        while Instant::now() < end {
            match tcp_exchange(to, Duration::from_secs(1)) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed, started.elapsed().as_secs_f64())
    });
    ensure!(
        failed * 100 <= ok,
        "{}: {failed} of {} connections failed",
        bed.setup.label(),
        ok + failed
    );
    Ok(ok as f64 / elapsed)
}

type Results = BTreeMap<(Setup, Workload), Vec<f64>>;

/// Pins the calling thread (and so every thread and process it starts) to one CPU until
/// dropped. On this VM a wakeup across CPUs costs 100–200 µs, so a ping-pong whose two
/// ends the scheduler happens to place on different CPUs runs ~20× slower than one on a
/// single CPU; pinning gives every configuration the same placement, and with client,
/// server and their softirq work on one CPU the figures are the datapath's CPU cost.
struct Pinned {
    old: libc::cpu_set_t,
    cpu: usize,
}

impl Pinned {
    fn last_cpu() -> anyhow::Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; the calls read and write only the sets we own.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            ensure!(
                libc::sched_getaffinity(0, size, &mut old) == 0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .rev()
                .find(|&c| libc::CPU_ISSET(c, &old))
                .context("no CPU in the affinity mask")?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            ensure!(
                libc::sched_setaffinity(0, size, &one) == 0,
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            );
            Ok(Pinned { old, cpu })
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in `last_cpu`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.old);
        }
    }
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let opts = Opts::new(quick);
    let setups = opts.setups();
    let pinned = Pinned::last_cpu()?;
    let mut beds = Vec::new();
    let built = Instant::now();
    for s in &setups {
        interrupt::check()?;
        eprintln!("    traffic: building {}", s.label());
        beds.push(build(*s).with_context(|| s.label())?);
    }
    let build_s = built.elapsed().as_secs_f64();
    let mut results: Results = BTreeMap::new();
    for round in 0..opts.rounds {
        eprintln!("    traffic: round {} of {}", round + 1, opts.rounds);
        for k in 0..beds.len() {
            let bed = &beds[(k + round) % beds.len()];
            for w in Workload::ALL {
                interrupt::check()?;
                let v = match w {
                    Workload::Stream => stream(bed, opts.seconds),
                    Workload::Rr => rr(bed, opts.seconds),
                    Workload::Crr => crr(bed, opts.crr_seconds),
                }
                .with_context(|| format!("{} {w:?}", bed.setup.label()))?;
                results.entry((bed.setup, w)).or_default().push(v);
            }
        }
    }
    let load: Vec<(Setup, f64)> = beds.iter().map(|b| (b.setup, b.load_s)).collect();
    let commands = commands(&beds[0], &opts, pinned.cpu);
    drop(beds);
    let cpu = pinned.cpu;
    drop(pinned);
    Ok(section(
        &opts, &setups, &results, &load, build_s, cpu, commands,
    ))
}

fn commands(bed: &Bed, o: &Opts, cpu: usize) -> Vec<String> {
    let ip = server_ip(bed);
    let t = o.seconds;
    vec![
        format!("# every process below runs pinned to CPU {cpu} (taskset -c {cpu}) at nice -10"),
        "# in the server pod's namespace".into(),
        format!("iperf3 -s -p {IPERF_PORT}"),
        format!("sockperf sr --tcp -i 0.0.0.0 -p {SOCKPERF_PORT}"),
        "# in the client pod's namespace, per round and configuration".into(),
        format!("iperf3 -c {ip} -p {IPERF_PORT} -t {t} --connect-timeout 3000 -J"),
        format!("sockperf pp --tcp -i {ip} -p {SOCKPERF_PORT} -t {t} -m 64"),
        format!(
            "# connection rate: in-process loop of connect({ip}:{CRR_PORT}) / read reply to EOF / close for {} s",
            o.crr_seconds
        ),
        "# rule sets, in the node's namespace (generated by xtask/src/bench/firewall.rs)".into(),
        "ipset restore < sets   # 1 + N hash:ip sets".into(),
        "iptables-restore < rules   # 2 rules per entry in KUBE-NWPLCY-BENCH".into(),
        "nft -f ruleset   # one concatenated set of N elements".into(),
    ]
}

fn section(
    o: &Opts,
    setups: &[Setup],
    results: &Results,
    load: &[(Setup, f64)],
    build_s: f64,
    cpu: usize,
    commands: Vec<String>,
) -> Section {
    let mut s = Section::new(
        "traffic",
        "2. Real traffic over veth: Palisade vs iptables+ipset vs nftables",
    );
    s.method.push(format!(
        "Each configuration gets its own simulated node (a network namespace) with a \
         client and a server pod wired by the CNI `ptp` plugin, so client → server \
         traffic leaves the client's veth, is routed in the node namespace and enters \
         the server's veth (addresses in 198.18.0.0/15). The server pod is isolated for \
         ingress with N allow entries: 3 that allow the client on the three test ports \
         and N−3 for other peers (one peer address and port each), in the middle of the \
         list for rule-ordered enforcers. Before measuring, every configuration is \
         checked: the allowed port connects and port {DENIED_PORT} (served, not allowed) \
         does not, except without enforcement."
    ));
    s.method.push(
        "- **Palisade**: the real programs (TCX) on both host veths; the server's slot \
         holds N POLICY entries, each peer has an identity; the client is a managed, \
         non-isolated endpoint, as on a real node.\n\
         - **iptables+ipset** (kube-router's layout, iptables-nft backend of Debian 12): \
         FORWARD → per-pod firewall chain (conntrack RELATED,ESTABLISHED accept first) \
         → policy chain with, per entry, `-m set --match-set SRC src -m set \
         --match-set DST dst --dport P -j MARK` plus `-m mark -j RETURN`, then REJECT of \
         unmarked traffic. ipsets hold the peers, but the rule list is linear in the \
         number of entries and is walked by the first packet of every connection; \
         packets of established connections stop at the conntrack rule.\n\
         - **nftables** (kube-network-policies' layout): `ct state established,related \
         accept`, a verdict map from pod IP to the pod's chain, and there one lookup in \
         a concatenated set `ip saddr . meta l4proto . th dport`. kube-network-policies \
         itself hands the first packet of each new connection to a userspace daemon over \
         NFQUEUE; that daemon is not part of this benchmark, so this is nftables' best \
         case (a kernel-only set lookup).\n\
         - Workloads per configuration and round: iperf3 TCP stream, sockperf TCP \
         ping-pong (one long connection: only conntrack or Palisade's per-packet path is \
         exercised), and a connection-rate loop (a new TCP connection per transaction: \
         every SYN goes through the full rule evaluation, which is where linear rule \
         lists show)."
            .to_string(),
    );
    s.method.push(format!(
        "{} rounds; each round visits every configuration (order rotated per round) and \
         runs each workload (stream and ping-pong {} s, connection rate {} s). The table \
         gives the median and min–max over rounds; the ratio is the median against the \
         baseline's median (medians rather than per-round ratios: on this shared machine \
         the disturbances are short bursts that hit single runs, not slow drift). \
         Building the {} nodes took {:.0} s (not part of any figure). All traffic \
         processes and threads run pinned to CPU {cpu}: on this VM a wakeup across CPUs \
         costs 100–200 µs, so a ping-pong whose ends land on different CPUs runs ~20× \
         slower than on one CPU, and which placement the scheduler picks would decide \
         the figure; on one CPU, client, server and their softirq work share it and the \
         figures show the datapath's CPU cost.",
        o.rounds,
        o.seconds,
        o.crr_seconds,
        setups.len(),
        build_s
    ));

    let base = Setup {
        enforcer: Enforcer::None,
        rules: 0,
    };
    let mut data = serde_json::Map::new();
    let mut ratios: BTreeMap<(Setup, Workload), f64> = BTreeMap::new();
    for w in Workload::ALL {
        let mut t = Table::new(
            format!("**{}**", w.title()),
            &[
                "configuration",
                "median (min–max) over rounds",
                "ratio to baseline",
            ],
        );
        let Some(b) = results.get(&(base, w)).and_then(|v| Summary::of(v)) else {
            continue;
        };
        let mut wdata = Vec::new();
        for setup in setups {
            let Some(abs) = results.get(&(*setup, w)).and_then(|v| Summary::of(v)) else {
                continue;
            };
            let f = |x: f64| {
                if w == Workload::Stream {
                    format!("{x:.2}")
                } else {
                    num(x)
                }
            };
            let q = super::stats::ratio(abs.median, b.median);
            t.row(vec![
                setup.label(),
                format!("{} ({}–{})", f(abs.median), f(abs.min), f(abs.max)),
                times(q),
            ]);
            wdata.push(json!({
                "enforcer": setup.enforcer.key(), "rules": setup.rules,
                "value": abs.json(), "ratio_to_baseline": q,
            }));
            ratios.insert((*setup, w), q);
        }
        s.tables.push(t);
        data.insert(w.key().into(), wdata.into());
    }
    let mut lt = Table::new(
        "Time to load each rule set (Palisade: map writes + attach; iptables: ipset restore + iptables-restore; nftables: nft -f):",
        &["configuration", "load time (s)"],
    );
    for (setup, secs) in load.iter().filter(|(s, _)| s.enforcer != Enforcer::None) {
        lt.row(vec![setup.label(), format!("{secs:.2}")]);
    }
    s.tables.push(lt);

    for (w, what) in [
        (Workload::Stream, "Palisade TCP throughput ≥ 0.95× baseline at every rule count"),
        (Workload::Rr, "Palisade request/response rate ≥ 0.95× baseline at every rule count (same bar, not in the issue)"),
        (Workload::Crr, "Palisade connection rate ≥ 0.95× baseline at every rule count (same bar, not in the issue)"),
    ] {
        let pal: Vec<(usize, f64)> = o
            .rule_counts
            .iter()
            .filter_map(|&n| {
                let k = Setup {
                    enforcer: Enforcer::Palisade,
                    rules: n,
                };
                ratios.get(&(k, w)).map(|r| (n, *r))
            })
            .collect();
        if pal.len() != o.rule_counts.len() {
            s.targets
                .push(Target::new(what, Verdict::NotMeasured, "missing runs"));
            continue;
        }
        let worst = pal.iter().map(|(_, r)| *r).fold(f64::INFINITY, f64::min);
        let detail = pal
            .iter()
            .map(|(n, r)| format!("{}: {}", int(*n), times(*r)))
            .collect::<Vec<_>>()
            .join(", ");
        s.targets
            .push(Target::new(what, Verdict::from_bool(worst >= 0.95), detail));
    }
    let max_rules = o.rule_counts.iter().copied().max().unwrap_or(0);
    let at = |e, w| {
        ratios
            .get(&(
                Setup {
                    enforcer: e,
                    rules: max_rules,
                },
                w,
            ))
            .copied()
    };
    if let (Some(ipt), Some(pal), Some(nft)) = (
        at(Enforcer::Iptables, Workload::Crr),
        at(Enforcer::Palisade, Workload::Crr),
        at(Enforcer::Nftables, Workload::Crr),
    ) {
        s.targets.push(Target::new(
            format!(
                "iptables at {} rules falls well behind (connection rate below 0.8× of Palisade's)",
                int(max_rules)
            ),
            Verdict::from_bool(ipt < 0.8 * pal),
            format!(
                "connection rate vs baseline: iptables {}, Palisade {}, nftables {}",
                times(ipt),
                times(pal),
                times(nft)
            ),
        ));
    }
    s.notes.push(
        "Where each enforcer does its work: Palisade runs on both pods' host veths (the \
         client is a managed, non-isolated endpoint, as every local pod is), so a round \
         trip passes four program runs, each with a conntrack lookup (and an update or \
         insert); iptables and nftables hook once, in the node's forward path, with the \
         kernel's conntrack. Established traffic therefore costs Palisade a constant amount \
         per packet at every rule count, and a new connection costs it the same two LPM \
         lookups whatever the rule count, while kube-router-style iptables walks its rule \
         list for every new connection."
            .into(),
    );
    s.notes.push(
        "Only one pod of the node has policies here. On a real kube-router node every \
         packet also walks one jump rule per local pod with policies in \
         KUBE-ROUTER-FORWARD before reaching its pod's chain, so these iptables figures \
         for established traffic are its best case."
            .into(),
    );
    s.commands = commands;
    s.data = json!({
        "rounds": o.rounds, "seconds_per_run": o.seconds, "crr_seconds_per_run": o.crr_seconds, "rule_counts": o.rule_counts,
        "results": data,
        "load_seconds": load.iter().map(|(s, t)| json!({"enforcer": s.enforcer.key(), "rules": s.rules, "seconds": t})).collect::<Vec<_>>(),
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_rate_comes_from_the_valid_duration_line() {
        let out = "sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=296702; ReceivedMessages=296701\n\
                   sockperf: ========= Printing statistics for Server No: 0\n\
                   sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=224092; ReceivedMessages=224092\n";
        let r = parse_sockperf(out).unwrap();
        assert!((r - 224092.0 / 1.55).abs() < 1e-6, "{r}");
        assert_eq!(parse_sockperf("sockperf: error"), None);
    }

    #[test]
    fn every_enforcer_is_measured_at_every_rule_count_with_one_baseline() {
        let o = Opts::new(false);
        let s = o.setups();
        assert_eq!(s.len(), 1 + 3 * o.rule_counts.len());
        assert_eq!(s.iter().filter(|x| x.enforcer == Enforcer::None).count(), 1);
        assert!(o.rounds >= 5);
    }
}
