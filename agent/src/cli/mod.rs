//! Command-line interface. One module per command; each reads the kernel or the agent's
//! status and prints for people (tables) or scripts (`--json`).

mod attach;
mod drops;
pub mod explain;
mod filters;
pub mod matrix;
pub mod monitor;
mod status;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::agent::AgentConfig;
use crate::dataplane::{Layout, DEFAULT_BPFFS_DIR};
use crate::source::{KubeConnection, SourceSpec};
pub use filters::Filters;

pub const DEFAULT_RUN_DIR: &str = "/run/palisade";

#[derive(Parser, Debug)]
#[command(
    name = "palisade",
    version,
    about = "Kubernetes NetworkPolicy enforcer (eBPF tc)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format for the agent.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PALISADE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Run inside the named network namespace (/var/run/netns/NAME): one agent per
    /// simulated node on one machine.
    #[arg(long, global = true, env = "PALISADE_NETNS")]
    pub netns: Option<String>,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where a node's Palisade state lives; every command that talks to the agent takes these.
#[derive(clap::Args, Debug, Clone)]
pub struct Dirs {
    /// bpffs directory holding Palisade's pinned maps and links.
    #[arg(long, env = "PALISADE_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Directory of the agent's runtime files (status).
    #[arg(long, env = "PALISADE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

impl Dirs {
    pub fn layout(&self) -> Layout {
        Layout::new(&self.bpffs_dir)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent: watch objects, compile policies, program the kernel.
    ///
    /// Kubernetes API (in-cluster service account, or KUBECONFIG): palisade agent --node-name node-1
    ///
    /// Manifest directory: palisade agent --manifests /etc/palisade/manifests --node-name node-1
    Agent(AgentArgs),
    /// Show drop (and with --all, allow) counters per pod, direction and reason.
    ///
    /// Reads the pinned maps directly, so it works while the agent is down.
    /// Example: palisade drops --namespace x
    Drops(drops::DropsArgs),
    /// Stream drop events live: pod, source, destination, protocol, ports, reason.
    ///
    /// Reads the pinned ring buffer; works while the agent is down.
    /// Example: palisade monitor --namespace x --json
    Monitor(monitor::MonitorArgs),
    /// Show the agent's sync state, programmed and rejected objects.
    ///
    /// Example: palisade status --json
    Status(status::StatusArgs),
    /// Why one connection is allowed or denied: isolating policies, rule, peer, port.
    ///
    /// Which policies isolate each end and which rule (peer and port) allows the
    /// connection, or that none does. Offline, from a manifest directory: no kernel or
    /// agent needed.
    /// Example: palisade explain y/b x/a 80 --manifests ./manifests
    Explain(explain::ExplainArgs),
    /// Print who may open a connection to whom among the pods of a manifest directory.
    ///
    /// Computed by the compiler; offline, no kernel or agent needed.
    /// Example: palisade matrix --manifests ./manifests --port 80/TCP
    Matrix(matrix::MatrixArgs),
    /// Attach the programs to one interface by hand until interrupted (debugging aid).
    ///
    /// Example: palisade attach --interface veth1234 --isolate both
    Attach(attach::AttachArgs),
    /// Print the version.
    Version,
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: palisade completions bash > /etc/bash_completion.d/palisade
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Directory of Namespace/Pod/NetworkPolicy manifests to enforce (the embedded
    /// source for one machine, demos and tests). Without it, the agent watches the
    /// Kubernetes API.
    #[arg(long, env = "PALISADE_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig file(s) for the Kubernetes API source (`:`-separated, merged in order).
    /// Without it: `~/.kube/config` if present, else the in-cluster service account.
    /// Ignored with --manifests.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: pods with spec.nodeName equal to it are enforced here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub dirs: Dirs,
    /// Serve /metrics, /healthz and /readyz on this address (`off`: don't). Loopback by
    /// default; the DaemonSet passes the node's address so Prometheus and kubelet reach it.
    #[arg(long, env = "PALISADE_HTTP_ADDR", default_value = crate::agent::http::DEFAULT_HTTP_ADDR, value_parser = parse_http_addr)]
    pub http_addr: HttpAddr,
    /// Size of the connection-tracking map (entries).
    #[arg(long, default_value_t = 262_144)]
    pub conntrack_entries: u32,
    /// Drop connections that were open before a pod became isolated, instead of letting
    /// them run until they close.
    #[arg(long)]
    pub revoke_untracked: bool,
    /// The cluster's service-cluster-ip-range (repeatable, IPv4 and IPv6). Egress of an
    /// isolated pod to an address in it is judged after kube-proxy's DNAT, on the backend.
    #[arg(
        long = "service-cidr",
        env = "PALISADE_SERVICE_CIDRS",
        value_delimiter = ','
    )]
    pub service_cidrs: Vec<ipnetwork::IpNetwork>,
    /// skb mark bits Palisade may use to carry a service packet's pending egress check
    /// (one contiguous run of at least 12 bits: 1 "pending" bit + the pod slot).
    #[arg(long, env = "PALISADE_MARK_MASK", default_value = "0xfff00000", value_parser = crate::dataplane::parse_mark_mask)]
    pub mark_mask: u32,
    /// Device(s) where traffic to other nodes leaves (uplink, tunnel), repeatable; their tc
    /// egress judges service packets for remote backends. Default: the default routes' devices.
    #[arg(long = "uplink", env = "PALISADE_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,
    /// Remove every program, link and pinned map Palisade created on this node, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// A socket address, or none for `off`.
#[derive(Clone, Copy, Debug)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{e}: expected IP:PORT (e.g. 127.0.0.1:9977) or `off`"))
}

pub fn init_tracing(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(ns) = &cli.netns {
        // Before any thread exists, so every thread the agent starts lives in it.
        enter_netns(ns)?;
    }
    match cli.command {
        Command::Agent(args) => run_agent(args),
        Command::Drops(args) => drops::run(args),
        Command::Monitor(args) => monitor::run(args),
        Command::Status(args) => status::run(args),
        Command::Attach(args) => attach::run(args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Ok(())
        }
        Command::Explain(args) => {
            if !explain::run(args)? {
                // Scripts can gate on the verdict; 1 and 2 are errors and usage errors.
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Matrix(args) => matrix::run(args),
        Command::Version => {
            println!("palisade {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let layout = args.dirs.layout();
    if args.cleanup {
        crate::dataplane::cleanup(&layout)
            .with_context(|| format!("cleaning up {}", layout.root().display()))?;
        let _ = std::fs::remove_file(args.dirs.run_dir.join(crate::agent::STATUS_FILE));
        println!(
            "removed Palisade's programs, links and maps under {}",
            layout.root().display()
        );
        return Ok(());
    }
    let source = match (args.manifests, args.kubeconfig) {
        (Some(dir), _) => SourceSpec::Manifests(dir),
        (None, Some(path)) => SourceSpec::Kubernetes(KubeConnection::Kubeconfig(path)),
        (None, None) => SourceSpec::Kubernetes(KubeConnection::Infer),
    };
    let node_name = args
        .node_name
        .context("no node name: pass --node-name or set NODE_NAME")?;
    let cfg = AgentConfig {
        node_name,
        source,
        layout,
        run_dir: args.dirs.run_dir,
        conntrack_entries: args.conntrack_entries,
        http_addr: args.http_addr.0,
        revoke_untracked: args.revoke_untracked,
        services: crate::dataplane::ServiceOptions {
            cidrs: args.service_cidrs,
            mark_mask: args.mark_mask,
            uplinks: args.uplinks,
        },
        max_entries: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::agent::run(cfg))
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let path = PathBuf::from("/var/run/netns").join(name);
    let f = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {name} ({})", path.display()))?;
    // SAFETY: setns on an fd we own; affects only the calling thread (the only one yet).
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {name}"));
    }
    Ok(())
}
