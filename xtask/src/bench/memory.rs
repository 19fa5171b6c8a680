//! Part 5: kernel memory of every map, as the kernel accounts it (`memlock:` in
//! /proc/self/fdinfo of a map fd), empty and with 10,000 local-pod policy entries and
//! 100,000 IP→identity entries.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{bail, Context as _};
use aya::maps::MapInfo;
use aya::programs::loaded_programs;
use palisade::dataplane::{Dataplane, LoadOptions};
use palisade_common::{maps as names, POLICY_PREFIX_FULL};
use palisade_tests::pins::PinDir;
use serde_json::json;

use super::per_packet::{fill_identities, filler_key};
use super::report::{int, num, Section, Table};

const LOCAL_PODS: u32 = 100;
const ENTRIES_PER_POD: usize = 100;
const IDENTITIES: usize = 100_000;

#[derive(Clone, Debug)]
struct MapMem {
    name: String,
    kind: String,
    max_entries: u64,
    memlock: u64,
}

/// `memlock`, `map_type` and `max_entries` from an fdinfo text.
fn parse_fdinfo(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn map_type_name(t: &str) -> &str {
    // enum bpf_map_type
    match t {
        "1" => "hash",
        "2" => "array",
        "6" => "percpu_array",
        "9" => "lru_hash",
        "11" => "lpm_trie",
        "27" => "ringbuf",
        other => other,
    }
}

/// Every map the loaded programs use, found through the program's map ids (so maps that
/// are not pinned, like per-CPU scratch space, are included).
fn maps_of(policy_id: u32) -> anyhow::Result<Vec<MapMem>> {
    let mut ids = None;
    for p in loaded_programs() {
        let p = p?;
        if let Some(m) = p.map_ids()? {
            if m.contains(&policy_id) {
                ids = Some(m);
                break;
            }
        }
    }
    let Some(ids) = ids else {
        bail!("no loaded program uses the POLICY_EXACT map {policy_id}");
    };
    let mut out = Vec::new();
    for id in ids {
        let info = MapInfo::from_id(id)?;
        let fd = info.fd()?;
        let raw = fd.as_fd().as_raw_fd();
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))?;
        let f = parse_fdinfo(&text);
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        out.push(MapMem {
            name: info.name_as_str().unwrap_or("?").to_string(),
            kind: map_type_name(&get("map_type")).to_string(),
            max_entries: get("max_entries").parse().unwrap_or(0),
            memlock: get("memlock")
                .parse()
                .with_context(|| format!("no memlock in fdinfo of map {id}"))?,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn run() -> anyhow::Result<Section> {
    let pins = PinDir::new("benchmem");
    let _ = palisade::dataplane::cleanup(&pins.layout());
    let dp = Dataplane::load(pins.layout(), &LoadOptions::default())?;
    let mut maps = dp.maps()?;
    let policy_id = MapInfo::from_pin(pins.layout().map(names::POLICY_EXACT))?.id();
    let empty = maps_of(policy_id)?;

    for slot in 0..LOCAL_PODS {
        for i in 0..ENTRIES_PER_POD {
            maps.insert_policy(POLICY_PREFIX_FULL, filler_key(slot, i, 4))?;
        }
    }
    fill_identities(&mut maps, IDENTITIES)?;
    let full = maps_of(policy_id)?;
    drop(maps);
    drop(dp);
    drop(pins);

    let mut s = Section::new("map_memory", "5. Map memory");
    s.method.push(format!(
        "The programs are loaded with the agent's default map sizes (conntrack 262,144 \
         entries), then {} local pods × {} exact-port policy entries = {} POLICY_EXACT entries \
         and {} IPv4 /32 IDENTITY4_EXACT entries are written. For every map the programs use \
         (found through the program's map ids, so unpinned per-CPU maps count too), the \
         kernel's own accounting is read from `memlock:` in /proc/self/fdinfo of a map \
         fd. Preallocated maps (arrays, the LRU conntrack map, the ring buffer) cost \
         their full size from the start; the LPM tries and hash maps grow with entries.",
        LOCAL_PODS,
        ENTRIES_PER_POD,
        int(LOCAL_PODS as usize * ENTRIES_PER_POD),
        int(IDENTITIES)
    ));
    let mut t = Table::new(
        "",
        &[
            "map",
            "type",
            "max entries",
            "memlock empty (KiB)",
            "memlock filled (KiB)",
        ],
    );
    let (mut tot_e, mut tot_f) = (0u64, 0u64);
    let mut data = Vec::new();
    for f in &full {
        let e = empty
            .iter()
            .find(|e| e.name == f.name)
            .map_or(0, |e| e.memlock);
        tot_e += e;
        tot_f += f.memlock;
        t.row(vec![
            f.name.clone(),
            f.kind.clone(),
            int(f.max_entries as usize),
            num(e as f64 / 1024.0),
            num(f.memlock as f64 / 1024.0),
        ]);
        data.push(
            json!({"map": f.name, "type": f.kind, "max_entries": f.max_entries,
                         "memlock_empty_bytes": e, "memlock_filled_bytes": f.memlock}),
        );
    }
    t.row(vec![
        "**total**".into(),
        String::new(),
        String::new(),
        num(tot_e as f64 / 1024.0),
        num(tot_f as f64 / 1024.0),
    ]);
    s.tables.push(t);
    s.data = json!({
        "policy_entries": LOCAL_PODS as usize * ENTRIES_PER_POD,
        "identity_entries": IDENTITIES,
        "maps": data,
        "total_empty_bytes": tot_e,
        "total_filled_bytes": tot_f,
    });
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields_are_parsed() {
        let f = parse_fdinfo("pos:\t0\nmap_type:\t11\nmax_entries:\t1048576\nmemlock:\t4096\n");
        assert_eq!(f["memlock"], "4096");
        assert_eq!(map_type_name(&f["map_type"]), "lpm_trie");
    }
}
