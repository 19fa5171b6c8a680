//! `palisade drops`: verdict counters per pod, direction and reason, most drops first.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Dirs, Filters};
use crate::dataplane::{read_counters, Maps};

#[derive(clap::Args, Debug)]
pub struct DropsArgs {
    /// Also show allow counters.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filters: Filters,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Refresh in place every INTERVAL seconds (default 2), with per-second rates.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2", conflicts_with = "json")]
    pub watch: Option<f64>,
    #[command(flatten)]
    pub dirs: Dirs,
}

#[derive(Serialize, Clone)]
struct Row {
    pod: String,
    direction: &'static str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
}

pub fn run(args: DropsArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.dirs.layout()).map_err(|e| match e {
        crate::dataplane::DataplaneError::NotPinned(path) => anyhow::anyhow!(
            "is the agent running on this node? (pinned maps at {} not found; pass --bpffs-dir if the agent uses another)",
            path.display()
        ),
        other => other.into(),
    })?;
    let Some(interval) = args.watch else {
        let rows = collect(&args, &maps)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_table(&args, &rows, None);
        }
        return Ok(());
    };
    let interval = std::time::Duration::from_secs_f64(interval.max(0.1));
    let mut prev: BTreeMap<(String, &'static str, &'static str), u64> = BTreeMap::new();
    loop {
        let rows = collect(&args, &maps)?;
        let rates: Vec<f64> = rows
            .iter()
            .map(|r| {
                let before = prev.get(&(r.pod.clone(), r.direction, r.reason));
                before.map_or(0.0, |b| {
                    (r.packets.saturating_sub(*b)) as f64 / interval.as_secs_f64()
                })
            })
            .collect();
        // Clear and home, then redraw: a refreshing table like top(1).
        print!("\x1b[H\x1b[2J");
        print_table(&args, &rows, Some(&rates));
        prev = rows
            .iter()
            .map(|r| ((r.pod.clone(), r.direction, r.reason), r.packets))
            .collect();
        std::thread::sleep(interval);
    }
}

fn collect(args: &DropsArgs, maps: &Maps) -> anyhow::Result<Vec<Row>> {
    // Names come from the agent's status; without it, slots are shown as they are.
    let names: BTreeMap<u32, String> = super::status::for_names(&args.dirs)?
        .map(|s| s.endpoints.into_iter().map(|e| (e.slot, e.pod)).collect())
        .unwrap_or_default();
    let slots: Vec<u32> = maps
        .endpoints
        .iter()
        .filter_map(|r| r.ok().map(|(_, ep)| ep.slot))
        .collect();
    let mut rows: Vec<Row> = read_counters(maps, Some(&slots))?
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
        .filter(|r| args.filters.matches(&r.pod, r.reason))
        .collect();
    rows.sort_by(|a, b| b.packets.cmp(&a.packets).then_with(|| a.pod.cmp(&b.pod)));
    Ok(rows)
}

/// 80 columns: pod 24, direction 7, reason 20, packets 10, bytes 12 (+ rate 8 in --watch).
fn print_table(args: &DropsArgs, rows: &[Row], rates: Option<&[f64]>) {
    let rate_head = if rates.is_some() { "  PKT/S" } else { "" };
    println!(
        "{:<24} {:<7} {:<20} {:>10} {:>12}{rate_head}",
        "POD", "DIR", "REASON", "PACKETS", "BYTES"
    );
    for (i, r) in rows.iter().enumerate() {
        let rate = rates.map(|r| format!(" {:>7.1}", r[i])).unwrap_or_default();
        println!(
            "{:<24} {:<7} {:<20} {:>10} {:>12}{rate}",
            r.pod, r.direction, r.reason, r.packets, r.bytes
        );
    }
    if rows.is_empty() {
        println!(
            "(no {} counted)",
            if args.all { "packets" } else { "drops" }
        );
    }
}
