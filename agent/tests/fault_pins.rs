//! The agent's pins taken away under traffic: every pin removed, then the whole bpffs
//! unmounted, then one pin replaced by another object. The real `palisade` binary runs in
//! a routed node namespace with its `--bpffs-dir` on a bpffs instance of the test's own.
//!
//! What users see: denied traffic stays denied and allowed connections never break
//! throughout (the agent's fds keep the links attached: without them, removing a link pin
//! detaches the program); the agent pins its very own maps and links again (same kernel
//! ids) and remounts bpffs, so `palisade drops` and `palisade status` work again and the
//! drop counters kept counting; a pin it must not fix (another object at its path) is
//! reported by `palisade status`, `/readyz` and the `pin_problems` metric until it is
//! gone, then repaired. An agent without CAP_SYS_ADMIN (the DaemonSet's) reports the
//! unmounted bpffs instead of mounting it, and re-pins once the operator has.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use palisade::dataplane::{link_ids, map_ids, Hook, Layout, Maps};
use palisade::source::SourceSpec;
use palisade_tests::agent::{AgentDirs, AgentProcess, TempDir};
use palisade_tests::http::http_get;
use palisade_tests::inproc::{self, InProcessAgent};
use palisade_tests::pins::{PinDir, PrivateBpffs};
use palisade_tests::privilege::drop_cap_sys_admin_from_this_thread;
use palisade_tests::traffic::{dropped, Traffic, Trio, POLICIES, PROGRAMMED};
use palisade_tests::{manifests, require_root, wait_until, Flavour, Node};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_palisade");
const NODE: &str = "n1";
/// The agent checks its pins every second; this leaves room for a loaded machine.
const REPAIR: Duration = Duration::from_secs(15);
/// The agent's HTTP port: its default, on the node namespace's loopback.
const HTTP_ADDR: &str = "127.0.0.1:9977";

/// `palisade ARGS --bpffs-dir .. --run-dir ..`: (success, stdout, stderr).
fn cli(dirs: &AgentDirs, args: &[&str]) -> (bool, String, String) {
    cli_at(&dirs.pins.path(), &dirs.run_dir, args)
}

fn cli_at(bpffs_dir: &Path, run_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--bpffs-dir")
        .arg(bpffs_dir)
        .arg("--run-dir")
        .arg(run_dir)
        .output()
        .expect("run palisade");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// x/b's ingress drops as `palisade drops --json` shows them (None: the command failed).
fn drops_of_b(dirs: &AgentDirs) -> Option<u64> {
    drops_of_b_at(&dirs.pins.path(), &dirs.run_dir)
}

fn drops_of_b_at(bpffs_dir: &Path, run_dir: &Path) -> Option<u64> {
    let (ok, out, _) = cli_at(bpffs_dir, run_dir, &["drops", "--json", "--pod", "x/b"]);
    let rows: Vec<Value> = serde_json::from_str(&out).ok().filter(|_| ok)?;
    Some(
        rows.iter()
            .filter(|r| r["direction"] == "ingress")
            .map(|r| r["packets"].as_u64().unwrap())
            .sum(),
    )
}

/// The kernel ids of the maps and of x/b's links, as their pins show them.
fn pinned_ids(layout: &Layout, ifindex: u32) -> (Vec<(&'static str, u32)>, Vec<Option<u32>>) {
    let links = Hook::ALL
        .iter()
        .map(|h| link_ids(layout, ifindex, *h).map(|l| l.link))
        .collect();
    (map_ids(layout).into_iter().collect(), links)
}

/// Waits until the pins show exactly `want` again; returns how long that took.
fn wait_repinned(
    what: &str,
    layout: &Layout,
    ifindex: u32,
    want: &(Vec<(&'static str, u32)>, Vec<Option<u32>>),
    log: &dyn Fn() -> String,
) -> Duration {
    let t0 = Instant::now();
    let back = wait_until(REPAIR, || pinned_ids(layout, ifindex) == *want);
    assert!(
        back,
        "{what}: pins not restored within {REPAIR:?}: {:?} (want {want:?})\n{}",
        pinned_ids(layout, ifindex),
        log()
    );
    t0.elapsed()
}

/// Removes every directory under `root`: all of Palisade's pins (what the kernel puts in
/// a bpffs root, `maps.debug` and `progs.debug`, cannot be removed). A removal the agent
/// races (re-pinning into a directory being removed) is tried again.
fn remove_all_pins(root: &Path) {
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let removed = wait_until(Duration::from_secs(5), || {
                std::fs::remove_dir_all(&path).is_ok()
            });
            assert!(removed, "cannot remove {}", path.display());
        }
    }
}

/// The inode of every pin (map and x/b's links): a pin made again is a new inode.
fn inodes(layout: &Layout, ifindex: u32) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    palisade_common::maps::PINNED
        .iter()
        .map(|m| layout.map(m))
        .chain(Hook::ALL.iter().map(|h| layout.link(ifindex, *h)))
        .map(|p| std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0))
        .collect()
}

#[test]
fn pins_removed_unmounted_or_replaced_under_traffic() {
    require_root();
    let tag = "pinfix";
    // Dropped last: the pins (and links) are cleaned up before it is unmounted.
    let bpffs = PrivateBpffs::new(tag);
    let node = Node::new(tag, Flavour::Routed).unwrap();
    let trio = Trio::new(&node).unwrap();
    let b = &trio.b;
    let dirs = AgentDirs::with_pins(tag, PinDir::at(bpffs.path())).unwrap();
    let layout = dirs.pins.layout();
    manifests::write(&dirs.manifests, "00-objects.yaml", &trio.objects(NODE)).unwrap();
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
    let mut agent = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap();
    agent.wait_ready(&dirs, PROGRAMMED).unwrap();

    let ids = pinned_ids(&layout, b.host_ifindex());
    assert_eq!(ids.0.len(), palisade_common::maps::PINNED.len());
    assert!(ids.1.iter().all(Option::is_some), "x/b has no pinned links");
    let slot_b = dirs.slot("x/b").unwrap();
    let maps = Maps::open(&layout).unwrap();
    let drops_before = dropped(&maps, slot_b, Some("ingress"));
    let traffic = Traffic::start(&trio, Duration::from_millis(20)).unwrap();
    traffic.progress("before the pins go", 15);
    let mut shown = drops_of_b(&dirs).expect("palisade drops before");

    // 1. Every pin removed (rm -r of everything under --bpffs-dir).
    let first = inodes(&layout, b.host_ifindex());
    remove_all_pins(&bpffs.path());
    let took = wait_repinned("removed", &layout, b.host_ifindex(), &ids, &|| {
        agent.log_tail()
    });
    let again = inodes(&layout, b.host_ifindex());
    assert!(
        first.iter().zip(&again).all(|(a, b)| a != b),
        "not every pin was made again: {first:?} -> {again:?}"
    );
    eprintln!("{tag}: every pin removed; back after {took:?}");
    traffic.progress("after the pins were put back", 15);
    let now = drops_of_b(&dirs).expect("palisade drops after re-pinning");
    assert!(now > shown, "x/b's drop counter stopped: {shown} -> {now}");
    shown = now;

    // 2. The bpffs unmounted: the agent mounts one again and pins everything there.
    assert!(bpffs.unmount(), "umount {}", bpffs.path().display());
    let took = wait_repinned("unmounted", &layout, b.host_ifindex(), &ids, &|| {
        agent.log_tail()
    });
    assert!(bpffs.mounted());
    eprintln!("{tag}: bpffs unmounted; remounted and re-pinned after {took:?}");
    traffic.progress("after bpffs was mounted again", 15);
    let now = drops_of_b(&dirs).expect("palisade drops after the remount");
    assert!(now > shown, "x/b's drop counter stopped: {shown} -> {now}");
    let (ok, out, err) = cli(&dirs, &["status"]);
    assert!(ok && !out.contains("pin problems"), "{out}{err}");
    assert_eq!(http_get(node.ns(), HTTP_ADDR, "/readyz").0, 200);

    // 3. Another object at one of its paths (CONFIG's map renamed over COUNTERS): the
    // agent does not fight it; it says so until the path is free, then pins COUNTERS.
    std::fs::rename(layout.map("CONFIG"), layout.map("COUNTERS")).unwrap();
    let reported = wait_until(REPAIR, || {
        dirs.status()
            .is_some_and(|s| s["pin_problems"].to_string().contains("COUNTERS"))
    });
    assert!(
        reported,
        "not reported: {:?}\n{}",
        dirs.status(),
        agent.log_tail()
    );
    let (ok, out, err) = cli(&dirs, &["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("pin problems") && out.contains("COUNTERS") && out.contains("not the agent's"),
        "{out}"
    );
    let (code, body) = http_get(node.ns(), HTTP_ADDR, "/readyz");
    assert_eq!(
        (code, body.trim()),
        (503, "pins missing and not repairable (see palisade status)")
    );
    let metrics = http_get(node.ns(), HTTP_ADDR, "/metrics").1;
    assert!(
        metrics.lines().any(|l| l == "palisade_pin_problems 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("pin"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::remove_file(layout.map("COUNTERS")).unwrap();
    wait_repinned("freed", &layout, b.host_ifindex(), &ids, &|| {
        agent.log_tail()
    });
    let cleared = wait_until(REPAIR, || {
        dirs.status()
            .is_some_and(|s| s["pin_problems"] == serde_json::json!([]))
            && http_get(node.ns(), HTTP_ADDR, "/readyz").0 == 200
    });
    assert!(cleared, "problem not cleared: {:?}", dirs.status());

    // Throughout: nothing denied got through, nothing allowed broke, every denied packet
    // was counted in the same counters.
    traffic.progress("at the end", 15);
    let report = traffic.stop();
    let counted = || dropped(&maps, slot_b, Some("ingress")) - drops_before;
    report.assert_enforced_throughout(tag, &trio, counted);
    drop(agent);
}

/// The DaemonSet's agent has no CAP_SYS_ADMIN: it cannot mount bpffs again. It says so
/// (status, `palisade status`) while enforcement goes on, and once the operator mounts
/// bpffs it pins its objects there (CAP_BPF is enough) and the problem clears.
#[test]
fn without_cap_sys_admin_an_unmounted_bpffs_is_reported_until_mounted_again() {
    require_root();
    let tag = "pinnoadm";
    let bpffs = PrivateBpffs::new(tag);
    let node = Node::new(tag, Flavour::Bridged).unwrap();
    let trio = Trio::new(&node).unwrap();
    let b = &trio.b;
    let pins = PinDir::at(bpffs.path());
    let layout = pins.layout();
    let tmp = TempDir::new(tag).unwrap();
    let (objects, run_dir) = (tmp.path().join("manifests"), tmp.path().join("run"));
    std::fs::create_dir_all(&objects).unwrap();
    manifests::write(&objects, "00-objects.yaml", &trio.objects(NODE)).unwrap();
    manifests::write(&objects, "10-policies.yaml", POLICIES).unwrap();
    let cfg = inproc::config(
        NODE,
        SourceSpec::Manifests(objects),
        layout.clone(),
        &run_dir,
    );
    let agent = InProcessAgent::spawn_with(node.ns(), cfg, drop_cap_sys_admin_from_this_thread);
    agent.wait_programmed(PROGRAMMED);
    let ids = pinned_ids(&layout, b.host_ifindex());
    let slot = agent.slot("x/b").unwrap();
    let maps = Maps::open(&layout).unwrap();
    let drops_before = dropped(&maps, slot, Some("ingress"));
    let traffic = Traffic::start(&trio, Duration::from_millis(20)).unwrap();
    traffic.progress("before the unmount", 15);
    let shown = drops_of_b_at(&bpffs.path(), &run_dir).expect("palisade drops before");

    assert!(bpffs.unmount());
    agent.wait_status("the lost pins reported", REPAIR, |v| {
        v["pin_problems"]
            .to_string()
            .contains("the agent lacks CAP_SYS_ADMIN")
    });
    assert!(
        !bpffs.mounted(),
        "the agent mounted bpffs without CAP_SYS_ADMIN"
    );
    let (ok, out, err) = cli_at(&bpffs.path(), &run_dir, &["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("pin problems")
            && out.contains(&format!("mount -t bpf bpf {}", bpffs.path().display())),
        "{out}"
    );
    traffic.progress("while the pins are gone", 15);

    bpffs.mount();
    let took = wait_repinned("mounted again", &layout, b.host_ifindex(), &ids, &|| {
        format!("{:?}", agent.status())
    });
    eprintln!("{tag}: re-pinned {took:?} after the operator mounted bpffs");
    agent.wait_status("problem cleared", REPAIR, |v| {
        v["pin_problems"] == serde_json::json!([])
    });
    traffic.progress("after the pins are back", 15);
    let now = drops_of_b_at(&bpffs.path(), &run_dir).expect("palisade drops after");
    assert!(now > shown, "x/b's drop counter stopped: {shown} -> {now}");

    let report = traffic.stop();
    let counted = || dropped(&maps, slot, Some("ingress")) - drops_before;
    report.assert_enforced_throughout(tag, &trio, counted);
    drop(agent);
}
