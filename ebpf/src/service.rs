//! Egress through Services, decided on the backend kube-proxy chose (issue #7).
//!
//! At the pod's interface a packet to a Service carries the ClusterIP; kube-proxy rewrites
//! it to a backend only later, in the node's netfilter PREROUTING. So `palisade_from_pod`
//! does not judge a packet of an egress-isolated pod whose destination lies in a service
//! CIDR: it writes "egress pending" and the source slot into the skb mark (the bits of
//! `SvcConfig::mark_mask`), remembers the original tuple in `SVC_PENDING`, and passes it.
//! The next tc hook on the packet's path judges the source slot's egress against the
//! translated destination and clears the bits: `palisade_to_pod` of a local backend
//! (before that pod's own ingress check) or `palisade_uplink` on the node's uplink for a
//! remote backend. Each packet is judged there, never at the source: a flow that the
//! deferred check allowed is tracked under its translated tuple (slot, egress), and its
//! pod→ClusterIP tuple is recorded in `CONNTRACK` too, so the replies that un-DNAT brings
//! back to the source pod are matched by the source's ordinary reply check. A denied packet
//! is dropped, counted as `dropped-no-rule` under the source pod's egress, and removes any
//! pod→ClusterIP entry of its tuple.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap},
    programs::TcContext,
};
use palisade_common::{
    CtKey, Endpoint, PolicyKey, SvcConfig, SvcPendingKey, CT_ADOPTED, DIR_EGRESS,
    EP_ISOLATED_EGRESS, MAX_ENDPOINTS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_ALLOWED_POLICY,
    REASON_ALLOWED_TRACKED, REASON_DROPPED_CT_FULL, REASON_DROPPED_NO_RULE,
};

use crate::{
    check::{
        adopt_mid_stream, alive, config, ct_key, finish, identity, later_fragment, policy_allows,
        remember_first_fragment, scratch, tcp_state, touch, track, Ctx,
    },
    parse::{parse, Kind, Packet, Parsed},
    CONNTRACK,
};

#[map]
static SVC_CONFIG: Array<SvcConfig> = Array::pinned(1, 0);
#[map]
static SVC_CIDR_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(1024, 0);
#[map]
static SVC_CIDR_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(1024, 0);
#[map]
static SVC_PENDING: LruHashMap<SvcPendingKey, CtKey> = LruHashMap::pinned(65_536, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[inline(always)]
fn svc_config() -> Option<SvcConfig> {
    let c = *SVC_CONFIG.get(0)?;
    if c.mark_mask == 0 {
        None
    } else {
        Some(c)
    }
}

/// True when the frame's destination lies in a service CIDR. Reads only the destination
/// address, so packets to anything else pay one LPM lookup and no second parse.
#[inline(always)]
fn to_service_cidr(tc: &TcContext) -> bool {
    let Ok(ethertype) = tc.load::<[u8; 2]>(12) else {
        return false;
    };
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => match tc.load::<[u8; 4]>(ETH_HLEN + 16) {
            Ok(d) => SVC_CIDR_V4.get(&Key::new(32, d)).is_some(),
            Err(_) => false,
        },
        ETH_P_IPV6 => match tc.load::<[u8; 16]>(ETH_HLEN + 24) {
            Ok(d) => SVC_CIDR_V6.get(&Key::new(128, d)).is_some(),
            Err(_) => false,
        },
        _ => false,
    }
}

/// Hook of `palisade_from_pod`, before its own check. `Some(true)`: the packet was marked
/// for a deferred verdict and passes; `None`: not a service packet, judge it here.
/// Never inlined: its stack frame must not add up with the check's (512 bytes in all).
#[inline(never)]
pub fn defer_from_pod(tc: &TcContext, ep: &Endpoint) -> Option<bool> {
    // The endpoint's flags first: a pod not isolated for egress costs no map lookup.
    if ep.flags & EP_ISOLATED_EGRESS == 0 || ep.slot >= MAX_ENDPOINTS {
        return None;
    }
    let cfg = svc_config()?;
    if !to_service_cidr(tc) {
        return None;
    }
    let p = scratch()?;
    if !matches!(parse(tc, p), Parsed::Ip) {
        return None;
    }
    let t = &p.tuple;
    // Only what kube-proxy translates: whole TCP/UDP/SCTP packets. ICMP and fragments to
    // a service address are judged here against the ClusterIP (which only an ipBlock
    // can allow).
    if p.kind != Kind::Normal
        || p.frag_id.is_some()
        || !(t.proto == PROTO_TCP || t.proto == PROTO_UDP || t.proto == PROTO_SCTP)
    {
        return None;
    }
    let key = SvcPendingKey {
        slot: ep.slot,
        sport: t.sport,
        proto: t.proto,
        family: t.family,
    };
    let orig = ct_key(t, ep.slot, DIR_EGRESS);
    // Without the record an allowed flow's replies could not be matched: judge it here
    // (which drops it, the ClusterIP being nobody's identity) rather than break it later.
    SVC_PENDING.insert(&key, &orig, 0).ok()?;
    // SAFETY: as above; mark is readable in tc programs.
    let mark = unsafe { (*tc.skb.skb).mark };
    tc.set_mark(cfg.pending_mark(mark, ep.slot));
    Some(true)
}

/// Hook of the later tc hooks (`palisade_to_pod` before its own check, `palisade_uplink`).
/// `None`: the packet carries no pending mark. Otherwise the verdict of the source pod's
/// egress on the translated packet; the mark bits are cleared either way. Never inlined,
/// for the same reason.
#[inline(never)]
pub fn deferred(tc: &TcContext) -> Option<bool> {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let (mark, ifindex) = unsafe { ((*tc.skb.skb).mark, (*tc.skb.skb).ifindex) };
    // A pending mark has its pending bit set: an unmarked packet (nearly every one) needs
    // no config lookup to know it carries none.
    if mark == 0 {
        return None;
    }
    let cfg = svc_config()?;
    let slot = cfg.pending_slot(mark)?;
    // Judged once: a tunnel's outer packet or the next hook must not see the bits again.
    tc.set_mark(mark & !cfg.mark_mask);
    if slot >= MAX_ENDPOINTS {
        return Some(false);
    }
    // The source pod's egress check, run here on the translated packet.
    let c = Ctx {
        tc,
        dir: DIR_EGRESS,
        slot,
        ifindex,
        isolated: true,
        cfg: config(),
    };
    let Some(p) = scratch() else {
        return Some(false);
    };
    Some(match parse(tc, p) {
        Parsed::Ip => {
            // SAFETY: reads the monotonic clock.
            let now = unsafe { bpf_ktime_get_ns() };
            let reason = judge(&c, p, now);
            finish(&c, Some(&*p), reason)
        }
        _ => finish(&c, None, REASON_DROPPED_NO_RULE),
    })
}

#[inline(always)]
fn judge(c: &Ctx, p: &Packet, now: u64) -> u32 {
    let (cfg, slot) = (&c.cfg, c.slot);
    let t = &p.tuple;
    match p.kind {
        Kind::Normal => {}
        // A translated datagram refragmented on its way: follows its first fragment.
        Kind::LaterFragment => return later_fragment(c, p, now),
        Kind::IcmpError => return REASON_DROPPED_NO_RULE,
    }
    let (syn_only, closing) = tcp_state(p);
    let key = ct_key(t, slot, DIR_EGRESS);
    let pkey = SvcPendingKey {
        slot,
        sport: t.sport,
        proto: t.proto,
        family: t.family,
    };
    // SAFETY: copied out at once.
    let orig = unsafe { SVC_PENDING.get(&pkey) }.copied();

    // A flow this deferred check allowed. Replies never pass here (they come back through
    // un-DNAT to the source pod), so a bare SYN is always judged anew: a reused tuple must
    // not ride on an old verdict.
    if !syn_only {
        if let Some(v) = CONNTRACK.get_ptr_mut(&key) {
            // SAFETY: pointer into the map value; plain data.
            let v = unsafe { &mut *v };
            if alive(cfg, t.proto, v, now) {
                touch(v, now, closing, false);
                return record(orig.as_ref(), now, closing, 0, REASON_ALLOWED_TRACKED);
            }
        }
        // Mid-stream TCP of a connection opened before the pod was isolated: kept, like
        // the source-side check keeps it, unless told to revoke.
        match adopt_mid_stream(c, p, &key, now) {
            Some(REASON_ALLOWED_TRACKED) => {
                return record(
                    orig.as_ref(),
                    now,
                    closing,
                    CT_ADOPTED,
                    REASON_ALLOWED_TRACKED,
                )
            }
            Some(reason) => return reason,
            None => {}
        }
    }

    let peer = identity(t.family, &t.daddr);
    if !policy_allows(PolicyKey::new(
        slot,
        peer.id,
        DIR_EGRESS,
        t.proto,
        p.policy_port,
    )) {
        // Nothing of the denied flow may keep letting replies or packets through.
        let _ = CONNTRACK.remove(&key);
        if let Some(o) = orig {
            let _ = CONNTRACK.remove(&o);
        }
        return REASON_DROPPED_NO_RULE;
    }
    if track(&key, now, 0).is_err() {
        return REASON_DROPPED_CT_FULL;
    }
    remember_first_fragment(c, p, now);
    record(orig.as_ref(), now, closing, 0, REASON_ALLOWED_POLICY)
}

/// Records (or refreshes) the pod→ClusterIP tuple of an allowed packet, which the source
/// pod's ingress check matches the un-DNATed replies against.
#[inline(always)]
fn record(orig: Option<&CtKey>, now: u64, closing: bool, state: u32, allowed: u32) -> u32 {
    let Some(o) = orig else {
        // Masquerade changed the source port: the packet is allowed, its replies cannot be
        // matched (the source pod's ingress check judges them as new flows).
        return allowed;
    };
    if allowed == REASON_ALLOWED_TRACKED {
        if let Some(v) = CONNTRACK.get_ptr_mut(o) {
            // SAFETY: pointer into the map value; plain data.
            let v = unsafe { &mut *v };
            touch(v, now, closing, false);
            return allowed;
        }
    }
    match track(o, now, state) {
        Ok(()) => allowed,
        Err(()) => REASON_DROPPED_CT_FULL,
    }
}

/// tc egress of the node's uplink and tunnel devices: the deferred egress check of service
/// packets whose backend is on another node. Every other packet passes untouched.
#[classifier]
pub fn palisade_uplink(ctx: TcContext) -> i32 {
    match deferred(&ctx) {
        Some(false) => crate::TC_ACT_SHOT,
        _ => crate::TC_ACT_OK,
    }
}
