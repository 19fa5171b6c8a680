//! Crafted Ethernet frames for BPF_PROG_TEST_RUN tests: well-formed IPv4/IPv6 packets
//! with TCP, UDP, SCTP and ICMP built with `etherparse`, plus the knobs needed to make
//! them odd (IPv4 options and fragments, IPv6 extension headers) or broken.
//!
//! ```
//! use palisade_tests::packets::{frame, L4, TCP_SYN};
//! let f = frame("198.18.0.1".parse()?, "198.18.1.1".parse()?, &L4::tcp(40000, 80, TCP_SYN));
//! assert_eq!(f.len(), 14 + 20 + 20 + 4);
//! # Ok::<(), std::net::AddrParseError>(())
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, TcpHeader};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// IPv6 extension header numbers.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Bytes a few payloads carry, so frames are not header-only.
const PAYLOAD: &[u8] = b"pali";

/// The upper layer of a packet: header plus a small payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (v4 or v6 by the packet's family): type, code, the 4 "rest of header" bytes
    /// and the body (for errors: the quoted packet).
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any protocol number with raw bytes after the IP headers.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

impl L4 {
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Self {
        L4::Tcp {
            sport,
            dport,
            flags,
        }
    }

    pub fn udp(sport: u16, dport: u16) -> Self {
        L4::Udp { sport, dport }
    }

    pub fn sctp(sport: u16, dport: u16) -> Self {
        L4::Sctp { sport, dport }
    }

    /// ICMP echo request or reply for either family.
    pub fn echo(v6: bool, request: bool, id: u16, seq: u16) -> Self {
        let ty = match (v6, request) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        L4::Icmp {
            ty,
            code: 0,
            rest: [a, b, c, d],
            body: PAYLOAD.to_vec(),
        }
    }

    /// Destination unreachable (port unreachable) quoting `quoted` (an IP packet,
    /// typically a frame without its Ethernet header: `&frame[14..]`).
    pub fn unreachable(v6: bool, quoted: &[u8]) -> Self {
        let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
        L4::Icmp {
            ty,
            code,
            rest: [0; 4],
            body: quoted.to_vec(),
        }
    }

    /// ICMPv6 neighbour solicitation for `target`.
    pub fn neighbour_solicitation(target: Ipv6Addr) -> Self {
        let mut body = target.octets().to_vec();
        // Source link-layer address option.
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&SRC_MAC);
        L4::Icmp {
            ty: 135,
            code: 0,
            rest: [0; 4],
            body,
        }
    }

    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Sctp { .. } => PROTO_SCTP,
            L4::Icmp { .. } if v6 => PROTO_ICMPV6,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The bytes of the upper layer (checksums are left zero: the programs don't check them).
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = TcpHeader::new(*sport, *dport, 0x1000_0000, 64240)
                    .to_bytes()
                    .to_vec();
                h[13] = *flags;
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
                }
                h.extend_from_slice(PAYLOAD);
                h
            }
            L4::Udp { sport, dport } => {
                let len = (8 + PAYLOAD.len()) as u16;
                let h = etherparse::UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: len,
                    checksum: 0,
                };
                let mut b = h.to_bytes().to_vec();
                b.extend_from_slice(PAYLOAD);
                b
            }
            L4::Sctp { sport, dport } => {
                // Common header: ports, verification tag, checksum; then an INIT chunk stub.
                let mut b = Vec::new();
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
                b.extend_from_slice(&[1, 0, 0, 4]);
                b
            }
            L4::Icmp {
                ty,
                code,
                rest,
                body,
            } => {
                let mut b = vec![*ty, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(body);
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

/// IPv4 header knobs.
#[derive(Clone, Debug, Default)]
pub struct V4Opts {
    /// Options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub id: u16,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
}

/// One IPv6 extension header: its number and its body after the next-header byte (and,
/// except for the fragment header, the length byte).
#[derive(Clone, Debug)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Ext {
    /// Hop-by-hop or destination options padded with PadN to `8 * (n + 1)` bytes.
    pub fn options(kind: u8, n: u8) -> Self {
        let len = 8 * (n as usize + 1) - 2;
        // One PadN option covering the rest.
        let mut body = vec![1, (len - 2) as u8];
        body.resize(len, 0);
        Ext { kind, body }
    }

    /// Fragment header: offset in 8-byte units, more-fragments flag, identification.
    pub fn fragment(offset: u16, more: bool, id: u32) -> Self {
        let off = (offset << 3) | more as u16;
        let mut body = vec![0];
        body.extend_from_slice(&off.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        Ext {
            kind: IPV6_FRAGMENT,
            body,
        }
    }

    fn write(&self, next: u8, out: &mut Vec<u8>) {
        out.push(next);
        match self.kind {
            IPV6_FRAGMENT => out.extend_from_slice(&self.body),
            IPV6_AUTH => {
                out.push(((self.body.len() + 2) / 4 - 2) as u8);
                out.extend_from_slice(&self.body);
            }
            _ => {
                out.push(((self.body.len() + 2) / 8 - 1) as u8);
                out.extend_from_slice(&self.body);
            }
        }
    }
}

pub fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (no Ethernet header) carrying `payload` as protocol `proto`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], o: &V4Opts) -> Vec<u8> {
    let mut h = Ipv4Header::new(
        payload.len() as u16,
        64,
        IpNumber(proto),
        src.octets(),
        dst.octets(),
    )
    .expect("payload fits");
    h.options = o
        .options
        .as_slice()
        .try_into()
        .expect("options of a valid length");
    h.set_payload_len(payload.len()).expect("payload fits");
    h.identification = o.id;
    h.dont_fragment = false;
    h.more_fragments = o.more_fragments;
    h.fragment_offset = IpFragOffset::try_new(o.frag_offset).expect("13-bit offset");
    h.header_checksum = h.calc_header_checksum();
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(payload);
    b
}

/// An IPv6 packet (no Ethernet header): `exts` in order, then `payload` as `proto`.
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    exts: &[Ext],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut rest = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |n| n.kind);
        e.write(next, &mut rest);
    }
    rest.extend_from_slice(payload);
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: rest.len() as u16,
        next_header: IpNumber(exts.first().map_or(proto, |e| e.kind)),
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    };
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(&rest);
    b
}

/// The IP packet (no Ethernet header) of `l4` from `src` to `dst` (same family).
pub fn ip_packet(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ipv4_packet(s, d, l4.proto(false), &l4.bytes(), &V4Opts::default())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, &[], l4.proto(true), &l4.bytes()),
        _ => panic!("mixed families: {src} -> {dst}"),
    }
}

/// An Ethernet frame of `l4` from `src` to `dst`.
pub fn frame(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let ethertype = if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    ether(ethertype, &ip_packet(src, dst, l4))
}

/// An IPv4 frame with header knobs (options, fragmentation).
pub fn frame_v4(src: Ipv4Addr, dst: Ipv4Addr, l4: &L4, o: &V4Opts) -> Vec<u8> {
    ether(
        ETH_P_IP,
        &ipv4_packet(src, dst, l4.proto(false), &l4.bytes(), o),
    )
}

/// An IPv6 frame with extension headers before `l4`.
pub fn frame_v6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], l4: &L4) -> Vec<u8> {
    ether(
        ETH_P_IPV6,
        &ipv6_packet(src, dst, exts, l4.proto(true), &l4.bytes()),
    )
}

/// An ARP request (who-has `target`, tell `sender`).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    b.extend_from_slice(&SRC_MAC);
    b.extend_from_slice(&sender.octets());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&target.octets());
    ether(ETH_P_ARP, &b)
}

/// Offset of the IP header in every frame built here.
pub const L3: usize = 14;

/// A random IPv6 extension header for the randomized packet tests: options, routing,
/// authentication, or a fragment header (first or later, more or last).
pub fn random_ext(rng: &mut crate::util::Rng) -> Ext {
    match rng.below(5) {
        0 => Ext::options(IPV6_HOP_BY_HOP, rng.below(2) as u8),
        1 => Ext::options(IPV6_DEST_OPTS, rng.below(3) as u8),
        2 => Ext::options(IPV6_ROUTING, 0),
        3 => Ext {
            kind: IPV6_AUTH,
            body: vec![0; 10],
        },
        _ => Ext::fragment(rng.pick(&[0, 0, 3]), rng.coin(), rng.next_u64() as u32),
    }
}

/// Random IPv4 header options and fragmentation for the randomized packet tests.
pub fn random_v4_opts(rng: &mut crate::util::Rng) -> V4Opts {
    let mut o = V4Opts::default();
    if rng.below(4) == 0 {
        o.options = vec![1; 4 * rng.below(11)];
    }
    if rng.below(5) == 0 {
        o.id = rng.next_u64() as u16;
        o.more_fragments = rng.coin();
        o.frag_offset = rng.pick(&[0, 0, 1, 185]);
    }
    o
}

/// A frame of a pod's traffic with `peer` (same family), carrying `l4`: from `pod` to
/// `peer` if `from_pod`, else back. One IPv6 frame in three carries `min_exts..=3` random
/// extension headers ([`random_ext`]); IPv4 frames get [`random_v4_opts`].
pub fn random_pod_frame(
    rng: &mut crate::util::Rng,
    pod: IpAddr,
    peer: IpAddr,
    from_pod: bool,
    l4: &L4,
    min_exts: usize,
) -> Vec<u8> {
    let (s, d) = if from_pod { (pod, peer) } else { (peer, pod) };
    match (s, d) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut exts = Vec::new();
            if rng.below(3) == 0 {
                for _ in 0..min_exts + rng.below(4 - min_exts) {
                    exts.push(random_ext(rng));
                }
            }
            frame_v6(s, d, &exts, l4)
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => frame_v4(s, d, l4, &random_v4_opts(rng)),
        _ => panic!("{s} and {d} are of different families"),
    }
}
