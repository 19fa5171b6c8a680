//! The rule sets Palisade is compared with, as text for `ipset restore`,
//! `iptables-restore` and `nft -f`. Pure functions: the benchmark loads their output into
//! a namespace it created, never into the host's.
//!
//! - iptables + ipset, modelled on kube-router's network policy controller: a jump per
//!   pod with policies from the FORWARD chain to the pod's firewall chain, which accepts
//!   conntrack-established traffic first, then runs the policy chain, where every
//!   (peer set, port) of every ingress rule is one `-m set --match-set SRC src -m set
//!   --match-set DST dst --dport P -j MARK` rule followed by a `-m mark ... -j RETURN`;
//!   unmarked traffic is rejected. ipsets hold the peer IPs, but the rule list itself
//!   grows with the number of (peer, port) entries and is walked linearly by the first
//!   packet of every connection.
//! - nftables, modelled on kube-network-policies: established traffic accepted by
//!   conntrack, pods with policies selected by address (here a verdict map from pod IP
//!   to its chain). kube-network-policies then sends the first packet of each new
//!   connection to its userspace evaluator over NFQUEUE; this benchmark has no such
//!   daemon, so the per-pod chain does the equivalent match in the kernel with one
//!   concatenated-set lookup `ip saddr . meta l4proto . th dport @allow`. That is a
//!   best case for nftables: the NFQUEUE round trip it replaces costs far more.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One allowed (peer, TCP port) pair of the protected pod, in rule order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub peer: Ipv4Addr,
    pub port: u16,
}

/// `n` entries for the pod: `n - allow.len()` fillers for peers that send nothing, with
/// the entries that allow the measured traffic in the middle of the list (the expected
/// position of a rule among others, neither the best nor the worst case for a linear
/// list).
pub fn entries(client: Ipv4Addr, allow_ports: &[u16], n: usize) -> Vec<Entry> {
    let fillers = n.saturating_sub(allow_ports.len());
    let mut out: Vec<Entry> = (0..fillers).map(filler).collect();
    let mid = out.len() / 2;
    let allow = allow_ports.iter().map(|&port| Entry { peer: client, port });
    out.splice(mid..mid, allow);
    out
}

/// Filler `i`: a peer in 198.19.0.0/16 (below the test underlay range 198.19.255.0/24)
/// and a port in 1024..61024.
pub fn filler(i: usize) -> Entry {
    let peer = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
    let port = 1024 + ((i * 7919) % 60_000) as u16;
    Entry { peer, port }
}

const DST_SET: &str = "KR-DST-POD";

fn src_set(i: usize) -> String {
    format!("KR-SRC-{i}")
}

/// `ipset restore` input: the pod's own set and one source set per entry.
pub fn ipset_restore(pod: Ipv4Addr, entries: &[Entry]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "create {DST_SET} hash:ip family inet hashsize 64");
    let _ = writeln!(s, "add {DST_SET} {pod}");
    for (i, e) in entries.iter().enumerate() {
        let _ = writeln!(s, "create {} hash:ip family inet hashsize 64", src_set(i));
        let _ = writeln!(s, "add {} {}", src_set(i), e.peer);
    }
    s
}

/// `iptables-restore` input (filter table) for one pod with an ingress policy.
pub fn iptables_restore(pod: Ipv4Addr, entries: &[Entry]) -> String {
    let fw = "KUBE-POD-FW-BENCH";
    let pol = "KUBE-NWPLCY-BENCH";
    let mut s = String::from("*filter\n:KUBE-ROUTER-FORWARD - [0:0]\n");
    let _ = writeln!(s, ":{fw} - [0:0]\n:{pol} - [0:0]");
    s += "-A FORWARD -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-FORWARD\n";
    let _ = writeln!(
        s,
        "-A KUBE-ROUTER-FORWARD -d {pod}/32 -m comment --comment \"to pod bench/server\" -j {fw}"
    );
    s += "-A KUBE-ROUTER-FORWARD -m mark --mark 0x20000/0x20000 -j ACCEPT\n";
    let _ = writeln!(
        s,
        "-A {fw} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A {fw} -m conntrack --ctstate INVALID -j DROP\n\
         -A {fw} -d {pod}/32 -m addrtype --src-type LOCAL -j ACCEPT\n\
         -A {fw} -j {pol}\n\
         -A {fw} -m mark ! --mark 0x10000/0x10000 -j REJECT --reject-with icmp-port-unreachable\n\
         -A {fw} -j MARK --set-xmark 0x0/0x10000\n\
         -A {fw} -j MARK --set-xmark 0x20000/0x20000"
    );
    for (i, e) in entries.iter().enumerate() {
        let _ = writeln!(
            s,
            "-A {pol} -p tcp -m set --match-set {} src -m set --match-set {DST_SET} dst \
             -m tcp --dport {} -j MARK --set-xmark 0x10000/0x10000\n\
             -A {pol} -m mark --mark 0x10000/0x10000 -j RETURN",
            src_set(i),
            e.port
        );
    }
    s += "COMMIT\n";
    s
}

/// `nft -f` input: one inet table for one pod with an ingress policy.
pub fn nft_ruleset(pod: Ipv4Addr, entries: &[Entry]) -> String {
    let mut s = String::from("table inet bench-netpol {\n");
    s += "  chain ingress-pod {\n";
    s += "    ip saddr . meta l4proto . th dport @allow-pod accept\n";
    s += "    drop\n  }\n";
    s += "  set allow-pod {\n    type ipv4_addr . inet_proto . inet_service\n";
    if !entries.is_empty() {
        s += "    elements = {\n";
        for e in entries {
            let _ = writeln!(s, "      {} . tcp . {},", e.peer, e.port);
        }
        s += "    }\n";
    }
    s += "  }\n";
    s += "  map pod-ingress-v4 {\n    type ipv4_addr : verdict\n";
    let _ = writeln!(s, "    elements = {{ {pod} : jump ingress-pod }}\n  }}");
    s += "  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n";
    s += "    ct state established,related accept\n";
    s += "    ip daddr vmap @pod-ingress-v4\n  }\n}\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 2);
    const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 3);

    #[test]
    fn entry_count_and_allow_position() {
        let e = entries(CLIENT, &[5201, 11111, 8080], 10_000);
        assert_eq!(e.len(), 10_000);
        let first = e.iter().position(|x| x.peer == CLIENT).unwrap();
        assert_eq!(first, (10_000 - 3) / 2);
        assert_eq!(e.iter().filter(|x| x.peer == CLIENT).count(), 3);
        let distinct: std::collections::HashSet<_> = e.iter().collect();
        assert_eq!(distinct.len(), e.len());
        assert!(e
            .iter()
            .all(|x| x.peer.octets()[..2] == [198, 19] || x.peer == CLIENT));
        assert!(e.iter().all(|x| x.peer.octets()[2] != 255));
        // Smaller than the allow set: just the allows.
        assert_eq!(entries(CLIENT, &[1, 2, 3], 2).len(), 3);
    }

    #[test]
    fn iptables_rules_grow_linearly_with_entries() {
        let e = entries(CLIENT, &[80], 1000);
        let rules = iptables_restore(POD, &e);
        let set_rules = rules.lines().filter(|l| l.contains("--match-set")).count();
        assert_eq!(set_rules, 1000);
        assert!(rules.contains(&format!("-d {POD}/32")));
        assert!(rules.trim_end().ends_with("COMMIT"));
        let sets = ipset_restore(POD, &e);
        assert_eq!(
            sets.lines().filter(|l| l.starts_with("create")).count(),
            1001
        );
    }

    #[test]
    fn nft_ruleset_has_one_element_per_entry() {
        let e = entries(CLIENT, &[80], 10);
        let r = nft_ruleset(POD, &e);
        assert_eq!(r.matches(" . tcp . ").count(), 10);
        assert!(r.contains(&format!("{CLIENT} . tcp . 80,")));
        assert!(r.contains("ct state established,related accept"));
    }
}
