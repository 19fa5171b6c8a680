//! One policy check: the egress check of a pod (packets leaving it) or its ingress check
//! (packets entering it). Order: conntrack (a flow this check allowed, or a reply to one),
//! then, for an isolated pod, the peer's identity and the pod's allow entries. Anything an
//! isolated pod cannot prove allowed is dropped and counted.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext};
use aya_log_ebpf::debug;
use palisade_common::{
    counter_index, Config, CtKey, CtValue, DropEvent, Endpoint, FragKey, IdentityValue, PolicyKey,
    CFG_DEBUG_LOG, CFG_REVOKE_UNTRACKED, CT_ADOPTED, CT_CLOSING, CT_SEEN_REPLY, DIR_EGRESS,
    DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, FRAGMENT_TIMEOUT_NS, IDENTITY_FLAG_HOST,
    POLICY_PREFIX_FULL, PROTO_TCP, REASON_ALLOWED_HOST, REASON_ALLOWED_NOT_ISOLATED,
    REASON_ALLOWED_POLICY, REASON_ALLOWED_TRACKED, REASON_DROPPED_CT_FULL, REASON_DROPPED_FRAGMENT,
    REASON_DROPPED_MALFORMED, REASON_DROPPED_NO_RULE,
};

use crate::{
    parse::{parse, Kind, Packet, Parsed, Tuple, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    CONFIG, CONNTRACK, COUNTERS, ENDPOINTS, EVENTS, EVENT_BUDGET, FRAGMENTS, IDENTITY4_CIDR,
    IDENTITY4_EXACT, IDENTITY6_CIDR, IDENTITY6_EXACT, POLICY_EXACT, POLICY_WILDCARD, SCRATCH,
};

const SEC: u64 = 1_000_000_000;

/// Where a check runs: the pod (slot) and direction judged, the interface the packet is
/// on, and the runtime settings. The deferred service check builds one for the source pod.
pub(crate) struct Ctx<'a> {
    pub tc: &'a TcContext,
    pub dir: u8,
    pub slot: u32,
    pub ifindex: u32,
    pub isolated: bool,
    pub cfg: Config,
}

/// The runtime settings (defaults until the agent wrote them).
#[inline(always)]
pub(crate) fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// The interface the packet is on and its endpoint entry; `None` for an interface
/// Palisade does not manage.
#[inline(always)]
pub fn endpoint(tc: &TcContext) -> Option<(u32, Endpoint)> {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*tc.skb.skb).ifindex };
    // SAFETY: the value is copied out at once; the agent only replaces whole entries.
    let ep = *unsafe { ENDPOINTS.get(&ifindex) }?;
    Some((ifindex, ep))
}

/// Returns true when the packet may pass. `ifindex`/`ep` come from [`endpoint`], looked up
/// once per packet by the caller.
pub fn check(tc: &TcContext, dir: u8, ifindex: u32, ep: Endpoint) -> bool {
    let bit = if dir == DIR_INGRESS {
        EP_ISOLATED_INGRESS
    } else {
        EP_ISOLATED_EGRESS
    };
    let c = Ctx {
        tc,
        dir,
        slot: ep.slot,
        ifindex,
        isolated: ep.flags & bit != 0,
        cfg: config(),
    };
    let Some(p) = scratch() else {
        return !c.isolated;
    };
    match parse(tc, p) {
        Parsed::Control => true,
        Parsed::OtherEtherType => finish(&c, None, not_isolated_or(&c, REASON_DROPPED_NO_RULE)),
        Parsed::Malformed => finish(&c, None, not_isolated_or(&c, REASON_DROPPED_MALFORMED)),
        Parsed::Ip => {
            let p = &*p;
            let now = unsafe { bpf_ktime_get_ns() };
            let reason = judge(&c, p, now);
            if !palisade_common::reason_is_drop(reason) && c.isolated {
                remember_first_fragment(&c, p, now);
            }
            finish(&c, Some(p), reason)
        }
    }
}

/// The per-CPU packet state both programs parse into.
#[inline(always)]
pub(crate) fn scratch() -> Option<&'static mut Packet> {
    let s = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch; nothing else uses it while this program runs on this CPU.
    Some(unsafe { &mut (*s).packet })
}

/// A TCP packet's (bare SYN, FIN or RST) flags: a bare SYN opens a flow anew, FIN/RST
/// mark its entry closing. Both false for other protocols.
#[inline(always)]
pub(crate) fn tcp_state(p: &Packet) -> (bool, bool) {
    let tcp = p.tuple.proto == PROTO_TCP;
    (
        tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0,
    )
}

/// An allowed first fragment vouches for the later fragments of its datagram.
#[inline(always)]
pub(crate) fn remember_first_fragment(c: &Ctx, p: &Packet, now: u64) {
    if p.kind == Kind::Normal {
        if let Some(id) = p.frag_id {
            let _ = FRAGMENTS.insert(&frag_key(c, &p.tuple, id), &now, 0);
        }
    }
}

/// A later fragment follows its first: passed while the first was allowed less than the
/// kernel's own reassembly timeout ago (the IPv4 id wraps, and the GC may delete it).
#[inline(always)]
pub(crate) fn later_fragment(c: &Ctx, p: &Packet, now: u64) -> u32 {
    let key = frag_key(c, &p.tuple, p.frag_id.unwrap_or(0));
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGMENTS.get(&key) } {
        Some(first) if now.saturating_sub(*first) < FRAGMENT_TIMEOUT_NS => REASON_ALLOWED_TRACKED,
        _ => REASON_DROPPED_FRAGMENT,
    }
}

/// A mid-stream TCP packet with no entry belongs to a connection opened before the pod
/// was isolated (or before Palisade started): kept (adopted) unless told to revoke.
/// `None`: not such a packet.
#[inline(always)]
pub(crate) fn adopt_mid_stream(c: &Ctx, p: &Packet, key: &CtKey, now: u64) -> Option<u32> {
    if p.tuple.proto != PROTO_TCP
        || p.tcp_flags & TCP_SYN != 0
        || p.tcp_flags & TCP_ACK == 0
        || c.cfg.flags & CFG_REVOKE_UNTRACKED != 0
    {
        return None;
    }
    Some(match track(key, now, CT_ADOPTED) {
        Ok(()) => REASON_ALLOWED_TRACKED,
        Err(()) => REASON_DROPPED_CT_FULL,
    })
}

#[inline(always)]
fn not_isolated_or(c: &Ctx, drop_reason: u32) -> u32 {
    if c.isolated {
        drop_reason
    } else {
        REASON_ALLOWED_NOT_ISOLATED
    }
}

/// An ICMP error relates to a tracked flow when it quotes a packet of that flow and goes
/// back to the quoted packet's sender (any router on the path may send it, so the outer
/// source is free). One addressed elsewhere is judged as a packet of its own, whatever it
/// quotes. Out of line: its two conntrack keys would push `judge` over the stack limit.
#[inline(never)]
fn icmp_error_related(c: &Ctx, p: &Packet, now: u64) -> bool {
    if p.tuple.daddr != p.inner.saddr {
        return false;
    }
    // The quoted packet travelled the other way. It is either a packet of a flow this pod
    // opened (tracked by the opposite check) or a reply of a flow this pod accepted
    // (tracked by this check, in the opening direction).
    let opened = ct_key(&p.inner, c.slot, opposite(c.dir));
    let accepted = ct_key(&reversed(&p.inner), c.slot, c.dir);
    for key in [opened, accepted] {
        if let Some(v) = CONNTRACK.get_ptr_mut(&key) {
            // SAFETY: pointer into the map value; plain data.
            if alive(&c.cfg, p.inner.proto, unsafe { &*v }, now) {
                return true;
            }
        }
    }
    false
}

#[inline(always)]
fn judge(c: &Ctx, p: &Packet, now: u64) -> u32 {
    let t = &p.tuple;
    match p.kind {
        Kind::LaterFragment => {
            if !c.isolated {
                return REASON_ALLOWED_NOT_ISOLATED;
            }
            return later_fragment(c, p, now);
        }
        Kind::IcmpError => {
            if icmp_error_related(c, p, now) {
                return REASON_ALLOWED_TRACKED;
            }
        }
        Kind::Normal => {}
    }

    let (syn_only, closing) = tcp_state(p);
    let key = ct_key(t, c.slot, c.dir);

    // A flow this check already allowed. A bare SYN on a flow that completed is a new
    // connection reusing the tuple: judge it again.
    if let Some(v) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer into the map value; concurrent updates only race on timestamps.
        let v = unsafe { &mut *v };
        if alive(&c.cfg, t.proto, v, now) && !(syn_only && v.state & CT_SEEN_REPLY != 0) {
            touch(v, now, closing, false);
            return REASON_ALLOWED_TRACKED;
        }
    }

    // A reply to a flow the opposite check allowed. A bare SYN is never a reply.
    if !syn_only {
        let rkey = ct_key(&reversed(t), c.slot, opposite(c.dir));
        if let Some(v) = CONNTRACK.get_ptr_mut(&rkey) {
            // SAFETY: as above.
            let v = unsafe { &mut *v };
            if alive(&c.cfg, t.proto, v, now) {
                touch(v, now, closing, true);
                return REASON_ALLOWED_TRACKED;
            }
        }
    }

    if !c.isolated {
        // Track even when not isolated: the opposite direction may be, and its replies
        // must find this flow.
        let _ = track(&key, now, 0);
        return REASON_ALLOWED_NOT_ISOLATED;
    }

    if let Some(reason) = adopt_mid_stream(c, p, &key, now) {
        return reason;
    }

    let peer_addr = if c.dir == DIR_INGRESS {
        &t.saddr
    } else {
        &t.daddr
    };
    let peer = identity(t.family, peer_addr);
    if c.dir == DIR_INGRESS && peer.flags & IDENTITY_FLAG_HOST != 0 {
        return match track(&key, now, 0) {
            Ok(()) => REASON_ALLOWED_HOST,
            Err(()) => REASON_DROPPED_CT_FULL,
        };
    }
    if !policy_allows(PolicyKey::new(
        c.slot,
        peer.id,
        c.dir,
        t.proto,
        p.policy_port,
    )) {
        return REASON_DROPPED_NO_RULE;
    }
    match track(&key, now, 0) {
        Ok(()) => REASON_ALLOWED_POLICY,
        // Without an entry the replies would be dropped: refuse the flow visibly instead.
        Err(()) => REASON_DROPPED_CT_FULL,
    }
}

/// The identity of `addr`: the longest prefix covering it. A host entry (/32, /128) is the
/// longest prefix of its address whenever it exists, so the exact hash map answers first
/// and only addresses without one walk the trie of shorter prefixes; the agent keeps every
/// entry in exactly one of the two (by its prefix length), so the answer is the one a
/// single trie of all entries would give.
#[inline(always)]
pub(crate) fn identity(family: u8, addr: &[u8; 16]) -> IdentityValue {
    let found = if family == 4 {
        let a = [addr[0], addr[1], addr[2], addr[3]];
        // SAFETY: the value is copied out at once.
        match unsafe { IDENTITY4_EXACT.get(&a) } {
            Some(v) => Some(*v),
            None => IDENTITY4_CIDR.get(&Key::new(32, a)).copied(),
        }
    } else {
        // SAFETY: as above.
        match unsafe { IDENTITY6_EXACT.get(addr) } {
            Some(v) => Some(*v),
            None => IDENTITY6_CIDR.get(&Key::new(128, *addr)).copied(),
        }
    };
    found.unwrap_or_default()
}

/// Whether an allow entry of the pod covers `key` (a packet's full key). Exact-port entries
/// live in a hash map, every wildcard one (any protocol, any port, a port-range block) in
/// the trie; the agent puts each entry in exactly one of them by its prefix length. Only
/// whether some entry matches decides, so a hash hit answers, and a miss leaves the trie,
/// which holds every other entry that could cover the key.
#[inline(always)]
pub(crate) fn policy_allows(key: PolicyKey) -> bool {
    // SAFETY: only the presence of the value is read.
    unsafe { POLICY_EXACT.get(&key) }.is_some()
        || POLICY_WILDCARD
            .get(&Key::new(POLICY_PREFIX_FULL, key))
            .is_some()
}

#[inline(always)]
fn opposite(dir: u8) -> u8 {
    if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

#[inline(always)]
pub(crate) fn reversed(t: &Tuple) -> Tuple {
    Tuple {
        family: t.family,
        proto: t.proto,
        saddr: t.daddr,
        daddr: t.saddr,
        sport: t.dport,
        dport: t.sport,
    }
}

#[inline(always)]
pub(crate) fn ct_key(t: &Tuple, slot: u32, dir: u8) -> CtKey {
    CtKey {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        family: t.family,
        dir,
        _pad: 0,
        slot,
    }
}

#[inline(always)]
fn frag_key(c: &Ctx, t: &Tuple, id: u32) -> FragKey {
    FragKey {
        saddr: t.saddr,
        daddr: t.daddr,
        id,
        // IPv6 fragments name the next header of the fragmentable part, which differs
        // between the first fragment and later ones; the 32-bit id is enough there.
        proto: if t.family == 4 { t.proto } else { 0 },
        family: t.family,
        dir: c.dir,
        _pad: 0,
        slot: c.slot,
    }
}

/// Dead entries count as absent: see `Config::ct_alive`.
#[inline(always)]
pub(crate) fn alive(cfg: &Config, proto: u8, v: &CtValue, now: u64) -> bool {
    cfg.ct_alive(proto, v, now)
}

#[inline(always)]
pub(crate) fn touch(v: &mut CtValue, now: u64, closing: bool, reply: bool) {
    v.last_seen_ns = now;
    if closing {
        v.state |= CT_CLOSING;
    }
    if reply {
        v.state |= CT_SEEN_REPLY;
    }
}

#[inline(always)]
pub(crate) fn track(key: &CtKey, now: u64, state: u32) -> Result<(), ()> {
    let v = CtValue {
        last_seen_ns: now,
        state,
        _pad: 0,
    };
    CONNTRACK.insert(key, &v, 0).map_err(|_| ())
}

/// Counts the verdict under the context's pod and direction, and reports drops.
#[inline(always)]
pub(crate) fn finish(c: &Ctx, p: Option<&Packet>, reason: u32) -> bool {
    let len = c.tc.len() as u64;
    if let Some(cell) = COUNTERS.get_ptr_mut(counter_index(c.slot, c.dir, reason)) {
        // SAFETY: per-CPU cell: no other writer while this program runs on this CPU.
        unsafe {
            (*cell).packets += 1;
            (*cell).bytes += len;
        }
    }
    let drop = palisade_common::reason_is_drop(reason);
    if drop {
        emit_drop(c, p, reason, len as u32);
    }
    !drop
}

fn emit_drop(c: &Ctx, p: Option<&Packet>, reason: u32, len: u32) {
    if c.cfg.flags & CFG_DEBUG_LOG != 0 {
        debug!(c.tc, "drop slot={} dir={} reason={}", c.slot, c.dir, reason);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value.
    let budget = unsafe { &mut *budget };
    if now.saturating_sub(budget.window_start_ns) >= SEC {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= c.cfg.events_per_sec {
        budget.lost = budget.lost.wrapping_add(1);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        budget.lost = budget.lost.wrapping_add(1);
        return;
    };
    budget.sent += 1;
    // Filled in place: a DropEvent on the stack would not fit beside the packet state.
    let ev: &mut DropEvent = unsafe { &mut *entry.as_mut_ptr() };
    ev.ts_ns = now;
    ev.dir = c.dir;
    ev._pad = 0;
    ev.reason = reason;
    ev.slot = c.slot;
    ev.ifindex = c.ifindex;
    ev.len = len;
    match p {
        Some(p) => {
            ev.saddr = p.tuple.saddr;
            ev.daddr = p.tuple.daddr;
            ev.sport = p.tuple.sport;
            ev.dport = p.tuple.dport;
            ev.proto = p.tuple.proto;
            ev.family = p.tuple.family;
        }
        None => {
            ev.saddr = [0; 16];
            ev.daddr = [0; 16];
            ev.sport = 0;
            ev.dport = 0;
            ev.proto = 0;
            ev.family = 0;
        }
    }
    entry.submit(0);
}
