//! Egress through Services (issue #7), the agent's side: the service CIDRs and the mark
//! range the programs use, and the `palisade_uplink` program on the node's uplink devices.
//! See `ebpf/src/service.rs` for how a service packet's egress verdict is deferred to the
//! hook that sees kube-proxy's translated destination.

use std::net::IpAddr;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, MapData,
    },
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
};
use ipnetwork::IpNetwork;
use palisade_common::{svc_maps as names, SvcConfig, PROGRAM_UPLINK, SVC_CIDR_PRESENT};

use super::{maps::open, Dataplane, DataplaneError, Hook};

/// What `--service-cidr`, `--mark-mask` and `--uplink` ask for.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// The cluster's service-cluster-ip-range(s). Empty: service handling is off and
    /// egress to a ClusterIP is judged against the ClusterIP itself.
    pub cidrs: Vec<IpNetwork>,
    /// The skb mark bits Palisade owns (see `palisade_common::SvcConfig`).
    pub mark_mask: u32,
    /// Devices whose tc egress judges service packets for remote backends. Empty: the
    /// devices of the default routes.
    pub uplinks: Vec<String>,
}

impl ServiceOptions {
    /// The programs' settings, or an error naming what is wrong with the mask.
    pub fn config(&self) -> Result<SvcConfig, String> {
        if self.cidrs.is_empty() {
            return Ok(SvcConfig::default());
        }
        SvcConfig::new(self.mark_mask).ok_or_else(|| {
            format!(
                "--mark-mask {:#010x}: need one contiguous run of at least {} bits \
                 (1 \"egress pending\" bit + the pod slot)",
                self.mark_mask,
                palisade_common::SVC_MARK_MIN_BITS
            )
        })
    }
}

/// Parses a mark mask given as hex (`0xfff00000`) or decimal.
pub fn parse_mark_mask(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    let mask = r.map_err(|e| format!("{s}: {e}"))?;
    SvcConfig::new(mask).map(|_| mask).ok_or_else(|| {
        format!(
            "{s}: need one contiguous run of at least {} bits",
            palisade_common::SVC_MARK_MIN_BITS
        )
    })
}

/// Writes the mark range and makes the service CIDR tries hold exactly `cidrs`.
pub fn program_services(
    layout: &super::Layout,
    cfg: SvcConfig,
    cidrs: &[IpNetwork],
) -> Result<(), DataplaneError> {
    let map_err = |name, source| DataplaneError::Map {
        name,
        source: Box::new(source),
    };
    let mut v4: LpmTrie<MapData, [u8; 4], u32> = open(layout, names::SVC_CIDR_V4)?;
    let mut v6: LpmTrie<MapData, [u8; 16], u32> = open(layout, names::SVC_CIDR_V6)?;
    // CIDRs first, the mark range last: a program never sees a mask without its CIDRs.
    for net in cidrs {
        match net.network() {
            IpAddr::V4(a) => v4
                .insert(
                    &Key::new(net.prefix() as u32, a.octets()),
                    SVC_CIDR_PRESENT,
                    0,
                )
                .map_err(|e| map_err(names::SVC_CIDR_V4, e))?,
            IpAddr::V6(a) => v6
                .insert(
                    &Key::new(net.prefix() as u32, a.octets()),
                    SVC_CIDR_PRESENT,
                    0,
                )
                .map_err(|e| map_err(names::SVC_CIDR_V6, e))?,
        }
    }
    remove_stale(&mut v4, cidrs).map_err(|e| map_err(names::SVC_CIDR_V4, e))?;
    remove_stale(&mut v6, cidrs).map_err(|e| map_err(names::SVC_CIDR_V6, e))?;
    let mut config: Array<MapData, SvcConfig> = open(layout, names::SVC_CONFIG)?;
    config
        .set(0, cfg, 0)
        .map_err(|e| map_err(names::SVC_CONFIG, e))
}

/// Removes the prefixes of `trie` that are not in `cidrs` (a CIDR dropped from the flags).
fn remove_stale<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u32>,
    cidrs: &[IpNetwork],
) -> Result<(), aya::maps::MapError>
where
    IpAddr: From<K>,
{
    let stale: Vec<Key<K>> = trie
        .keys()
        .flatten()
        .filter(|k| {
            !cidrs.iter().any(|n| {
                n.prefix() as u32 == k.prefix_len() && n.network() == IpAddr::from(k.data())
            })
        })
        .collect();
    for k in stale {
        trie.remove(&k)?;
    }
    Ok(())
}

/// The devices of the node's default routes (IPv4 and IPv6), where traffic to other nodes
/// leaves when no `--uplink` is given.
pub fn default_route_devices() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(s) = std::fs::read_to_string("/proc/net/route") {
        // Iface Destination Gateway Flags ...; the default route has destination 0 and mask 0.
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
                out.push(f[0].to_string());
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/net/ipv6_route") {
        // dst dst_len src src_len next_hop metric refcnt use flags iface.
        for line in s.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 10 && f[1] == "00" && f[0].bytes().all(|b| b == b'0') && f[9] != "lo" {
                out.push(f[9].to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Size of the kernel's `struct __sk_buff` (BPF_PROG_TEST_RUN context) and the offset of
/// its `mark` field.
const SKB_CTX_LEN: usize = 192;
const SKB_CTX_MARK: usize = 8;

/// Outcome of a test run with an skb mark.
#[derive(Clone, Copy, Debug)]
pub struct MarkedRun {
    pub verdict: u32,
    /// skb->mark after the program ran.
    pub mark: u32,
}

impl Dataplane {
    fn uplink_program(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM_UPLINK)
            .ok_or(DataplaneError::MissingProgram(PROGRAM_UPLINK))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM_UPLINK,
                source: Box::new(source),
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program {
                name: PROGRAM_UPLINK,
                source: Box::new(source),
            })?;
        }
        Ok(prog)
    }

    /// Attaches `palisade_uplink` to the tc egress of `ifname`, through a pinned TCX link
    /// (`links/uplink-IFINDEX`) whose program a restarted or upgraded agent swaps in place.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let ifindex = super::ifindex_of(ifname)?;
        let layout = self.layout.clone();
        let prog = self.uplink_program()?;
        super::attach::attach_at(prog, ifindex, TcAttachType::Egress, &layout, |l| {
            l.uplink_link(ifindex)
        })?;
        self.hold(layout.uplink_link(ifindex))?;
        // Its link may have been the last one keeping a previous layout version.
        self.retire_unlinked()
    }

    /// Runs a pod hook (`Some(hook)`) or the uplink program (`None`) once on `frame` with
    /// `skb->mark = mark`, returning the verdict and the mark the program left.
    pub fn test_run_marked(
        &mut self,
        hook: Option<Hook>,
        frame: &[u8],
        mark: u32,
    ) -> Result<MarkedRun, DataplaneError> {
        let (name, prog) = match hook {
            Some(h) => (h.program(), super::program(&mut self.ebpf, h)?),
            None => (PROGRAM_UPLINK, self.uplink_program()?),
        };
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_CTX_MARK..SKB_CTX_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        let r = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                name,
                source: Box::new(source),
            })?;
        let mut m = [0u8; 4];
        m.copy_from_slice(&ctx_out[SKB_CTX_MARK..SKB_CTX_MARK + 4]);
        Ok(MarkedRun {
            verdict: r.return_value,
            mark: u32::from_ne_bytes(m),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_masks_parse_and_say_what_is_wrong() {
        assert_eq!(parse_mark_mask("0xfff00000"), Ok(0xfff0_0000));
        assert_eq!(parse_mark_mask("4293918720"), Ok(0xfff0_0000));
        let e = parse_mark_mask("0x4000").unwrap_err();
        assert!(e.contains("at least 12 bits"), "{e}");
        assert!(parse_mark_mask("0xzz").is_err());
    }

    #[test]
    fn no_service_cidr_means_no_mark() {
        let o = ServiceOptions {
            mark_mask: 0x4000,
            ..Default::default()
        };
        assert_eq!(o.config(), Ok(SvcConfig::default()));
        let o = ServiceOptions {
            cidrs: vec!["198.19.128.0/24".parse().unwrap()],
            mark_mask: 0x4000,
            uplinks: vec![],
        };
        assert!(o.config().is_err());
    }
}
