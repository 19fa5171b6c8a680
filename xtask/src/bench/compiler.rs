//! Part 4: the policy compiler at 10k pods / 2k policies, through the compiler crate's
//! own scale example (`agent/policy/examples/scale/`), which prints JSON with one object
//! per scenario (`typical`, `fragmented`): `full_compile_wall_ms.median`,
//! `incremental.<kind>.wall.{p50_ms,p99_ms}`, `peak_heap_mib`, `plan.{identities,map_entries}`.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use serde_json::{json, Value};

use super::proc::output;
use super::report::{num, Section, Table, Target, Verdict};

pub const EXAMPLE: &str = "agent/policy/examples/scale";
const COMMAND: &str = "cargo run --release -p palisade-policy --example scale -- --json";

/// The last line of `out` that is a JSON object.
pub fn parse_output(out: &str) -> Option<Value> {
    // The example prints one JSON object, on one line or pretty-printed over many: try
    // every line that opens an object, from the last, with the rest of the output.
    let starts: Vec<usize> = out
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .filter(|&i| out[i..].trim_start().starts_with('{'))
        .collect();
    let mut starts = starts;
    starts.sort_unstable();
    starts
        .iter()
        .rev()
        .find_map(|&i| serde_json::from_str::<Value>(out[i..].trim()).ok())
        .filter(Value::is_object)
}

pub fn run(repo: &Path) -> anyhow::Result<Section> {
    let mut s = Section::new("compiler", "4. Policy compiler at 10k pods / 2k policies");
    s.commands.push(COMMAND.into());
    if !repo.join(EXAMPLE).exists() {
        s.notes.push(format!(
            "Not available: `{EXAMPLE}` does not exist in this checkout, so the compiler \
             figures were not measured in this run."
        ));
        for what in ["full compile < 1 s", "incremental update < 5 ms (p99)"] {
            s.targets.push(Target::new(
                what,
                Verdict::NotMeasured,
                format!("{EXAMPLE} not available"),
            ));
        }
        s.data = json!({"available": false});
        return Ok(s);
    }
    let out = output(Command::new("cargo").current_dir(repo).args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "palisade-policy",
        "--example",
        "scale",
        "--",
        "--json",
    ]))?;
    let v = parse_output(&out)
        .with_context(|| format!("no JSON object in the output of `{COMMAND}`: {out}"))?;
    s.method.push(format!(
        "The compiler crate's scale example builds a synthetic cluster (10,000 pods, 500 \
         namespaces, 2,000 policies, 100 local pods) and times a full compile and \
         single-object incremental changes (wall clock, median of runs / p50 and p99 of \
         hundreds of changes), with its peak heap. Two scenarios: *typical*, and \
         *fragmented*, where ipBlock excepts split the pod range so that nearly every pod \
         gets an identity of its own. Output of `{COMMAND}` in this run:"
    ));
    const SCENARIOS: [&str; 2] = ["typical", "fragmented"];
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    let mut t = Table::new("", &["measure", "typical", "fragmented"]);
    let row = |t: &mut Table, name: &str, get: &dyn Fn(&Value) -> String| {
        let mut cells = vec![name.to_string()];
        cells.extend(SCENARIOS.iter().map(|sc| get(&v[*sc])));
        t.row(cells);
    };
    row(&mut t, "full compile (ms, median)", &|x| {
        num(f(&x["full_compile_wall_ms"]["median"]))
    });
    row(&mut t, "peak heap (MiB)", &|x| num(f(&x["peak_heap_mib"])));
    row(&mut t, "identities", &|x| num(f(&x["plan"]["identities"])));
    row(&mut t, "map entries", &|x| {
        num(f(&x["plan"]["map_entries"]))
    });
    let kinds: Vec<String> = v["typical"]["incremental"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for kind in &kinds {
        row(
            &mut t,
            &format!("incremental {kind} (ms, p50 / p99)"),
            &|x| {
                let w = &x["incremental"][kind.as_str()]["wall"];
                format!("{} / {}", num(f(&w["p50_ms"])), num(f(&w["p99_ms"])))
            },
        );
    }
    s.tables.push(t);
    let worst = |values: Vec<f64>| values.into_iter().filter(|x| !x.is_nan()).reduce(f64::max);
    let full = worst(
        SCENARIOS
            .iter()
            .map(|sc| f(&v[*sc]["full_compile_wall_ms"]["median"]))
            .collect(),
    );
    s.targets.push(Target::new(
        "full compile < 1 s",
        full.map_or(Verdict::NotMeasured, |ms| Verdict::from_bool(ms < 1000.0)),
        format!("slowest scenario {} ms", full.map_or("n/a".into(), num)),
    ));
    let mut p99s: Vec<(String, f64)> = Vec::new();
    for sc in SCENARIOS {
        for k in &kinds {
            let p99 = f(&v[sc]["incremental"][k.as_str()]["wall"]["p99_ms"]);
            p99s.push((format!("{sc} {k}"), p99));
        }
    }
    let worst_inc = p99s
        .iter()
        .filter(|(_, p)| !p.is_nan())
        .max_by(|a, b| a.1.total_cmp(&b.1));
    s.targets.push(Target::new(
        "incremental update < 5 ms (p99)",
        worst_inc.map_or(Verdict::NotMeasured, |(_, p)| Verdict::from_bool(*p < 5.0)),
        worst_inc.map_or("n/a".into(), |(k, p)| {
            format!("worst p99 {} ms ({k})", num(*p))
        }),
    ));
    s.data = json!({"available": true, "scale": v});
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_line_is_found_after_other_output() {
        let pretty = "building...\n{\n  \"full_ms\": 1.5,\n  \"incremental\": {}\n}\n";
        assert_eq!(parse_output(pretty).unwrap()["full_ms"], 1.5);
        let out = "building...\n{\"full_ms\": 420.5, \"incremental\": {\"pod_add\": {\"p50_ms\": 0.3, \"p99_ms\": 1.2}}}\n";
        let v = parse_output(out).unwrap();
        assert_eq!(v["full_ms"], 420.5);
        assert!(parse_output("no json here\n[1,2]\n").is_none());
    }
}
