//! The scene of the fault tests (agent restart, layout upgrade, `kill -9` loops): pods x/a,
//! x/b and y/c on one node, allowed TCP streams x/a → x/b that must never break, and a
//! denied client y/c spraying TCP and UDP at x/b that must never get through — each side
//! measured independently of Palisade's own counters (sniffers on the pods' eth0).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Result;
use palisade::dataplane::{read_counters, Maps};

use crate::cni::{Node, Pod};
use crate::manifests;
use crate::probe::{Family, Proto, Server};
use crate::sniff::Sniffer;
use crate::stream::{EchoServer, SprayReport, Sprayer, Stream, StreamReport};
use crate::util::wait_until;

/// x/b accepts TCP and UDP 80 from x/a only and sends nothing of its own; x/a may only
/// reach x/b on 80 and accepts nothing. Replies pass only through connection tracking.
pub const POLICIES: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {pod: b}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
"#;

/// What `POLICIES` plus the trio's objects program.
pub const PROGRAMMED: &[&str] = &[
    "Pod/x/a",
    "Pod/x/b",
    "Pod/y/c",
    "NetworkPolicy/x/b-from-a",
    "NetworkPolicy/x/a-to-b",
];

/// x/a, x/b (serving TCP echo and UDP on 80) and y/c on one node.
pub struct Trio {
    pub a: Pod,
    pub b: Pod,
    pub c: Pod,
    pub echo: EchoServer,
    _udp: Server,
}

impl Trio {
    pub fn new(node: &Node) -> Result<Trio> {
        let a = node.add_pod("x/a")?;
        let b = node.add_pod("x/b")?;
        let c = node.add_pod("y/c")?;
        let echo = EchoServer::start(b.ns(), 80)?;
        let udp = Server::udp(b.ns(), 80, "x/b")?;
        Ok(Trio {
            a,
            b,
            c,
            echo,
            _udp: udp,
        })
    }

    /// Namespaces x and y and the three pods, scheduled on `node_name`.
    pub fn objects(&self, node_name: &str) -> String {
        let mut s = manifests::namespace("x") + &manifests::namespace("y");
        for p in [&self.a, &self.b, &self.c] {
            s += &manifests::pod(p, node_name);
        }
        s
    }
}

/// Packets of `slot` counted under a drop reason, in `direction` ("ingress"/"egress") or
/// in both (`None`).
pub fn dropped(maps: &Maps, slot: u32, direction: Option<&str>) -> u64 {
    read_counters(maps, Some(&[slot]))
        .unwrap()
        .iter()
        .filter(|r| r.drop && direction.is_none_or(|d| r.direction == d))
        .map(|r| r.packets)
        .sum()
}

/// Source/destination address pairs of `from` → `to` in both families.
pub fn pairs(from: &Pod, to: &Pod) -> Vec<(IpAddr, IpAddr)> {
    Family::BOTH
        .iter()
        .map(|f| (from.ip(*f), to.ip(*f)))
        .collect()
}

/// The allowed streams and the denied sprayer, running.
pub struct Traffic {
    streams: Vec<Stream>,
    sprayer: Sprayer,
    /// Denied packets seen leaving y/c, arriving at x/b; allowed ones arriving at x/b.
    sent: Sniffer,
    arrived: Sniffer,
    control: Sniffer,
}

/// What the traffic saw, once stopped.
pub struct TrafficReport {
    pub spray: SprayReport,
    pub streams: Vec<StreamReport>,
    /// Denied packets that left y/c.
    pub sent: u64,
    /// Denied packets that reached x/b.
    pub arrived: u64,
    /// Allowed packets that reached x/b: the same sniffer seeing them makes a zero above
    /// mean something.
    pub control: u64,
}

impl Traffic {
    /// Starts a stream per family x/a → x/b (a round trip every 2 ms) and a sprayer y/c →
    /// x/b (TCP and UDP, both families, a round every `spray_every`).
    pub fn start(trio: &Trio, spray_every: Duration) -> Result<Traffic> {
        let (a, b, c) = (&trio.a, &trio.b, &trio.c);
        let streams = Family::BOTH
            .iter()
            .map(|f| Stream::start(a.ns(), b.addr(*f, 80), Duration::from_millis(2)))
            .collect::<Result<Vec<_>>>()?;
        let arrived = Sniffer::start(b.ns(), "eth0", &pairs(c, b))?;
        let control = Sniffer::start(b.ns(), "eth0", &pairs(a, b))?;
        let sent = Sniffer::start(c.ns(), "eth0", &pairs(c, b))?;
        let targets: Vec<(Proto, SocketAddr)> = Family::BOTH
            .iter()
            .flat_map(|f| [(Proto::Tcp, b.addr(*f, 80)), (Proto::Udp, b.addr(*f, 80))])
            .collect();
        let sprayer = Sprayer::start(c.ns(), &targets, spray_every)?;
        Ok(Traffic {
            streams,
            sprayer,
            sent,
            arrived,
            control,
        })
    }

    /// Asserts that both sides keep going: every stream makes 100 more round trips and the
    /// sprayer `rounds` more rounds (within 20 s).
    pub fn progress(&self, what: &str, rounds: u64) {
        let base: Vec<u64> = self.streams.iter().map(Stream::round_trips).collect();
        let start = self.sprayer.rounds();
        let ok = wait_until(Duration::from_secs(20), || {
            self.streams
                .iter()
                .zip(&base)
                .all(|(s, b)| s.round_trips() >= b + 100)
                && self.sprayer.rounds() >= start + rounds
        });
        assert!(ok, "traffic stalled {what}");
    }

    pub fn stop(self) -> TrafficReport {
        let spray = self.sprayer.stop();
        let streams = self.streams.into_iter().map(Stream::stop).collect();
        TrafficReport {
            spray,
            streams,
            sent: self.sent.stop().unwrap(),
            arrived: self.arrived.stop().unwrap(),
            control: self.control.stop().unwrap(),
        }
    }
}

impl TrafficReport {
    /// One line for the test log: the figures the closing notes quote.
    pub fn summary(&self) -> String {
        format!(
            "denied packets sent {} (attempts per target {:?}), arrived {}; allowed packets seen {}; streams: {}",
            self.sent,
            self.spray.attempts,
            self.arrived,
            self.control,
            self.streams
                .iter()
                .map(|r| format!(
                    "{} round trips / {} bytes, longest gap {:?}, {} retransmits",
                    r.round_trips, r.bytes, r.longest_gap, r.retransmits
                ))
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    /// What every fault test guarantees: no denied packet reached x/b or was answered,
    /// whatever the protocol or family, and no allowed connection broke.
    pub fn assert_no_leak_no_break(&self, trio: &Trio) {
        assert!(
            self.control > 0,
            "the sniffer on x/b saw no allowed packet either"
        );
        assert_eq!(self.arrived, 0, "denied packets arrived at x/b");
        assert_eq!(
            self.spray.answered,
            Vec::<String>::new(),
            "denied attempts answered"
        );
        assert_eq!(trio.echo.accepted_from(trio.c.ipv4().into()), 0);
        assert_eq!(trio.echo.accepted_from(trio.c.ipv6().into()), 0);
        for r in &self.streams {
            assert_eq!(r.error, None, "allowed connection broke: {r:?}");
        }
    }

    /// Logs the [`summary`](Self::summary) and the drop count under `tag`, then asserts
    /// [`assert_no_leak_no_break`](Self::assert_no_leak_no_break) and
    /// [`assert_all_counted`](Self::assert_all_counted).
    pub fn assert_enforced_throughout(&self, tag: &str, trio: &Trio, counted: impl Fn() -> u64) {
        eprintln!(
            "{tag}: {}; counted as dropped {}",
            self.summary(),
            counted()
        );
        self.assert_no_leak_no_break(trio);
        self.assert_all_counted(counted);
    }

    /// Every denied packet y/c sent was counted as dropped by x/b's ingress check
    /// (`counted` reads that counter, minus its value before the traffic). Counters move as
    /// the packets cross x/b's interface, just after y/c's eth0, so this waits briefly; the
    /// kernel may still retransmit a denied SYN after the sniffer stopped, which is
    /// counted too, hence at least.
    pub fn assert_all_counted(&self, counted: impl Fn() -> u64) {
        assert!(self.sent > 0, "the denied client sent nothing");
        wait_until(Duration::from_secs(2), || counted() >= self.sent);
        let n = counted();
        assert!(
            n >= self.sent,
            "drop counter {n} < denied packets sent {}",
            self.sent
        );
    }
}
