//! The status the agent publishes after every reconcile, atomically (write + rename), in
//! its run directory. `palisade status --json` prints it; its shape is a contract:
//! `programmed` maps `Kind/namespace/name` to the resourceVersion the kernel reflects.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub source: String,
    /// The first full sync has been programmed.
    pub synced: bool,
    pub programmed: BTreeMap<String, String>,
    pub rejected: Vec<Rejected>,
    pub endpoints: Vec<EndpointStatus>,
    /// Manifests that could not be read, with file and line.
    pub source_errors: Vec<String>,
    pub pid: u32,
    /// Fill level of each map the agent writes.
    #[serde(default)]
    pub maps: BTreeMap<String, MapFill>,
    /// Maps that were too full to take every entry the policies need: enforcement is
    /// partial (fewer flows allowed than the policies say) until they have room.
    #[serde(default)]
    pub map_errors: Vec<MapError>,
    /// Interfaces attached isolated because a pod a policy selects may be behind them
    /// but none is identified yet (see the quarantine rule in the README).
    #[serde(default)]
    pub quarantined: Vec<QuarantinedStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantinedStatus {
    pub ifindex: u32,
    /// The interface's name when the agent knows it.
    pub name: Option<String>,
    pub isolation: String,
    /// Addresses the pod side of the interface holds, as far as the agent has seen.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
}

/// A full map, and whose entries it lacks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapError {
    pub map: String,
    pub capacity: u32,
    /// Entries the policies need that are not in the map.
    pub missing: usize,
    /// What it means, in one sentence.
    pub error: String,
    /// Local pods (`namespace/name`) whose entries are missing.
    pub pods: Vec<String>,
    /// Policies (`namespace/name`) selecting those pods.
    pub policies: Vec<String>,
    /// Identity prefixes not in the map (left out, or withheld so that addresses of a
    /// missing prefix gain nothing from a wider one); at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MapFill {
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rejected {
    pub object: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub slot: u32,
    /// Host-side interface; None while the pod's interface is not found yet.
    pub ifindex: Option<u32>,
    pub isolation: String,
    /// The pod's IPs, so tools can name local pods in packet events.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Policies (`namespace/name`) isolating the pod for ingress.
    #[serde(default)]
    pub isolated_ingress_by: Vec<String>,
    /// Policies (`namespace/name`) isolating the pod for egress.
    #[serde(default)]
    pub isolated_egress_by: Vec<String>,
}

impl Status {
    pub fn read(run_dir: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(run_dir.join(STATUS_FILE))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(format!(".{STATUS_FILE}.tmp"));
        // Streamed: at 100,000 objects the text is megabytes, not worth holding.
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer_pretty(&mut out, self)?;
        std::io::Write::flush(&mut out)?;
        drop(out);
        std::fs::rename(tmp, run_dir.join(STATUS_FILE))
    }

    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}
