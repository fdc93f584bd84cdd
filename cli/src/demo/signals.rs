//! The ways a user ends the demo: SIGINT (Ctrl-C), SIGTERM and SIGHUP each
//! end it cleanly, its runners killed and its server removed, instead of
//! leaving them behind.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT, SIGTERM and SIGHUP: each ends the demo cleanly.
pub(super) struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub(super) fn new() -> Result<Signals, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("installing a signal handler: {e}"));
        Ok(Signals {
            int: sig(SignalKind::interrupt())?,
            term: sig(SignalKind::terminate())?,
            hup: sig(SignalKind::hangup())?,
        })
    }

    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
