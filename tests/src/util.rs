use std::time::{Duration, Instant};

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
///
/// The back-off starts at 1 ms because most kernel state we wait for (links
/// vanishing, addresses leaving `tentative`) settles within a few ms, and caps
/// at 50 ms so a slow condition does not burn a core.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
