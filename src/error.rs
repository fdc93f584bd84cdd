//! The crate's error type, and [`ErrorChain`], which prints any error with
//! its causes (and a PostgreSQL error with the server's message).

use std::fmt;
use std::sync::Arc;

use crate::store::ConnectError;

/// A `Result` whose error defaults to the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SQLSTATE raised by the SQL functions when a session is missing, expired or ended.
pub const SQLSTATE_SESSION_LOST: &str = "SL001";
/// SQLSTATE raised by the SQL functions for an argument out of range (e.g. a zero TTL).
pub const SQLSTATE_INVALID_ARGUMENT: &str = "SL003";
/// SQLSTATE raised when the caller speaks another version of the protocol
/// than the database (a runner of an older session-lock, or SQL copied from
/// one).
pub const SQLSTATE_PROTOCOL_MISMATCH: &str = "SL004";
/// SQLSTATE raised when a task table declaration cannot work.
pub const SQLSTATE_BAD_DECLARATION: &str = "SL005";

/// Everything that can go wrong talking to the session-lock database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The session is missing, expired or ended (SQLSTATE `SL001`). Its tasks
    /// belong to nobody, or to other sessions, now: stop working on them and
    /// start a new session.
    #[error("session {session} is lost (missing, expired or ended): start a new session")]
    SessionLost {
        /// The session that was lost.
        session: i64,
    },
    /// The session-lock schema or functions are missing from the database.
    #[error(
        "the session-lock migrations are not applied to this database ({detail}): run `session-lock migrate --database-url URL` or `Migrator::run` first"
    )]
    NotMigrated {
        /// What Postgres reported missing.
        detail: String,
    },
    /// The database runs another version of the session-lock protocol than
    /// this caller (SQLSTATE `SL004`): upgrade session-lock here, or migrate
    /// the database with this release.
    #[error("protocol mismatch: {detail}")]
    ProtocolMismatch {
        /// The server's message, naming the function refused.
        detail: String,
    },
    /// A task table declaration cannot work (SQLSTATE `SL005`), or a
    /// declared finish left a task open.
    #[error("{detail}")]
    Declaration {
        /// The server's message, naming the table and the problem.
        detail: String,
    },
    /// An argument was rejected by the SQL functions (SQLSTATE `SL003`), or
    /// by the store before it was sent (a capacity or pool size out of
    /// range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A database URL that cannot be parsed, or names a setting this crate
    /// cannot honour.
    #[error("bad database URL: {0}")]
    BadUrl(String),
    /// TLS cannot be set up: the root certificate file cannot be read or
    /// holds no certificate, or the TLS library refused the configuration.
    #[error("TLS setup: {what}: {source}")]
    Tls {
        /// What was being set up.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A session-lock SQL function answered in a shape this release does
    /// not expect (no row where one is always returned).
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
    /// A row returned by the task table could not be turned into a task.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// Waiting for a pooled connection timed out.
    #[error("timed out waiting for a database connection from the pool")]
    PoolTimedOut,
    /// A call got no answer within the call timeout; its connection was
    /// discarded.
    #[error("no answer from the database within {0:?}")]
    Timeout(std::time::Duration),
    /// Opening a connection failed: unreachable, refused, wrong password,
    /// TLS refused, or no answer within the connect timeout. Retried on the
    /// next call.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] Arc<ConnectError>),
    /// User code (a Tasker, DbFinder or ScanTask) panicked; the panic was
    /// caught and the actor running it restarted.
    #[error("user code panicked: {0}")]
    Panicked(#[source] Panic),
    /// A runner configuration value cannot work.
    #[error("invalid runner configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The DbFinder found another database than the one the session lives
    /// in: the session was dropped there, and a new one is started.
    #[error("the database moved (identity {from} became {to}): the session there is dropped")]
    Moved {
        /// The identity of the session's database.
        from: String,
        /// The identity of the database found now.
        to: String,
    },
    /// The runner has stopped and takes no more requests.
    #[error("the runner has stopped")]
    Stopped,
    /// Any other database error.
    #[error("database error: {}", describe_db(.0))]
    Db(#[source] tokio_postgres::Error),
    /// The URL leads to a transaction pooler (it refused the startup
    /// parameter `options`, as PgBouncer does), and what was asked needs a
    /// session of its own (the migrator's advisory lock): give it a URL
    /// that reaches the database directly.
    #[error(
        "{what} needs a session of its own, and this URL leads to a transaction pooler (it refused the startup parameter `options`): use a URL that reaches the database directly"
    )]
    NeedsSession {
        /// What needed the session.
        what: &'static str,
    },
    /// Applying migrations failed.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

impl Error {
    /// Whether this is a lost session (`SL001`): the caller must stop using the
    /// session and its tasks.
    pub fn is_session_lost(&self) -> bool {
        matches!(self, Error::SessionLost { .. })
    }

    /// Whether retrying later may succeed: connection failures, timeouts and
    /// serialisation conflicts, as opposed to bugs, bad input or a lost session.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::PoolTimedOut | Error::Connect(_) | Error::Timeout(_) => true,
            Error::Db(e) => match e.code() {
                None => true, // closed connection, I/O error, timeout
                Some(code) => {
                    let c = code.code();
                    // class 08: connection exception; 40: transaction rollback
                    // (serialisation, deadlock); 53: insufficient resources;
                    // 57P0x: admin/crash shutdown, cannot connect now; 57014: query canceled;
                    // 55P03: a lock not granted within lock_timeout.
                    c.starts_with("08")
                        || c == "55P03"
                        || c.starts_with("40")
                        || c.starts_with("53")
                        || c.starts_with("57P")
                        || c == "57014"
                }
            },
            _ => false,
        }
    }

    /// The SQLSTATE reported by Postgres, if this error came from the server.
    pub fn db_code(&self) -> Option<&str> {
        match self {
            Error::Db(e) => e.code().map(|c| c.code()),
            Error::SessionLost { .. } => Some(SQLSTATE_SESSION_LOST),
            Error::ProtocolMismatch { .. } => Some(SQLSTATE_PROTOCOL_MISMATCH),
            Error::Declaration { .. } => Some(SQLSTATE_BAD_DECLARATION),
            _ => None,
        }
    }

    /// Classifies a database error raised while working with `session` (a
    /// lost session is reported as such only when there is one).
    pub(crate) fn from_db(e: tokio_postgres::Error, session: Option<i64>) -> Self {
        let Some(db) = e.as_db_error() else {
            return Error::Db(e);
        };
        match (db.code().code(), session) {
            (SQLSTATE_SESSION_LOST, Some(session)) => Error::SessionLost { session },
            (SQLSTATE_PROTOCOL_MISMATCH, _) => Error::ProtocolMismatch {
                detail: with_hint(db),
            },
            (SQLSTATE_BAD_DECLARATION, _) => Error::Declaration {
                detail: with_hint(db),
            },
            (SQLSTATE_INVALID_ARGUMENT, _) => Error::InvalidArgument(db.message().to_owned()),
            // undefined_function, invalid_schema_name, undefined_table
            ("42883" | "3F000" | "42P01", _) if mentions_session_lock(db.message()) => {
                Error::NotMigrated {
                    detail: db.message().to_owned(),
                }
            }
            _ => Error::Db(e),
        }
    }

    /// A pool checkout that failed.
    pub(crate) fn from_pool(e: bb8::RunError<ConnectError>) -> Self {
        match e {
            bb8::RunError::User(ConnectError::Db(e)) => Error::from_db(e, None),
            bb8::RunError::User(e) => Error::Connect(Arc::new(e)),
            bb8::RunError::TimedOut => Error::PoolTimedOut,
        }
    }
}

/// A panic caught in user code: its message, as an error.
#[derive(Debug, Clone)]
pub struct Panic {
    message: String,
}

impl Panic {
    /// The panic of `payload`, as `std::panic::catch_unwind` returns it.
    pub(crate) fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_owned()
        };
        Panic { message }
    }

    /// What the panic said.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Panic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Panic {}

/// Prints an error with every cause in its chain (`a: b: c`), skipping a
/// cause whose text the message already holds, and a PostgreSQL error with
/// the server's message, SQLSTATE, detail and hint, which tokio-postgres'
/// own `Display` leaves out. The one formatter the CLI and the tests use.
///
/// ```
/// use session_lock::ErrorChain;
/// let e = std::io::Error::other("connection refused");
/// assert_eq!(ErrorChain(&e).to_string(), "connection refused");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = one(self.0);
        let mut cause = self.0.source();
        while let Some(inner) = cause {
            let inner_text = one(inner);
            if !text.contains(&inner_text) {
                text.push_str(": ");
                text.push_str(&inner_text);
            }
            cause = inner.source();
        }
        f.write_str(&text)
    }
}

/// One error's own text; a PostgreSQL server error's in full.
fn one(e: &(dyn std::error::Error + 'static)) -> String {
    match e.downcast_ref::<tokio_postgres::Error>() {
        Some(pg) if pg.as_db_error().is_some() => describe_db(pg),
        _ => e.to_string(),
    }
}

fn with_hint(db: &tokio_postgres::error::DbError) -> String {
    match db.hint() {
        Some(h) => format!("{} ({h})", db.message()),
        None => db.message().to_owned(),
    }
}

fn mentions_session_lock(message: &str) -> bool {
    message.contains("session_lock") || message.contains("example_")
}

/// Formats a tokio-postgres error with the server's message, detail and hint,
/// which its own `Display` leaves out.
pub(crate) fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            // Include the source chain: "error connecting to server: Connection refused".
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// A row from the task table that could not be turned into the task type.
///
/// The task stays assigned to its session: it is reported, never dropped, and
/// comes back on the next tick until it is fixed or the row is corrected.
#[derive(Debug)]
pub struct ScanError {
    /// The id of the task, when the `id` column itself could be read.
    pub task_id: Option<i64>,
    /// The column that failed.
    pub column: String,
    /// Why it failed.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl ScanError {
    /// A failure to read `column` of the row of task `task_id`.
    pub fn new(
        task_id: Option<i64>,
        column: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ScanError {
            task_id,
            column: column.into(),
            source: source.into(),
        }
    }
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.task_id {
            Some(id) => write!(
                f,
                "task {id}: cannot read column `{}`: {}",
                self.column, self.source
            ),
            None => write!(
                f,
                "cannot read column `{}` of a task row: {}",
                self.column, self.source
            ),
        }
    }
}

impl std::error::Error for ScanError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
