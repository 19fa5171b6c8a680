//! `palisade explain SRC DST PORT[/PROTO] --manifests DIR`: the verdict on one connection
//! and why, from the compiler's reference semantics (`palisade_policy::explain`). Offline:
//! no kernel and no agent needed, so a policy can be checked before it is applied.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use palisade_policy::explain::{
    self, Check, Explanation, Isolation, RuleEval, Side, Subject, Traffic,
};
use palisade_policy::reference::Cluster;

use crate::source::load_dir;

const EXAMPLES: &str = "\
Examples:
  # Why can y/b not open a connection to x/a on TCP port 80?
  palisade explain y/b x/a 80 --manifests ./manifests

  # DNS from a pod to an address, as the agent of node-1 judges it, for a script
  palisade explain x/a 198.18.0.53 53/UDP --manifests ./manifests --node-name node-1 --json

SRC and DST are namespace/pod or an IPv4/IPv6 address. Between two pods the IPv4 addresses
are used when both have one, else the IPv6 ones. Traffic from a pod's own node (its
host-network pods' addresses, or --node-ip) is always let in. Exit status: 0 allowed,
3 denied or no verdict (a pod without an address), 1 an error, 2 a usage error.";

#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct ExplainArgs {
    /// Source: namespace/pod or an IP address.
    #[arg(value_name = "SRC")]
    pub src: Subject,
    /// Destination: namespace/pod or an IP address.
    #[arg(value_name = "DST")]
    pub dst: Subject,
    /// Destination port and protocol (TCP if omitted), e.g. 80, 53/UDP; or icmp.
    #[arg(value_name = "PORT[/PROTO]")]
    pub traffic: Traffic,
    /// Directory of Namespace/Pod/NetworkPolicy manifests to judge against. Without it,
    /// judge against what the agent on this node enforces (its source, node name and
    /// addresses, from its status in --run-dir).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Judge as the agent of this node does: only its pods are enforced. Default: every
    /// node enforces its own pods.
    #[arg(long, value_name = "NODE")]
    pub node_name: Option<String>,
    /// An address of --node-name (repeatable), besides those of its host-network pods.
    #[arg(long = "node-ip", value_name = "IP", requires = "node_name")]
    pub node_ips: Vec<IpAddr>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: super::Dirs,
}

/// A manifest directory read into the evaluator's input, with what the user must hear.
pub struct Manifests {
    pub cluster: Cluster,
    /// Skipped documents (file:line: why) and rejected policies, one line each.
    pub warnings: Vec<String>,
}

/// Reads `dir` as the agent would. Node addresses are those of the nodes' host-network pods
/// (a host-network pod's IP is its node's) plus `extra` for one named node.
pub fn load_manifests(dir: &Path, extra: Option<(&str, &[IpAddr])>) -> anyhow::Result<Manifests> {
    let snap = load_dir(dir).with_context(|| {
        format!(
            "cannot read the manifests: is {} a directory of *.yaml/*.json files?",
            dir.display()
        )
    })?;
    let mut warnings: Vec<String> = snap
        .errors
        .iter()
        .map(|e| format!("{e} (skipped)"))
        .collect();
    warnings.extend(
        explain::rejections(&snap.policies)
            .iter()
            .map(|r| format!("{r} (rejected: it isolates the pods it selects and allows nothing)")),
    );
    let mut nodes: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for p in &snap.pods {
        let spec = p.spec.as_ref();
        if let (Some(node), Some(true)) = (
            spec.and_then(|s| s.node_name.clone()),
            spec.and_then(|s| s.host_network),
        ) {
            let st = p.status.as_ref();
            let ips = st
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|i| i.ip.as_str())
                .chain(st.and_then(|s| s.pod_ip.as_deref()))
                .filter_map(|s| s.parse::<IpAddr>().ok());
            nodes.entry(node).or_default().extend(ips);
        }
    }
    if let Some((node, ips)) = extra {
        nodes.entry(node.to_string()).or_default().extend(ips);
    }
    for ips in nodes.values_mut() {
        ips.sort();
        ips.dedup();
    }
    if snap.pods.is_empty() {
        warnings.push(format!("{}: no pods found", dir.display()));
    }
    Ok(Manifests {
        cluster: Cluster {
            namespaces: snap.namespaces,
            pods: snap.pods,
            policies: snap.policies,
            nodes,
        },
        warnings,
    })
}

/// Colour only for people: a terminal, no --json, and NO_COLOR unset or empty.
pub fn use_colour(json: bool) -> bool {
    !json
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::stdout().is_terminal()
}

pub fn paint(colour: bool, code: &str, s: &str) -> String {
    if colour {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

pub const GREEN: &str = "32";
pub const RED: &str = "31";
pub const BOLD_GREEN: &str = "1;32";
pub const BOLD_RED: &str = "1;31";

/// Runs the command; `Ok(false)` when the connection is denied or has no verdict.
pub fn run(args: ExplainArgs) -> anyhow::Result<bool> {
    let mut args = args;
    if args.manifests.is_none() {
        live_source(&mut args)?;
    }
    let dir = args.manifests.as_deref().context("no manifest directory")?;
    let extra = args
        .node_name
        .as_deref()
        .map(|n| (n, args.node_ips.as_slice()));
    let m = load_manifests(dir, extra)?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    let e = explain::explain(
        &m.cluster,
        args.node_name.as_deref(),
        &args.src,
        &args.dst,
        args.traffic,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", render(&e, use_colour(false)));
    }
    Ok(e.allowed == Some(true))
}

/// Points `args` at what the running agent enforces: its source, its node and this node's
/// addresses (the CLI runs on the node, or with --netns in the node's namespace).
fn live_source(args: &mut ExplainArgs) -> anyhow::Result<()> {
    let status = super::status::read(&args.dirs, "; or pass --manifests DIR to judge offline")?;
    let Some(dir) = status.source.strip_prefix("manifests:") else {
        anyhow::bail!(
            "the agent follows {}; explaining against it needs its objects: pass --manifests DIR",
            status.source
        );
    };
    args.manifests = Some(PathBuf::from(dir));
    if args.node_name.is_none() {
        args.node_name = Some(status.node);
        args.node_ips = crate::agent::node_ips()?;
    }
    Ok(())
}

fn side(s: &Side) -> String {
    match (&s.ip, &s.pod) {
        (None, _) => format!("{} (no IP address)", s.subject),
        (Some(ip), Some(pod)) if *pod == s.subject => format!("{pod} ({ip})"),
        (Some(ip), Some(pod)) if s.subject == ip.to_string() => format!("{ip} (pod {pod})"),
        (Some(ip), Some(pod)) => format!("{} ({ip}, pod {pod})", s.subject),
        (Some(ip), None) if s.subject == ip.to_string() => s.subject.clone(),
        (Some(ip), None) => format!("{} ({ip})", s.subject),
    }
}

/// The human rendering: verdict first, then each end's check.
pub fn render(e: &Explanation, colour: bool) -> String {
    let mut s = String::new();
    let traffic = Traffic {
        protocol: e.protocol,
        port: e.port,
    };
    let _ = writeln!(s, "{} -> {}  {traffic}", side(&e.src), side(&e.dst));
    if let Some(n) = &e.node {
        let _ = writeln!(s, "as judged by the agent of node {n}");
    }
    let verdict = match e.allowed {
        Some(true) => paint(colour, BOLD_GREEN, "ALLOWED"),
        Some(false) => {
            let by: Vec<&str> = [
                (!e.egress.passes()).then_some("the source's egress"),
                (!e.ingress.passes()).then_some("the destination's ingress"),
            ]
            .into_iter()
            .flatten()
            .collect();
            format!(
                "{} by {}",
                paint(colour, BOLD_RED, "DENIED"),
                by.join(" and ")
            )
        }
        None => paint(colour, BOLD_RED, "NO VERDICT"),
    };
    let _ = writeln!(s, "verdict: {verdict}");
    let _ = writeln!(s);
    section(&mut s, "egress of the source", &e.src, &e.egress, colour);
    section(
        &mut s,
        "ingress of the destination",
        &e.dst,
        &e.ingress,
        colour,
    );
    wrap(&s, 80)
}

/// Characters a terminal shows (colour codes take no room).
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// Breaks lines longer than `width` at spaces; continuations are indented 4 more than the
/// line they continue. A word longer than the width stays whole.
pub fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let mut cur = String::new();
        let mut cur_len = 0;
        for word in line.trim_start().split(' ') {
            let w = visible_len(word);
            if cur.is_empty() {
                cur = format!("{}{word}", " ".repeat(indent));
                cur_len = indent + w;
            } else if cur_len + 1 + w > width {
                out += &cur;
                out.push('\n');
                cur = format!("{}{word}", " ".repeat(indent + 4));
                cur_len = indent + 4 + w;
            } else {
                cur.push(' ');
                cur += word;
                cur_len += 1 + w;
            }
        }
        out += &cur;
        out.push('\n');
    }
    out
}

fn section(s: &mut String, title: &str, end: &Side, c: &Check, colour: bool) {
    let ok = |t: &str| paint(colour, GREEN, t);
    let bad = |t: &str| paint(colour, RED, t);
    match c {
        Check::NotEnforced { why } => {
            let _ = writeln!(s, "{title} {}: {}", end.subject, ok("not checked"));
            let _ = writeln!(s, "  {why}");
        }
        Check::NotIsolated { pod } => {
            let _ = writeln!(s, "{title} {pod}: {}", ok("not isolated"));
            let dir = if title.starts_with("egress") {
                "egress"
            } else {
                "ingress"
            };
            let _ = writeln!(s, "  no NetworkPolicy selects {pod} for {dir}");
        }
        Check::FromNode { pod, node } => {
            let _ = writeln!(s, "{title} {pod}: {}", ok("from its own node"));
            let _ = writeln!(
                s,
                "  traffic from node {node}'s addresses into its pods is always allowed"
            );
        }
        Check::Allowed {
            pod,
            isolated_by,
            rules,
        } => {
            let _ = writeln!(s, "{title} {pod}: {}", ok("allowed"));
            isolation(s, isolated_by, Some(rules));
            for r in rules.iter().filter(|r| r.allows) {
                rule(s, r, "allows");
            }
        }
        Check::Denied {
            pod,
            isolated_by,
            rules,
        } => {
            let _ = writeln!(s, "{title} {pod}: {}", bad("denied, no rule allows it"));
            isolation(s, isolated_by, Some(rules));
            for r in rules {
                rule(s, r, "does not allow");
            }
        }
        Check::Unknown {
            pod,
            reason,
            isolated_by,
        } => {
            let who = pod.as_deref().map(|p| format!(" {p}")).unwrap_or_default();
            let _ = writeln!(s, "{title}{who}: {}", bad("not judged"));
            let _ = writeln!(s, "  {reason}");
            if pod.is_some() {
                isolation(s, isolated_by, None);
            }
        }
    }
}

/// `rules`: the evaluated rules, to count each policy's; `None` when none were evaluated.
fn isolation(s: &mut String, by: &[Isolation], rules: Option<&[RuleEval]>) {
    if by.is_empty() {
        let _ = writeln!(s, "  isolated by no NetworkPolicy");
        return;
    }
    let _ = writeln!(s, "  isolated by:");
    for i in by {
        if let Some(first) = i.rejected.first() {
            let _ = writeln!(
                s,
                "    {} REJECTED, allows nothing: {}: {}",
                i.policy, first.field, first.error
            );
            for r in &i.rejected[1..] {
                let _ = writeln!(s, "      also {}: {}", r.field, r.error);
            }
            continue;
        }
        let Some(rules) = rules else {
            let _ = writeln!(s, "    {}", i.policy);
            continue;
        };
        let what = match rules.iter().filter(|r| r.policy == i.policy).count() {
            0 => "no rules for this direction: allows nothing".to_string(),
            1 => "1 rule".to_string(),
            n => format!("{n} rules"),
        };
        let _ = writeln!(s, "    {} ({what})", i.policy);
    }
}

fn rule(s: &mut String, r: &RuleEval, verb: &str) {
    let _ = writeln!(s, "  {} {}[{}] {verb}:", r.policy, r.direction, r.rule);
    let mark = |m: bool| if m { "matches" } else { "no match" };
    let _ = writeln!(s, "    peer {}: {}", mark(r.peer.matched), r.peer.why);
    let _ = writeln!(s, "    port {}: {}", mark(r.port.matched), r.port.why);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_lines_within_the_width() {
        let text = format!(
            "  peer no match: {}\nshort\n",
            "from[0] podSelector {app=api} does not select shop/web {app=web}; ".repeat(3)
        );
        let w = wrap(&text, 80);
        assert!(w.lines().all(|l| l.len() <= 80), "{w}");
        assert!(
            w.lines().skip(1).take(2).all(|l| l.starts_with("      ")),
            "{w}"
        );
        assert_eq!(
            w.split_whitespace().collect::<Vec<_>>(),
            text.split_whitespace().collect::<Vec<_>>()
        );
        let coloured = paint(true, GREEN, "allowed");
        assert_eq!(visible_len(&coloured), "allowed".len());
    }
}
