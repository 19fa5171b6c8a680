//! Packet parsing: Ethernet, IPv4 (with options), IPv6 (with extension headers), and the
//! first bytes of TCP/UDP/SCTP/ICMP. Everything is read with `bpf_skb_load_bytes`, which
//! bounds-checks against the whole skb (linear or not), so a truncated packet is a clean
//! error rather than an out-of-bounds read.

use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::TcContext};
use palisade_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Addresses and ports of a flow in the direction of the packet (ports in host order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuple {
    pub family: u8,
    pub proto: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// What the packet is, as far as policy is concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole packet, or the first fragment of a datagram (`frag_id` set).
    Normal,
    /// An ICMP error quoting a packet of another flow (`inner`).
    IcmpError,
    /// A fragment after the first: no ports; follows its datagram's verdict.
    LaterFragment,
}

#[repr(C)]
pub struct Packet {
    pub tuple: Tuple,
    pub kind: Kind,
    /// Destination port for the policy lookup: 0 for protocols without ports.
    pub policy_port: u16,
    pub tcp_flags: u8,
    /// Fragment identification when the packet is a fragment (first or later).
    pub frag_id: Option<u32>,
    /// For `IcmpError`: the quoted packet's tuple, as that packet travelled.
    pub inner: Tuple,
}

pub enum Parsed {
    /// An IP packet, parsed into the scratch `Packet`.
    Ip,
    /// ARP and IPv6 neighbour discovery: link-level control that must always pass.
    Control,
    /// An Ethernet type Palisade does not judge (not IP).
    OtherEtherType,
    /// Truncated or inconsistent headers.
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| ())
}

/// Reads `size_of::<T>()` bytes straight into `dst`, so large headers never sit on the
/// 512-byte BPF stack.
#[inline(always)]
fn load_into<T>(ctx: &TcContext, off: usize, dst: &mut T) -> Result<(), ()> {
    // SAFETY: the helper writes exactly size_of::<T>() bytes into a valid &mut T of plain
    // bytes, or fails without reading past the packet.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off as u32,
            dst as *mut T as *mut c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(())
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses the frame into `p` (a per-CPU scratch value: headers never sit on the stack).
#[inline(always)]
pub fn parse(ctx: &TcContext, p: &mut Packet) -> Parsed {
    let ethertype = match load::<[u8; 2]>(ctx, 12) {
        Ok(t) => be16(t),
        Err(()) => return Parsed::Malformed,
    };
    p.kind = Kind::Normal;
    p.policy_port = 0;
    p.tcp_flags = 0;
    p.frag_id = None;
    p.tuple.sport = 0;
    p.tuple.dport = 0;
    p.tuple.saddr = [0; 16];
    p.tuple.daddr = [0; 16];
    let r = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN, p),
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN, p),
        ETH_P_ARP => return Parsed::Control,
        _ => return Parsed::OtherEtherType,
    };
    r.unwrap_or(Parsed::Malformed)
}

/// Reads an IPv4 header at `off` into `t` (ports unset); returns the L4 offset, the
/// identification, the fragment offset (8-byte units), the more-fragments flag and the
/// total length.
#[inline(always)]
fn ipv4_header(
    ctx: &TcContext,
    off: usize,
    t: &mut Tuple,
) -> Result<(usize, u32, u16, bool, usize), ()> {
    let h: [u8; 12] = load(ctx, off)?;
    if h[0] >> 4 != 4 {
        return Err(());
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let total = be16([h[2], h[3]]) as usize;
    if total < ihl {
        return Err(());
    }
    let frag = be16([h[6], h[7]]);
    t.family = 4;
    t.proto = h[9];
    t.saddr = [0; 16];
    t.daddr = [0; 16];
    let mut a = [0u8; 4];
    load_into(ctx, off + 12, &mut a)?;
    t.saddr[..4].copy_from_slice(&a);
    load_into(ctx, off + 16, &mut a)?;
    t.daddr[..4].copy_from_slice(&a);
    let id = be16([h[4], h[5]]) as u32;
    Ok((off + ihl, id, frag & 0x1fff, frag & 0x2000 != 0, total))
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize, p: &mut Packet) -> Result<Parsed, ()> {
    let (l4, id, frag_off, more, total) = ipv4_header(ctx, off, &mut p.tuple)?;
    // The IPv4 total length must fit in what was received.
    if off + total > ctx.len() as usize {
        return Err(());
    }
    let fragment = frag_off != 0 || more;
    finish(
        ctx,
        p,
        l4,
        off + total,
        if fragment { Some(id) } else { None },
        frag_off,
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize, p: &mut Packet) -> Result<Parsed, ()> {
    let h: [u8; 8] = load(ctx, off)?;
    if h[0] >> 4 != 6 {
        return Err(());
    }
    let payload = be16([h[4], h[5]]) as usize;
    let end = off + 40 + payload;
    if end > ctx.len() as usize {
        return Err(());
    }
    let t = &mut p.tuple;
    t.family = 6;
    load_into(ctx, off + 8, &mut t.saddr)?;
    load_into(ctx, off + 24, &mut t.daddr)?;
    let mut next = h[6];
    let mut l4 = off + 40;
    let mut frag_id: Option<u32> = None;
    let mut frag_off = 0u16;
    // Extension headers, bounded so the verifier sees a finite loop.
    for _ in 0..6 {
        match next {
            0 | 43 | 60 => {
                let e: [u8; 2] = load(ctx, l4)?;
                next = e[0];
                l4 += (e[1] as usize + 1) * 8;
            }
            51 => {
                let e: [u8; 2] = load(ctx, l4)?;
                next = e[0];
                l4 += (e[1] as usize + 2) * 4;
            }
            44 => {
                let e: [u8; 8] = load(ctx, l4)?;
                next = e[0];
                frag_off = be16([e[2], e[3]]) >> 3;
                // Even an atomic fragment (offset 0, no more) is tracked as a fragment.
                frag_id = Some(u32::from_be_bytes([e[4], e[5], e[6], e[7]]));
                l4 += 8;
                if frag_off != 0 {
                    // What follows is fragment data, not headers: never parse it as such.
                    break;
                }
            }
            _ => break,
        }
        if l4 > end {
            // An extension header that runs past the datagram.
            return Err(());
        }
    }
    if frag_off == 0 && matches!(next, 0 | 43 | 60 | 51 | 44) {
        // More extension headers than we follow: refuse to guess the upper layer.
        return Err(());
    }
    p.tuple.proto = next;
    finish(ctx, p, l4, end, frag_id, frag_off)
}

#[inline(always)]
fn finish(
    ctx: &TcContext,
    p: &mut Packet,
    l4: usize,
    // End of the IP datagram: upper-layer headers must lie inside it, not in padding.
    end: usize,
    frag_id: Option<u32>,
    frag_off: u16,
) -> Result<Parsed, ()> {
    p.frag_id = frag_id;
    if frag_off != 0 {
        p.kind = Kind::LaterFragment;
        return Ok(Parsed::Ip);
    }
    let t = &mut p.tuple;
    match t.proto {
        PROTO_TCP => {
            let h: [u8; 14] = load(ctx, l4)?;
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 || l4 + doff > end {
                return Err(());
            }
            t.sport = be16([h[0], h[1]]);
            t.dport = be16([h[2], h[3]]);
            p.tcp_flags = h[13];
            p.policy_port = t.dport;
        }
        PROTO_UDP | PROTO_SCTP => {
            let h: [u8; 4] = load(ctx, l4)?;
            // UDP needs 8 bytes, SCTP 12 bytes of common header: check they are there.
            let need = if t.proto == PROTO_UDP { 8 } else { 12 };
            if l4 + need > end {
                return Err(());
            }
            t.sport = be16([h[0], h[1]]);
            t.dport = be16([h[2], h[3]]);
            p.policy_port = t.dport;
        }
        // ICMP only in IPv4 and ICMPv6 only in IPv6; the other pairing is an unknown
        // protocol (judged without ports), never neighbour discovery.
        PROTO_ICMP | PROTO_ICMPV6 if (t.proto == PROTO_ICMPV6) == (t.family == 6) => {
            if l4 + 8 > end {
                return Err(());
            }
            let h: [u8; 8] = load(ctx, l4)?;
            let ty = h[0];
            let v6 = t.family == 6;
            if v6 && matches!(ty, 130..=137 | 143) {
                return Ok(Parsed::Control);
            }
            let echo = if v6 {
                matches!(ty, 128 | 129)
            } else {
                matches!(ty, 0 | 8)
            };
            let error = if v6 {
                matches!(ty, 1..=4)
            } else {
                matches!(ty, 3 | 4 | 5 | 11 | 12)
            };
            if echo {
                let id = be16([h[4], h[5]]);
                t.sport = id;
                t.dport = id;
            } else if error {
                p.kind = Kind::IcmpError;
                if v6 {
                    inner_ipv6(ctx, l4 + 8, end, &mut p.inner)?;
                } else {
                    inner_ipv4(ctx, l4 + 8, end, &mut p.inner)?;
                }
            }
        }
        _ => {}
    }
    Ok(Parsed::Ip)
}

/// The packet quoted by an ICMPv4 error: its IP header and the first 8 bytes after it.
#[inline(always)]
fn inner_ipv4(ctx: &TcContext, off: usize, end: usize, t: &mut Tuple) -> Result<(), ()> {
    if off + 20 > end {
        return Err(());
    }
    let (l4, _, _, _, _) = ipv4_header(ctx, off, t)?;
    inner_ports(ctx, t, l4, end)
}

#[inline(always)]
fn inner_ipv6(ctx: &TcContext, off: usize, end: usize, t: &mut Tuple) -> Result<(), ()> {
    if off + 40 > end {
        return Err(());
    }
    let h: [u8; 8] = load(ctx, off)?;
    if h[0] >> 4 != 6 {
        return Err(());
    }
    t.family = 6;
    t.proto = h[6];
    load_into(ctx, off + 8, &mut t.saddr)?;
    load_into(ctx, off + 24, &mut t.daddr)?;
    inner_ports(ctx, t, off + 40, end)
}

#[inline(always)]
fn inner_ports(ctx: &TcContext, t: &mut Tuple, l4: usize, end: usize) -> Result<(), ()> {
    t.sport = 0;
    t.dport = 0;
    match t.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            if l4 + 4 > end {
                return Err(());
            }
            let h: [u8; 4] = load(ctx, l4)?;
            t.sport = be16([h[0], h[1]]);
            t.dport = be16([h[2], h[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4 + 6 > end {
                return Err(());
            }
            let h: [u8; 6] = load(ctx, l4)?;
            let id = be16([h[4], h[5]]);
            t.sport = id;
            t.dport = id;
        }
        _ => {}
    }
    Ok(())
}
