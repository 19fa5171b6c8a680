//! Summaries of repeated measurements: median with min–max, percentiles, ratios.

use serde_json::{json, Value};

/// Median, min and max of a set of runs, plus the runs themselves.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    /// `None` for an empty set: a figure that was not measured must not look like zero.
    pub fn of(runs: &[f64]) -> Option<Summary> {
        if runs.is_empty() {
            return None;
        }
        let mut sorted = runs.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            median: percentile_sorted(&sorted, 50.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            runs: runs.to_vec(),
        })
    }

    pub fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "runs": self.runs})
    }
}

/// Percentile `p` (0–100) of `values` by linear interpolation between closest ranks.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(percentile_sorted(&sorted, p))
}

fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// `value / base`, or NaN when the base is missing or zero (shown as "n/a").
pub fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sets() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn ratio_of_missing_base_is_not_a_number() {
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert!(ratio(3.0, 0.0).is_nan());
    }
}
