//! `palisade attach`: the programs on one interface, by hand, until Ctrl-C. The interface
//! gets a free slot and the chosen isolation with no allow entries; everything is removed
//! on exit.

use anyhow::Context as _;
use clap::ValueEnum;
use palisade_common::{Config, Endpoint, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, MAX_ENDPOINTS};

use super::Dirs;
use crate::dataplane::{ifindex_of, Dataplane, LoadOptions};

#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    /// Host-side interface of the pod.
    #[arg(long)]
    pub interface: String,
    /// Directions in which the pod is default-deny.
    #[arg(long, value_enum, default_value_t = Isolate::Both)]
    pub isolate: Isolate,
    #[command(flatten)]
    pub dirs: Dirs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Isolate {
    None,
    Ingress,
    Egress,
    Both,
}

impl Isolate {
    fn flags(self) -> u32 {
        match self {
            Isolate::None => 0,
            Isolate::Ingress => EP_ISOLATED_INGRESS,
            Isolate::Egress => EP_ISOLATED_EGRESS,
            Isolate::Both => EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS,
        }
    }
}

pub fn run(args: AttachArgs) -> anyhow::Result<()> {
    let ifindex = ifindex_of(&args.interface)?;
    let mut dp = Dataplane::load(args.dirs.layout(), &LoadOptions::default())?;
    let mut maps = dp.maps()?;
    let used: Vec<u32> = maps
        .endpoints
        .iter()
        .filter_map(|r| r.ok().map(|(_, ep)| ep.slot))
        .collect();
    let slot = (0..MAX_ENDPOINTS)
        .find(|s| !used.contains(s))
        .context("every endpoint slot is in use")?;
    maps.set_config(Config {
        events_per_sec: 1000,
        ..Default::default()
    })?;
    maps.reset_counters(slot)?;
    maps.set_endpoint(
        ifindex,
        Endpoint {
            slot,
            flags: args.isolate.flags(),
        },
    )?;
    dp.attach(ifindex)?;
    println!(
        "attached to {} (ifindex {ifindex}, slot {slot}); Ctrl-C detaches",
        args.interface
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(wait_for_signal())?;
    dp.detach(ifindex)?;
    maps.remove_endpoint(ifindex)?;
    println!("detached from {}", args.interface);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
