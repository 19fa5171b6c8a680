//! Palisade's tc programs: default-deny NetworkPolicy enforcement on the host-side
//! interface of every local pod. `palisade_from_pod` (tc ingress of the host veth) is the
//! pod's egress check, `palisade_to_pod` (tc egress of the host veth) its ingress check.
#![no_std]
#![no_main]

mod check;
mod parse;
mod service;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use palisade_common::{
    Config, Counter, CtKey, CtValue, Endpoint, EventBudget, FragKey, IdentityValue, PolicyKey,
    PolicyValue, COUNTER_ENTRIES, DIR_EGRESS, DIR_INGRESS, MAX_ENDPOINTS,
};

// Every map is pinned by name, so a restarted agent reopens the live state instead of
// replacing it, and enforcement continues while no agent runs.
#[map]
static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(MAX_ENDPOINTS, 0);
// IP -> identity, per family: host addresses (pod and node IPs, nearly every entry) in a
// hash map probed first, shorter prefixes (ipBlock CIDRs and their except holes) in an LPM
// trie probed when the hash misses. See `check::identity`. The hash maps grow with their
// entries like the tries (no preallocation: 262,144 entries would pin ~34 MiB up front).
#[map]
static IDENTITY4_EXACT: HashMap<[u8; 4], IdentityValue> =
    HashMap::pinned(262_144, BPF_F_NO_PREALLOC as u32);
#[map]
static IDENTITY6_EXACT: HashMap<[u8; 16], IdentityValue> =
    HashMap::pinned(262_144, BPF_F_NO_PREALLOC as u32);
#[map]
static IDENTITY4_CIDR: LpmTrie<[u8; 4], IdentityValue> = LpmTrie::pinned(262_144, 0);
#[map]
static IDENTITY6_CIDR: LpmTrie<[u8; 16], IdentityValue> = LpmTrie::pinned(262_144, 0);
// Allow entries, split the same way: exact-port entries (the full key, nearly all of them)
// in a hash map probed first, wildcard ones (any protocol, any port, port-range blocks) in
// an LPM trie probed on a miss. See `check::policy_allows`.
#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(1_048_576, BPF_F_NO_PREALLOC as u32);
#[map]
static POLICY_WILDCARD: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(1_048_576, 0);
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);
#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(262_144, 0);
#[map]
static FRAGMENTS: LruHashMap<FragKey, u64> = LruHashMap::pinned(8_192, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);
#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// Per-CPU working memory for the packet being judged: the BPF stack is only 512 bytes.
#[repr(C)]
pub struct Scratch {
    pub packet: parse::Packet,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

#[classifier]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    let Some((ifindex, ep)) = check::endpoint(&ctx) else {
        // Not a pod interface Palisade manages.
        return TC_ACT_OK;
    };
    if let Some(pass) = service::defer_from_pod(&ctx, &ep) {
        return verdict(pass);
    }
    verdict(check::check(&ctx, DIR_EGRESS, ifindex, ep))
}

#[classifier]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    if service::deferred(&ctx) == Some(false) {
        return TC_ACT_SHOT;
    }
    let Some((ifindex, ep)) = check::endpoint(&ctx) else {
        return TC_ACT_OK;
    };
    verdict(check::check(&ctx, DIR_INGRESS, ifindex, ep))
}

#[inline(always)]
fn verdict(pass: bool) -> i32 {
    if pass {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
