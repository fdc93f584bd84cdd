//! Failover probes: one measurement each, taken on a connection of the
//! probe's own so that it runs while the fault that started it is still
//! being held. A probe counts from the moment the fault struck until the
//! victim's session holds no open task (but those a foreign transaction
//! had locked); it gives up, and says so, after [`GUARD`].

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::conn::Conn;
use super::{GUARD, POLL};

/// The open tasks a session holds, but those of `$2`.
const HELD_BY_BUT: &str = "SELECT count(*) FROM example_task
     WHERE session_id = $1 AND finished_at IS NULL AND id <> ALL ($2::bigint[])";

/// One failover measurement.
#[derive(Debug)]
pub(super) struct Failover {
    pub(super) what: String,
    pub(super) session: i64,
    /// On the probe's first answer; -1 if it never had one.
    pub(super) held_at_fault: i64,
    /// `None`: still holding after [`GUARD`].
    pub(super) took: Option<Duration>,
}

/// Polls until `session` holds no open task but those of `except`;
/// measures from `at`.
pub(super) fn spawn_probe(
    url: String,
    what: String,
    session: i64,
    except: Vec<i64>,
    at: Instant,
) -> JoinHandle<Failover> {
    tokio::spawn(async move {
        let mut conn = Conn::new(&url);
        let mut held_at_fault = None;
        loop {
            if let Ok(rows) = conn.query(HELD_BY_BUT, &[&session, &except]).await {
                let held: i64 = rows[0].get(0);
                held_at_fault.get_or_insert(held);
                if held == 0 {
                    return Failover {
                        what,
                        session,
                        held_at_fault: held_at_fault.unwrap_or(0),
                        took: Some(at.elapsed()),
                    };
                }
            }
            if at.elapsed() > GUARD {
                return Failover {
                    what,
                    session,
                    held_at_fault: held_at_fault.unwrap_or(-1),
                    took: None,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    })
}
