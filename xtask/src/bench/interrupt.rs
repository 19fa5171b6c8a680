//! Ctrl-C and SIGTERM turn into an error at the next check, so the benchmark unwinds
//! through its guards (namespaces, rulesets inside them, pins, child processes) instead of
//! dying with them in place.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails once a stop was requested.
pub fn check() -> anyhow::Result<()> {
    if requested() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
