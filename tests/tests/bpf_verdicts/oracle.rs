//! Random frames, judged twice: by the programs and by an independent reading of the
//! policy over `etherparse` header slices. Conntrack and fragment state is forgotten after
//! every frame that passes and untracked connections are revoked, so the only way through
//! is a rule, the node, or link-level control.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice};

use super::*;

/// SplitMix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

const HOLE_ID: u32 = 21;

/// The rule set: (prefix, identity, dir, proto, port).
const RULES: &[(u32, u32, u8, u8, u16)] = &[
    (POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80),
    (POLICY_PREFIX_ANY_PORT, PEER_ID, DIR_EGRESS, PROTO_UDP, 0),
    (
        POLICY_PREFIX_ANY_PORT + 12,
        PEER_ID,
        DIR_EGRESS,
        PROTO_SCTP,
        80,
    ),
    (
        POLICY_PREFIX_ANY_PORT + 8,
        PEER_ID,
        DIR_INGRESS,
        PROTO_TCP,
        8192,
    ),
    (POLICY_PREFIX_ANY_PORT, 0, DIR_INGRESS, PROTO_ICMP, 0),
    (POLICY_PREFIX_ANY_PORT, 0, DIR_INGRESS, PROTO_ICMPV6, 0),
    (POLICY_PREFIX_ANY_PROTO, HOLE_ID, DIR_EGRESS, 0, 0),
    (POLICY_PREFIX_FULL, 0, DIR_EGRESS, PROTO_TCP, 443),
];

/// The identity table, as (network, id, flags): looked up by longest prefix here too.
fn identities() -> Vec<(IpNetwork, u32, u32)> {
    [
        ("198.18.1.0/24", PEER_ID, 0),
        ("fd00:198:18:1::/64", PEER_ID, 0),
        ("198.18.1.128/25", HOLE_ID, 0),
        ("fd00:198:18:1:8000::/65", HOLE_ID, 0),
        ("198.18.0.1/32", NODE_ID, IDENTITY_FLAG_HOST),
        ("fd00:198:18::1/128", NODE_ID, IDENTITY_FLAG_HOST),
    ]
    .into_iter()
    .map(|(n, id, f)| (n.parse().unwrap(), id, f))
    .collect()
}

fn identity_of(table: &[(IpNetwork, u32, u32)], a: IpAddr) -> (u32, u32) {
    table
        .iter()
        .filter(|(n, _, _)| n.contains(a))
        .max_by_key(|(n, _, _)| n.prefix())
        .map_or((0, 0), |(_, id, f)| (*id, *f))
}

fn rule_allows(id: u32, dir: u8, proto: u8, port: u16) -> bool {
    RULES.iter().any(|&(prefix, rid, rdir, rproto, rport)| {
        if rid != id || rdir != dir {
            return false;
        }
        if prefix == POLICY_PREFIX_ANY_PROTO {
            return true;
        }
        let bits = prefix - POLICY_PREFIX_ANY_PORT;
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        rproto == proto && (port & mask) == (rport & mask)
    })
}

/// What the policy says about a frame.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// Link-level control: passes, uncounted.
    Control,
    Reason(&'static str),
}

struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
    later_fragment: bool,
}

enum Parse {
    Pkt(Pkt),
    Control,
    Malformed,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// ICMP error quote: an IPv4 header and the ports (or echo id) after it.
fn quote4_ok(q: &[u8]) -> bool {
    if q.len() < 20 || q[0] >> 4 != 4 || (q[0] & 0xf) < 5 {
        return false;
    }
    let ihl = (q[0] & 0xf) as usize * 4;
    if (be16(&q[2..4]) as usize) < ihl {
        return false;
    }
    quote_ports_ok(q[9], q.len().saturating_sub(ihl))
}

fn quote6_ok(q: &[u8]) -> bool {
    q.len() >= 40 && q[0] >> 4 == 6 && quote_ports_ok(q[6], q.len() - 40)
}

fn quote_ports_ok(proto: u8, avail: usize) -> bool {
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => avail >= 4,
        PROTO_ICMP | PROTO_ICMPV6 => avail >= 6,
        _ => true,
    }
}

/// The upper layer of a whole packet or first fragment.
fn upper(m: Mode, v6: bool, proto: u8, b: &[u8], src: IpAddr, dst: IpAddr) -> Parse {
    let mut port = 0;
    // The programs pick ICMP semantics by protocol number alone, whatever the family.
    let v6 = if m.cross_family_icmp && matches!(proto, PROTO_ICMP | PROTO_ICMPV6) {
        proto == PROTO_ICMPV6
    } else {
        v6
    };
    match proto {
        PROTO_TCP if m.tcp_14 => {
            if b.len() < 14 || b[12] >> 4 < 5 {
                return Parse::Malformed;
            }
            port = be16(&b[2..4]);
        }
        PROTO_TCP => match TcpHeaderSlice::from_slice(b) {
            Ok(t) => port = t.destination_port(),
            Err(_) => return Parse::Malformed,
        },
        PROTO_UDP | PROTO_SCTP => {
            let need = if proto == PROTO_UDP { 8 } else { 12 };
            if b.len() < need {
                return Parse::Malformed;
            }
            port = be16(&b[2..4]);
        }
        PROTO_ICMP if !v6 => {
            if b.len() < 8 {
                return Parse::Malformed;
            }
            if matches!(b[0], 3 | 4 | 5 | 11 | 12) && !quote4_ok(&b[8..]) {
                return Parse::Malformed;
            }
        }
        PROTO_ICMPV6 if v6 => {
            if b.len() < 8 {
                return Parse::Malformed;
            }
            if matches!(b[0], 130..=137 | 143) {
                return Parse::Control;
            }
            if matches!(b[0], 1..=4) && !quote6_ok(&b[8..]) {
                return Parse::Malformed;
            }
        }
        _ => {}
    }
    Parse::Pkt(Pkt {
        src,
        dst,
        proto,
        port,
        later_fragment: false,
    })
}

fn parse4(m: Mode, ip: &[u8]) -> Parse {
    let Ok(h) = Ipv4HeaderSlice::from_slice(ip) else {
        return Parse::Malformed;
    };
    let hl = h.slice().len();
    let total = h.total_len() as usize;
    if total < hl || total > ip.len() {
        return Parse::Malformed;
    }
    let (src, dst) = (
        IpAddr::V4(h.source_addr()),
        IpAddr::V4(h.destination_addr()),
    );
    let proto = h.protocol().0;
    if h.fragments_offset().value() != 0 {
        return Parse::Pkt(Pkt {
            src,
            dst,
            proto,
            port: 0,
            later_fragment: true,
        });
    }
    let end = if m.frame { ip.len() } else { total };
    upper(m, false, proto, &ip[hl..end], src, dst)
}

fn parse6(m: Mode, ip: &[u8]) -> Parse {
    let Ok(h) = Ipv6HeaderSlice::from_slice(ip) else {
        return Parse::Malformed;
    };
    let plen = h.payload_length() as usize;
    if 40 + plen > ip.len() {
        return Parse::Malformed;
    }
    let (src, dst) = (
        IpAddr::V6(h.source_addr()),
        IpAddr::V6(h.destination_addr()),
    );
    let d = if m.frame {
        &ip[40..]
    } else {
        &ip[40..40 + plen]
    };
    let mut frag_off = 0u16;
    let mut next = h.next_header().0;
    let mut off = 0usize;
    for _ in 0..6 {
        match next {
            0 | 43 | 60 | 51 => {
                if off + 2 > d.len() {
                    return Parse::Malformed;
                }
                let unit = if next == 51 {
                    (d[off + 1] as usize + 2) * 4
                } else {
                    (d[off + 1] as usize + 1) * 8
                };
                next = d[off];
                off += unit;
            }
            44 => {
                if off + 8 > d.len() {
                    return Parse::Malformed;
                }
                next = d[off];
                frag_off = be16(&d[off + 2..off + 4]) >> 3;
                if frag_off != 0 && !m.later_frag_walk {
                    // What follows a later fragment's header is data.
                    return Parse::Pkt(Pkt {
                        src,
                        dst,
                        proto: next,
                        port: 0,
                        later_fragment: true,
                    });
                }
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) || (off > d.len() && !m.frame) {
        return Parse::Malformed;
    }
    if frag_off != 0 {
        return Parse::Pkt(Pkt {
            src,
            dst,
            proto: next,
            port: 0,
            later_fragment: true,
        });
    }
    upper(m, true, next, d.get(off..).unwrap_or(&[]), src, dst)
}

/// How the reading deviates from the strict one: each flag is a known bug of the programs
/// (see the ignored tests), so a mismatch they explain is told apart from a new one.
#[derive(Clone, Copy, Debug, Default)]
struct Mode {
    /// Upper-layer headers bounded by the frame instead of the IP datagram.
    frame: bool,
    /// TCP needs 14 bytes and a data offset >= 5, not the data-offset header.
    tcp_14: bool,
    /// IPv6 headers are followed past a later fragment's fragment header.
    later_frag_walk: bool,
    /// ICMPv6 in IPv4 (and ICMPv4 in IPv6) read as ICMP.
    cross_family_icmp: bool,
}

const STRICT: Mode = Mode {
    frame: false,
    tcp_14: false,
    later_frag_walk: false,
    cross_family_icmp: false,
};

/// The known deviations, alone and together, named for the report.
// Deviations explained by known program bugs: none left; every frame must match.
const KNOWN: [(&str, Mode); 0] = [];

fn expect(m: Mode, table: &[(IpNetwork, u32, u32)], f: &[u8], hook: Hook) -> Want {
    let parsed = match be16(&f[12..14]) {
        ETH_P_ARP => Parse::Control,
        ETH_P_IP => parse4(m, &f[L3..]),
        ETH_P_IPV6 => parse6(m, &f[L3..]),
        _ => return Want::Reason(DROPPED_NO_RULE),
    };
    let p = match parsed {
        Parse::Control => return Want::Control,
        Parse::Malformed => return Want::Reason(DROPPED_MALFORMED),
        Parse::Pkt(p) => p,
    };
    if p.later_fragment {
        return Want::Reason(DROPPED_FRAGMENT);
    }
    let (dir, peer) = match hook {
        Hook::FromPod => (DIR_EGRESS, p.dst),
        Hook::ToPod => (DIR_INGRESS, p.src),
    };
    let (id, flags) = identity_of(table, peer);
    if dir == DIR_INGRESS && flags & IDENTITY_FLAG_HOST != 0 {
        return Want::Reason(ALLOWED_HOST);
    }
    if rule_allows(id, dir, p.proto, p.port) {
        Want::Reason(ALLOWED_POLICY)
    } else {
        Want::Reason(DROPPED_NO_RULE)
    }
}

// --- generation ---------------------------------------------------------------------

const PEERS4: [Ipv4Addr; 6] = [
    PEER4,
    Ipv4Addr::new(198, 18, 1, 127),
    Ipv4Addr::new(198, 18, 1, 128),
    Ipv4Addr::new(198, 18, 1, 200),
    NODE4,
    WORLD4,
];
const PEERS6: [Ipv6Addr; 5] = [
    PEER6,
    Ipv6Addr::new(0xfd00, 0x198, 0x18, 1, 0x7fff, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x198, 0x18, 1, 0x8000, 0, 0, 1),
    NODE6,
    WORLD6,
];
const PORTS: [u16; 12] = [80, 81, 79, 95, 96, 443, 53, 8191, 8192, 8447, 8448, 0];

fn port(rng: &mut Rng) -> u16 {
    if rng.below(4) == 0 {
        rng.next() as u16
    } else {
        rng.pick(&PORTS)
    }
}

fn l4(rng: &mut Rng, v6: bool) -> L4 {
    match rng.below(10) {
        0 | 1 => {
            let any = rng.byte();
            let flags = rng.pick(&[
                TCP_SYN,
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_ACK | TCP_PSH,
                TCP_RST,
                TCP_FIN | TCP_ACK,
                0,
                any,
            ]);
            L4::tcp(port(rng), port(rng), flags)
        }
        2 => L4::udp(port(rng), port(rng)),
        3 => L4::sctp(port(rng), port(rng)),
        4 => L4::echo(v6, rng.coin(), rng.next() as u16, 1),
        5 => {
            let (a, b) = if v6 {
                (v6_any(rng), v6_any(rng))
            } else {
                (v4_any(rng), v4_any(rng))
            };
            let inner = l4(rng, v6);
            let q = ip_packet(a, b, &inner);
            let cut = 20 + rng.below(q.len().min(60));
            L4::unreachable(v6, &q[..cut.min(q.len())])
        }
        6 if v6 => L4::neighbour_solicitation(PEER6),
        6 | 7 => L4::Icmp {
            ty: rng.byte(),
            code: rng.byte(),
            rest: [rng.byte(), rng.byte(), rng.byte(), rng.byte()],
            body: {
                let n = rng.below(48);
                rng.bytes(n)
            },
        },
        _ => L4::Raw {
            proto: {
                let any = rng.byte();
                rng.pick(&[47, 59, 50, 253, any])
            },
            bytes: {
                let n = rng.below(40);
                rng.bytes(n)
            },
        },
    }
}

fn v4_any(rng: &mut Rng) -> IpAddr {
    IpAddr::V4(if rng.coin() { POD4 } else { rng.pick(&PEERS4) })
}
fn v6_any(rng: &mut Rng) -> IpAddr {
    IpAddr::V6(if rng.coin() { POD6 } else { rng.pick(&PEERS6) })
}

fn valid(rng: &mut Rng, hook: Hook) -> Vec<u8> {
    let v6 = rng.coin();
    let l4 = l4(rng, v6);
    if v6 {
        let peer = rng.pick(&PEERS6);
        let (s, d) = if hook == Hook::FromPod {
            (POD6, peer)
        } else {
            (peer, POD6)
        };
        let mut exts = Vec::new();
        if rng.below(3) == 0 {
            for _ in 0..rng.below(4) {
                exts.push(match rng.below(5) {
                    0 => Ext::options(IPV6_HOP_BY_HOP, rng.below(2) as u8),
                    1 => Ext::options(IPV6_DEST_OPTS, rng.below(3) as u8),
                    2 => Ext::options(IPV6_ROUTING, 0),
                    3 => Ext {
                        kind: IPV6_AUTH,
                        body: vec![0; 10],
                    },
                    _ => Ext::fragment(rng.pick(&[0, 0, 3]), rng.coin(), rng.next() as u32),
                });
            }
        }
        frame_v6(s, d, &exts, &l4)
    } else {
        let peer = rng.pick(&PEERS4);
        let (s, d) = if hook == Hook::FromPod {
            (POD4, peer)
        } else {
            (peer, POD4)
        };
        let mut o = V4Opts::default();
        if rng.below(4) == 0 {
            o.options = vec![1; 4 * rng.below(11)];
        }
        if rng.below(5) == 0 {
            o.id = rng.next() as u16;
            o.more_fragments = rng.coin();
            o.frag_offset = rng.pick(&[0, 0, 1, 185]);
        }
        frame_v4(s, d, &l4, &o)
    }
}

fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        let hdr = f.len().min(96);
        match rng.below(5) {
            0 => {
                let i = rng.below(hdr);
                f[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = L3 + rng.below(hdr.saturating_sub(L3).max(1));
                if i < f.len() {
                    f[i] = rng.byte();
                }
            }
            2 => {
                let n = L3 + rng.below(f.len() - L3 + 1);
                f.truncate(n);
            }
            3 => {
                let n = 1 + rng.below(20);
                let extra = rng.bytes(n);
                f.extend_from_slice(&extra);
            }
            _ => {
                // Length fields: IPv4 total length or IPv6 payload length, nudged.
                let at = if be16(&f[12..14]) == ETH_P_IP {
                    L3 + 2
                } else {
                    L3 + 4
                };
                if at + 2 <= f.len() {
                    let v = be16(&f[at..at + 2])
                        .wrapping_add(rng.pick(&[1u16, 0xffff, 4, 0xfffc, 0x100]));
                    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
        if f.len() < L3 {
            f.resize(L3, 0);
        }
    }
    f
}

fn gen(rng: &mut Rng, hook: Hook) -> Vec<u8> {
    if rng.below(10) == 0 {
        let n = L3 + rng.below(120);
        let mut f = rng.bytes(n);
        let any = rng.next() as u16;
        let et = rng.pick(&[ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, any]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        return f;
    }
    let f = valid(rng, hook);
    if rng.below(3) == 0 {
        f
    } else {
        mutate(rng, f)
    }
}

/// BPF_PROG_TEST_RUN refuses IP frames shorter than the fixed IP header.
fn test_run_accepts(f: &[u8]) -> bool {
    match be16(&f[12..14]) {
        ETH_P_IP => f.len() >= L3 + 20,
        ETH_P_IPV6 => f.len() >= L3 + 40,
        _ => true,
    }
}

pub fn run() {
    let seed = std::env::var("PALISADE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2024_u64);
    let frames: usize = std::env::var("PALISADE_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let mut fx = Fx::new("random", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    let table = identities();
    for (net, id, flags) in &table {
        fx.maps
            .set_identity(
                *net,
                IdentityValue {
                    id: *id,
                    flags: *flags,
                },
            )
            .unwrap();
    }
    for &(prefix, id, dir, proto, port) in RULES {
        fx.allow(prefix, id, dir, proto, port);
    }
    let mut rng = Rng(seed);
    let mut wrong = Vec::new();
    let mut skipped = 0usize;
    let mut known = std::collections::BTreeMap::<&str, usize>::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..frames {
        let hook = if rng.coin() {
            Hook::FromPod
        } else {
            Hook::ToPod
        };
        let f = gen(&mut rng, hook);
        if !test_run_accepts(&f) {
            skipped += 1;
            continue;
        }
        let want = expect(STRICT, &table, &f, hook);
        let (verdict, counted) = fx.run(hook, &f);
        let got = match counted {
            None => Want::Control,
            Some(r) => Want::Reason(r),
        };
        let implied = match got {
            Want::Reason(r) if r.starts_with("dropped") => TC_ACT_SHOT,
            _ => TC_ACT_OK,
        };
        *seen.entry(format!("{want:?}")).or_default() += 1;
        if verdict != implied {
            wrong.push(format!(
                "#{i} {hook:?}: verdict {verdict} but counted {got:?}: {}",
                hex(&f)
            ));
        } else if got != want {
            match KNOWN
                .iter()
                .find(|(_, m)| expect(*m, &table, &f, hook) == got)
            {
                Some((name, _)) => *known.entry(*name).or_default() += 1,
                None => wrong.push(format!(
                    "#{i} {hook:?}: want {want:?}, got verdict {verdict} {got:?}: {}",
                    hex(&f)
                )),
            }
        }
        if verdict == TC_ACT_OK {
            fx.forget_flows();
        }
    }
    eprintln!("seed {seed:#x}, {frames} frames ({skipped} too short for BPF_PROG_TEST_RUN), expected outcomes: {seen:?}; \
         deviations explained by known bugs (ignored tests): {known:?}");
    assert!(
        wrong.is_empty(),
        "{} of {frames} frames judged differently (seed {seed:#x}):\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
