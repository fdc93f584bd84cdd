//! The run's clock: fault windows are kept in wall-clock seconds since the
//! epoch, which is the database's `now()` on this same host, so they compare
//! directly with the timestamps the checks read back; every log line carries
//! both the time since the run started and the time of day.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock seconds since the epoch: the database's `now()` on this same host.
pub(super) fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) start: Instant,
}

impl Clock {
    /// Prints one line of the fault log (seen with `--nocapture`).
    pub(super) fn log(&self, msg: impl std::fmt::Display) {
        let now = epoch_now();
        let day = now.rem_euclid(86_400.0);
        let (h, m, s) = ((day / 3600.0) as u32, (day / 60.0) as u32 % 60, day % 60.0);
        eprintln!(
            "[chaos {:8.3}s {h:02}:{m:02}:{s:06.3}Z] {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }
}
