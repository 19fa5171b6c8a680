//! `palisade status`: what the agent has programmed, from the status it publishes.

use anyhow::Context as _;

use super::Dirs;
use crate::agent::status::{Status, StatusError};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Machine-readable output (the contract tests and scripts wait on).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: Dirs,
}

/// The agent's status for a command that needs it: an untrusted run directory is its own
/// error (naming the path and the fix); any other failure asks whether the agent runs,
/// followed by `hint`.
pub(super) fn read(dirs: &Dirs, hint: &str) -> anyhow::Result<Status> {
    match Status::read(&dirs.run_dir) {
        Ok(s) => Ok(s),
        Err(e @ StatusError::Untrusted { .. }) => Err(e.into()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "is the agent running on this node? (no status in {}){hint}",
                dirs.run_dir.display()
            )
        }),
    }
}

/// The agent's status for naming pods, if there is one: commands that read the maps
/// work without it, but never on an untrusted one.
pub(super) fn for_names(dirs: &Dirs) -> anyhow::Result<Option<Status>> {
    match Status::read(&dirs.run_dir) {
        Ok(s) => Ok(Some(s)),
        Err(e @ StatusError::Untrusted { .. }) => Err(e.into()),
        Err(_) => Ok(None),
    }
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = read(&args.dirs, "")?;
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
    for e in &status.map_errors {
        println!("map full:   {}", e.error);
        if !e.pods.is_empty() {
            println!("  pods missing entries: {}", e.pods.join(", "));
        }
        if !e.policies.is_empty() {
            println!("  their policies:       {}", e.policies.join(", "));
        }
        if !e.prefixes.is_empty() {
            println!("  prefixes not written: {}", e.prefixes.join(", "));
        }
    }
    if !status.pin_problems.is_empty() {
        println!(
            "pin problems (enforcement continues; drops, monitor, restarts cannot reach these):"
        );
        for e in &status.pin_problems {
            println!("  error: {e}");
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
    if !status.quarantined.is_empty() {
        println!("quarantined interfaces (no pod identified yet; isolated, nothing allowed):");
        for q in &status.quarantined {
            let ips: Vec<String> = q.ips.iter().map(ToString::to_string).collect();
            println!(
                "  {:<16} ifindex {:<6} {:<17} {}",
                q.name.as_deref().unwrap_or("?"),
                q.ifindex,
                q.isolation,
                ips.join(", ")
            );
        }
    }
    if !status.rejected.is_empty() {
        println!("rejected:");
        for r in &status.rejected {
            println!("  {}: {}", r.object, r.error);
        }
    }
    Ok(())
}
