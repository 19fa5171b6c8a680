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
    /// Pins on bpffs that are missing and could not be put back: the CLI, the next agent
    /// and `--cleanup` cannot reach those objects (enforcement is unaffected).
    #[serde(default)]
    pub pin_problems: Vec<String>,
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
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, run_dir.join(STATUS_FILE))
    }

    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}
