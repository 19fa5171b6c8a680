//! `palisade drops`: verdict counters per pod, direction and reason, most drops first.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Dirs;
use crate::agent::status::Status;
use crate::dataplane::{read_counters, Maps};

#[derive(clap::Args, Debug)]
pub struct DropsArgs {
    /// Also show allow counters.
    #[arg(long)]
    pub all: bool,
    /// Only pods of this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this pod (name, or namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this reason (e.g. dropped-no-rule).
    #[arg(long)]
    pub reason: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: Dirs,
}

#[derive(Serialize)]
struct Row {
    pod: String,
    direction: &'static str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
}

pub fn run(args: DropsArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.dirs.layout())?;
    // Names come from the agent's status; without it, slots are shown as they are.
    let names: BTreeMap<u32, String> = Status::read(&args.dirs.run_dir)
        .map(|s| s.endpoints.into_iter().map(|e| (e.slot, e.pod)).collect())
        .unwrap_or_default();
    let slots: Vec<u32> = maps
        .endpoints
        .iter()
        .filter_map(|r| r.ok().map(|(_, ep)| ep.slot))
        .collect();
    let mut rows: Vec<Row> = read_counters(&maps, Some(&slots))?
        .into_iter()
        .filter(|c| args.all || c.drop)
        .map(|c| Row {
            pod: names
                .get(&c.slot)
                .cloned()
                .unwrap_or_else(|| format!("slot/{}", c.slot)),
            direction: c.direction,
            reason: c.reason,
            packets: c.packets,
            bytes: c.bytes,
        })
        .filter(|r| matches_filters(&args, r))
        .collect();
    rows.sort_by(|a, b| b.packets.cmp(&a.packets).then_with(|| a.pod.cmp(&b.pod)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<8} {:<22} {:>10} {:>12}",
        "POD", "DIR", "REASON", "PACKETS", "BYTES"
    );
    for r in &rows {
        println!(
            "{:<28} {:<8} {:<22} {:>10} {:>12}",
            r.pod, r.direction, r.reason, r.packets, r.bytes
        );
    }
    if rows.is_empty() {
        println!(
            "(no {} counted)",
            if args.all { "packets" } else { "drops" }
        );
    }
    Ok(())
}

fn matches_filters(args: &DropsArgs, r: &Row) -> bool {
    let (ns, name) = r.pod.split_once('/').unwrap_or(("", &r.pod));
    args.namespace.as_deref().is_none_or(|n| n == ns)
        && args.pod.as_deref().is_none_or(|p| p == name || p == r.pod)
        && args.reason.as_deref().is_none_or(|x| x == r.reason)
}
