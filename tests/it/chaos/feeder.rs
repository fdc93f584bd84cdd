//! The feeder: while faults are injected, at least [`BACKLOG`] tasks wait
//! open, so that every runner always holds its full share and every fault
//! strikes runners with work in hand. Every 100 ms it counts the open tasks
//! and, below the backlog, tops them up to twice the backlog; through an
//! outage it simply tries again.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::OPEN;
use super::conn::Conn;

/// How many open tasks the feeder keeps waiting while faults are injected.
const BACKLOG: i64 = 30;

pub(super) struct Feeder {
    stop: watch::Sender<bool>,
    task: JoinHandle<u64>,
}

impl Feeder {
    pub(super) fn start(url: String) -> Feeder {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conn = Conn::new(&url);
            let mut inserts = 0;
            while !*stopped.borrow() {
                if let Ok(rows) = conn.query(OPEN, &[]).await {
                    let open: i64 = rows[0].get(0);
                    if open < BACKLOG {
                        let n = 2 * BACKLOG - open;
                        if conn
                            .query(
                                "INSERT INTO example_task (payload)
                                 SELECT 'chaos ' || g FROM generate_series(1, $1::bigint) g",
                                &[&n],
                            )
                            .await
                            .is_ok()
                        {
                            inserts += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            inserts
        });
        Feeder { stop, task }
    }

    /// Stops it; returns how many insert statements it made.
    pub(super) async fn stop(self) -> u64 {
        self.stop.send_replace(true);
        self.task.await.expect("feeder")
    }
}
