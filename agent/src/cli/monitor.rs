//! `palisade monitor`: drop events as they happen, read from the pinned ring buffer.
//!
//! The ring buffer has one consumer position: two monitors on one node share the events
//! between them. The programs rate-limit events per CPU; what was not sent is counted in
//! EVENT_BUDGET and reported here, so a quiet monitor never hides a flood.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use aya::maps::{PerCpuArray, RingBuf};
use palisade_common::{maps as names, DropEvent, EventBudget, DIR_INGRESS, REASON_NAMES};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use super::{Dirs, Filters};
use crate::dataplane::{open_pinned, DataplaneError};

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    #[command(flatten)]
    pub dirs: Dirs,
}

/// One drop, as printed.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    /// The enforced pod the packet was judged for (namespace/name).
    pub pod: String,
    pub direction: &'static str,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    pub reason: &'static str,
    pub bytes: u32,
    /// The policies that isolate the pod in this direction, when the agent published them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<String>,
}

/// Names for addresses and slots, from the agent's status.
#[derive(Default)]
struct Names {
    slots: BTreeMap<u32, String>,
    ips: BTreeMap<IpAddr, String>,
    /// slot -> (policies isolating ingress, policies isolating egress).
    isolated_by: BTreeMap<u32, (Vec<String>, Vec<String>)>,
}

impl Names {
    /// Names from the agent's status (none without one; an error if it is untrusted).
    fn load(dirs: &Dirs) -> anyhow::Result<Self> {
        let Some(status) = super::status::for_names(dirs)? else {
            return Ok(Self::default());
        };
        let mut names = Self::default();
        for e in status.endpoints {
            for ip in &e.ips {
                names.ips.insert(*ip, e.pod.clone());
            }
            names
                .isolated_by
                .insert(e.slot, (e.isolated_ingress_by, e.isolated_egress_by));
            names.slots.insert(e.slot, e.pod);
        }
        Ok(names)
    }

    fn addr(&self, ip: IpAddr) -> String {
        match self.ips.get(&ip) {
            Some(pod) => format!("{pod} ({ip})"),
            None => ip.to_string(),
        }
    }
}

pub fn run(args: MonitorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<12} {:<8} {:<18} {:<34} {:<34} {:<6} {:<12} REASON",
            "TIME", "DIR", "POD", "SOURCE", "DESTINATION", "PROTO", "PORTS"
        )?;
    }
    let mut failed = None;
    let summary = rt.block_on(stream(&args, |ev| {
        let res = if args.json {
            serde_json::to_string(ev)
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(out, "{line}"))
        } else {
            print_line(&mut out, ev)
        }
        .and_then(|()| out.flush());
        // stdout closed (`| head`): stop quietly.
        failed = res.err();
        failed.is_none()
    }))?;
    if failed.is_some() {
        return Ok(());
    }
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "summary": { "events": summary.events, "lost_to_rate_limit": summary.lost } })
        )?;
    } else {
        writeln!(
            out,
            "-- {} events shown, {} not sent by the programs (rate limit)",
            summary.events, summary.lost
        )?;
    }
    Ok(())
}

/// What a monitoring session saw.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: u64,
    /// Drops the programs counted but did not send (rate limit), during the session.
    pub lost: u64,
}

/// Feeds every drop event matching the filters to `sink` until it returns false, the
/// count or duration is reached, or Ctrl-C. Events already in the ring buffer come first.
pub async fn stream(
    args: &MonitorArgs,
    mut sink: impl FnMut(&Event) -> bool,
) -> anyhow::Result<Summary> {
    let layout = args.dirs.layout();
    let ring: RingBuf<aya::maps::MapData> = open_pinned(&layout, names::EVENTS).map_err(hint)?;
    let budget: PerCpuArray<aya::maps::MapData, EventBudget> =
        open_pinned(&layout, names::EVENT_BUDGET).map_err(hint)?;
    let lost_at_start = lost(&budget)?;
    // SAFETY: RingBuf owns its map fd for its whole life, and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    let mut names = Names::load(&args.dirs)?;
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    let mut seen = 0u64;
    'outer: loop {
        let ready = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, ring.readable_mut()).await.ok(),
                None => Some(ring.readable_mut().await),
            }
        };
        tokio::select! {
            guard = ready => {
                let Some(guard) = guard else { break };
                let mut guard = guard.context("waiting for events")?;
                let mut refreshed = false;
                while let Some(item) = guard.get_inner_mut().next() {
                    let Some(raw) = parse_event(&item) else { continue };
                    // A pod that appeared after the monitor started: reload names once.
                    if !refreshed && !names.slots.contains_key(&raw.slot) {
                        names = Names::load(&args.dirs)?;
                        refreshed = true;
                    }
                    let ev = describe(&raw, &names);
                    if !args.filters.matches(&ev.pod, ev.reason) {
                        continue;
                    }
                    seen += 1;
                    if !sink(&ev) || args.count.is_some_and(|c| seen >= c) {
                        break 'outer;
                    }
                }
                guard.clear_ready();
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(Summary {
        events: seen,
        lost: lost(&budget)?.wrapping_sub(lost_at_start),
    })
}

fn hint(e: DataplaneError) -> anyhow::Error {
    match e {
        DataplaneError::NotPinned(path) => anyhow::anyhow!(
            "is the agent running on this node? (pinned map {} not found; pass --bpffs-dir if the agent uses another)",
            path.display()
        ),
        other => other.into(),
    }
}

fn lost(budget: &PerCpuArray<aya::maps::MapData, EventBudget>) -> anyhow::Result<u64> {
    let values = budget.get(&0, 0).context("reading EVENT_BUDGET")?;
    Ok(values.iter().map(|b| u64::from(b.lost)).sum())
}

fn parse_event(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: DropEvent is repr(C) plain data of this size; read_unaligned copes with the
    // ring buffer's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

fn ip_of(family: u8, raw: [u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(raw))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// `ts_ns` is CLOCK_MONOTONIC (bpf_ktime_get_ns); wall time = now - (monotonic now - ts).
fn wall_time(ts_ns: u64) -> SystemTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let mono = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    SystemTime::now() - Duration::from_nanos(mono.saturating_sub(ts_ns))
}

fn describe(e: &DropEvent, names: &Names) -> Event {
    let src = ip_of(e.family, e.saddr);
    let dst = ip_of(e.family, e.daddr);
    let time = humantime_utc(wall_time(e.ts_ns));
    Event {
        time,
        pod: names
            .slots
            .get(&e.slot)
            .cloned()
            .unwrap_or_else(|| format!("slot/{}", e.slot)),
        direction: if e.dir == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        },
        src: names.addr(src),
        dst: names.addr(dst),
        proto: proto_name(e.proto),
        sport: e.sport,
        dport: e.dport,
        reason: REASON_NAMES
            .get(e.reason as usize)
            .copied()
            .unwrap_or("unknown"),
        bytes: e.len,
        isolated_by: names
            .isolated_by
            .get(&e.slot)
            .map(|(ingress, egress)| {
                if e.dir == DIR_INGRESS {
                    ingress.clone()
                } else {
                    egress.clone()
                }
            })
            .unwrap_or_default(),
    }
}

/// RFC 3339 with milliseconds, UTC, without pulling in a date crate for one format.
fn humantime_utc(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn print_line(out: &mut impl std::io::Write, e: &Event) -> std::io::Result<()> {
    let ports = if e.sport == 0 && e.dport == 0 {
        "-".to_string()
    } else {
        format!("{}->{}", e.sport, e.dport)
    };
    let by = if e.isolated_by.is_empty() {
        String::new()
    } else {
        format!(" [isolated by {}]", e.isolated_by.join(", "))
    };
    writeln!(
        out,
        "{:<12} {:<8} {:<18} {:<34} {:<34} {:<6} {:<12} {}{by}",
        &e.time[11..23],
        e.direction,
        e.pod,
        e.src,
        e.dst,
        e.proto,
        ports,
        e.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_437_296_789);
        assert_eq!(humantime_utc(t), "2026-11-23T12:34:56.789Z");
    }
}
