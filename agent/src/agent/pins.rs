//! The agent's side of keeping its pins (see `dataplane::repin`): on every heartbeat the
//! dataplane puts back missing pins; what it cannot repair is published in the status
//! (`pin_problems`), the `pin_problems` metric and `/readyz`, and logged as an error.
//! Enforcement never depends on it: the agent's fds keep programs, links and maps alive.

use super::metrics::Health;
use super::status::Status;
use crate::dataplane::Dataplane;

/// Checks and repairs the pins; true when the status changed and must be published.
pub(super) fn check(dp: &mut Dataplane, status: &mut Status, health: &Health) -> bool {
    let report = dp.check_pins();
    if let Some(at) = &report.mounted {
        tracing::warn!(at = %at.display(), "bpffs was not mounted any more; mounted it again");
    }
    if !report.repinned.is_empty() {
        tracing::warn!(
            pins = report.repinned.len(),
            first = %report.repinned[0].display(),
            "pins had been removed; pinned the agent's objects again"
        );
    }
    if report.problems == status.pin_problems {
        return false;
    }
    for problem in &report.problems {
        tracing::error!(%problem, "pins cannot be repaired; enforcement continues");
    }
    if report.problems.is_empty() {
        tracing::info!("pins repaired");
    }
    health.set_pins_broken(!report.problems.is_empty());
    status.pin_problems = report.problems;
    true
}
