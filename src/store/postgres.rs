//! [`PgStore`], the [`Database`] over PostgreSQL: the protocol's SQL
//! functions called over tokio-postgres, on pools of their own. Heartbeats
//! and session starts use the control pool, which nothing else draws from,
//! so no slow get_work and no query of the application's can make a renewal
//! wait; get_work and finish_tasks use the work pool; the application's own
//! queries ([`PgStore::client`]) a third. A runner's actors use a handle of
//! their own ([`Database::for_runner`]) whose control and work pools are
//! driven on their thread. Every call is bounded on the client, and a
//! connection whose call was abandoned is never reused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::interval::Interval;
use super::pool::{ConnectErrors, IdentityCell, Manager, bounded_connect, is_read_only};
use super::pooler::{PoolerCell, own_backend, refused_options};
use super::{
    Database, DatabaseId, DbFinder, GetWork, Listener, Session, SessionId, SessionStart, TaskStats,
    Work,
};
use crate::error::{Error, Result};
use crate::task::{ScanTask, TaskId};
use crate::tls::{Tls, TlsMode};

/// Default size of the work pool (get_work, finish_tasks) and of the pool
/// for the application's own queries.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// Size of the control pool (session starts, heartbeats, ends).
const CONTROL_POOL_SIZE: u32 = 2;
/// Default time allowed to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default server-side limit on any one statement.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time unacknowledged data may sit on the socket before the kernel
/// drops the connection (`TCP_USER_TIMEOUT`).
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time before the first TCP keepalive probe.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
/// Default time between TCP keepalive probes.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(2);
/// Default number of unanswered keepalive probes before the connection is dropped.
pub const DEFAULT_KEEPALIVES_RETRIES: u32 = 3;

const START_SESSION: &str =
    "SELECT session_id, session_token FROM session_lock.start_session($1, $2, $3, $4, $5)";
const BUMP_SESSION: &str = "SELECT session_lock.bump_session($1, $2, $3)";
const END_SESSION: &str = "SELECT session_lock.end_session($1, $2)";
const REAP_SESSIONS: &str = "SELECT session_lock.reap_sessions($1)";
const DATABASE_IDENTITY: &str = "SELECT session_lock.database_identity()";

/// Connection and pool settings for [`PgStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Encryption and server verification. Defaults to [`TlsMode::Prefer`],
    /// as libpq; [`PgStore::connect`] takes it from the URL's `sslmode`.
    pub tls: TlsMode,
    /// Most connections in each pool: the work pool and the application's
    /// ([`PgStore::client`]); each runner has a work pool of this size of
    /// its own, and a control pool of two (see [`Database::for_runner`]).
    /// Connections open as calls need them. Defaults to
    /// [`DEFAULT_POOL_SIZE`].
    pub pool_size: u32,
    /// Time allowed to open a connection, and to wait for one from the pool.
    /// Defaults to [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Server-side limit on any one statement. Defaults to
    /// [`DEFAULT_STATEMENT_TIMEOUT`].
    pub statement_timeout: Duration,
    /// Client-side limit on any one call, for when the server never sees
    /// the statement (a partition that a proxy acknowledges defeats TCP
    /// timeouts). A connection whose call timed out is discarded. Defaults
    /// to the statement timeout plus 5 seconds.
    pub call_timeout: Duration,
    /// `TCP_USER_TIMEOUT` of each connection. Defaults to
    /// [`DEFAULT_TCP_USER_TIMEOUT`].
    pub tcp_user_timeout: Duration,
    /// TCP keepalive idle time. Defaults to [`DEFAULT_KEEPALIVES_IDLE`].
    pub keepalives_idle: Duration,
    /// TCP keepalive probe interval. Defaults to [`DEFAULT_KEEPALIVES_INTERVAL`].
    pub keepalives_interval: Duration,
    /// TCP keepalive probes before giving up. Defaults to [`DEFAULT_KEEPALIVES_RETRIES`].
    pub keepalives_retries: u32,
    /// Whether the URL leads to a transaction pooler (PgBouncer with
    /// `pool_mode = transaction`), where no session state outlives a
    /// transaction. Defaults to false; a pooler that refuses the startup
    /// parameter `options`, as PgBouncer's default configuration does, is
    /// recognised on the first connect anyway. Behind a pooler the store
    /// connects without `options` (the statement timeout is then the call
    /// timeout alone, unless the role sets one) and LISTENs only through
    /// [`direct`](Self::direct).
    pub pooler: bool,
    /// A direct connection to the same database, bypassing the pooler, for
    /// what needs a session of its own: LISTEN. Its TLS is the store's
    /// [`tls`](Self::tls); [`with_direct_url`](Self::with_direct_url) reads
    /// one from a URL. Defaults to none: LISTEN goes through the URL, or,
    /// behind a pooler, not at all (the runner then relies on its tick, and
    /// says so).
    pub direct: Option<tokio_postgres::Config>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            tls: TlsMode::default(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            call_timeout: DEFAULT_STATEMENT_TIMEOUT + Duration::from_secs(5),
            tcp_user_timeout: DEFAULT_TCP_USER_TIMEOUT,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            keepalives_interval: DEFAULT_KEEPALIVES_INTERVAL,
            keepalives_retries: DEFAULT_KEEPALIVES_RETRIES,
            pooler: false,
            direct: None,
        }
    }
}

impl StoreOptions {
    /// Sets [`direct`](Self::direct) from a URL (its `sslmode` is not
    /// used: the store's [`tls`](Self::tls) applies).
    pub fn with_direct_url(mut self, url: &str) -> Result<Self> {
        let (config, _) = crate::tls::parse_url(url)?;
        self.direct = Some(config);
        Ok(self)
    }

    /// Applies the timeouts and keepalives to a connection config, so that a
    /// partitioned database fails a call in seconds instead of hanging on the
    /// kernel's defaults (minutes). A statement timeout already present in
    /// the config's `options` is kept.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        config
            .connect_timeout(self.connect_timeout)
            .tcp_user_timeout(self.tcp_user_timeout)
            .keepalives(true)
            .keepalives_idle(self.keepalives_idle)
            .keepalives_interval(self.keepalives_interval)
            .keepalives_retries(self.keepalives_retries);
        let options = config.get_options().unwrap_or("").to_owned();
        if !options.contains("statement_timeout") {
            let timeout = format!(
                "-c statement_timeout={}",
                self.statement_timeout.as_millis()
            );
            let joined = if options.is_empty() {
                timeout
            } else {
                format!("{options} {timeout}")
            };
            config.options(joined);
        }
        if config.get_application_name().is_none() {
            config.application_name("session-lock");
        }
    }
}

/// The [`Database`] over Postgres: bb8 pools of tokio-postgres connections
/// calling the session-lock SQL functions. Cheap to clone; clones share the
/// pools.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Session starts, heartbeats and ends: nothing else waits in it.
    control: Pool<Manager>,
    /// get_work, finish_tasks, reap_sessions.
    work: Pool<Manager>,
    /// The application's own queries.
    user: Pool<Manager>,
    /// The identity of the database the latest new connection reached.
    identity: Arc<IdentityCell>,
    /// For connections outside the pools (LISTEN needs one of its own).
    config: tokio_postgres::Config,
    /// Where LISTEN goes when the URL leads to a pooler.
    direct: Option<tokio_postgres::Config>,
    /// Whether the URL leads to a transaction pooler.
    pooler: Arc<PoolerCell>,
    /// Whether the log said that LISTEN is off behind the pooler.
    told_no_listen: AtomicBool,
    tls: Tls,
    connect_errors: ConnectErrors,
    call_timeout: Duration,
    pool_size: u32,
    connect_timeout: Duration,
    /// A runner's handle ([`Database::for_runner`]): its control and work
    /// pools are its own, their connections driven on the runner's thread.
    for_runner: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("work", &self.inner.work)
            .field("control", &self.inner.control)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A connection from the pool [`PgStore::client`] hands out for the
/// application's own queries; it derefs to a tokio-postgres `Client` and
/// goes back to that pool when dropped.
pub struct StoreClient<'a>(PooledConnection<'a, Manager>);

impl std::fmt::Debug for StoreClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient").finish_non_exhaustive()
    }
}

impl std::ops::Deref for StoreClient<'_> {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        &self.0
    }
}

/// What a store's pools are made of.
struct Pools<'a> {
    config: &'a tokio_postgres::Config,
    tls: &'a Tls,
    connect_timeout: Duration,
    identity: &'a Arc<IdentityCell>,
    pooler: &'a Arc<PoolerCell>,
    connect_errors: &'a ConnectErrors,
}

impl Pools<'_> {
    /// A pool of at most `size` connections, opened and driven on the
    /// runtime this is called on; `identified`: each new connection records
    /// the database it reached (the protocol's pools).
    fn pool(&self, size: u32, identified: bool, test_on_check_out: bool) -> Pool<Manager> {
        Pool::builder()
            .error_sink(Box::new(self.connect_errors.clone()))
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(self.connect_timeout)
            // The protocol's pools find a broken connection when a call
            // fails, and bb8 then drops it: testing every checkout would
            // add a round trip to every call. The application's pool
            // tests, since its users' calls are not guarded.
            .test_on_check_out(test_on_check_out)
            // A failed connect is reported (see ConnectErrors) rather
            // than retried silently until the caller's wait times out.
            .retry_connection(false)
            .build_unchecked(Manager::new(
                self.config.clone(),
                self.tls.clone(),
                self.connect_timeout,
                identified.then(|| self.identity.clone()),
                self.pooler.clone(),
            ))
    }
}

impl PgStore {
    /// Connects to the database at `url` (a libpq-style URL or key=value
    /// string) with [`StoreOptions::default`] and the TLS mode of its
    /// `sslmode` (see [`tls`](crate::tls): `verify-full` with `sslrootcert`
    /// checks the server).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_direct(url, None).await
    }

    /// [`connect`](Self::connect), and when `direct_url` is given, LISTEN
    /// on it ([`StoreOptions::with_direct_url`]): for a `url` that goes
    /// through PgBouncer in transaction mode, `direct_url` reaches the same
    /// database without it.
    pub async fn connect_with_direct(url: &str, direct_url: Option<&str>) -> Result<Self> {
        let (config, tls) = crate::tls::parse_url(url)?;
        let mut options = StoreOptions {
            tls,
            ..StoreOptions::default()
        };
        if let Some(direct) = direct_url {
            options = options.with_direct_url(direct)?;
        }
        Self::from_config(config, options).await
    }

    /// Builds the pools for `config` with the given options. They connect
    /// lazily: an unreachable database is reported by the first call.
    ///
    /// Connections are opened and driven on the Tokio runtime this is called
    /// on: in an actix application, call it from `main` (the System's
    /// arbiter), which lives as long as the process.
    pub async fn from_config(
        mut config: tokio_postgres::Config,
        options: StoreOptions,
    ) -> Result<Self> {
        if options.pool_size == 0 {
            return Err(Error::InvalidArgument(
                "pool_size must be at least 1".into(),
            ));
        }
        options.apply(&mut config);
        let direct = options.direct.clone().map(|mut direct| {
            options.apply(&mut direct);
            direct
        });
        let tls = crate::tls::connector(&options.tls)?;
        let connect_errors = ConnectErrors::default();
        let identity = Arc::new(IdentityCell::default());
        let pooler = Arc::new(PoolerCell::declared(options.pooler));
        let pools = Pools {
            config: &config,
            tls: &tls,
            connect_timeout: options.connect_timeout,
            identity: &identity,
            pooler: &pooler,
            connect_errors: &connect_errors,
        };
        Ok(PgStore {
            inner: Arc::new(Inner {
                control: pools.pool(CONTROL_POOL_SIZE, true, false),
                work: pools.pool(options.pool_size, true, false),
                user: pools.pool(options.pool_size, false, true),
                identity: identity.clone(),
                config: config.clone(),
                direct,
                pooler: pooler.clone(),
                told_no_listen: AtomicBool::new(false),
                tls: tls.clone(),
                connect_errors: connect_errors.clone(),
                call_timeout: options.call_timeout,
                pool_size: options.pool_size,
                connect_timeout: options.connect_timeout,
                for_runner: false,
            }),
        })
    }

    /// A connection for the application's own queries (a Tasker's, say),
    /// from a pool the protocol never uses: however the application uses
    /// or abandons it, no heartbeat or get_work waits behind it.
    pub async fn client(&self) -> Result<StoreClient<'_>> {
        Ok(StoreClient(self.checkout(&self.inner.user).await?))
    }

    /// Calls an entry point that takes a session and task ids and returns
    /// the ids it acted on (`finish_tasks`, `fail_tasks`).
    async fn task_ids(&self, sql: &str, session: &Session, ids: &[TaskId]) -> Result<Vec<TaskId>> {
        let rows = self
            .query(
                &self.inner.work,
                sql,
                &[
                    (&session.id, Type::INT8),
                    (&session.token, Type::UUID),
                    (&ids, Type::INT8_ARRAY),
                ],
                Some(session.id),
            )
            .await?;
        rows.iter()
            .map(|row| {
                row.try_get(0)
                    .map_err(|e| Error::from_db(e, Some(session.id)))
            })
            .collect()
    }

    /// Runs one statement on a connection of `pool`, bounded by the call
    /// timeout; the connection is discarded if the call does not complete.
    async fn query(
        &self,
        pool: &Pool<Manager>,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        session: Option<SessionId>,
    ) -> Result<Vec<Row>> {
        let conn = self.checkout(pool).await?;
        let limit = self.inner.call_timeout;
        let rows = conn
            .guarded(tokio::time::timeout(limit, conn.query_params(sql, params)))
            .await
            .map_err(|_| Error::Timeout(limit))?;
        rows.map_err(|e| {
            if is_read_only(&e) {
                tracing::warn!("the database refused a write as read-only (a standby, or a demoted primary): dropping the connection to find the primary");
                conn.discard();
            }
            Error::from_db(e, session)
        })
    }

    async fn checkout<'a>(&self, pool: &'a Pool<Manager>) -> Result<PooledConnection<'a, Manager>> {
        let seq = self.inner.connect_errors.seq();
        tokio::select! {
            conn = pool.get() => conn.map_err(Error::from_pool),
            cause = self.inner.connect_errors.after(seq) => Err(Error::Connect(cause)),
        }
    }
}

impl Database for PgStore {
    /// Control and work pools of the runner's own, their connections opened
    /// and driven on the runner's thread (they close with it); the
    /// application's pool and everything learnt about the database (its
    /// identity, whether it is a pooler, why a connect failed) shared.
    fn for_runner(&self) -> Option<Self> {
        let inner = &self.inner;
        if inner.for_runner {
            return Some(self.clone());
        }
        let pools = Pools {
            config: &inner.config,
            tls: &inner.tls,
            connect_timeout: inner.connect_timeout,
            identity: &inner.identity,
            pooler: &inner.pooler,
            connect_errors: &inner.connect_errors,
        };
        Some(PgStore {
            inner: Arc::new(Inner {
                control: pools.pool(CONTROL_POOL_SIZE, true, false),
                work: pools.pool(inner.pool_size, true, false),
                user: inner.user.clone(),
                identity: inner.identity.clone(),
                config: inner.config.clone(),
                direct: inner.direct.clone(),
                pooler: inner.pooler.clone(),
                told_no_listen: AtomicBool::new(inner.told_no_listen.load(Ordering::Relaxed)),
                tls: inner.tls.clone(),
                connect_errors: inner.connect_errors.clone(),
                call_timeout: inner.call_timeout,
                pool_size: inner.pool_size,
                connect_timeout: inner.connect_timeout,
                for_runner: true,
            }),
        })
    }

    fn same_handle(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    async fn database_identity(&self) -> Result<DatabaseId> {
        if let Some(id) = self.inner.identity.get() {
            return Ok(id);
        }
        let rows = self
            .query(&self.inner.control, DATABASE_IDENTITY, &[], None)
            .await?;
        let id = DatabaseId(first(&rows, None)?);
        Ok(self.inner.identity.get().unwrap_or(id))
    }

    #[tracing::instrument(level = "debug", skip(self, params), fields(session.name = %params.name), err)]
    async fn start_session(&self, params: &SessionStart) -> Result<Session> {
        let pid = i32::try_from(params.pid).unwrap_or(0);
        let capacity = i32::try_from(params.capacity).map_err(|_| {
            Error::InvalidArgument(format!("capacity {} is out of range", params.capacity))
        })?;
        let rows = self
            .query(
                &self.inner.control,
                START_SESSION,
                &[
                    (&params.name, Type::TEXT),
                    (&Interval(params.ttl), Type::INTERVAL),
                    (&capacity, Type::INT4),
                    (&params.host, Type::TEXT),
                    (&pid, Type::INT4),
                ],
                None,
            )
            .await?;
        let row = rows.first().ok_or_else(|| {
            Error::UnexpectedReply("session_lock.start_session returned no row".into())
        })?;
        Ok(Session {
            id: row.try_get(0).map_err(|e| Error::from_db(e, None))?,
            token: row.try_get(1).map_err(|e| Error::from_db(e, None))?,
        })
    }

    #[tracing::instrument(level = "debug", skip(self, session), fields(session = session.id), err)]
    async fn bump_session(&self, session: &Session, ttl: Duration) -> Result<()> {
        self.query(
            &self.inner.control,
            BUMP_SESSION,
            &[
                (&session.id, Type::INT8),
                (&session.token, Type::UUID),
                (&Interval(ttl), Type::INTERVAL),
            ],
            Some(session.id),
        )
        .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self, session), fields(session = session.id), err)]
    async fn end_session(&self, session: &Session) -> Result<bool> {
        let rows = self
            .query(
                &self.inner.control,
                END_SESSION,
                &[(&session.id, Type::INT8), (&session.token, Type::UUID)],
                Some(session.id),
            )
            .await?;
        first(&rows, Some(session.id))
    }

    #[tracing::instrument(level = "debug", skip(self, params), fields(session = params.session.id, finishing = params.finished.len()), err)]
    async fn get_work<T: ScanTask>(&self, params: GetWork<'_>) -> Result<Work<T>> {
        let session = params.session.id;
        let rows = self
            .query(
                &self.inner.work,
                T::QUERIES.get_work,
                &[
                    (&session, Type::INT8),
                    (&params.session.token, Type::UUID),
                    (&params.finished, Type::INT8_ARRAY),
                    (&params.running, Type::INT8_ARRAY),
                    (&params.sweep, Type::BOOL),
                    (&params.known, Type::INT8_ARRAY),
                    (&true, Type::BOOL),
                ],
                Some(session),
            )
            .await?;
        let mut work = Work {
            finished: Vec::new(),
            tasks: Vec::with_capacity(rows.len()),
            unreadable: Vec::new(),
        };
        for row in &rows {
            // The finished ids come first, in one row of their own (asked
            // for by the last parameter), with the task's columns NULL; a
            // held task has none.
            let finished: Option<Vec<TaskId>> = row
                .try_get(1)
                .map_err(|e| Error::from_db(e, Some(session)))?;
            match finished {
                Some(ids) => work.finished.extend(ids),
                None => match T::scan(row) {
                    Ok(task) => work.tasks.push(task),
                    Err(e) => work.unreadable.push(e),
                },
            }
        }
        Ok(work)
    }

    #[tracing::instrument(level = "debug", skip(self, session, ids), fields(session = session.id, tasks = ids.len()), err)]
    async fn finish_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> Result<Vec<TaskId>> {
        self.task_ids(T::QUERIES.finish, session, ids).await
    }

    #[tracing::instrument(level = "debug", skip(self, session, ids), fields(session = session.id, tasks = ids.len()), err)]
    async fn fail_tasks<T: ScanTask>(
        &self,
        session: &Session,
        ids: &[TaskId],
    ) -> Result<Vec<TaskId>> {
        self.task_ids(T::QUERIES.fail, session, ids).await
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn task_stats<T: ScanTask>(
        &self,
        session: SessionId,
        groups: u32,
    ) -> Result<Option<TaskStats>> {
        let groups = i32::try_from(groups).unwrap_or(i32::MAX);
        let rows = self
            .query(
                &self.inner.work,
                T::QUERIES.stats,
                &[(&session, Type::INT8), (&groups, Type::INT4)],
                None,
            )
            .await?;
        let mut stats = TaskStats::default();
        for row in &rows {
            let metric: String = row.try_get(0).map_err(|e| Error::from_db(e, None))?;
            let group: Option<String> = row.try_get(1).map_err(|e| Error::from_db(e, None))?;
            let value: i64 = row.try_get(2).map_err(|e| Error::from_db(e, None))?;
            let value = u64::try_from(value).unwrap_or(0);
            match metric.as_str() {
                "held" => stats.held_by_group.push((group, value)),
                "held_other" => stats.held_in_other_groups = value,
                "quarantined" => stats.quarantined = value,
                "suspect" => stats.suspect = value,
                // A later release's metric: recorded by that release.
                _ => {}
            }
        }
        Ok(Some(stats))
    }

    async fn quiet<T: ScanTask>(&self, session: &Session) -> Result<bool> {
        let rows = self
            .query(
                &self.inner.work,
                T::QUERIES.quiet,
                &[(&session.id, Type::INT8), (&session.token, Type::UUID)],
                Some(session.id),
            )
            .await?;
        first(&rows, Some(session.id))
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn reap_sessions(&self, older_than: Duration) -> Result<u64> {
        let rows = self
            .query(
                &self.inner.work,
                REAP_SESSIONS,
                &[(&Interval(older_than), Type::INTERVAL)],
                None,
            )
            .await?;
        let reaped: i32 = first(&rows, None)?;
        Ok(u64::try_from(reaped).unwrap_or(0))
    }

    async fn listen(&self, channel: &'static str) -> Result<Option<Listener>> {
        self.listen_on(channel).await
    }
}

impl PgStore {
    fn tell_no_listen(&self) {
        if !self.inner.told_no_listen.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "LISTEN needs a session of its own, which a transaction pooler does not keep: \
                 new tasks wait for the next tick (give the store a direct URL to LISTEN on)"
            );
        }
    }

    async fn listen_on(&self, channel: &'static str) -> Result<Option<Listener>> {
        use futures_util::future::poll_fn;
        use tokio_postgres::AsyncMessage;

        let config = match &self.inner.direct {
            Some(direct) => direct,
            None if self.inner.pooler.is_pooler() => {
                self.tell_no_listen();
                return Ok(None);
            }
            None => &self.inner.config,
        };
        let limit = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let connect = bounded_connect(limit, config.connect(self.inner.tls.clone())).await;
        let (client, mut connection) = match connect {
            Err(Error::Db(e)) if self.inner.direct.is_none() && refused_options(&e) => {
                self.inner.pooler.found();
                self.tell_no_listen();
                return Ok(None);
            }
            other => other?,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    // A full channel already holds a wake-up: coalesce.
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "listen connection closed");
                        break;
                    }
                }
            }
        });
        if self.inner.direct.is_none() {
            // A pooler that let `options` through: told by its cancel key.
            let backend = tokio::time::timeout(
                limit,
                client.query_typed("SELECT pg_catalog.pg_backend_pid()", &[]),
            )
            .await
            .ok()
            .and_then(|rows| rows.ok())
            .and_then(|rows| rows.first().and_then(|row| row.try_get::<_, i32>(0).ok()));
            if own_backend(&client, backend).await == Some(false) {
                self.inner.pooler.found_by_cancel_key();
                self.tell_no_listen();
                return Ok(None);
            }
        }
        // LISTEN takes no bind parameters; the channel is a constant chosen
        // in code (TaskQueries::notify_channel), quoted as an identifier.
        tokio::time::timeout(
            limit,
            client.batch_execute(&format!("LISTEN {}", quote_ident(channel))),
        )
        .await
        .map_err(|_| Error::Timeout(limit))?
        .map_err(|e| Error::from_db(e, None))?;
        Ok(Some(Listener::new(Some(client), rx)))
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl DbFinder for PgStore {
    type Db = PgStore;

    async fn find(&self) -> Result<PgStore> {
        Ok(self.clone())
    }
}

/// Opens one connection to `url` outside any pool (for migrations and
/// operator queries), honouring its `sslmode` and with the timeouts of
/// [`StoreOptions::default`]. The connection is driven by a task on the
/// current Tokio runtime and closes when the client is dropped.
pub async fn connect_one(url: &str) -> Result<tokio_postgres::Client> {
    connect_one_with(url, StoreOptions::default()).await
}

/// [`connect_one`] with other timeouts and keepalives; the TLS mode always
/// comes from the URL's `sslmode`.
pub async fn connect_one_with(url: &str, options: StoreOptions) -> Result<tokio_postgres::Client> {
    let (mut config, tls) = crate::tls::parse_url(url)?;
    let options = StoreOptions { tls, ..options };
    options.apply(&mut config);
    let connect = config.connect(crate::tls::connector(&options.tls)?);
    let (client, connection) = match bounded_connect(options.connect_timeout, connect).await {
        Err(Error::Db(e)) if refused_options(&e) => {
            return Err(Error::NeedsSession {
                what: "connect_one (the migrator takes a session-level advisory lock)",
            });
        }
        other => other?,
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// The first column of the first row of a one-row result.
fn first<'a, T: tokio_postgres::types::FromSql<'a>>(
    rows: &'a [Row],
    session: Option<SessionId>,
) -> Result<T> {
    let row = rows
        .first()
        .ok_or_else(|| Error::UnexpectedReply("a session-lock function returned no row".into()))?;
    row.try_get(0).map_err(|e| Error::from_db(e, session))
}

/// This machine's host name, or "" when it cannot be read.
pub(crate) fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}
