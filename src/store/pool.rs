//! The store's connections: a bb8 connection manager that opens every
//! connection on the store's home runtime, bounds the whole connect, reads
//! the database's identity on every new connection, and never pools a
//! connection whose call was abandoned; and the record of connect failures
//! that lets a caller waiting for a connection learn why none came.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bb8::ManageConnection as _;
use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement};

use super::pooler::{PoolerCell, own_backend, refused_options, without_options};
use crate::error::{Error, Result};
use crate::store::DatabaseId;
use crate::tls::Tls;

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
    /// The server is a standby (in recovery), where the protocol cannot
    /// write: list every node in the URL with
    /// `target_session_attrs=read-write`, and the connect finds the primary.
    #[error(
        "the server is a standby (pg_is_in_recovery): session-lock needs the primary; list every node in the URL with target_session_attrs=read-write"
    )]
    Standby,
}

/// The latest identity read from a new connection, shared by a store's
/// pools: a connection that lands in another database (a DNS name moved, a
/// restored backup) changes it, and the runner starts over there.
#[derive(Debug, Default)]
pub(crate) struct IdentityCell(Mutex<Option<DatabaseId>>);

impl IdentityCell {
    pub(crate) fn get(&self) -> Option<DatabaseId> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, id: DatabaseId) {
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| *c != id) {
            tracing::warn!(from = %current.as_ref().map(ToString::to_string).unwrap_or_default(), to = %id,
                "a new connection reached another database than before");
        }
        *current = Some(id);
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
pub(crate) struct Manager {
    inner: Arc<PostgresConnectionManager<Tls>>,
    /// The same without the startup parameter `options`, for a pooler.
    bare: Arc<PostgresConnectionManager<Tls>>,
    pooler: Arc<PoolerCell>,
    home: tokio::runtime::Handle,
    connect_timeout: Duration,
    /// Where to record the identity of each new connection's database, for
    /// the pools the protocol uses (a user's pool does not read it).
    identity: Option<Arc<IdentityCell>>,
}

impl Manager {
    pub(crate) fn new(
        config: tokio_postgres::Config,
        tls: Tls,
        connect_timeout: Duration,
        identity: Option<Arc<IdentityCell>>,
        pooler: Arc<PoolerCell>,
    ) -> Self {
        Manager {
            bare: Arc::new(PostgresConnectionManager::new(
                without_options(&config),
                tls.clone(),
            )),
            inner: Arc::new(PostgresConnectionManager::new(config, tls)),
            pooler,
            home: tokio::runtime::Handle::current(),
            connect_timeout,
            identity,
        }
    }
    /// One connect, on the home runtime, with or without `options`.
    async fn connect_once(
        &self,
        bare: bool,
    ) -> std::result::Result<tokio_postgres::Client, ConnectError> {
        let limit = self.connect_timeout;
        let manager = if bare { &self.bare } else { &self.inner }.clone();
        let attempt = {
            let manager = manager.clone();
            async move { connect_within(limit, manager.connect()).await }
        };
        match self.home.spawn(attempt).await {
            Ok(res) => res,
            // The home runtime has shut down: connect here rather than fail.
            Err(_) => connect_within(limit, manager.connect()).await,
        }
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = ConnectError;

    async fn connect(&self) -> std::result::Result<Self::Connection, Self::Error> {
        let limit = self.connect_timeout;
        let client = match self.connect_once(self.pooler.is_pooler()).await {
            Err(ConnectError::Db(e)) if refused_options(&e) => {
                self.pooler.found();
                self.connect_once(true).await
            }
            other => other,
        }?;
        // Both checks as unnamed statements (query_typed): a connection
        // prepares named ones only once it is known to be its backend's
        // own. Behind a transaction pooler a named one may be bound on
        // another server connection, to another client's statement of the
        // same name, and answer with its columns.
        let mut prepares = false;
        if self.identity.is_some() {
            // A standby refuses every write the protocol makes: find the
            // primary instead (the next connect tries the URL's hosts anew).
            // And whether the connection is the backend's own: its cancel
            // key names that backend.
            let check = tokio::time::timeout(
                limit,
                client.query_typed(
                    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_backend_pid()",
                    &[],
                ),
            )
            .await
            .map_err(|_| ConnectError::TimedOut(limit))?;
            let (standby, backend) = check
                .ok()
                .and_then(|rows| {
                    rows.first().map(|row| {
                        (
                            row.try_get::<_, bool>(0).ok(),
                            row.try_get::<_, i32>(1).ok(),
                        )
                    })
                })
                .unwrap_or_default();
            if standby == Some(true) {
                return Err(ConnectError::Standby);
            }
            if !self.pooler.is_pooler() {
                match own_backend(&client, backend).await {
                    Some(true) => prepares = true,
                    Some(false) => self.pooler.found_by_cancel_key(),
                    None => {}
                }
            }
        }
        if let Some(cell) = &self.identity {
            // Unmigrated databases have no such function: the protocol's
            // own calls report that, with the remedy.
            let read = tokio::time::timeout(
                limit,
                client.query_typed("SELECT session_lock.database_identity()", &[]),
            )
            .await
            .map_err(|_| ConnectError::TimedOut(limit))?;
            if let Some(id) = read.ok().and_then(|rows| {
                rows.first()
                    .and_then(|row| row.try_get::<_, String>(0).ok())
            }) {
                cell.set(DatabaseId(id));
            }
        }
        Ok(PgConnection {
            client,
            abandoned: AtomicBool::new(false),
            statements: prepares.then(Mutex::default),
        })
    }

    /// Bounded, and guarded: a connection whose check does not answer (a
    /// peer gone silent behind a partition, a query still pending on it) is
    /// marked abandoned, so bb8 drops it instead of pooling it again, also
    /// when the caller's wait for a connection times out first. Unbounded,
    /// one dead connection would fail every checkout of its pool for ever.
    async fn is_valid(&self, conn: &mut Self::Connection) -> std::result::Result<(), Self::Error> {
        let limit = self.connect_timeout / 2;
        let check = tokio::time::timeout(limit, conn.client.simple_query(""));
        match conn.guarded(check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ConnectError::Db(e)),
            Err(_) => {
                conn.abandoned.store(true, Ordering::Relaxed);
                Err(ConnectError::TimedOut(limit))
            }
        }
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
///
/// On a connection straight to PostgreSQL (its cancel key names its
/// backend) each statement of the store is prepared once and kept, by its
/// text: a call then skips the parsing and planning of its statement (a
/// tenth of a draining get_work's server time when sent unnamed). Behind a
/// pooler every call is an unnamed statement (see the pooler module).
#[derive(Debug)]
pub(crate) struct PgConnection {
    client: tokio_postgres::Client,
    abandoned: AtomicBool,
    /// The statements prepared on this connection, by their text; `None`
    /// where it must not prepare any.
    statements: Option<Mutex<HashMap<String, Statement>>>,
}

/// Most statements one connection keeps prepared: the store has about a
/// dozen; past this (a program sending texts of its own) it starts over.
const MAX_PREPARED: usize = 64;

impl PgConnection {
    /// Runs `call` on this connection; if the call does not complete (it
    /// is dropped, or times out), the connection is marked abandoned and
    /// never pooled again.
    pub(crate) async fn guarded<T>(&self, call: impl Future<Output = T>) -> T {
        struct InFlight<'a>(&'a AtomicBool, bool);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
        }
        let mut in_flight = InFlight(&self.abandoned, false);
        let out = call.await;
        in_flight.1 = true;
        out
    }

    /// Runs `sql` with `params` (each with its type): as a statement
    /// prepared once on this connection when it may keep one, otherwise
    /// unnamed. A kept statement the server no longer takes (its result
    /// type changed since, when a task table's columns did; or it is gone)
    /// fails before anything ran: it is prepared again and the call made
    /// once more.
    pub(crate) async fn query_params(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        let Some(statements) = &self.statements else {
            return self.client.query_typed(sql, params).await;
        };
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        let statement = self.prepared(statements, sql, params).await?;
        match self.client.query(&statement, &values).await {
            Err(e) if stale_statement(&e) => {
                lock(statements).remove(sql);
                let statement = self.prepared(statements, sql, params).await?;
                self.client.query(&statement, &values).await
            }
            other => other,
        }
    }

    /// The statement kept for `sql`, prepared now if there is none.
    async fn prepared(
        &self,
        statements: &Mutex<HashMap<String, Statement>>,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = lock(statements).get(sql) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = self.client.prepare_typed(sql, &types).await?;
        let mut kept = lock(statements);
        if kept.len() >= MAX_PREPARED {
            kept.clear();
        }
        kept.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Throws the connection away instead of pooling it again: it reached
    /// a server that cannot serve the protocol any more (a primary demoted
    /// to a standby, SQLSTATE 25006), so the next connect may find the
    /// current primary.
    pub(crate) fn discard(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }
}

/// SQLSTATE read_only_sql_transaction: the server is (now) a standby.
const READ_ONLY: &str = "25006";

/// Whether `e` is the server's refusal of a kept statement before running
/// it: its result type changed since it was prepared (0A000, "cached plan
/// must not change result type"), or it is gone (26000).
fn stale_statement(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code == "26000"
            || (code == "0A000"
                && db
                    .message()
                    .starts_with("cached plan must not change result type"))
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `e` says the server cannot take writes: a standby, or a primary
/// demoted in a failover.
pub(crate) fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == READ_ONLY)
}

impl std::ops::Deref for PgConnection {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// Keeps the latest failure to open a pooled connection, so that a caller
/// waiting for a connection gets its cause (wrong password, TLS refused,
/// connection refused) at once, instead of bb8's bare timeout.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectErrors(Arc<ConnectErrorsInner>);

#[derive(Debug, Default)]
struct ConnectErrorsInner {
    /// Sequence number of the latest failure, and the failure.
    latest: Mutex<(u64, Option<Arc<ConnectError>>)>,
    notify: tokio::sync::Notify,
}

impl ConnectErrors {
    pub(crate) fn seq(&self) -> u64 {
        self.0
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Waits for a failure after `seq` and returns it.
    pub(crate) async fn after(&self, seq: u64) -> Arc<ConnectError> {
        loop {
            let notified = self.0.notify.notified();
            {
                let latest = self.0.latest.lock().unwrap_or_else(PoisonError::into_inner);
                if let (true, Some(error)) = (latest.0 > seq, &latest.1) {
                    return error.clone();
                }
            }
            notified.await;
        }
    }
}

impl bb8::ErrorSink<ConnectError> for ConnectErrors {
    fn sink(&self, error: ConnectError) {
        tracing::debug!(%error, "cannot open a database connection");
        {
            let mut latest = self.0.latest.lock().unwrap_or_else(PoisonError::into_inner);
            latest.0 += 1;
            latest.1 = Some(Arc::new(error));
        }
        self.0.notify.notify_waiters();
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ConnectError>> {
        Box::new(self.clone())
    }
}

/// Runs a connect for at most `limit`: tokio-postgres bounds only the TCP
/// connect, not the TLS, startup and authentication that follow. Pooled and
/// dedicated connections alike.
pub(crate) async fn connect_within<T>(
    limit: Duration,
    connect: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, ConnectError> {
    tokio::time::timeout(limit, connect)
        .await
        .map_err(|_| ConnectError::TimedOut(limit))?
        .map_err(ConnectError::Db)
}

/// [`connect_within`] for a dedicated connection, with the crate's errors.
pub(crate) async fn bounded_connect<T>(
    limit: Duration,
    connect: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    connect_within(limit, connect).await.map_err(|e| match e {
        ConnectError::Db(e) => Error::from_db(e, None),
        other => Error::Connect(Arc::new(other)),
    })
}
