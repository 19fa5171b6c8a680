//! Reading the per-CPU verdict counters into rows a person or a script can use.

use palisade_common::{counter_index, reason_is_drop, DIRECTIONS, MAX_ENDPOINTS, REASONS};

use super::{DataplaneError, Maps};

/// One non-zero counter, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CounterRow {
    pub slot: u32,
    pub direction: &'static str,
    pub reason: &'static str,
    pub drop: bool,
    pub packets: u64,
    pub bytes: u64,
}

pub fn direction_name(dir: u8) -> &'static str {
    if dir == palisade_common::DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// Every non-zero counter of the given slots (all slots when `slots` is None).
pub fn read_counters(
    maps: &Maps,
    slots: Option<&[u32]>,
) -> Result<Vec<CounterRow>, DataplaneError> {
    let all: Vec<u32> = match slots {
        Some(s) => s.to_vec(),
        None => (0..MAX_ENDPOINTS).collect(),
    };
    let mut rows = Vec::new();
    for slot in all {
        for dir in 0..DIRECTIONS as u8 {
            for reason in 0..REASONS {
                let values = maps
                    .counters
                    .get(&counter_index(slot, dir, reason), 0)
                    .map_err(|e| DataplaneError::Map {
                        name: palisade_common::maps::COUNTERS,
                        source: Box::new(e),
                    })?;
                let (packets, bytes) = values
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                if packets > 0 {
                    rows.push(CounterRow {
                        slot,
                        direction: direction_name(dir),
                        reason: palisade_common::REASON_NAMES[reason as usize],
                        drop: reason_is_drop(reason),
                        packets,
                        bytes,
                    });
                }
            }
        }
    }
    Ok(rows)
}
