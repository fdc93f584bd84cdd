//! A throwaway PostgreSQL server started from the installed server binaries.
//!
//! [`EmbeddedPostgres`] runs `initdb` into a fresh directory under
//! [`std::env::temp_dir`], starts the `postgres` binary on a loopback port with
//! trust authentication, and removes everything again when dropped. It is what
//! the integration tests, the benchmarks and the `demo` command use when no
//! `DATABASE_URL` is given.
//!
//! ```no_run
//! use session_lock_testkit::embedded::{EmbeddedPostgres, ShutdownMode};
//!
//! # fn main() -> Result<(), session_lock_testkit::embedded::EmbeddedError> {
//! let pg = EmbeddedPostgres::start()?;
//! let url = pg.url("postgres"); // postgres://postgres@127.0.0.1:PORT/postgres
//! # let _ = url;
//! pg.restart(ShutdownMode::Immediate)?; // crash + recovery, same data and port
//! drop(pg); // stops the server and deletes its data directory
//! # Ok(())
//! # }
//! ```
//!
//! # Where the binaries come from
//!
//! The first of these that holds both `initdb` and `postgres` is used:
//!
//! 1. the directory in the environment variable `SESSION_LOCK_PG_BIN`;
//! 2. `pg_config --bindir`, if `pg_config` is on `PATH`;
//! 3. the directories on `PATH`;
//! 4. `/usr/lib/postgresql/<version>/bin`, highest version first (Debian/Ubuntu).
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the current process is root, `initdb`
//! and `postgres` run as the `postgres` user, or `nobody` if there is none; the
//! data directory is created under the temporary directory and handed to that
//! user, who must be able to reach it (the default `/tmp` is fine).
//!
//! # Nothing is left behind
//!
//! Blocking calls only (`std::process`); from async code, wrap them in
//! `tokio::task::spawn_blocking`. The server is spawned from a dedicated thread
//! that lives as long as the [`EmbeddedPostgres`], and on Linux the server is
//! told (`PR_SET_PDEATHSIG`) to shut down immediately when that thread dies, so
//! a server held in a `static`, or owned by a process killed with `SIGKILL`,
//! does not outlive its process. Data directories such processes leave behind
//! are removed by the next [`EmbeddedPostgres::start`].
//!
//! This module is Unix-only.

#![cfg(unix)]

mod binaries;
mod cleanup;
mod command;
mod error;
mod initdb;
mod keeper;
mod server;
mod standby;
pub(crate) mod user;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use error::EmbeddedError;

use keeper::Keeper;
use server::signal_and_wait;
use user::RunAs;

/// The address the server listens on.
const HOST: &str = "127.0.0.1";
/// The superuser `initdb` creates.
const SUPERUSER: &str = "postgres";
/// How long to wait for the server to exit after a shutdown signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start an [`EmbeddedPostgres`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// `false` (the default) turns off `fsync`, `synchronous_commit` and
    /// `full_page_writes`: fast, and the server still recovers from a crash,
    /// but a crash (including [`ShutdownMode::Immediate`]) may lose the last
    /// few hundred milliseconds of commits, as `synchronous_commit` is off. Tests
    /// that check committed data survive a crash should add
    /// `("synchronous_commit", "on")` to [`extra_settings`](Self::extra_settings)
    /// (cheap while `fsync` stays off) or set this. `true` keeps PostgreSQL's
    /// durable defaults.
    pub durable: bool,
    /// `max_connections` (default 300).
    pub max_connections: u32,
    /// The port to listen on; `None` (the default) picks a free one.
    pub port: Option<u16>,
    /// More `postgresql.conf` settings, passed as `-c name=value`; they override
    /// the ones above.
    pub extra_settings: Vec<(String, String)>,
    /// More environment for the server (not for `initdb`): e.g. an
    /// `LD_PRELOAD` of libfaketime, to give the server a clock of its own.
    pub env: Vec<(String, String)>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            durable: false,
            max_connections: 300,
            port: None,
            extra_settings: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// How to shut the server down (see PostgreSQL's
/// [server shutdown](https://www.postgresql.org/docs/current/server-shutdown.html)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// `SIGTERM`: wait for every client to disconnect, then shut down cleanly.
    Smart,
    /// `SIGINT`: disconnect clients, roll back their transactions, shut down cleanly.
    Fast,
    /// `SIGQUIT`: kill everything at once, like a crash; the next start recovers
    /// from the write-ahead log.
    Immediate,
}

impl ShutdownMode {
    /// The signal the postmaster receives for this mode.
    fn signal(self) -> libc::c_int {
        match self {
            ShutdownMode::Smart => libc::SIGTERM,
            ShutdownMode::Fast => libc::SIGINT,
            ShutdownMode::Immediate => libc::SIGQUIT,
        }
    }
}

/// What the mutex guards.
#[derive(Debug)]
struct State {
    /// The postmaster, while it runs (or until it is reaped).
    child: Option<Child>,
    /// The thread that spawns the postmaster.
    keeper: Keeper,
}

/// A throwaway PostgreSQL server: a fresh data directory, a loopback port,
/// superuser `postgres` with trust authentication.
///
/// All methods take `&self`, so one server can live in a `static` and be shared
/// by many threads. Dropping it stops the server and deletes its data directory.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    opts: EmbeddedOptions,
    state: Mutex<State>,
}

impl EmbeddedPostgres {
    /// Starts a server with the default [`EmbeddedOptions`]: not durable, 300
    /// connections, a free port. Blocks until it accepts connections.
    pub fn start() -> Result<Self, EmbeddedError> {
        Self::start_with(EmbeddedOptions::default())
    }

    /// Starts a server with the given options: finds the binaries, runs
    /// `initdb` into a fresh directory and starts `postgres`. Blocks until the
    /// server accepts connections (at most a minute).
    pub fn start_with(opts: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let mut pg = Self::unstarted(opts)?;
        pg.initdb()?;
        pg.start_on_a_port()?;
        tracing::debug!(port = pg.port, data_dir = %pg.data_dir.display(), "embedded PostgreSQL ready");
        Ok(pg)
    }

    /// A server not started yet, its data directory fresh, empty and its
    /// user's; dropping it removes the directory.
    fn unstarted(opts: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let bin_dir = binaries::find_bin_dir()?;
        let run_as = user::run_as()?;
        let data_dir = cleanup::fresh_data_dir()?;

        // From here on, dropping `pg` removes the directory again.
        let keeper = Keeper::start().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&data_dir);
        })?;
        let pg = EmbeddedPostgres {
            log_path: data_dir.join("postgres.log"),
            data_dir,
            bin_dir,
            port: 0,
            run_as,
            opts,
            state: Mutex::new(State {
                child: None,
                keeper,
            }),
        };
        pg.prepare_data_dir()?;
        Ok(pg)
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's name, `postgres`; it needs no password from loopback.
    pub fn user(&self) -> &str {
        SUPERUSER
    }

    /// A connection URL for database `dbname` as the superuser:
    /// `postgres://postgres@127.0.0.1:PORT/dbname`. Only database `postgres`
    /// (and the templates) exist at first.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(dbname)
        )
    }

    /// The server's data directory (deleted on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory the PostgreSQL binaries were taken from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's log file (inside the data directory), appended to by every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The options the server was started with (with the chosen port filled in
    /// by [`port`](Self::port), not here).
    pub fn options(&self) -> &EmbeddedOptions {
        &self.opts
    }

    /// The postmaster's process id while it runs; `None` once it has exited.
    pub fn pid(&self) -> Option<u32> {
        let mut st = self.lock();
        let child = st.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Whether the postmaster is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Stops the server and removes its data directory when the process exits
    /// normally (returns from `main` or calls [`std::process::exit`]), for a
    /// server in a `static`, which is never dropped. Without this, such a
    /// server is still stopped when the process exits (by its parent-death
    /// signal, on Linux), but its data directory stays until the next
    /// [`start`](Self::start) in any process removes it. Registering twice is
    /// harmless.
    pub fn cleanup_at_exit(&'static self) {
        cleanup::at_exit(self);
    }

    /// Shuts the server down and waits until the postmaster has exited. Does
    /// nothing if it is not running.
    ///
    /// If it has not exited after a minute, [`Smart`](ShutdownMode::Smart) and
    /// [`Fast`](ShutdownMode::Fast) escalate to `SIGQUIT`, then `SIGKILL`;
    /// [`Immediate`](ShutdownMode::Immediate) escalates to `SIGKILL`.
    pub fn stop(&self, mode: ShutdownMode) -> Result<(), EmbeddedError> {
        let mut st = self.lock();
        self.stop_locked(&mut st, mode, STOP_TIMEOUT)
    }

    /// Kills the postmaster with `SIGKILL` and waits until it has exited: a
    /// harsher crash than [`ShutdownMode::Immediate`], as its backends are left
    /// to notice by themselves. [`start_again`](Self::start_again) waits for
    /// them to go. Does nothing if it is not running. As PostgreSQL warns, a
    /// killed postmaster cannot release its shared memory: each call may leave
    /// a segment of about a megabyte in `/dev/shm`.
    ///
    /// After killing the postmaster some other way, call this (or
    /// [`stop`](Self::stop)) before [`start_again`](Self::start_again): until the
    /// dying postmaster has been reaped it still counts as running.
    pub fn kill(&self) -> Result<(), EmbeddedError> {
        let mut st = self.lock();
        let Some(child) = st.child.as_mut() else {
            return Ok(());
        };
        if !signal_and_wait(child, libc::SIGKILL, STOP_TIMEOUT) {
            return Err(EmbeddedError::StopTimeout {
                pid: child.id(),
                timeout: STOP_TIMEOUT,
                log: self.log_path.clone(),
            });
        }
        st.child = None;
        Ok(())
    }

    /// Starts the server again after [`stop`](Self::stop) (or a crash), with the
    /// same data directory, port and settings, and waits until it accepts
    /// connections. Does nothing if it is running.
    pub fn start_again(&self) -> Result<(), EmbeddedError> {
        let mut st = self.lock();
        if let Some(child) = st.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
            st.child = None;
        }
        self.start_stopped(&mut st)
    }

    /// [`stop`](Self::stop)s the server with `mode`, then
    /// [`start_again`](Self::start_again)s it. The postmaster gets a new pid;
    /// existing connections are lost.
    pub fn restart(&self, mode: ShutdownMode) -> Result<(), EmbeddedError> {
        let mut st = self.lock();
        self.stop_locked(&mut st, mode, STOP_TIMEOUT)?;
        st.child = None;
        self.start_stopped(&mut st)
    }

    /// Locks the state, ignoring poisoning (the state stays consistent).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Percent-encodes a database name for a URL path.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
