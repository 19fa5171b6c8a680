//! The kernel ABI of Palisade: every map key and value shared by the tc programs and the
//! agent, defined once. All types are `#[repr(C)]` with explicit padding so both sides agree
//! byte for byte; multi-byte fields that take part in an LPM prefix are big-endian.
#![no_std]

/// Bumped whenever a map's key or value layout changes. It is part of the pin directory, so
/// an agent never reopens a pinned map whose layout it does not understand.
/// 2: the identity tries became `IDENTITY{4,6}_EXACT` hash maps of host addresses plus
/// `IDENTITY{4,6}_CIDR` tries of shorter prefixes, and `POLICY` became `POLICY_EXACT` (a hash
/// map of exact-port entries) plus `POLICY_WILDCARD` (a trie of the others).
pub const LAYOUT_VERSION: u32 = 2;

/// Direction of a check, seen from the local pod.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
pub const DIRECTIONS: u32 = 2;

/// Upper bound of local pods per node (slots). Kubelet's default is 110 pods per node.
pub const MAX_ENDPOINTS: u32 = 2048;

/// IP protocol numbers the programs understand.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Value of the IP→identity maps. Each family has two: `IDENTITY4_EXACT`/`IDENTITY6_EXACT`, hash maps
/// keyed by a host address (`[u8; 4]` / `[u8; 16]`, network order) holding the /32 and
/// /128 entries, and `IDENTITY4_CIDR`/`IDENTITY6_CIDR`, LPM tries keyed by `lpm_trie::Key<[u8; 4]>` /
/// `Key<[u8; 16]>` holding every shorter prefix. An entry lives in exactly one of them,
/// chosen by its prefix length; the programs probe the hash map first, then the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityValue {
    pub id: u32,
    pub flags: u32,
}

/// Identity of an address that no entry covers (outside every pod IP and every ipBlock).
pub const IDENTITY_WORLD: u32 = 0;
/// The address belongs to this node: ingress from it is always allowed (kubelet probes).
pub const IDENTITY_FLAG_HOST: u32 = 1 << 0;

/// Value of `ENDPOINTS`, keyed by the ifindex (u32) of a local pod's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Index of the pod in the policy and counter maps; `< MAX_ENDPOINTS`.
    pub slot: u32,
    /// `EP_*` bits.
    pub flags: u32,
}

/// Ingress to the pod is default-deny: only policy entries, replies and the node pass.
pub const EP_ISOLATED_INGRESS: u32 = 1 << 0;
/// Egress from the pod is default-deny.
pub const EP_ISOLATED_EGRESS: u32 = 1 << 1;

/// One allow entry of a local pod: the key of `POLICY_EXACT` (an exact-port entry,
/// prefix `POLICY_PREFIX_FULL`) or the data part of the `POLICY_WILDCARD` LPM key (any
/// other prefix). The prefix covers the fields in declaration order, so a shorter prefix
/// wildcards the port (or port range block) and then the protocol. `slot`, `identity` and
/// `port` are big-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub slot: u32,
    pub identity: u32,
    pub dir: u8,
    pub proto: u8,
    pub port: u16,
}

/// Prefix length (bits) of a `PolicyKey` that matches every protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length of a `PolicyKey` that matches every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of a `PolicyKey` for one exact port.
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKey {
    /// A key from host-order values; the lookup key the programs build for a packet.
    pub const fn new(slot: u32, identity: u32, dir: u8, proto: u8, port: u16) -> Self {
        Self {
            slot: slot.to_be(),
            identity: identity.to_be(),
            dir,
            proto,
            port: port.to_be(),
        }
    }
}

/// Value of `POLICY`: why the entry exists (kept for counters and debugging).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub flags: u32,
}

/// Verdict reasons: the index of a counter and the reason of a drop event.
pub const REASON_ALLOWED_POLICY: u32 = 0;
/// A packet of a flow this check already allowed, or a reply to one (conntrack).
pub const REASON_ALLOWED_TRACKED: u32 = 1;
pub const REASON_ALLOWED_NOT_ISOLATED: u32 = 2;
pub const REASON_ALLOWED_HOST: u32 = 3;
pub const REASON_DROPPED_NO_RULE: u32 = 4;
pub const REASON_DROPPED_MALFORMED: u32 = 5;
pub const REASON_DROPPED_FRAGMENT: u32 = 6;
pub const REASON_DROPPED_CT_FULL: u32 = 7;
pub const REASONS: u32 = 8;

/// Human names of the reasons, indexed by reason; used by the CLI and metrics.
pub const REASON_NAMES: [&str; REASONS as usize] = [
    "allowed-by-policy",
    "allowed-tracked",
    "allowed-not-isolated",
    "allowed-from-node",
    "dropped-no-rule",
    "dropped-malformed",
    "dropped-fragment",
    "dropped-conntrack-full",
];

/// True for reasons that drop the packet.
pub const fn reason_is_drop(reason: u32) -> bool {
    reason >= REASON_DROPPED_NO_RULE
}

/// Index into the per-CPU `COUNTERS` array.
pub const fn counter_index(slot: u32, dir: u8, reason: u32) -> u32 {
    (slot * DIRECTIONS + dir as u32) * REASONS + reason
}

/// Size of the `COUNTERS` array.
pub const COUNTER_ENTRIES: u32 = MAX_ENDPOINTS * DIRECTIONS * REASONS;

/// One per-CPU counter cell.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of the `CONNTRACK` LRU map: a flow in the direction that opened it, as seen by one
/// enforcement point (slot + direction). Each check tracks its own flows, so a flow that
/// the source's egress allowed is still judged by the destination's ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// IPv4 addresses use the first 4 bytes; the rest is zero.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in host order; ICMP echo uses the identifier as both ports so that the reversed
    /// tuple of a reply is the request's tuple.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
    pub slot: u32,
}

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the last packet; entries older than their timeout are dead.
    pub last_seen_ns: u64,
    /// `CT_*` bits.
    pub state: u32,
    pub _pad: u32,
}

/// Timeouts of `CONNTRACK` entries when `Config` leaves them at 0: an entry whose last
/// packet is older than its timeout is dead, and the programs treat it exactly as if it
/// were absent (so deleting a dead entry never changes a verdict).
pub const CT_DEFAULT_TCP_TIMEOUT_S: u32 = 3600;
pub const CT_DEFAULT_UDP_TIMEOUT_S: u32 = 60;
pub const CT_DEFAULT_CLOSING_TIMEOUT_S: u32 = 10;

/// How long a first fragment's verdict holds for the later fragments of its datagram
/// (Linux's own reassembly gives up after 30 s, `net.ipv4.ipfrag_time`).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

impl Config {
    /// The timeout (seconds) of a tracked flow of protocol `proto` in `state` (`CT_*`).
    #[inline(always)]
    pub fn ct_timeout_s(&self, proto: u8, state: u32) -> u32 {
        let (configured, default) = if state & CT_CLOSING != 0 {
            (self.closing_timeout_s, CT_DEFAULT_CLOSING_TIMEOUT_S)
        } else if proto == PROTO_TCP {
            (self.tcp_timeout_s, CT_DEFAULT_TCP_TIMEOUT_S)
        } else {
            (self.udp_timeout_s, CT_DEFAULT_UDP_TIMEOUT_S)
        };
        if configured == 0 {
            default
        } else {
            configured
        }
    }

    /// Whether a tracked flow still lets packets through at `now_ns` (`bpf_ktime_get_ns`,
    /// i.e. CLOCK_MONOTONIC). The one definition the programs and the garbage collector
    /// share.
    #[inline(always)]
    pub fn ct_alive(&self, proto: u8, v: &CtValue, now_ns: u64) -> bool {
        now_ns.saturating_sub(v.last_seen_ns)
            < self.ct_timeout_s(proto, v.state) as u64 * 1_000_000_000
    }
}

/// A reply has been seen: the flow is established.
pub const CT_SEEN_REPLY: u32 = 1 << 0;
/// A FIN or RST was seen: the flow expires on the short timeout.
pub const CT_CLOSING: u32 = 1 << 1;
/// Adopted mid-stream (open before Palisade isolated the pod).
pub const CT_ADOPTED: u32 = 1 << 2;

/// Key of `FRAGMENTS`: the datagram whose first fragment a check allowed, so later
/// fragments (which carry no ports) follow its verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
    pub slot: u32,
}

/// Runtime settings, index 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `CFG_*` bits.
    pub flags: u32,
    /// Drop events allowed per second and CPU before they are only counted as lost.
    pub events_per_sec: u32,
    pub tcp_timeout_s: u32,
    pub udp_timeout_s: u32,
    pub closing_timeout_s: u32,
    pub _pad: u32,
}

/// Revoke connections that were open before a pod became isolated (default: keep them).
pub const CFG_REVOKE_UNTRACKED: u32 = 1 << 0;
/// Emit aya-log debug records from the programs.
pub const CFG_DEBUG_LOG: u32 = 1 << 1;

/// An event in the `EVENTS` ring buffer: one dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
    pub reason: u32,
    pub slot: u32,
    pub ifindex: u32,
    pub len: u32,
}

/// Per-CPU rate-limit state for drop events (index 0 of `EVENT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub sent: u32,
    pub lost: u32,
}

/// Map names, shared so the agent finds what the programs define. At most 15 bytes each:
/// the kernel keeps that much of a map's name (`BPF_OBJ_NAME_LEN`), and bpftool, fdinfo and
/// the memory benchmark show that.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const IDENTITY4_EXACT: &str = "IDENTITY4_EXACT";
    pub const IDENTITY6_EXACT: &str = "IDENTITY6_EXACT";
    /// Named apart from layout 1's `IDENTITY_V4`/`_V6` (one trie of every prefix), whose
    /// definition they share but whose meaning they do not: an upgrade must not adopt
    /// those (see the agent's `dataplane::upgrade`).
    pub const IDENTITY4_CIDR: &str = "IDENTITY4_CIDR";
    pub const IDENTITY6_CIDR: &str = "IDENTITY6_CIDR";
    /// Exact-port allow entries (prefix `POLICY_PREFIX_FULL`), keyed by `PolicyKey`.
    pub const POLICY_EXACT: &str = "POLICY_EXACT";
    /// Every other allow entry (any protocol, any port, port-range blocks): an LPM trie.
    /// Named apart from layout 1's `POLICY` (every entry), like the identity tries.
    pub const POLICY_WILDCARD: &str = "POLICY_WILDCARD";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// Every map the programs pin (the others are per-program scratch).
    pub const PINNED: [&str; 12] = [
        ENDPOINTS,
        IDENTITY4_EXACT,
        IDENTITY6_EXACT,
        IDENTITY4_CIDR,
        IDENTITY6_CIDR,
        POLICY_EXACT,
        POLICY_WILDCARD,
        COUNTERS,
        CONNTRACK,
        FRAGMENTS,
        CONFIG,
        EVENTS,
    ];
}

/// Program names (the tc hooks on the pod's host-side interface).
pub mod programs {
    /// tc ingress of the host-side veth: packets leaving the pod (its egress check).
    pub const FROM_POD: &str = "palisade_from_pod";
    /// tc egress of the host-side veth: packets entering the pod (its ingress check).
    pub const TO_POD: &str = "palisade_to_pod";
}

// ---- Services (issue #7): egress decided on the backend kube-proxy chose ----------------
//
// A packet of an egress-isolated pod whose destination lies in a service CIDR is not judged
// at the pod's interface (it carries a ClusterIP there). `palisade_from_pod` writes the
// source slot into the skb mark (`SvcConfig::mark_mask`: lowest bit "egress pending", the
// bits above it the slot) and passes it on; kube-proxy DNATs it; the next tc hook on its
// path (`palisade_to_pod` of a local backend, `palisade_uplink` on the node's uplink for a
// remote one) judges the source slot's egress against the translated destination and
// clears the bits.

/// Value of `SVC_CIDR_V4` / `SVC_CIDR_V6` (LPM tries keyed like the identity tries).
pub const SVC_CIDR_PRESENT: u32 = 1;

/// Index 0 of `SVC_CONFIG`. A zero mask turns service handling off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcConfig {
    /// Contiguous skb mark bits Palisade owns; at least `SVC_MARK_MIN_BITS` wide.
    pub mark_mask: u32,
    /// Position of the mask's lowest bit (the "egress pending" bit).
    pub mark_shift: u32,
}

/// 1 pending bit + enough bits for every slot below `MAX_ENDPOINTS`.
pub const SVC_MARK_MIN_BITS: u32 = 1 + (32 - (MAX_ENDPOINTS - 1).leading_zeros());

/// Default mark range: bits 20..31. kube-proxy uses 0x4000/0x8000, flannel none, AWS VPC
/// CNI 0x80, Cilium 0x0f00/0xf000 (plus identities in the upper half, but Cilium enforces
/// policy itself), Calico 0xffff0000 by default (also an enforcer, never beside Palisade).
pub const SVC_DEFAULT_MARK_MASK: u32 = 0xfff0_0000;

impl SvcConfig {
    /// The config for `mask`, or None when it is not contiguous or too narrow.
    pub const fn new(mask: u32) -> Option<SvcConfig> {
        if mask == 0 {
            return None;
        }
        let shift = mask.trailing_zeros();
        let width = (mask >> shift).trailing_ones();
        if mask.count_ones() != width || width < SVC_MARK_MIN_BITS {
            return None;
        }
        Some(SvcConfig {
            mark_mask: mask,
            mark_shift: shift,
        })
    }

    /// The mark a pending packet of `slot` carries (other bits of `mark` kept).
    pub const fn pending_mark(&self, mark: u32, slot: u32) -> u32 {
        (mark & !self.mark_mask) | ((((slot << 1) | 1) << self.mark_shift) & self.mark_mask)
    }

    /// The source slot of a pending mark.
    pub const fn pending_slot(&self, mark: u32) -> Option<u32> {
        let v = (mark & self.mark_mask) >> self.mark_shift;
        if v & 1 == 0 {
            None
        } else {
            Some(v >> 1)
        }
    }
}

/// Key of `SVC_PENDING`: what a translated packet still shares with the packet the source
/// pod sent (DNAT rewrites the destination only; masquerade keeps the port unless it must
/// not). Value: the original tuple as a `CtKey`, so an allowed deferred check can record the
/// pod→ClusterIP flow that the pod's replies are matched against.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcPendingKey {
    pub slot: u32,
    pub sport: u16,
    pub proto: u8,
    pub family: u8,
}

pub mod svc_maps {
    pub const SVC_CONFIG: &str = "SVC_CONFIG";
    pub const SVC_CIDR_V4: &str = "SVC_CIDR_V4";
    pub const SVC_CIDR_V6: &str = "SVC_CIDR_V6";
    pub const SVC_PENDING: &str = "SVC_PENDING";
}

/// tc egress of the node's uplink (and tunnel) devices: the deferred egress check of
/// service packets going to a remote backend. Passes every unmarked packet untouched.
pub const PROGRAM_UPLINK: &str = "palisade_uplink";

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for SvcConfig {}
    unsafe impl aya::Pod for SvcPendingKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(size_of::<CtValue>(), 16);
        assert_eq!(size_of::<DropEvent>(), 64);
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(size_of::<FragKey>(), 44);
    }

    #[test]
    fn pinned_map_names_fit_the_kernels_name_length() {
        for name in maps::PINNED {
            assert!(name.len() <= 15, "{name} would be cut to {}", &name[..15]);
        }
    }

    #[test]
    fn policy_key_prefix_order_puts_port_last() {
        let k = PolicyKey::new(1, 2, DIR_EGRESS, PROTO_TCP, 0x1234);
        // SAFETY: PolicyKey is repr(C) plain data of 12 bytes.
        let bytes: [u8; 12] = unsafe { core::mem::transmute(k) };
        assert_eq!(bytes, [0, 0, 0, 1, 0, 0, 0, 2, 1, 6, 0x12, 0x34]);
    }

    #[test]
    fn counter_indices_are_dense_and_in_bounds() {
        let last = counter_index(MAX_ENDPOINTS - 1, DIR_EGRESS, REASONS - 1);
        assert_eq!(last, COUNTER_ENTRIES - 1);
        assert!(reason_is_drop(REASON_DROPPED_NO_RULE));
        assert!(!reason_is_drop(REASON_ALLOWED_TRACKED));
    }

    #[test]
    fn service_marks_round_trip_and_keep_foreign_bits() {
        assert_eq!(SVC_MARK_MIN_BITS, 12);
        let c = SvcConfig::new(SVC_DEFAULT_MARK_MASK).unwrap();
        assert_eq!(c.mark_shift, 20);
        let m = c.pending_mark(0x4000, MAX_ENDPOINTS - 1);
        assert_eq!(m & 0x4000, 0x4000, "kube-proxy's masquerade bit survives");
        assert_eq!(c.pending_slot(m), Some(MAX_ENDPOINTS - 1));
        assert_eq!(c.pending_slot(0x4000), None);
        assert!(SvcConfig::new(0x0ff0_0000).is_none(), "too narrow");
        assert!(SvcConfig::new(0xfff0_0100).is_none(), "not contiguous");
        assert_eq!(size_of::<SvcPendingKey>(), 8);
    }
}
