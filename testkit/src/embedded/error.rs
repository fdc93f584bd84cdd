//! An embedded server's error says what to do about it: install the
//! binaries or point at them, create an unprivileged user, read the end of
//! the server's log, or kill a server that would not stop.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong starting, stopping or restarting an
/// [`EmbeddedPostgres`](super::EmbeddedPostgres).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// No directory holding both `initdb` and `postgres` was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found (searched: {searched}): install them (Debian/Ubuntu: apt-get install postgresql-15), or set SESSION_LOCK_PG_BIN to their directory, or set DATABASE_URL to use an existing server"
    )]
    BinariesNotFound {
        /// The places that were searched.
        searched: String,
    },
    /// `SESSION_LOCK_PG_BIN` is set but does not hold the server binaries.
    #[error(
        "SESSION_LOCK_PG_BIN={} does not contain both `initdb` and `postgres`: point it at PostgreSQL's bin directory (see `pg_config --bindir`) or unset it",
        dir.display()
    )]
    BadBinDir {
        /// The value of `SESSION_LOCK_PG_BIN`.
        dir: PathBuf,
    },
    /// Running as root, and there is no unprivileged user to run the server as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and neither a `postgres` nor a `nobody` user exists: create one (useradd --system postgres) or run as a normal user"
    )]
    NoUnprivilegedUser,
    /// A file-system or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `initdb` failed.
    #[error(
        "initdb failed ({status}) for {} running as {user}: check that this user can write there (or set TMPDIR to a directory it can reach); initdb said:\n{output}",
        data_dir.display()
    )]
    Initdb {
        /// How `initdb` exited.
        status: String,
        /// The data directory it was initialising.
        data_dir: PathBuf,
        /// The user it ran as.
        user: String,
        /// What `initdb` printed.
        output: String,
    },
    /// A server tool other than `initdb` failed (`pg_basebackup`, `pg_ctl`).
    #[error("{tool} failed ({status}) running as {user}; it said:\n{output}")]
    Tool {
        /// The tool and what it was doing.
        tool: String,
        /// How it exited.
        status: String,
        /// The user it ran as.
        user: String,
        /// What it printed.
        output: String,
    },
    /// The server exited while starting up.
    #[error(
        "PostgreSQL server exited during startup ({status}) on port {port}; end of its log {}:\n{log_tail}",
        log.display()
    )]
    ServerExited {
        /// How the server exited.
        status: String,
        /// The port it was started on.
        port: u16,
        /// The server's log file.
        log: PathBuf,
        /// The end of what this start wrote to the log.
        log_tail: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "PostgreSQL server (pid {pid}, port {port}) did not accept connections within {timeout:?}, so it was killed; end of its log {}:\n{log_tail}",
        log.display()
    )]
    StartTimeout {
        /// The server's process id.
        pid: u32,
        /// The port it was started on.
        port: u16,
        /// How long was waited.
        timeout: Duration,
        /// The server's log file.
        log: PathBuf,
        /// The end of what this start wrote to the log.
        log_tail: String,
    },
    /// The server did not exit after being told to, even after `SIGKILL`.
    #[error(
        "PostgreSQL server (pid {pid}) did not exit within {timeout:?} of being signalled: kill it by hand (kill -KILL {pid}) and check its log {}",
        log.display()
    )]
    StopTimeout {
        /// The server's process id.
        pid: u32,
        /// How long was waited after each signal.
        timeout: Duration,
        /// The server's log file.
        log: PathBuf,
    },
    /// The thread that spawns the server has gone away.
    #[error(
        "the thread that spawns the embedded PostgreSQL server has exited (a bug in session-lock): drop this EmbeddedPostgres and start a new one"
    )]
    KeeperGone,
}

/// Wraps an [`io::Error`] with what was being done.
pub(super) fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let action = action.into();
    move |source| EmbeddedError::Io { action, source }
}
