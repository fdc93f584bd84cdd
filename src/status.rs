//! What a runner is doing, published on a watch channel: for readiness
//! probes, status pages and tests that wait on "tick done" or "session
//! renewed" instead of sleeping.

use std::time::SystemTime;

use tokio::sync::watch;

use crate::store::SessionId;
use crate::task::TaskId;

/// A snapshot of one runner. Counters only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerStatus {
    /// The runner's name.
    pub name: String,
    /// The session the runner may use now: started, renewed within its
    /// lease, not fenced. `None` while starting, fenced, lost or stopped.
    pub session: Option<SessionId>,
    /// Sessions started, including replacements of lost ones.
    pub session_starts: u64,
    /// Sessions the database reported lost (SL001: expired, ended or
    /// reclaimed); each is replaced by a new session.
    pub session_losses: u64,
    /// Times this process fenced its session because no renewal succeeded
    /// within `ttl - safety_margin`. A fence is lifted if a later heartbeat
    /// succeeds, and becomes a loss if it reports SL001.
    pub fences: u64,
    /// Heartbeats that succeeded.
    pub heartbeats: u64,
    /// Heartbeats that failed.
    pub heartbeat_failures: u64,
    /// Ticks completed.
    pub ticks: u64,
    /// Tasks handed to the workers.
    pub fetched: u64,
    /// Tasks the database confirmed finished for this runner (a finish
    /// whose reply was lost is not counted: the runner cannot know).
    pub finished: u64,
    /// Tasks that failed, panicked, timed out or did not scan.
    pub failed: u64,
    /// Completed tasks the database did not finish because the session no
    /// longer held them (lost, or the row changed outside session-lock).
    pub rejected: u64,
    /// Tasks a batch did not complete that were given back to be retried
    /// after their backoff ([`FailedTasks::GiveBack`](crate::FailedTasks)).
    pub given_back: u64,
    /// Tasks the session held at its last successful get_work (a failed
    /// call leaves the figure as it was).
    pub tasks_held: usize,
    /// Tasks whose runs outlived the batch timeout and every attempt to
    /// stop them (a Tasker blocking its thread). While any is running the
    /// session is not renewed: its lease expires and its tasks move on.
    pub stuck_tasks: u64,
    /// Tasks still running when `Stop` finished: their session was left to
    /// expire rather than ended, so that no other session starts them while
    /// they run.
    pub left_at_stop: Vec<TaskId>,
    /// Times the DbFinder found another database than the session's: the
    /// session was dropped there and a new one started.
    pub database_moves: u64,
    /// Whether new tasks wake the runner through LISTEN now. False when the
    /// task type names no channel, `listen` is off, the listen connection
    /// is down (it is retried), or the URL leads to a transaction pooler
    /// and the store has no direct URL: the runner then relies on its tick.
    pub listening: bool,
    /// Whether the runner waits `quiet_tick` between ticks: at its last
    /// tick the task table had no open task, and it listens for new ones.
    pub quiet: bool,
    /// When the last tick completed.
    pub last_tick: Option<SystemTime>,
    /// Workers restarted after a panic or a timeout.
    pub worker_restarts: u64,
    /// Actors restarted by the supervisor.
    pub actor_restarts: u64,
    /// The last error seen, for operators.
    pub last_error: Option<String>,
    /// Whether the runner has stopped.
    pub stopped: bool,
}

impl RunnerStatus {
    /// Whether the runner holds a live session it may use.
    pub fn is_ready(&self) -> bool {
        self.session.is_some() && !self.stopped
    }
}

/// The publishing side, shared by a runner's actors.
pub(crate) type StatusTx = watch::Sender<RunnerStatus>;
