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

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The address the server listens on.
const HOST: &str = "127.0.0.1";
/// The superuser `initdb` creates.
const SUPERUSER: &str = "postgres";
/// Prefix of the data directories under the temporary directory.
const DIR_PREFIX: &str = "session-lock-pg-";
/// How long to wait for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the server to exit after a shutdown signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Drop` waits for a fast shutdown before an immediate one.
const DROP_FAST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports to try when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// Environment variables that would redirect the server or the readiness probe.
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
    "PGAPPNAME",
    "PGTZ",
    "PGDATESTYLE",
];

/// Numbers the data directories of this process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Everything that can go wrong starting, stopping or restarting an [`EmbeddedPostgres`].
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
fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let action = action.into();
    move |source| EmbeddedError::Io { action, source }
}

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
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            durable: false,
            max_connections: 300,
            port: None,
            extra_settings: Vec::new(),
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

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// A spawn request for the keeper thread.
type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// What the mutex guards.
#[derive(Debug)]
struct State {
    /// The postmaster, while it runs (or until it is reaped).
    child: Option<Child>,
    /// Sends spawn requests to the keeper thread.
    keeper_tx: Option<mpsc::Sender<SpawnRequest>>,
    /// The keeper thread.
    keeper: Option<JoinHandle<()>>,
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

/// Why one attempt to start the server failed.
enum StartFailure {
    /// The server exited before accepting connections.
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    /// Anything else.
    Other(EmbeddedError),
}

impl From<EmbeddedError> for StartFailure {
    fn from(e: EmbeddedError) -> Self {
        StartFailure::Other(e)
    }
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
        let bin_dir = find_bin_dir()?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };

        let tmp = std::env::temp_dir();
        remove_stale_dirs(&tmp);
        let data_dir = tmp.join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        if data_dir.exists() {
            // Only possible if a dead process with our pid left it behind.
            fs::remove_dir_all(&data_dir)
                .map_err(io_err(format!("removing stale {}", data_dir.display())))?;
        }
        fs::create_dir(&data_dir).map_err(io_err(format!(
            "creating the data directory {} (set TMPDIR to a writable directory)",
            data_dir.display()
        )))?;

        // From here on, dropping `pg` removes the directory again.
        let (keeper_tx, keeper) = spawn_keeper().inspect_err(|_| {
            let _ = fs::remove_dir_all(&data_dir);
        })?;
        let mut pg = EmbeddedPostgres {
            log_path: data_dir.join("postgres.log"),
            data_dir,
            bin_dir,
            port: 0,
            run_as,
            opts,
            state: Mutex::new(State {
                child: None,
                keeper_tx: Some(keeper_tx),
                keeper: Some(keeper),
            }),
        };
        pg.prepare_data_dir()?;
        pg.initdb()?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            pg.port = match pg.opts.port {
                Some(port) => port,
                None => free_port()?,
            };
            let mut st = pg.lock();
            match pg.start_locked(&mut st) {
                Ok(()) => break,
                Err(StartFailure::Exited { log_tail, .. })
                    if pg.opts.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && log_tail.contains("Address already in use") =>
                {
                    tracing::debug!(port = pg.port, "port taken, trying another");
                }
                Err(e) => return Err(pg.start_error(e)),
            }
        }
        tracing::debug!(port = pg.port, data_dir = %pg.data_dir.display(), "embedded PostgreSQL ready");
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
        let mut servers = AT_EXIT.lock().unwrap_or_else(PoisonError::into_inner);
        if servers.iter().any(|s| std::ptr::eq(*s, self)) {
            return;
        }
        servers.push(self);
        drop(servers);
        AT_EXIT_REGISTERED.call_once(|| {
            // SAFETY: `cleanup_servers_at_exit` is an `extern "C"` function that
            // never unwinds.
            if unsafe { libc::atexit(cleanup_servers_at_exit) } != 0 {
                tracing::debug!("atexit failed: data directories will be left behind");
            }
        });
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
        self.start_locked(&mut st).map_err(|e| self.start_error(e))
    }

    /// [`stop`](Self::stop)s the server with `mode`, then
    /// [`start_again`](Self::start_again)s it. The postmaster gets a new pid;
    /// existing connections are lost.
    pub fn restart(&self, mode: ShutdownMode) -> Result<(), EmbeddedError> {
        let mut st = self.lock();
        self.stop_locked(&mut st, mode, STOP_TIMEOUT)?;
        st.child = None;
        self.start_locked(&mut st).map_err(|e| self.start_error(e))
    }

    /// Locks the state, ignoring poisoning (the state stays consistent).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A description of the user the server runs as.
    fn user_name(&self) -> String {
        match &self.run_as {
            Some(u) => u.name.clone(),
            None => format!("uid {}", unsafe { libc::geteuid() }),
        }
    }

    /// Hands the (empty) data directory to the server's user, mode 0700.
    fn prepare_data_dir(&self) -> Result<(), EmbeddedError> {
        if let Some(user) = &self.run_as {
            let path = CString::new(self.data_dir.as_os_str().as_bytes()).map_err(|_| {
                EmbeddedError::Io {
                    action: format!("using data directory {}", self.data_dir.display()),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
                }
            })?;
            if unsafe { libc::chown(path.as_ptr(), user.uid, user.gid) } != 0 {
                return Err(EmbeddedError::Io {
                    action: format!("handing {} to user {}", self.data_dir.display(), user.name),
                    source: io::Error::last_os_error(),
                });
            }
        }
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(
            format!("setting permissions of {}", self.data_dir.display()),
        ))
    }

    /// Applies what every child needs: user, working directory, environment.
    fn prepare(&self, cmd: &mut Command) {
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir(&self.data_dir);
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C").env("LANG", "C");
        cmd.stdin(Stdio::null());
    }

    /// Runs `initdb` into the data directory.
    fn initdb(&self) -> Result<(), EmbeddedError> {
        let mut cmd = Command::new(self.bin_dir.join("initdb"));
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        self.prepare(&mut cmd);
        let started = Instant::now();
        let out = cmd.output().map_err(io_err(format!(
            "running {}",
            self.bin_dir.join("initdb").display()
        )))?;
        tracing::debug!(elapsed = ?started.elapsed(), "initdb done");
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(EmbeddedError::Initdb {
            status: out.status.to_string(),
            data_dir: self.data_dir.clone(),
            user: self.user_name(),
            output,
        })
    }

    /// The command that runs the postmaster, logging to `log`.
    fn server_command(&self, log: File) -> Result<Command, EmbeddedError> {
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D").arg(&self.data_dir);
        cmd.arg("-p").arg(self.port.to_string());
        let mut settings = vec![
            format!("listen_addresses={HOST}"),
            format!("unix_socket_directories={}", self.socket_dir()),
            format!("max_connections={}", self.opts.max_connections),
        ];
        if !self.opts.durable {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        settings.extend(
            self.opts
                .extra_settings
                .iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        for setting in settings {
            cmd.arg("-c").arg(setting);
        }
        self.prepare(&mut cmd);
        let log2 = log
            .try_clone()
            .map_err(io_err(format!("opening {}", self.log_path.display())))?;
        cmd.stdout(log).stderr(log2);

        #[cfg(target_os = "linux")]
        {
            // Own process group: terminal signals go to us, and reach the
            // server through the parent-death signal below.
            cmd.process_group(0);
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: the closure only makes async-signal-safe system calls
            // and does not allocate. It runs after std's setuid, which would
            // otherwise clear the parent-death signal.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGQUIT as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    // The spawning thread may have died before prctl took effect.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    /// The Unix-socket directory setting: the data directory, or none if its
    /// path is too long for a socket address or would need quoting.
    fn socket_dir(&self) -> String {
        let dir = self.data_dir.to_string_lossy();
        let unquotable = dir.contains([',', ' ', '"', '\'', '\\']);
        // sun_path holds 108 bytes; "/.s.PGSQL.65535.lock" takes 20.
        if unquotable || dir.len() + 21 > 107 {
            String::new()
        } else {
            dir.into_owned()
        }
    }

    /// Starts the postmaster on `self.port` (state must hold no running child)
    /// and waits until it accepts connections. Retries while a previous,
    /// killed server's processes still hold its shared memory.
    fn start_locked(&self, st: &mut State) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.start_once(st, deadline) {
                Err(StartFailure::Exited { log_tail, .. })
                    if Instant::now() < deadline
                        && log_tail.contains("pre-existing shared memory block") =>
                {
                    tracing::debug!("old server processes still around, retrying start");
                    thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`start_locked`](Self::start_locked).
    fn start_once(&self, st: &mut State, deadline: Instant) -> Result<(), StartFailure> {
        let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(format!("opening {}", self.log_path.display())))?;
        let cmd = self.server_command(log)?;

        let tx = st.keeper_tx.as_ref().ok_or(EmbeddedError::KeeperGone)?;
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.send((cmd, reply_tx))
            .map_err(|_| EmbeddedError::KeeperGone)?;
        let mut child = reply_rx
            .recv()
            .map_err(|_| EmbeddedError::KeeperGone)?
            .map_err(io_err(format!(
                "starting {}",
                self.bin_dir.join("postgres").display()
            )))?;
        tracing::debug!(pid = child.id(), port = self.port, "postgres spawned");

        let isready = self.bin_dir.join("pg_isready");
        let has_isready = is_executable(&isready);
        let mut pause = Duration::from_millis(10);
        loop {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(StartFailure::Exited {
                        status,
                        log_tail: self.log_tail(log_start),
                    });
                }
                Err(e) => {
                    return Err(EmbeddedError::Io {
                        action: "waiting for postgres".into(),
                        source: e,
                    }
                    .into());
                }
            }
            let ready = if has_isready {
                self.isready(&isready)
            } else {
                self.ready_without_isready(child.id())
            };
            if ready {
                st.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let pid = child.id();
                let _ = signal_and_wait(&mut child, libc::SIGQUIT, Duration::from_secs(5))
                    || signal_and_wait(&mut child, libc::SIGKILL, Duration::from_secs(5));
                return Err(EmbeddedError::StartTimeout {
                    pid,
                    port: self.port,
                    timeout: START_TIMEOUT,
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(log_start),
                }
                .into());
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Whether `pg_isready` says the server accepts connections.
    fn isready(&self, isready: &Path) -> bool {
        let mut cmd = Command::new(isready);
        cmd.args([
            "-q", "-h", HOST, "-U", SUPERUSER, "-d", "postgres", "-t", "2", "-p",
        ])
        .arg(self.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        matches!(cmd.status(), Ok(s) if s.success())
    }

    /// Without `pg_isready`: the postmaster says "ready" in `postmaster.pid`
    /// and the port takes connections.
    fn ready_without_isready(&self, pid: u32) -> bool {
        let Ok(pidfile) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let mut lines = pidfile.lines();
        let ours = lines.next().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid);
        // Line 8 is the postmaster's status.
        let ready = lines.nth(6).is_some_and(|l| l.trim() == "ready");
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port));
        ours && ready && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    /// The end of what was written to the log since byte `from`.
    fn log_tail(&self, from: u64) -> String {
        const MAX: u64 = 4000;
        let Ok(mut file) = File::open(&self.log_path) else {
            return String::from("(no log)");
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(MAX));
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
            return String::from("(log unreadable)");
        }
        String::from_utf8_lossy(&buf).trim_end().to_owned()
    }

    /// Turns a failed start into the public error.
    fn start_error(&self, e: StartFailure) -> EmbeddedError {
        match e {
            StartFailure::Other(e) => e,
            StartFailure::Exited { status, log_tail } => EmbeddedError::ServerExited {
                status: status.to_string(),
                port: self.port,
                log: self.log_path.clone(),
                log_tail,
            },
        }
    }

    /// Signals the postmaster with `mode` and waits for it to exit, escalating
    /// after `timeout`. Clears `st.child` once it is reaped.
    fn stop_locked(
        &self,
        st: &mut State,
        mode: ShutdownMode,
        timeout: Duration,
    ) -> Result<(), EmbeddedError> {
        let Some(child) = st.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        let escalation: &[libc::c_int] = match mode {
            ShutdownMode::Smart | ShutdownMode::Fast => &[libc::SIGQUIT, libc::SIGKILL],
            ShutdownMode::Immediate => &[libc::SIGKILL],
        };
        let mut stopped = signal_and_wait(child, mode.signal(), timeout);
        for &sig in escalation {
            if stopped {
                break;
            }
            tracing::debug!(pid, sig, "postgres did not stop in time, escalating");
            stopped = signal_and_wait(child, sig, timeout);
        }
        if !stopped {
            return Err(EmbeddedError::StopTimeout {
                pid,
                timeout,
                log: self.log_path.clone(),
            });
        }
        tracing::debug!(pid, ?mode, "postgres stopped");
        st.child = None;
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        let mut st = self.lock();
        if self
            .stop_locked(&mut st, ShutdownMode::Fast, DROP_FAST_TIMEOUT)
            .is_err()
        {
            let _ = self.stop_locked(&mut st, ShutdownMode::Immediate, DROP_FAST_TIMEOUT);
        }
        // Closing the channel ends the keeper thread.
        st.keeper_tx = None;
        if let Some(keeper) = st.keeper.take() {
            let _ = keeper.join();
        }
        drop(st);
        if let Err(e) = fs::remove_dir_all(&self.data_dir) {
            tracing::debug!(error = %e, dir = %self.data_dir.display(), "could not remove data directory");
        }
    }
}

/// Servers to clean up when the process exits.
static AT_EXIT: Mutex<Vec<&'static EmbeddedPostgres>> = Mutex::new(Vec::new());
/// Whether [`cleanup_servers_at_exit`] is registered with `atexit`.
static AT_EXIT_REGISTERED: std::sync::Once = std::sync::Once::new();

/// Stops the servers in [`AT_EXIT`] and removes their data directories.
extern "C" fn cleanup_servers_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let servers = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(PoisonError::into_inner));
        for pg in servers {
            // Another thread may be exiting with a restart in progress: wait a
            // little for it, but never hang the exit.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut st = loop {
                match pg.state.try_lock() {
                    Ok(st) => break Some(st),
                    Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(std::sync::TryLockError::WouldBlock) => break None,
                }
            };
            let Some(st) = st.as_mut() else { continue };
            if pg
                .stop_locked(st, ShutdownMode::Immediate, Duration::from_secs(5))
                .is_ok()
            {
                let _ = fs::remove_dir_all(&pg.data_dir);
            }
        }
    });
}

/// Sends `sig` to the child (unless it has exited) and waits up to `timeout`
/// for it to exit, reaping it. Returns whether it has exited.
fn signal_and_wait(child: &mut Child, sig: libc::c_int, timeout: Duration) -> bool {
    match child.try_wait() {
        Ok(Some(_)) | Err(_) => return true,
        Ok(None) => {}
    }
    // The child is not reaped yet, so its pid cannot have been reused.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Starts the thread that spawns the server. The server's parent-death signal
/// fires when this thread ends, which it does only when the channel closes.
fn spawn_keeper() -> Result<(mpsc::Sender<SpawnRequest>, JoinHandle<()>), EmbeddedError> {
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    let handle = thread::Builder::new()
        .name("session-lock-pg-keeper".into())
        .spawn(move || {
            while let Ok((mut cmd, reply)) = rx.recv() {
                let _ = reply.send(cmd.spawn());
            }
        })
        .map_err(io_err("starting the embedded PostgreSQL keeper thread"))?;
    Ok((tx, handle))
}

/// Picks a port that is free right now.
fn free_port() -> Result<u16, EmbeddedError> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("finding a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

/// Whether `path` is an executable file (following symlinks).
fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `dir` holds `initdb` and `postgres`.
fn has_server_bins(dir: &Path) -> bool {
    is_executable(&dir.join("postgres")) && is_executable(&dir.join("initdb"))
}

/// The real directory of the binaries in `dir`: PostgreSQL finds its share
/// directory relative to its real path, so symlinks are resolved.
fn real_bin_dir(dir: &Path) -> PathBuf {
    if let Some(real) = fs::canonicalize(dir.join("postgres"))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| has_server_bins(d))
    {
        return real;
    }
    fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Finds the directory with the server binaries (see the module docs).
fn find_bin_dir() -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = std::env::var_os("SESSION_LOCK_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_bins(&dir) {
            Ok(real_bin_dir(&dir))
        } else {
            Err(EmbeddedError::BadBinDir { dir })
        };
    }

    let mut searched = Vec::new();
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(OsStr::from_bytes(out.stdout.trim_ascii()));
            if has_server_bins(&dir) {
                return Ok(real_bin_dir(&dir));
            }
            searched.push(format!("pg_config --bindir ({})", dir.display()));
        }
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_bins(&dir) {
                return Ok(real_bin_dir(&dir));
            }
        }
        searched.push("PATH".into());
    }

    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_server_bins(d)) {
        return Ok(real_bin_dir(&dir));
    }
    searched.push(format!("{}/*/bin", root.display()));

    Err(EmbeddedError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

/// The user to run the server as when we are root.
fn unprivileged_user() -> Result<RunAs, EmbeddedError> {
    ["postgres", "nobody"]
        .into_iter()
        .find_map(lookup_user)
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

/// Looks a user up in the password database.
fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, which outlive the call;
    // only the numeric fields are read afterwards.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 64 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(RunAs {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// Whether process `pid` exists.
fn process_alive(pid: libc::pid_t) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new(&format!("/proc/{pid}")).exists();
    }
    // SAFETY: signal 0 only checks for existence; pid > 0 is checked by callers.
    unsafe {
        libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

/// Removes `session-lock-pg-<pid>-*` directories of processes that no longer
/// exist, first stopping any server still running in them.
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() || process_alive(pid) {
            continue;
        }
        let dir = entry.path();
        kill_leftover_postmaster(&dir);
        match fs::remove_dir_all(&dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "removed stale data directory"),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "could not remove stale data directory")
            }
        }
    }
}

/// Stops a postmaster still running in `dir` (its working directory is the
/// data directory), waiting a few seconds for it to exit.
fn kill_leftover_postmaster(dir: &Path) {
    let Some(pid) = fs::read_to_string(dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<libc::pid_t>().ok())
        .filter(|&p| p > 1)
    else {
        return;
    };
    let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
    if !cwd.is_ok_and(|cwd| fs::canonicalize(dir).is_ok_and(|d| d == cwd)) {
        return;
    }
    tracing::debug!(pid, dir = %dir.display(), "stopping leftover postgres");
    unsafe {
        libc::kill(pid, libc::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if process_alive(pid) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
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
