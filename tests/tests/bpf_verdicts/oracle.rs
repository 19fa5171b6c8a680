//! Random frames, judged twice: by the programs and by an independent reading of the
//! policy over `etherparse` header slices. Conntrack and fragment state is forgotten after
//! every frame that passes and untracked connections are revoked, so the only way through
//! is a rule, the node, or link-level control.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_tests::strict::{self, be16, test_run_accepts, Parse};
use palisade_tests::util::Rng;

use super::*;

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
        rid == id && rdir == dir && entry_covers(prefix, rproto, rport, proto, port)
    })
}

/// What the policy says about a frame.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// Link-level control: passes, uncounted.
    Control,
    Reason(&'static str),
}

fn expect(table: &[(IpNetwork, u32, u32)], f: &[u8], hook: Hook) -> Want {
    let p = match strict::parse(f) {
        Parse::Control => return Want::Control,
        Parse::Malformed => return Want::Reason(DROPPED_MALFORMED),
        Parse::OtherEtherType => return Want::Reason(DROPPED_NO_RULE),
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
        rng.next_u64() as u16
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
        4 => L4::echo(v6, rng.coin(), rng.next_u64() as u16, 1),
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
        random_pod_frame(rng, POD6.into(), peer.into(), hook == Hook::FromPod, &l4, 0)
    } else {
        let peer = rng.pick(&PEERS4);
        random_pod_frame(rng, POD4.into(), peer.into(), hook == Hook::FromPod, &l4, 0)
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
        let any = rng.next_u64() as u16;
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
        let want = expect(&table, &f, hook);
        let (verdict, counted) = fx.run_alone(hook, &f);
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
            wrong.push(format!(
                "#{i} {hook:?}: want {want:?}, got verdict {verdict} {got:?}: {}",
                hex(&f)
            ));
        }
    }
    eprintln!("seed {seed:#x}, {frames} frames ({skipped} too short for BPF_PROG_TEST_RUN), expected outcomes: {seen:?}");
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
