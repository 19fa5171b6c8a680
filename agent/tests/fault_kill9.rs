//! `kill -9` of the agent 20 times in a row at random moments (seeded) during reconciles:
//! right after start (the first sync) and right after a manifest change. An allowed TCP
//! connection per family streams throughout and a denied client sprays TCP and UDP at the
//! same server. Then the last agent converges and every map (ENDPOINTS, IDENTITY{4,6}_EXACT,
//! IDENTITY{4,6}_CIDR, POLICY_EXACT, POLICY_WILDCARD) is compared with the maps a clean
//! agent builds from the same manifests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use palisade::dataplane::Maps;
use palisade_tests::agent::{AgentDirs, AgentProcess};
use palisade_tests::traffic::{dropped, Traffic, Trio, POLICIES};
use palisade_tests::util::Rng;
use palisade_tests::{manifests, require_root, wait_until, Flavour, Node};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");
const NODE: &str = "n1";
const KILLS: usize = 20;

const PROGRAMMED: &[&str] = palisade_tests::traffic::PROGRAMMED;

/// A policy selecting no pod: a change the agent must reconcile, harmless to traffic.
fn churn(i: usize) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: churn, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{pod: nobody}}}}\n  ingress:\n  - ports: [{{protocol: TCP, port: {}}}]\n",
        1000 + i
    )
}

/// Every map, with slots replaced by the interface that owns them and identity ids by the
/// smallest prefix carrying them, so two agents that number things alike compare equal
/// and two that number differently still compare by meaning.
type Dump = BTreeMap<String, String>;

fn dump(maps: &Maps) -> Dump {
    let mut out = Dump::new();
    let mut slot_if = BTreeMap::new();
    for r in maps.endpoints.iter() {
        let (ifindex, ep) = r.unwrap();
        slot_if.insert(ep.slot, ifindex);
        out.insert(
            format!("ENDPOINT if{ifindex}"),
            format!("flags {:#x}", ep.flags),
        );
    }
    let mut id_name = BTreeMap::<u32, String>::new();
    let mut ids = Vec::new();
    // Both maps of each family, each entry named with the map that holds it.
    for r in maps.identity_v4.exact.iter() {
        let (a, v) = r.unwrap();
        ids.push((format!("{}/32", std::net::Ipv4Addr::from(a)), "exact", v));
    }
    for r in maps.identity_v4.trie.iter() {
        let (k, v) = r.unwrap();
        let net = format!("{}/{}", std::net::Ipv4Addr::from(k.data()), k.prefix_len());
        ids.push((net, "cidr", v));
    }
    for r in maps.identity_v6.exact.iter() {
        let (a, v) = r.unwrap();
        ids.push((format!("{}/128", std::net::Ipv6Addr::from(a)), "exact", v));
    }
    for r in maps.identity_v6.trie.iter() {
        let (k, v) = r.unwrap();
        let net = format!("{}/{}", std::net::Ipv6Addr::from(k.data()), k.prefix_len());
        ids.push((net, "cidr", v));
    }
    for (net, _, v) in &ids {
        let e = id_name.entry(v.id).or_insert_with(|| net.clone());
        if net < e {
            *e = net.clone();
        }
    }
    let name = |id: u32| {
        if id == 0 {
            "world".to_string()
        } else {
            id_name
                .get(&id)
                .cloned()
                .unwrap_or(format!("unknown-id-{id}"))
        }
    };
    for (net, map, v) in &ids {
        out.insert(
            format!("IDENTITY {map} {net}"),
            format!("{} flags {:#x}", name(v.id), v.flags),
        );
    }
    for r in maps.policy.iter() {
        let (k, v) = r.unwrap();
        let key = k.data();
        let slot = key.slot;
        let owner = slot_if
            .get(&slot)
            .map_or(format!("slot{slot}"), |i| format!("if{i}"));
        let identity = key.identity;
        out.insert(
            format!(
                "POLICY {owner} {} dir {} proto {} port {} /{}",
                name(identity),
                key.dir,
                key.proto,
                key.port,
                k.prefix_len()
            ),
            format!("{v:?}"),
        );
    }
    out
}

#[test]
fn twenty_kill9_during_reconciles_leak_nothing_break_nothing_and_converge() {
    require_root();
    let tag = "fk9";
    let node = Node::new(tag, Flavour::Routed).unwrap();
    let trio = Trio::new(&node).unwrap();

    let dirs = AgentDirs::new(tag, None).unwrap();
    manifests::write(&dirs.manifests, "00-objects.yaml", &trio.objects(NODE)).unwrap();
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
    manifests::write(&dirs.manifests, "20-churn.yaml", &churn(0)).unwrap();
    let t0 = Instant::now();
    let agent = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap();
    let mut agent = Some(agent);
    agent
        .as_mut()
        .unwrap()
        .wait_ready(&dirs, PROGRAMMED)
        .unwrap();
    // Kill moments are drawn from [0, 400 ms): the startup sync takes this long.
    let first_sync = t0.elapsed();
    let maps = Maps::open(&dirs.pins.layout()).unwrap();
    let slot_a = dirs.slot("x/a").unwrap();

    let traffic = Traffic::start(&trio, Duration::from_millis(10)).unwrap();
    // Every drop of x/a, either direction: its traffic is all allowed.
    let a_drops_before = dropped(&maps, slot_a, None);

    // The kill moments are reproducible with PALISADE_SEED.
    let mut rng = Rng(std::env::var("PALISADE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b11_6b11));
    let start = Instant::now();
    let mut delays = Vec::new();
    for i in 1..=KILLS {
        // Odd rounds: kill during the startup sync; even ones: during a change's reconcile.
        if i % 2 == 0 {
            manifests::write(&dirs.manifests, "20-churn.yaml", &churn(i)).unwrap();
        }
        let d = Duration::from_millis(rng.below(400) as u64);
        delays.push(d.as_millis());
        std::thread::sleep(d); // a random moment is the point here, not a synchronisation
        agent.take().unwrap().kill9().unwrap();
        agent = Some(AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap());
    }
    let mut last = agent.take().unwrap();
    last.wait_ready(&dirs, PROGRAMMED).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            dirs.status()
                .is_some_and(|v| v["programmed"].get("NetworkPolicy/y/churn").is_some())
        }),
        "the churn policy is programmed"
    );
    let kill_phase = start.elapsed();
    traffic.progress("after the kills", 5);

    let report = traffic.stop();
    let after_kills = dump(&maps);
    eprintln!(
        "first sync {first_sync:.2?}; {KILLS} kills in {kill_phase:.2?} (delays ms {delays:?}); {}",
        report.summary()
    );
    report.assert_no_leak_no_break(&trio);
    assert_eq!(
        dropped(&maps, slot_a, None),
        a_drops_before,
        "x/a's allowed traffic was never dropped"
    );
    drop(maps);
    last.kill9().unwrap();

    // A clean agent on the same manifests, with its own fresh pins.
    let clean_dirs = AgentDirs::new("fk9c", Some(&dirs.manifests)).unwrap();
    let mut clean = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &clean_dirs, &[]).unwrap();
    clean.wait_ready(&clean_dirs, PROGRAMMED).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        clean_dirs
            .status()
            .is_some_and(|v| v["programmed"].get("NetworkPolicy/y/churn").is_some())
    }));
    let clean_maps = Maps::open(&clean_dirs.pins.layout()).unwrap();
    let fresh = dump(&clean_maps);
    assert!(fresh.keys().any(|k| k.starts_with("POLICY")), "{fresh:?}");
    assert_eq!(
        after_kills, fresh,
        "maps after {KILLS} kills vs a clean agent"
    );
    drop(clean_maps);
    clean.kill9().unwrap();
}
