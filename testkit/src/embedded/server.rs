//! The postmaster's life: it starts on a loopback port (another free one if
//! the chosen one is taken) and counts as started only once it accepts
//! connections; it stops with the signal of the shutdown mode, escalating
//! until it has exited and been reaped.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::binaries::is_executable;
use super::command::clear_pg_env;
use super::error::{EmbeddedError, io_err};
use super::keeper::die_with_keeper;
use super::{EmbeddedPostgres, HOST, SUPERUSER, ShutdownMode, State};

/// How long to wait for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How many free ports to try when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 5;

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
    /// Starts the postmaster for the first time, on the configured port or
    /// else on a free one, trying others while the chosen one turns out to
    /// be taken.
    pub(super) fn start_on_a_port(&mut self) -> Result<(), EmbeddedError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = match self.opts.port {
                Some(port) => port,
                None => free_port()?,
            };
            let mut st = self.lock();
            match self.start_locked(&mut st) {
                Ok(()) => return Ok(()),
                Err(StartFailure::Exited { log_tail, .. })
                    if self.opts.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && log_tail.contains("Address already in use") =>
                {
                    tracing::debug!(port = self.port, "port taken, trying another");
                }
                Err(e) => return Err(self.start_error(e)),
            }
        }
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
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let log2 = log
            .try_clone()
            .map_err(io_err(format!("opening {}", self.log_path.display())))?;
        cmd.stdout(log).stderr(log2);
        die_with_keeper(&mut cmd);
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

    /// Starts the postmaster again on its port, after a stop or a crash
    /// (state must hold no running child), and waits until it accepts
    /// connections.
    pub(super) fn start_stopped(&self, st: &mut State) -> Result<(), EmbeddedError> {
        self.start_locked(st).map_err(|e| self.start_error(e))
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

        let mut child = st.keeper.spawn(cmd)?.map_err(io_err(format!(
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
        clear_pg_env(&mut cmd);
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
    pub(super) fn stop_locked(
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

/// Sends `sig` to the child (unless it has exited) and waits up to `timeout`
/// for it to exit, reaping it. Returns whether it has exited.
pub(super) fn signal_and_wait(child: &mut Child, sig: libc::c_int, timeout: Duration) -> bool {
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
