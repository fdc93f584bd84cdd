//! The database boundary: one async function per SQL function of the
//! protocol, over a bb8 pool of tokio-postgres connections.
//!
//! Actors never build SQL; they call a [`Database`], found anew through a
//! [`DbFinder`] on every tick so that the database may move.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::error::{Error, Result, ScanError};
use crate::task::{ScanTask, TaskId};
use crate::tls::{Tls, TlsMode};

/// A session's id: the primary key of its `session_lock.session` row.
pub type SessionId = i64;

/// Default size of the connection pool.
pub const DEFAULT_POOL_SIZE: u32 = 4;
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

const SESSION_START: &str =
    "SELECT session_lock.start_session($1, $2 * interval '1 millisecond', $3, $4)";
const SESSION_BUMP: &str = "SELECT session_lock.bump_session($1, $2 * interval '1 millisecond')";
const SESSION_END: &str = "SELECT session_lock.end_session($1)";
const SESSIONS_REAP: &str = "SELECT session_lock.reap_sessions($1 * interval '1 millisecond')";

/// What a new session records about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStart {
    /// The runner's name: sessions of one name share its tasks.
    pub name: String,
    /// How long the lease lasts without a heartbeat.
    pub ttl: Duration,
    /// The host of the process, for operators.
    pub host: String,
    /// The process id, for operators.
    pub pid: u32,
}

impl SessionStart {
    /// A session for runner `name` with lease `ttl`, recording this
    /// process's host name and pid.
    pub fn new(name: impl Into<String>, ttl: Duration) -> Self {
        SessionStart {
            name: name.into(),
            ttl,
            host: local_host_name(),
            pid: std::process::id(),
        }
    }
}

/// The parameters of one `get_work` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkGet {
    /// The calling session.
    pub session: SessionId,
    /// The most tasks the session may hold.
    pub max_tasks: u32,
    /// The lease to extend the session by (get_work is also a heartbeat).
    pub ttl: Duration,
}

/// The tasks a session holds after a `get_work`.
#[derive(Debug)]
pub struct Work<T> {
    /// Every task that scanned.
    pub tasks: Vec<T>,
    /// Rows that did not scan. Their tasks stay assigned to the session.
    pub unreadable: Vec<ScanError>,
}

/// The calls a runner makes to the database (the seed's `Database`).
///
/// [`PgStore`] implements it over Postgres; implement it yourself to wrap
/// one (for example to add metrics or routing).
pub trait Database: Send + Sync + 'static {
    /// Starts a session and returns its id.
    fn session_start(
        &self,
        params: &SessionStart,
    ) -> impl Future<Output = Result<SessionId>> + Send;
    /// Extends a live session's lease. [`Error::SessionLost`] when it is not live.
    fn session_bump(
        &self,
        session: SessionId,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Ends a session so that its tasks are free on the others' next tick.
    /// Returns false when it was already over. Idempotent.
    fn session_end(&self, session: SessionId) -> impl Future<Output = Result<bool>> + Send;
    /// Bumps the session, moves it to its fair share and returns its tasks.
    /// [`Error::SessionLost`] when it is not live.
    fn work_get<T: ScanTask>(
        &self,
        params: WorkGet,
    ) -> impl Future<Output = Result<Work<T>>> + Send;
    /// Finishes `finished` (the previous batch's completed tasks) and gets
    /// work, in one call and one transaction when the database allows: a
    /// busy runner then needs one round trip per tick. The finish is fenced
    /// like [`tasks_finish`](Self::tasks_finish); ids the session no longer
    /// holds are skipped (for a live session, only when a row was changed
    /// outside session-lock). The default makes the two calls.
    fn work_finish_and_get<T: ScanTask>(
        &self,
        params: WorkGet,
        finished: &[TaskId],
    ) -> impl Future<Output = Result<Work<T>>> + Send {
        async move {
            if !finished.is_empty() {
                self.tasks_finish::<T>(params.session, finished).await?;
            }
            self.work_get::<T>(params).await
        }
    }
    /// Finishes those of `ids` the session still holds and returns them.
    /// [`Error::SessionLost`] when it is not live: nothing is finished then.
    fn tasks_finish<T: ScanTask>(
        &self,
        session: SessionId,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<TaskId>>> + Send;
    /// Deletes sessions reclaimed longer than `older_than` ago; returns how many.
    fn sessions_reap(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;
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
}

/// Notifications from one LISTEN connection. Dropping it closes the
/// connection.
#[derive(Debug)]
pub struct Listener {
    _client: tokio_postgres::Client,
    rx: tokio::sync::mpsc::Receiver<()>,
}

impl Listener {
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

/// Connection and pool settings for [`PgStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Encryption and server verification. Defaults to [`TlsMode::Prefer`],
    /// as libpq; [`PgStore::connect`] takes it from the URL's `sslmode`.
    pub tls: TlsMode,
    /// Most connections in the pool. Defaults to [`DEFAULT_POOL_SIZE`].
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
        }
    }
}

impl StoreOptions {
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

/// The pool's connection manager: bb8-postgres's, with every connection
/// opened and driven on the runtime that created the store.
///
/// tokio-postgres splits a connection into a `Client` and a task that owns
/// the socket. bb8-postgres spawns that task wherever `connect` is called, so
/// a connection first needed by an actor on a short-lived arbiter would die
/// with that arbiter and leave a dead client in a pool the whole service
/// shares. Opening it on the store's home runtime (the actix System's, when
/// the store is made in `main`) ties every connection to the process instead.
#[derive(Debug, Clone)]
pub struct Manager {
    inner: Arc<PostgresConnectionManager<Tls>>,
    home: tokio::runtime::Handle,
    connect_timeout: Duration,
}

impl Manager {
    fn new(config: tokio_postgres::Config, tls: Tls, connect_timeout: Duration) -> Self {
        Manager {
            inner: Arc::new(PostgresConnectionManager::new(config, tls)),
            home: tokio::runtime::Handle::current(),
            connect_timeout,
        }
    }
}

/// Why a pooled connection could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server or the network refused it.
    #[error("{}", crate::error::describe_db(.0))]
    Db(#[source] tokio_postgres::Error),
    /// The whole connect (TCP, TLS, startup, authentication) took longer
    /// than the connect timeout. tokio-postgres bounds only the TCP part; a
    /// partition behind a proxy that accepts the TCP connection would
    /// otherwise hold the attempt, and its pool slot, until the server's
    /// authentication_timeout (a minute).
    #[error("no answer while connecting within {0:?}")]
    TimedOut(Duration),
}

impl bb8::ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = ConnectError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let limit = self.connect_timeout;
        let inner = self.inner.clone();
        let attempt = async move { connect_within(limit, inner.connect()).await };
        let client = match self.home.spawn(attempt).await {
            Ok(res) => res,
            // The home runtime has shut down: connect here rather than fail.
            Err(_) => connect_within(limit, self.inner.connect()).await,
        }?;
        Ok(PgConnection {
            client,
            abandoned: AtomicBool::new(false),
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        self.inner
            .is_valid(&mut conn.client)
            .await
            .map_err(ConnectError::Db)
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.abandoned.load(Ordering::Relaxed) || self.inner.has_broken(&mut conn.client)
    }
}

/// A pooled connection: a tokio-postgres `Client` (it derefs to one) that
/// is thrown away instead of pooled once a call on it was abandoned.
///
/// A call abandoned mid-flight (timed out, or its future dropped) leaves a
/// request outstanding whose answer may never come: behind a partition that
/// a proxy acknowledges, TCP timeouts never fire, and reusing such a
/// connection would hang every later call on it.
#[derive(Debug)]
pub struct PgConnection {
    client: tokio_postgres::Client,
    abandoned: AtomicBool,
}

impl std::ops::Deref for PgConnection {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// Marks the connection abandoned unless the call it guards completed.
struct InFlight<'a> {
    conn: &'a PgConnection,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// Keeps the latest failure to open a pooled connection, so that a caller
/// waiting for a connection gets its cause (wrong password, TLS refused,
/// connection refused) at once, instead of bb8's bare timeout.
#[derive(Debug, Clone, Default)]
struct ConnectErrors(Arc<ConnectErrorsInner>);

#[derive(Debug, Default)]
struct ConnectErrorsInner {
    /// Sequence number and description of the latest failure.
    latest: std::sync::Mutex<(u64, String)>,
    notify: tokio::sync::Notify,
}

impl ConnectErrors {
    fn seq(&self) -> u64 {
        self.0
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Waits for a failure after `seq` and returns its description.
    async fn after(&self, seq: u64) -> String {
        loop {
            let notified = self.0.notify.notified();
            {
                let latest = self
                    .0
                    .latest
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if latest.0 > seq {
                    return latest.1.clone();
                }
            }
            notified.await;
        }
    }
}

impl bb8::ErrorSink<ConnectError> for ConnectErrors {
    fn sink(&self, error: ConnectError) {
        let text = error.to_string();
        tracing::debug!(error = %text, "cannot open a database connection");
        {
            let mut latest = self
                .0
                .latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            latest.0 += 1;
            latest.1 = text;
        }
        self.0.notify.notify_waiters();
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ConnectError>> {
        Box::new(self.clone())
    }
}

/// The [`Database`] over Postgres: a bb8 pool of tokio-postgres connections
/// calling the session-lock SQL functions. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool<Manager>,
    /// For connections outside the pool (LISTEN needs one of its own).
    config: Arc<tokio_postgres::Config>,
    tls: Tls,
    connect_errors: ConnectErrors,
    call_timeout: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (a libpq-style URL or key=value
    /// string) with [`StoreOptions::default`] and the TLS mode of its
    /// `sslmode` (see [`tls`](crate::tls): `verify-full` with `sslrootcert`
    /// checks the server).
    pub async fn connect(url: &str) -> Result<Self> {
        let (config, tls) = crate::tls::parse_url(url)?;
        Self::from_config(
            config,
            StoreOptions {
                tls,
                ..StoreOptions::default()
            },
        )
        .await
    }

    /// Builds a pool for `config` with the given options. The pool connects
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
        let tls = crate::tls::connector(&options.tls)?;
        let connect_errors = ConnectErrors::default();
        let pool = Pool::builder()
            .error_sink(Box::new(connect_errors.clone()))
            .max_size(options.pool_size)
            .min_idle(Some(0))
            .connection_timeout(options.connect_timeout)
            // A broken connection is detected when a call fails and is then
            // dropped by bb8; testing every checkout would add a round trip
            // to every call.
            .test_on_check_out(false)
            // A failed connect is reported (see ConnectErrors) rather than
            // retried silently until the caller's wait times out.
            .retry_connection(false)
            .build_unchecked(Manager::new(
                config.clone(),
                tls.clone(),
                options.connect_timeout,
            ));
        Ok(PgStore {
            pool,
            config: Arc::new(config),
            tls,
            connect_errors,
            call_timeout: options.call_timeout,
        })
    }

    /// The underlying pool, for queries of your own.
    pub fn pool(&self) -> &Pool<Manager> {
        &self.pool
    }

    /// Runs one statement on a pooled connection, bounded by the call
    /// timeout; the connection is discarded if the call does not complete.
    async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        session: Option<SessionId>,
    ) -> Result<Vec<Row>> {
        let conn = self.conn().await?;
        let mut in_flight = InFlight {
            conn: &conn,
            done: false,
        };
        let rows = tokio::time::timeout(self.call_timeout, conn.query_typed(sql, params))
            .await
            .map_err(|_| Error::Timeout(self.call_timeout))?;
        in_flight.done = true;
        rows.map_err(|e| Error::from_db(e, session))
    }

    async fn conn(&self) -> Result<PooledConnection<'_, Manager>> {
        let seq = self.connect_errors.seq();
        tokio::select! {
            conn = self.pool.get() => Ok(conn?),
            cause = self.connect_errors.after(seq) => Err(Error::Connect(cause)),
        }
    }
}

impl Database for PgStore {
    #[tracing::instrument(level = "debug", skip(self, params), fields(session.name = %params.name), err)]
    async fn session_start(&self, params: &SessionStart) -> Result<SessionId> {
        let pid = i32::try_from(params.pid).unwrap_or(0);
        let rows = self
            .query(
                SESSION_START,
                &[
                    (&params.name, Type::TEXT),
                    (&millis(params.ttl), Type::INT8),
                    (&params.host, Type::TEXT),
                    (&pid, Type::INT4),
                ],
                None,
            )
            .await?;
        first(&rows, None)
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn session_bump(&self, session: SessionId, ttl: Duration) -> Result<()> {
        self.query(
            SESSION_BUMP,
            &[(&session, Type::INT8), (&millis(ttl), Type::INT8)],
            Some(session),
        )
        .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn session_end(&self, session: SessionId) -> Result<bool> {
        let rows = self
            .query(SESSION_END, &[(&session, Type::INT8)], Some(session))
            .await?;
        first(&rows, Some(session))
    }

    async fn work_get<T: ScanTask>(&self, params: WorkGet) -> Result<Work<T>> {
        self.work_finish_and_get::<T>(params, &[]).await
    }

    #[tracing::instrument(level = "debug", skip(self, finished), fields(finished = finished.len()), err)]
    async fn work_finish_and_get<T: ScanTask>(
        &self,
        params: WorkGet,
        finished: &[TaskId],
    ) -> Result<Work<T>> {
        let max_tasks = i32::try_from(params.max_tasks).map_err(|_| {
            Error::InvalidArgument(format!("max_tasks {} is out of range", params.max_tasks))
        })?;
        let rows = self
            .query(
                T::QUERIES.get_work,
                &[
                    (&params.session, Type::INT8),
                    (&max_tasks, Type::INT4),
                    (&millis(params.ttl), Type::INT8),
                    (&finished, Type::INT8_ARRAY),
                ],
                Some(params.session),
            )
            .await?;
        let mut work = Work {
            tasks: Vec::with_capacity(rows.len()),
            unreadable: Vec::new(),
        };
        for row in &rows {
            match T::scan(row) {
                Ok(task) => work.tasks.push(task),
                Err(e) => work.unreadable.push(e),
            }
        }
        Ok(work)
    }

    #[tracing::instrument(level = "debug", skip(self, ids), fields(tasks = ids.len()), err)]
    async fn tasks_finish<T: ScanTask>(
        &self,
        session: SessionId,
        ids: &[TaskId],
    ) -> Result<Vec<TaskId>> {
        let rows = self
            .query(
                T::QUERIES.finish,
                &[(&session, Type::INT8), (&ids, Type::INT8_ARRAY)],
                Some(session),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(|e| Error::from_db(e, Some(session))))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn sessions_reap(&self, older_than: Duration) -> Result<u64> {
        let rows = self
            .query(SESSIONS_REAP, &[(&millis(older_than), Type::INT8)], None)
            .await?;
        let reaped: i32 = first(&rows, None)?;
        Ok(u64::try_from(reaped).unwrap_or(0))
    }

    async fn listen(&self, channel: &'static str) -> Result<Option<Listener>> {
        self.listen_on(channel).await
    }
}

impl PgStore {
    async fn listen_on(&self, channel: &'static str) -> Result<Option<Listener>> {
        use futures_util::future::poll_fn;
        use tokio_postgres::AsyncMessage;

        let limit = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let (client, mut connection) =
            bounded_connect(limit, self.config.connect(self.tls.clone())).await?;
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
        // LISTEN takes no bind parameters; the channel is a constant chosen
        // in code (TaskQueries::notify_channel), quoted as an identifier.
        tokio::time::timeout(
            limit,
            client.batch_execute(&format!("LISTEN {}", quote_ident(channel))),
        )
        .await
        .map_err(|_| Error::Timeout(limit))?
        .map_err(|e| Error::from_db(e, None))?;
        Ok(Some(Listener {
            _client: client,
            rx,
        }))
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
    let (client, connection) = bounded_connect(options.connect_timeout, connect).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// Runs a connect for at most `limit`: tokio-postgres bounds only the TCP
/// connect, not the TLS, startup and authentication that follow. Pooled and
/// dedicated connections alike.
async fn connect_within<T>(
    limit: Duration,
    connect: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, ConnectError> {
    tokio::time::timeout(limit, connect)
        .await
        .map_err(|_| ConnectError::TimedOut(limit))?
        .map_err(ConnectError::Db)
}

/// [`connect_within`] for a dedicated connection, with the crate's errors.
async fn bounded_connect<T>(
    limit: Duration,
    connect: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    connect_within(limit, connect).await.map_err(|e| match e {
        ConnectError::TimedOut(limit) => Error::Connect(format!("no answer within {limit:?}")),
        ConnectError::Db(e) => Error::from_db(e, None),
    })
}

/// The first column of the first row of a one-row result.
fn first<'a, T: tokio_postgres::types::FromSql<'a>>(
    rows: &'a [Row],
    session: Option<SessionId>,
) -> Result<T> {
    let row = rows
        .first()
        .ok_or_else(|| Error::InvalidArgument("a session-lock function returned no row".into()))?;
    row.try_get(0).map_err(|e| Error::from_db(e, session))
}

/// Milliseconds of `d`, saturating: durations are validated long before they
/// could overflow.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// This machine's host name, or "" when it cannot be read.
pub(crate) fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}
