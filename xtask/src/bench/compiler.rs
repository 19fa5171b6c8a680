//! Part 4: the policy compiler at 10k pods / 2k policies, through the compiler crate's
//! own scale example (`agent/policy/examples/scale/`), which prints JSON:
//! `{"full_ms", "incremental": {"pod_add"|"label_change"|"policy_change": {"p50_ms",
//! "p99_ms"}}, "peak_heap_bytes", "identities", "map_entries"}`.

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
        "The compiler crate's scale example builds a synthetic cluster and times a full \
         compile and single-object incremental changes, and reports its peak heap. \
         Output of `{COMMAND}` in this run:"
    ));
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    let mut t = Table::new("", &["measure", "value"]);
    t.row(vec!["full compile (ms)".into(), num(f(&v["full_ms"]))]);
    let mut worst_p99 = f64::NAN;
    let mut kinds = Vec::new();
    if let Some(inc) = v["incremental"].as_object() {
        for (kind, m) in inc {
            let (p50, p99) = (f(&m["p50_ms"]), f(&m["p99_ms"]));
            t.row(vec![
                format!("incremental {kind} (ms, p50 / p99)"),
                format!("{} / {}", num(p50), num(p99)),
            ]);
            worst_p99 = if worst_p99.is_nan() {
                p99
            } else {
                worst_p99.max(p99)
            };
            kinds.push(format!("{kind} {}", num(p99)));
        }
    }
    t.row(vec![
        "peak heap (MiB)".into(),
        num(f(&v["peak_heap_bytes"]) / 1048576.0),
    ]);
    t.row(vec!["identities".into(), num(f(&v["identities"]))]);
    t.row(vec!["map entries".into(), num(f(&v["map_entries"]))]);
    s.tables.push(t);
    let full = f(&v["full_ms"]);
    s.targets.push(Target::new(
        "full compile < 1 s",
        if full.is_nan() {
            Verdict::NotMeasured
        } else {
            Verdict::from_bool(full < 1000.0)
        },
        format!("{} ms", num(full)),
    ));
    s.targets.push(Target::new(
        "incremental update < 5 ms (p99)",
        if worst_p99.is_nan() {
            Verdict::NotMeasured
        } else {
            Verdict::from_bool(worst_p99 < 5.0)
        },
        format!("p99 ms: {}", kinds.join(", ")),
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
