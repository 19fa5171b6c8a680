//! `palisade status`: what the agent has programmed, from the status it publishes.

use anyhow::Context as _;

use super::Dirs;
use crate::agent::status::Status;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Machine-readable output (the contract tests and scripts wait on).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: Dirs,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = Status::read(&args.dirs.run_dir).with_context(|| {
        format!(
            "is the agent running on this node? (no status in {})",
            args.dirs.run_dir.display()
        )
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("node:       {}", status.node);
    println!("source:     {}", status.source);
    println!("synced:     {}", status.synced);
    println!(
        "agent pid:  {} ({})",
        status.pid,
        if status.agent_alive() {
            "running"
        } else {
            "not running"
        }
    );
    println!("programmed: {} objects", status.programmed.len());
    if !status.maps.is_empty() {
        println!("maps:");
        for (name, fill) in &status.maps {
            let pct = if fill.capacity == 0 {
                0.0
            } else {
                fill.entries as f64 * 100.0 / f64::from(fill.capacity)
            };
            println!(
                "  {:<15} {:>9} / {:<9} ({pct:.1}%)",
                name, fill.entries, fill.capacity
            );
        }
    }
    if !status.source_errors.is_empty() {
        println!("source problems:");
        for e in &status.source_errors {
            println!("  {e}");
        }
    }
    println!("endpoints:");
    for e in &status.endpoints {
        println!(
            "  {:<28} slot {:<4} ifindex {:<6} {}",
            e.pod,
            e.slot,
            e.ifindex
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            e.isolation
        );
    }
    if !status.rejected.is_empty() {
        println!("rejected:");
        for r in &status.rejected {
            println!("  {}: {}", r.object, r.error);
        }
    }
    Ok(())
}
