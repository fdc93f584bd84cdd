//! A throwaway PgBouncer in transaction mode, in front of a PostgreSQL the
//! caller names: the pooled path users run in production, started from the
//! installed `pgbouncer` binary (Debian: `apt-get install pgbouncer`).
//!
//! What it keeps true:
//! - PgBouncer's defaults, but for what a throwaway instance must set: its
//!   address and port (loopback, a free one), its files (a directory of its
//!   own, removed on drop), `pool_mode = transaction`, and trust
//!   authentication of the embedded server's superuser. In particular
//!   `ignore_startup_parameters` is left empty, so a client sending the
//!   startup parameter `options` is refused, as in a default install
//!   ([`start_ignoring_options`](PgBouncer::start_ignoring_options) lets it
//!   through, as some installs do).
//! - It never outlives this value: dropping it kills the process, and the
//!   process is told to die with the thread that started it. Run as root,
//!   it runs as the server's unprivileged user (PgBouncer refuses root).
//! - [`restart`](PgBouncer::restart) brings it back on the same port, so
//!   clients see a pooler that went away and came back.
//!
//! ```no_run
//! # fn main() -> Result<(), session_lock_testkit::pgbouncer::PgBouncerError> {
//! use session_lock_testkit::pgbouncer::PgBouncer;
//! let bouncer = PgBouncer::start("127.0.0.1", 5432)?;
//! let url = bouncer.url("postgres"); // postgres://postgres@127.0.0.1:PORT/postgres
//! # Ok(()) }
//! ```

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::embedded::user::{RunAs, run_as};

/// How long PgBouncer may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Where Debian and most distributions install the binary, besides `PATH`.
const KNOWN_PATHS: &[&str] = &["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// Why PgBouncer could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgBouncerError {
    /// No `pgbouncer` binary was found.
    #[error(
        "pgbouncer not found (searched PATH and {KNOWN_PATHS:?}): install it (Debian/Ubuntu: apt-get install pgbouncer)"
    )]
    NotFound,
    /// A file or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// It did not accept connections in time; its log's tail.
    #[error(
        "pgbouncer did not accept connections within {READY_WITHIN:?}; its log ends with:\n{log}"
    )]
    NotReady {
        /// The tail of its log.
        log: String,
    },
    /// Running as root, and no unprivileged user to run it as.
    #[error("running as root, and no `postgres` or `nobody` user to run pgbouncer as")]
    NoUser,
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> PgBouncerError {
    let action = action.into();
    move |source| PgBouncerError::Io { action, source }
}

/// A running PgBouncer in transaction mode; killed on drop.
#[derive(Debug)]
pub struct PgBouncer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts PgBouncer in front of the PostgreSQL at `host:port` (trust
    /// authentication of user `postgres`, as the embedded server has), for
    /// every database there.
    pub fn start(host: &str, port: u16) -> Result<Self, PgBouncerError> {
        Self::start_with(host, port, "")
    }

    /// [`start`](Self::start), with `ignore_startup_parameters = options`:
    /// a client's startup parameter `options` is accepted and ignored, so
    /// it cannot tell the pooler by a refusal.
    pub fn start_ignoring_options(host: &str, port: u16) -> Result<Self, PgBouncerError> {
        Self::start_with(host, port, "ignore_startup_parameters = options\n")
    }

    fn start_with(host: &str, port: u16, extra: &str) -> Result<Self, PgBouncerError> {
        let bin = find_bin().ok_or(PgBouncerError::NotFound)?;
        let run_as = run_as().map_err(|_| PgBouncerError::NoUser)?;
        let dir = std::env::temp_dir().join(format!(
            "session-lock-pgbouncer-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).map_err(io_err(
                format!("handing {} to {}", dir.display(), user.name),
            ))?;
        }
        let listen_port = free_port().map_err(io_err("finding a free port"))?;
        let ini = format!(
            "[databases]\n\
             * = host={host} port={port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen_port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n\
             {extra}",
            dir = dir.display()
        );
        for (name, text) in [
            ("pgbouncer.ini", ini.as_str()),
            ("userlist.txt", "\"postgres\" \"\"\n"),
        ] {
            let path = dir.join(name);
            fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .map_err(io_err(format!("setting permissions of {}", path.display())))?;
        }
        let mut bouncer = PgBouncer {
            bin,
            dir,
            port: listen_port,
            run_as,
            child: None,
        };
        bouncer.spawn()?;
        Ok(bouncer)
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/dbname`, through PgBouncer.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }

    /// Kills it (every client and server connection drops) and starts it
    /// again on the same port.
    pub fn restart(&mut self) -> Result<(), PgBouncerError> {
        self.kill();
        self.spawn()
    }

    /// Kills it; [`restart`](Self::restart) brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.dir.join("pgbouncer.pid"));
    }

    fn spawn(&mut self) -> Result<(), PgBouncerError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(self.dir.join("pgbouncer.ini"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        // SAFETY: prctl is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", self.bin.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.kill();
                return Err(PgBouncerError::NotReady {
                    log: tail(&self.log_path()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn find_bin() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pgbouncer"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    in_path
        .into_iter()
        .chain(KNOWN_PATHS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// A port free on loopback now (the listener is closed before PgBouncer
/// binds it).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
