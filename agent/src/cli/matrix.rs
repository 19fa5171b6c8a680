//! `palisade matrix --manifests DIR`: who may open a connection to whom, for every pair of
//! pods in a manifest directory, computed by the compiler — each node's plan looked up as
//! its dataplane does — so the table is what the agents would enforce.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use palisade_common::{DIR_EGRESS, DIR_INGRESS};
use palisade_policy::explain::{pick_addresses, Protocol, Traffic};
use palisade_policy::reference::Cluster;
use palisade_policy::{compile, Plan};

use super::explain::{load_manifests, paint, use_colour, GREEN, RED};

const EXAMPLES: &str = "\
Examples:
  palisade matrix --manifests ./manifests
  palisade matrix --manifests ./manifests --port 53/UDP --json > before.json

  # What a policy change does, before applying it:
  palisade matrix --manifests ./old > old.txt
  palisade matrix --manifests ./new > new.txt && diff old.txt new.txt

Rows are sources, columns destinations: X = the row pod may open a connection to the
column pod (its egress and the destination's ingress both allow it), . = it may not.
Pods without an IP address and terminated pods are left out. Between two pods the IPv4
addresses are used when both have one, else the IPv6 ones (see --family). A pod to itself
is computed like any other pair, although the upstream e2e netpol suite does not judge
that cell. --json prints {\"port\", \"protocol\", \"pods\": [\"ns/name\", ...],
\"allowed\": [[bool, ...], ...]} with allowed[i][j] for pods[i] -> pods[j]; the shape is
stable for scripts.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// IPv4 when both pods have an IPv4 address, else IPv6.
    Auto,
    /// IPv4 only; pods without an IPv4 address are left out.
    Ipv4,
    /// IPv6 only; pods without an IPv6 address are left out.
    Ipv6,
}

#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct MatrixArgs {
    /// Directory of Namespace/Pod/NetworkPolicy manifests.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// Destination port and protocol (TCP if omitted), e.g. 80, 53/UDP; or icmp.
    #[arg(long, value_name = "PORT[/PROTO]", default_value = "80/TCP")]
    pub port: Traffic,
    /// Address family of the connections.
    #[arg(long, value_enum, default_value_t = Family::Auto)]
    pub family: Family,
    /// Machine-readable output (a stable contract, see below).
    #[arg(long)]
    pub json: bool,
}

/// The who-may-connect-to-whom table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub traffic: Traffic,
    /// `namespace/name`, sorted.
    pub pods: Vec<String>,
    /// `allowed[i][j]`: `pods[i]` may open a connection to `pods[j]`.
    pub allowed: Vec<Vec<bool>>,
}

/// The matrix over the pods of `cluster` that have an address (of `family`) and have not
/// terminated. Every node some pod runs on enforces its own pods, with its own plan.
pub fn compute(cluster: &Cluster, traffic: Traffic, family: Family) -> Matrix {
    let wanted = |ip: &IpAddr| match family {
        Family::Auto => true,
        Family::Ipv4 => ip.is_ipv4(),
        Family::Ipv6 => ip.is_ipv6(),
    };
    let mut pods: Vec<(String, Vec<IpAddr>)> = cluster
        .pods
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .map(|p| {
            let name = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            let ips: Vec<IpAddr> = pod_ips(p).into_iter().filter(wanted).collect();
            (name, ips)
        })
        .filter(|(_, ips)| !ips.is_empty())
        .collect();
    pods.sort();
    let nodes: BTreeSet<&str> = cluster
        .pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.as_deref())
        .collect();
    let mut views: Vec<NodeView> = nodes
        .iter()
        .map(|n| {
            let ips = cluster.nodes.get(*n).cloned().unwrap_or_default();
            NodeView::new(compile(
                &cluster.namespaces,
                &cluster.pods,
                &cluster.policies,
                n,
                &ips,
            ))
        })
        .collect();
    let allowed = pods
        .iter()
        .map(|(_, from)| {
            pods.iter()
                .map(|(_, to)| {
                    pick_addresses(from, to).is_some_and(|(s, d)| {
                        let proto = traffic.protocol.number(s.is_ipv4());
                        views
                            .iter_mut()
                            .all(|v| v.verdict(s, d, proto, traffic.port))
                    })
                })
                .collect()
        })
        .collect();
    Matrix {
        traffic,
        pods: pods.into_iter().map(|(n, _)| n).collect(),
        allowed,
    }
}

/// One node's plan with the lookups of [`Plan::verdict`] memoised: a check depends only on
/// the endpoint, the direction and the peer's identity, and pods share identities, so an
/// n×n matrix costs about endpoints × identities checks instead of n² (each of which scans
/// the endpoint's entries).
struct NodeView {
    plan: Plan,
    /// Endpoint (index into `plan.endpoints`) of each local pod address.
    endpoint: HashMap<IpAddr, usize>,
    identity: HashMap<IpAddr, (u32, u32)>,
    checks: HashMap<(usize, u8, (u32, u32)), bool>,
}

impl NodeView {
    fn new(plan: Plan) -> Self {
        let endpoint = plan
            .endpoints
            .values()
            .enumerate()
            .flat_map(|(i, e)| e.ips.iter().map(move |ip| (*ip, i)))
            .collect();
        Self {
            plan,
            endpoint,
            identity: HashMap::new(),
            checks: HashMap::new(),
        }
    }

    /// [`Plan::verdict`]: the source's egress check if it is local, and the destination's
    /// ingress check if it is.
    fn verdict(&mut self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        self.passes(src, DIR_EGRESS, dst, proto, port)
            && self.passes(dst, DIR_INGRESS, src, proto, port)
    }

    fn passes(&mut self, local: IpAddr, dir: u8, peer: IpAddr, proto: u8, port: u16) -> bool {
        let Some(&ep) = self.endpoint.get(&local) else {
            return true;
        };
        let plan = &self.plan;
        let id = *self.identity.entry(peer).or_insert_with(|| {
            let v = plan.identity_of(peer);
            (v.id, v.flags)
        });
        *self.checks.entry((ep, dir, id)).or_insert_with(|| {
            let e = plan.endpoints.values().nth(ep).expect("endpoint index");
            plan.check(e, dir, peer, proto, port).passes()
        })
    }
}

fn pod_ips(p: &k8s_openapi::api::core::v1::Pod) -> Vec<IpAddr> {
    let st = p.status.as_ref();
    let list: Vec<IpAddr> = st
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if list.is_empty() {
        st.and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .into_iter()
            .collect()
    } else {
        list
    }
}

impl Matrix {
    /// The JSON contract, one matrix row per line.
    pub fn to_json(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let port = match self.traffic.protocol {
            Protocol::Icmp => 0,
            _ => self.traffic.port,
        };
        let mut s = format!(
            "{{\n  \"port\": {port},\n  \"protocol\": {},\n  \"pods\": [",
            q(self.traffic.protocol.as_str())
        );
        s += &self
            .pods
            .iter()
            .map(|p| q(p))
            .collect::<Vec<_>>()
            .join(", ");
        s += "],\n  \"allowed\": [";
        let rows: Vec<String> = self
            .allowed
            .iter()
            .map(|r| {
                let cells: Vec<&str> = r
                    .iter()
                    .map(|&b| if b { "true" } else { "false" })
                    .collect();
                format!("\n    [{}]", cells.join(", "))
            })
            .collect();
        s += &rows.join(",");
        if !rows.is_empty() {
            s += "\n  ";
        }
        s += "]\n}\n";
        s
    }

    /// The grid for people, at most `width` columns wide: pod names as column headers when
    /// they fit, else numbers (the rows say which pod each number is), in as many column
    /// blocks as needed.
    pub fn render(&self, width: usize, colour: bool) -> String {
        let n = self.pods.len();
        let mut s = format!(
            "{}: may the row pod open a connection to the column pod? X yes, . no\n",
            self.traffic
        );
        if n == 0 {
            s += "(no pods with an IP address)\n";
            return s;
        }
        let mark = |b: bool| {
            if b {
                paint(colour, GREEN, "X")
            } else {
                paint(colour, RED, ".")
            }
        };
        let name_w = self.pods.iter().map(|p| p.len()).max().unwrap_or(0);
        let corner = "from\\to";
        let left = name_w.max(corner.len());
        // Names as headers: every column as wide as the longest name.
        if left + n * (name_w + 1) <= width {
            let _ = write!(s, "\n{corner:<left$}");
            for p in &self.pods {
                let _ = write!(s, " {p:^name_w$}");
            }
            s += "\n";
            for (i, from) in self.pods.iter().enumerate() {
                let _ = write!(s, "{from:<left$}");
                for &b in &self.allowed[i] {
                    // Centre the one-character mark by hand: padding ignores colour codes.
                    let pad = name_w - 1;
                    let (l, r) = (pad / 2 + pad % 2, pad / 2);
                    let _ = write!(s, " {}{}{}", " ".repeat(l), mark(b), " ".repeat(r));
                }
                s += "\n";
            }
        } else {
            let num_w = n.to_string().len();
            // Long names are cut so that some columns always fit.
            let max_name = width.saturating_sub(num_w + 2 + 10 * (num_w + 1)).max(8);
            let names: Vec<String> = self.pods.iter().map(|p| cut(p, max_name)).collect();
            let name_w = names.iter().map(|p| p.chars().count()).max().unwrap_or(0);
            let row_w = num_w + 1 + name_w;
            let per_block = ((width.saturating_sub(row_w)) / (num_w + 1)).max(1);
            for start in (0..n).step_by(per_block) {
                let end = (start + per_block).min(n);
                let row_w = row_w.max(corner.len());
                let _ = write!(s, "\n{corner:<row_w$}");
                for j in start..end {
                    let _ = write!(s, " {:>num_w$}", j + 1);
                }
                s += "\n";
                for (i, name) in names.iter().enumerate() {
                    let label = format!("{:>num_w$} {name}", i + 1);
                    let _ = write!(s, "{label:<w$}", w = row_w.max(corner.len()));
                    for j in start..end {
                        let _ = write!(s, " {}{}", " ".repeat(num_w - 1), mark(self.allowed[i][j]));
                    }
                    s += "\n";
                }
            }
        }
        let yes: usize = self.allowed.iter().flatten().filter(|&&b| b).count();
        let _ = writeln!(
            s,
            "\n{yes} of {} pairs allowed (a pod to itself included)",
            n * n
        );
        // Centred cells leave trailing blanks.
        s.lines().map(|l| l.trim_end().to_string() + "\n").collect()
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let kept: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}~")
    }
}

pub fn run(args: MatrixArgs) -> anyhow::Result<()> {
    let m = load_manifests(&args.manifests, None)?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    let matrix = compute(&m.cluster, args.port, args.family);
    if args.json {
        print!("{}", matrix.to_json());
    } else {
        print!("{}", matrix.render(80, use_colour(false)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(n: usize, name: impl Fn(usize) -> String) -> Matrix {
        Matrix {
            traffic: "80".parse().unwrap(),
            pods: (0..n).map(name).collect(),
            // A pattern with both values in every row and column.
            allowed: (0..n)
                .map(|i| (0..n).map(|j| (i * 7 + j * 3) % 5 < 2).collect())
                .collect(),
        }
    }

    fn marks(s: &str) -> (usize, usize) {
        let grid = s.lines().filter(|l| l.ends_with('X') || l.ends_with('.'));
        grid.flat_map(|l| l.split(' ').filter(|w| *w == "X" || *w == "."))
            .fold(
                (0, 0),
                |(x, d), w| if w == "X" { (x + 1, d) } else { (x, d + 1) },
            )
    }

    #[test]
    fn many_long_names_fit_80_columns_in_blocks() {
        let m = matrix(40, |i| {
            format!("namespace-of-team-{i}/a-pod-with-a-rather-long-name-{i}")
        });
        let s = m.render(80, false);
        for l in s.lines().filter(|l| !l.starts_with("80/TCP")) {
            assert!(l.chars().count() <= 80, "{} columns: {l:?}", l.len());
        }
        let yes = m.allowed.iter().flatten().filter(|&&b| b).count();
        assert_eq!(marks(&s), (yes, 40 * 40 - yes), "{s}");
        assert!(s.contains("~"), "long names are cut: {s}");
        assert!(s.contains(&format!("{yes} of 1600 pairs allowed")));
    }

    #[test]
    fn short_names_head_their_columns() {
        let m = matrix(9, |i| {
            format!("{}/{}", ["x", "y", "z"][i / 3], ["a", "b", "c"][i % 3])
        });
        let s = m.render(80, false);
        assert!(s.contains("from\\to x/a x/b x/c y/a"), "{s}");
        assert!(s.lines().all(|l| l.chars().count() <= 80));
        let yes = m.allowed.iter().flatten().filter(|&&b| b).count();
        assert_eq!(marks(&s), (yes, 81 - yes), "{s}");
    }

    #[test]
    fn json_contract() {
        let m = matrix(2, |i| format!("x/{i}"));
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"port": 80, "protocol": "TCP", "pods": ["x/0", "x/1"],
                "allowed": [m.allowed[0], m.allowed[1]]})
        );
        let empty = matrix(0, |_| String::new());
        let v: serde_json::Value = serde_json::from_str(&empty.to_json()).unwrap();
        assert_eq!(v["allowed"], serde_json::json!([]));
    }
}
