//! A strict, independent reading of a frame over `etherparse` header slices: what the
//! programs must make of it, written without looking at `ebpf/src/parse.rs`. The packet
//! oracle and the fuzzer judge the programs against it.

use std::net::IpAddr;

use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice};

use crate::packets::{
    ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, L3, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

/// An IP packet as policy sees it.
#[derive(Debug)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Destination port (0 where the protocol has none).
    pub port: u16,
    /// A fragment other than the first: carries no ports.
    pub later_fragment: bool,
    /// For ICMP errors: the quoted packet's (src, dst).
    pub quoted: Option<(IpAddr, IpAddr)>,
}

#[derive(Debug)]
pub enum Parse {
    Pkt(Pkt),
    /// ARP and ICMPv6 neighbour discovery / MLD: link-level control.
    Control,
    Malformed,
    /// Neither IP nor ARP.
    OtherEtherType,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// BPF_PROG_TEST_RUN refuses IP frames shorter than the fixed IP header.
pub fn test_run_accepts(f: &[u8]) -> bool {
    match be16(&f[12..14]) {
        ETH_P_IP => f.len() >= L3 + 20,
        ETH_P_IPV6 => f.len() >= L3 + 40,
        _ => true,
    }
}

/// Reads an Ethernet frame.
pub fn parse(f: &[u8]) -> Parse {
    match be16(&f[12..14]) {
        ETH_P_ARP => Parse::Control,
        ETH_P_IP => parse4(&f[L3..]),
        ETH_P_IPV6 => parse6(&f[L3..]),
        _ => Parse::OtherEtherType,
    }
}

fn quote_ports_ok(proto: u8, avail: usize) -> bool {
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => avail >= 4,
        PROTO_ICMP | PROTO_ICMPV6 => avail >= 6,
        _ => true,
    }
}

/// ICMP error quote: an IPv4 header and the ports (or echo id) after it.
fn quote4_ok(q: &[u8]) -> bool {
    if q.len() < 20 || q[0] >> 4 != 4 || (q[0] & 0xf) < 5 {
        return false;
    }
    let ihl = (q[0] & 0xf) as usize * 4;
    (be16(&q[2..4]) as usize) >= ihl && quote_ports_ok(q[9], q.len().saturating_sub(ihl))
}

fn quote6_ok(q: &[u8]) -> bool {
    q.len() >= 40 && q[0] >> 4 == 6 && quote_ports_ok(q[6], q.len() - 40)
}

/// The upper layer of a whole packet or first fragment, bounded by the IP datagram.
fn upper(v6: bool, proto: u8, b: &[u8], src: IpAddr, dst: IpAddr) -> Parse {
    let mut port = 0;
    let mut quoted = None;
    match proto {
        PROTO_TCP => match TcpHeaderSlice::from_slice(b) {
            Ok(t) => port = t.destination_port(),
            Err(_) => return Parse::Malformed,
        },
        PROTO_UDP | PROTO_SCTP => {
            if b.len() < if proto == PROTO_UDP { 8 } else { 12 } {
                return Parse::Malformed;
            }
            port = be16(&b[2..4]);
        }
        PROTO_ICMP if !v6 => {
            let error = b.first().is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
            if b.len() < 8 || (error && !quote4_ok(&b[8..])) {
                return Parse::Malformed;
            }
            if error {
                let a = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&b[i..i + 4]).unwrap());
                quoted = Some((a(8 + 12), a(8 + 16)));
            }
        }
        PROTO_ICMPV6 if v6 => {
            if b.len() < 8 {
                return Parse::Malformed;
            }
            if matches!(b[0], 130..=137 | 143) {
                return Parse::Control;
            }
            if matches!(b[0], 1..=4) {
                if !quote6_ok(&b[8..]) {
                    return Parse::Malformed;
                }
                let a = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&b[i..i + 16]).unwrap());
                quoted = Some((a(8 + 8), a(8 + 24)));
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
        quoted,
    })
}

fn later_fragment(src: IpAddr, dst: IpAddr, proto: u8) -> Parse {
    Parse::Pkt(Pkt {
        src,
        dst,
        proto,
        port: 0,
        later_fragment: true,
        quoted: None,
    })
}

fn parse4(ip: &[u8]) -> Parse {
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
        return later_fragment(src, dst, proto);
    }
    upper(false, proto, &ip[hl..total], src, dst)
}

fn parse6(ip: &[u8]) -> Parse {
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
    let d = &ip[40..40 + plen];
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
                // What follows a later fragment's header is data.
                if be16(&d[off + 2..off + 4]) >> 3 != 0 {
                    return later_fragment(src, dst, next);
                }
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) || off > d.len() {
        return Parse::Malformed;
    }
    upper(true, next, &d[off..], src, dst)
}
