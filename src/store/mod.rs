//! The database boundary: the port the runtime calls, [`Database`] (found
//! anew through a [`DbFinder`] on every tick, so the database may move),
//! and its PostgreSQL adapter, [`PgStore`].
//!
//! Actors never build SQL. Every method of [`Database`] calls one SQL
//! function of the protocol and is named like it (`start_session`,
//! `bump_session`, `get_work`, ...), so one grep finds both sides.

mod for_runner;
mod interval;
mod pool;
mod pooler;
mod postgres;
mod token;

use std::future::Future;
use std::time::Duration;

pub(crate) use for_runner::ForRunner;
pub(crate) use interval::Interval;
pub use pool::ConnectError;
pub(crate) use postgres::local_host_name;
pub use postgres::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVES_IDLE, DEFAULT_KEEPALIVES_INTERVAL,
    DEFAULT_KEEPALIVES_RETRIES, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT,
    DEFAULT_TCP_USER_TIMEOUT, PgStore, StoreClient, StoreOptions, connect_one, connect_one_with,
};
pub use token::SessionToken;

use crate::error::{Result, ScanError};
use crate::task::{ScanTask, TaskId};

/// A session's id: the primary key of its `session_lock.session` row.
pub type SessionId = i64;

/// A session as its process holds it: the id, and the token every call for
/// it must present (so that nobody else, even with the same database role,
/// can renew, end or finish for it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    /// The session's id.
    pub id: SessionId,
    /// The session's secret.
    pub token: SessionToken,
}

/// Which database a session or a task id belongs to: ids are numbered from
/// 1 in every database, so they mean nothing without it. Read from
/// `session_lock.database_identity()`: the cluster's system identifier
/// (which a primary shares with its streaming standbys, so a failover keeps
/// it) and the database's oid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatabaseId(pub String);

impl std::fmt::Display for DatabaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a new session records about itself (`session_lock.start_session`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStart {
    /// The runner's name: sessions of one name share its tasks.
    pub name: String,
    /// How long the lease lasts without a heartbeat.
    pub ttl: Duration,
    /// The most tasks the session holds (the runner's `max_tasks`), and its
    /// weight in the fair shares of its name.
    pub capacity: u32,
    /// The host of the process, for operators.
    pub host: String,
    /// The process id, for operators.
    pub pid: u32,
}

impl SessionStart {
    /// A session for runner `name` with lease `ttl` and room for `capacity`
    /// tasks, recording this process's host name and pid.
    pub fn new(name: impl Into<String>, ttl: Duration, capacity: u32) -> Self {
        SessionStart {
            name: name.into(),
            ttl,
            capacity,
            host: local_host_name(),
            pid: std::process::id(),
        }
    }
}

/// The arguments of one `get_work` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetWork<'a> {
    /// The calling session.
    pub session: &'a Session,
    /// The previous batch's completed tasks, finished first (fenced, in the
    /// same transaction), so that a busy runner needs one call per tick.
    pub finished: &'a [TaskId],
    /// Tasks whose runs have not returned in the caller's process: never
    /// given back as surplus.
    pub running: &'a [TaskId],
    /// Whether to sweep this session's stretch of session ids for orphaned
    /// tasks (held by no live session). The runner does it once per tick
    /// interval, not on every draining call.
    pub sweep: bool,
    /// Every task the session may hold: the ids the session's previous
    /// answer named (those in `finished` may be left out: the ones the call
    /// does not finish are looked up too). get_work then looks these up by
    /// key (plus what it picks up) instead of reading the session's whole
    /// stretch of the open index, whose dead entries a snapshot held
    /// elsewhere keeps. Only a session's own get_work gives it tasks, so a
    /// caller that read every answer since knows them all; `None` after any
    /// call whose answer was not read (an error, a timeout, a restart), and
    /// the call reads the range. A held task missing from `Some` would be
    /// neither counted nor returned until a call with `None`.
    pub known: Option<&'a [TaskId]>,
}

impl<'a> GetWork<'a> {
    /// A plain `get_work`: nothing to finish, nothing running, with a sweep.
    pub fn new(session: &'a Session) -> GetWork<'a> {
        GetWork {
            session,
            finished: &[],
            running: &[],
            sweep: true,
            known: None,
        }
    }
}

/// What a `get_work` returned.
#[derive(Debug)]
pub struct Work<T> {
    /// Those of [`GetWork::finished`] the database finished: the session
    /// still held them and they were open. The others are still held (a
    /// row someone else had locked: try again next call) or gone (moved,
    /// changed outside session-lock).
    pub finished: Vec<TaskId>,
    /// The tasks the session holds now, every one that scanned.
    pub tasks: Vec<T>,
    /// Rows that did not scan. Their tasks stay assigned to the session.
    pub unreadable: Vec<ScanError>,
}

/// What the task table's `stats` reported: what no tick sees, recorded as
/// gauges every
/// [`stats_interval`](crate::RunnerConfigBuilder::stats_interval).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskStats {
    /// The session's open tasks per group of a grouped table, the groups
    /// holding most first, as many groups as asked for (`None`: the tasks
    /// whose group key is NULL). Empty for an ungrouped table.
    pub held_by_group: Vec<(Option<String>, u64)>,
    /// The session's open tasks in the groups not named.
    pub held_in_other_groups: u64,
    /// The table's quarantined tasks: picked up `max_attempts` times
    /// without finishing (`session-lock retry` releases them).
    pub quarantined: u64,
    /// The table's free open tasks picked up at least twice, but fewer than
    /// `max_attempts` times, without finishing: each waits out its backoff
    /// and is picked up alone by its session.
    pub suspect: u64,
}

/// The calls a runner makes to the database (the seed's `Database`).
///
/// [`PgStore`] implements it over Postgres; implement it yourself to wrap
/// one (for example to add metrics or routing).
pub trait Database: Send + Sync + 'static {
    /// The database's identity. A runner checks it before acting on a
    /// session, and starts over when it changed: a session or task id of
    /// one database must never be used in another.
    fn database_identity(&self) -> impl Future<Output = Result<DatabaseId>> + Send;
    /// `session_lock.start_session`: starts a session and returns it.
    fn start_session(&self, params: &SessionStart) -> impl Future<Output = Result<Session>> + Send;
    /// `session_lock.bump_session`, the heartbeat: extends a live session's
    /// lease. [`Error::SessionLost`](crate::Error::SessionLost) when it is
    /// not live. Must not wait behind the other calls (a store gives it
    /// connections of its own).
    fn bump_session(
        &self,
        session: &Session,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// `session_lock.end_session`: ends a session so that its tasks are
    /// free on the others' next tick. Returns false when it was already
    /// over. Idempotent.
    fn end_session(&self, session: &Session) -> impl Future<Output = Result<bool>> + Send;
    /// The task table's `get_work`: finishes [`GetWork::finished`], moves
    /// the session to its fair share and returns its tasks.
    /// [`Error::SessionLost`](crate::Error::SessionLost) when it is not live.
    fn get_work<T: ScanTask>(
        &self,
        params: GetWork<'_>,
    ) -> impl Future<Output = Result<Work<T>>> + Send;
    /// The task table's `finish_tasks`: finishes those of `ids` the session
    /// still holds and returns them.
    /// [`Error::SessionLost`](crate::Error::SessionLost) when it is not
    /// live: nothing is finished then.
    fn finish_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<TaskId>>> + Send;
    /// The task table's `fail_tasks`: gives back those of `ids` the session
    /// still holds, each to wait out its retry backoff before any session
    /// picks it up again (its next pickup counts another attempt), and
    /// returns them. [`Error::SessionLost`](crate::Error::SessionLost) when
    /// the session is not live: nothing is given back then.
    fn fail_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<TaskId>>> + Send;
    /// The task table's `stats`: the session's held tasks per group (at
    /// most `groups` groups named) and the table's quarantined and suspect
    /// tasks. `None` when not supported, the default: the runner then
    /// records no such gauges.
    fn task_stats<T: ScanTask>(
        &self,
        session: SessionId,
        groups: u32,
    ) -> impl Future<Output = Result<Option<TaskStats>>> + Send {
        let _ = (session, groups);
        async { Ok(None) }
    }
    /// The task table's `quiet`: whether the session's runner, listening
    /// since before it asked, may wait for a notification instead of its
    /// next tick (the lease is live and no open task could be picked up
    /// without an INSERT first). `false` when not supported, the default:
    /// the runner then ticks as usual.
    fn quiet<T: ScanTask>(&self, session: &Session) -> impl Future<Output = Result<bool>> + Send {
        let _ = session;
        async { Ok(false) }
    }
    /// `session_lock.reap_sessions`: deletes sessions reclaimed longer than
    /// `older_than` ago; returns how many.
    fn reap_sessions(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;
    /// Listens on a notification channel on a connection of its own, so
    /// that new tasks wake an idle runner. `None` when not supported, the
    /// default: the runner then relies on its tick alone.
    fn listen(
        &self,
        channel: &'static str,
    ) -> impl Future<Output = Result<Option<Listener>>> + Send {
        let _ = channel;
        async { Ok(None) }
    }
    /// A handle on this database for one runner's own actors, called on the
    /// thread they run on (the runner's control arbiter, which ends with
    /// the runner): a store may give them connections opened and driven
    /// there, so that no call of theirs crosses threads to its connection.
    /// Called on such a handle, returns another handle on it. `None`, the
    /// default: the runner uses this handle.
    fn for_runner(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
    /// Whether `other` is this handle or a clone of it, so that its
    /// [`for_runner`](Self::for_runner) handle serves both. The default:
    /// never.
    fn same_handle(&self, other: &Self) -> bool
    where
        Self: Sized,
    {
        let _ = other;
        false
    }
}

/// Notifications from one LISTEN connection. Dropping it closes the
/// connection.
#[derive(Debug)]
pub struct Listener {
    /// The LISTEN connection, kept open while the listener lives.
    _client: Option<tokio_postgres::Client>,
    rx: tokio::sync::mpsc::Receiver<()>,
}

impl Listener {
    pub(crate) fn new(
        client: Option<tokio_postgres::Client>,
        rx: tokio::sync::mpsc::Receiver<()>,
    ) -> Self {
        Listener {
            _client: client,
            rx,
        }
    }

    /// Waits for the next notification; bursts are coalesced into one.
    /// Returns false when the connection has closed.
    pub async fn notified(&mut self) -> bool {
        self.rx.recv().await.is_some()
    }
}

/// Finds the current [`Database`] (the seed's `DBFinder`): called on every
/// tick, so the database can move between ticks.
pub trait DbFinder: Send + Sync + 'static {
    /// The database type found.
    type Db: Database;
    /// Returns the database to use for this tick.
    fn find(&self) -> impl Future<Output = Result<Self::Db>> + Send;
}
