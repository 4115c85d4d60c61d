//! Time spent per op, forward and backward, when the environment sets MULTITOKEN_PROFILE=1.
//! `multitoken bench train` prints the table; it costs nothing when off.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

#[derive(Default, Clone, Copy)]
struct OpTimes {
    forward: Duration,
    backward: Duration,
    calls: u64,
}

static TIMES: Mutex<BTreeMap<&'static str, OpTimes>> = Mutex::new(BTreeMap::new());

/// Whether the environment sets `MULTITOKEN_PROFILE=1` (read once).
pub fn profiling_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("MULTITOKEN_PROFILE").is_ok_and(|v| v == "1"))
}

pub(super) fn add_forward(op: &'static str, elapsed: Duration) {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let entry = times.entry(op).or_default();
    entry.forward += elapsed;
    entry.calls += 1;
}

pub(super) fn add_backward(op: &'static str, elapsed: Duration) {
    TIMES.lock().unwrap_or_else(|e| e.into_inner()).entry(op).or_default().backward += elapsed;
}

/// A table of the accumulated times, largest first, and resets them.
pub fn profile_report() -> String {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<(&str, OpTimes)> = times.iter().map(|(k, v)| (*k, *v)).collect();
    times.clear();
    rows.sort_by_key(|(_, t)| std::cmp::Reverse(t.forward + t.backward));
    let total: f64 = rows.iter().map(|(_, t)| (t.forward + t.backward).as_secs_f64()).sum();
    let mut out = format!("{:<16} {:>8} {:>12} {:>12} {:>7}\n", "op", "calls", "forward ms", "backward ms", "share");
    for (op, t) in rows {
        let (f, b) = (t.forward.as_secs_f64() * 1e3, t.backward.as_secs_f64() * 1e3);
        out += &format!("{op:<16} {:>8} {f:>12.1} {b:>12.1} {:>6.1}%\n", t.calls, 100.0 * (f + b) / 1e3 / total.max(1e-12));
    }
    out
}
