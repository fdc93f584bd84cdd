//! Runner processes: `session-lock run` as a child process, the one driver
//! the tests, the benchmarks and the demo share.
//!
//! A runner process prints `session_id=N` on stdout whenever it starts a
//! session. A reader thread per process turns those lines into
//! [`RunnerEvent`]s, one per session however often it is printed: into the
//! process's own channel, so a test can wait for a session instead of
//! sleeping, or into a [`Fleet`]'s shared one, so a driver of many
//! processes waits on all of them at once. stderr goes to a log file, whose
//! tail is printed when the test fails and ends the errors a fleet reports.
//! The database URL is passed in the environment (`DATABASE_URL`), where
//! `ps` does not show a password. Dropping a [`RunnerProcess`] SIGKILLs and
//! reaps it, and `PR_SET_PDEATHSIG` kills it should the parent die first:
//! nothing outlives the process that started it.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Numbers the log files of this process's runner processes.
static NEXT_LOG: AtomicU64 = AtomicU64::new(0);

/// The `session-lock` binary the drivers start, found once per process.
static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `session-lock` binary: `SESSION_LOCK_BIN` if set, otherwise this
/// workspace's `session-lock-cli`, built on first use in the profile of the
/// calling process (a no-op when `cargo test --workspace` built it already).
///
/// # Panics
///
/// When the binary cannot be built, with cargo's error.
pub fn session_lock_bin() -> &'static Path {
    let found = BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SESSION_LOCK_BIN").filter(|b| !b.is_empty()) {
            return Ok(PathBuf::from(bin));
        }
        escargot::CargoBuild::new()
            .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
            .package("session-lock-cli")
            .bin("session-lock")
            .current_release()
            .run()
            .map(|run| run.path().to_path_buf())
            .map_err(|e| {
                format!(
                    "cannot build the session-lock binary ({e}); outside this workspace, install it (cargo install session-lock-cli) and set SESSION_LOCK_BIN to its path"
                )
            })
    });
    match found {
        Ok(bin) => bin,
        Err(e) => panic!("{e}"),
    }
}

/// What a runner process's stdout says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEvent {
    /// It holds a session it did not announce before.
    Session(i64),
    /// Its stdout closed: it exited, or is about to.
    Closed,
}

/// How to start a runner process: `session-lock run` and its arguments.
#[derive(Debug, Clone)]
pub struct RunnerCommand {
    exe: Option<PathBuf>,
    url: String,
    label: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log_level: String,
    log: Option<PathBuf>,
    keep_log: bool,
    own_group: bool,
}

impl RunnerCommand {
    /// `session-lock run` against the database at `url`, labelled `runner`,
    /// logging at `info` to a file in the temporary directory that is
    /// removed when the process is dropped after a passing test.
    pub fn new(url: impl Into<String>) -> Self {
        RunnerCommand {
            exe: None,
            url: url.into(),
            label: "runner".into(),
            args: Vec::new(),
            env: Vec::new(),
            log_level: "info".into(),
            log: None,
            keep_log: false,
            own_group: false,
        }
    }

    /// The executable to start, instead of [`session_lock_bin`] (the demo
    /// starts its own executable).
    pub fn exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.exe = Some(exe.into());
        self
    }

    /// The name messages and log files give the process.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// One argument after `run`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Arguments after `run`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `SESSION_LOCK_LOG` for the process (`info` by default).
    pub fn log_level(mut self, level: impl Into<String>) -> Self {
        self.log_level = level.into();
        self
    }

    /// Where stderr goes, instead of a file in the temporary directory.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Keeps the log file after a passing test too, and says where it is
    /// (unless it is in a [`log_file`](Self::log_file) the caller chose).
    pub fn keep_log(mut self, keep: bool) -> Self {
        self.keep_log = keep;
        self
    }

    /// Starts the process in a process group of its own, so that a Ctrl-C
    /// at the terminal reaches only the parent, which decides how its
    /// runners end.
    pub fn own_process_group(mut self, own: bool) -> Self {
        self.own_group = own;
        self
    }

    /// Starts the process, with a channel of its own for its events.
    pub fn spawn(self) -> io::Result<RunnerProcess> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut process = self.start(move |_, event| tx.send(event).is_ok())?;
        process.events = Some(rx);
        Ok(process)
    }

    /// Starts the process; `send` receives its pid and each event until it
    /// returns false.
    fn start(
        self,
        send: impl Fn(u32, RunnerEvent) -> bool + Send + 'static,
    ) -> io::Result<RunnerProcess> {
        let log_chosen = self.log.is_some();
        let log = self.log.unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "session-lock-run-{}-{}-{}.log",
                std::process::id(),
                NEXT_LOG.fetch_add(1, Ordering::Relaxed),
                self.label
            ))
        });
        let stderr = std::fs::File::create(&log).map_err(|e| {
            io::Error::new(e.kind(), format!("creating the log {}: {e}", log.display()))
        })?;
        let exe = self.exe.unwrap_or_else(|| session_lock_bin().to_path_buf());
        let mut cmd = Command::new(&exe);
        cmd.arg("run")
            .args(&self.args)
            .env("DATABASE_URL", &self.url)
            .env("SESSION_LOCK_LOG", &self.log_level)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if self.own_group {
            cmd.process_group(0);
        }
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody would kill us.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("starting runner {} ({}): {e}", self.label, exe.display()),
            )
        })?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            let mut announced = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(session) = line
                    .trim()
                    .strip_prefix("session_id=")
                    .and_then(|s| s.parse().ok())
                    .filter(|s| !announced.contains(s))
                {
                    announced.push(session);
                    if !send(pid, RunnerEvent::Session(session)) {
                        return;
                    }
                }
            }
            send(pid, RunnerEvent::Closed);
        });
        Ok(RunnerProcess {
            label: self.label,
            child,
            pid,
            events: None,
            sessions: Vec::new(),
            closed: false,
            killed: false,
            exit: None,
            log,
            keep_log: self.keep_log,
            announce_log: self.keep_log && !log_chosen,
        })
    }
}

/// A running `session-lock run`. Methods that wait panic, with the end of
/// the process's log, when what they wait for does not come: they are for
/// tests. A [`Fleet`] reports the same without panicking.
#[derive(Debug)]
pub struct RunnerProcess {
    label: String,
    child: Child,
    pid: u32,
    /// Its own events; `None` in a fleet, which receives them.
    events: Option<mpsc::UnboundedReceiver<RunnerEvent>>,
    /// Every session announced and received so far, in order.
    sessions: Vec<i64>,
    closed: bool,
    killed: bool,
    exit: Option<ExitStatus>,
    log: PathBuf,
    keep_log: bool,
    /// Whether dropping it says where the kept log is.
    announce_log: bool,
}

impl RunnerProcess {
    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends it a signal (SIGSTOP, SIGCONT, SIGTERM...).
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        if self.exit.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("runner {} has exited", self.label),
            ));
        }
        // SAFETY: kill(2) on our own child, not reaped yet (only `kill`,
        // `try_exit` and `Drop` reap it, and they record the exit).
        if unsafe { libc::kill(self.pid as libc::pid_t, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.killed = true;
        if let Some(status) = self.try_exit() {
            return Ok(status);
        }
        self.child.kill()?; // SIGKILL ends a stopped process too
        let status = self.child.wait()?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Whether it was killed by [`kill`](Self::kill).
    pub fn was_killed(&self) -> bool {
        self.killed
    }

    /// Whether it still runs: not killed, stdout open, not exited.
    pub fn is_alive(&self) -> bool {
        !self.killed && !self.closed && self.exit.is_none()
    }

    /// The sessions it announced that were received so far, in order.
    pub fn sessions(&self) -> &[i64] {
        &self.sessions
    }

    /// The session announced last, of those announced so far.
    pub fn current_session(&mut self) -> Option<i64> {
        while self.try_event().is_some() {}
        self.sessions.last().copied()
    }

    /// Whether it announced a session not yet received by
    /// [`next_session`](Self::next_session) or seen by
    /// [`current_session`](Self::current_session).
    pub fn announced_another(&mut self) -> bool {
        while let Some(event) = self.try_event() {
            if matches!(event, RunnerEvent::Session(_)) {
                return true;
            }
        }
        false
    }

    /// The next session it announces, in order.
    pub async fn next_session(&mut self, within: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + within;
        match self.event_until(deadline).await {
            Some(RunnerEvent::Session(id)) => id,
            Some(RunnerEvent::Closed) => self.no_session("closed its stdout without a new session"),
            None => self.no_session(&format!("announced no new session within {within:?}")),
        }
    }

    /// Waits for a session other than `after` (any, if `None`), starting
    /// from the latest one announced.
    pub async fn new_session(&mut self, after: Option<i64>, within: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(id) = self.current_session().filter(|&id| Some(id) != after) {
                return id;
            }
            match self.event_until(deadline).await {
                Some(RunnerEvent::Session(_)) => {}
                Some(RunnerEvent::Closed) => {
                    self.no_session("closed its stdout without a new session")
                }
                None => self.no_session(&format!("announced no new session within {within:?}")),
            }
        }
    }

    /// Records an event, from its own channel or its fleet's.
    fn record(&mut self, event: RunnerEvent) {
        match event {
            RunnerEvent::Session(id) => self.sessions.push(id),
            RunnerEvent::Closed => self.closed = true,
        }
    }

    fn try_event(&mut self) -> Option<RunnerEvent> {
        let event = self.events.as_mut()?.try_recv().ok()?;
        self.record(event);
        Some(event)
    }

    /// The next event of its own channel, or `None` at the deadline (or
    /// when it is in a fleet, which receives its events).
    async fn event_until(&mut self, deadline: tokio::time::Instant) -> Option<RunnerEvent> {
        let events = self.events.as_mut()?;
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => RunnerEvent::Closed,
            Err(_) => return None,
        };
        self.record(event);
        Some(event)
    }

    fn no_session(&mut self, what: &str) -> ! {
        let exit = self.try_exit();
        panic!(
            "runner {} {what} (exit {exit:?}); stderr:\n{}",
            self.label,
            self.log_tail(40)
        )
    }

    /// How it exited; `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `within` for it to exit; `None` if it still runs then.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for it to exit.
    ///
    /// # Panics
    ///
    /// When it still runs after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match self.exit_within(within).await {
            Some(status) => status,
            None => panic!(
                "runner {} did not exit within {within:?}; stderr:\n{}",
                self.label,
                self.log_tail(40)
            ),
        }
    }

    /// Its log file (stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        self.last_log_lines(n, "\n")
    }

    /// The last `n` lines of its log on one line, `a | b | c`: for an
    /// error message of one line.
    pub fn log_tail_line(&self, n: usize) -> String {
        self.last_log_lines(n, " | ")
    }

    fn last_log_lines(&self, n: usize, separator: &str) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join(separator)
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.keep_log {
            if self.announce_log {
                eprintln!("kept runner {} log: {}", self.label, self.log.display());
            }
        } else if std::thread::panicking() {
            eprintln!(
                "--- runner {} (pid {}) log, last lines ({}):\n{}",
                self.label,
                self.pid,
                self.log.display(),
                self.log_tail(40)
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Many runner processes and one stream of their events. Dropping it kills
/// those still running.
#[derive(Debug)]
pub struct Fleet {
    processes: Vec<RunnerProcess>,
    tx: mpsc::UnboundedSender<(u32, RunnerEvent)>,
    events: mpsc::UnboundedReceiver<(u32, RunnerEvent)>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        Fleet {
            processes: Vec::new(),
            tx,
            events,
        }
    }

    /// Starts a process in the fleet; returns its pid.
    pub fn spawn(&mut self, command: RunnerCommand) -> io::Result<u32> {
        let tx = self.tx.clone();
        let process = command.start(move |pid, event| tx.send((pid, event)).is_ok())?;
        let pid = process.pid;
        self.processes.push(process);
        Ok(pid)
    }

    /// The processes, in the order they were started.
    pub fn processes(&self) -> &[RunnerProcess] {
        &self.processes
    }

    /// The process `pid`.
    pub fn get(&self, pid: u32) -> Option<&RunnerProcess> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// The process `pid`, to signal or kill.
    pub fn get_mut(&mut self, pid: u32) -> Option<&mut RunnerProcess> {
        self.processes.iter_mut().find(|p| p.pid == pid)
    }

    /// Every session its processes announced and were received so far:
    /// process by process, in the order they were started.
    pub fn sessions(&self) -> impl Iterator<Item = i64> + '_ {
        self.processes
            .iter()
            .flat_map(|p| p.sessions.iter().copied())
    }

    /// The process that announced `session`, whether it still holds it or
    /// not.
    pub fn announced_by(&self, session: i64) -> Option<&RunnerProcess> {
        self.processes
            .iter()
            .find(|p| p.sessions.contains(&session))
    }

    /// The next event of any process, recorded in that process first.
    pub async fn next_event(&mut self) -> (u32, RunnerEvent) {
        // The fleet holds a sender, so the channel never closes.
        let (pid, event) = self.events.recv().await.expect("the fleet holds a sender");
        self.record(pid, event);
        (pid, event)
    }

    /// The next event, if one is waiting.
    pub fn try_next_event(&mut self) -> Option<(u32, RunnerEvent)> {
        let (pid, event) = self.events.try_recv().ok()?;
        self.record(pid, event);
        Some((pid, event))
    }

    fn record(&mut self, pid: u32, event: RunnerEvent) {
        if let Some(p) = self.get_mut(pid) {
            p.record(event);
        }
    }

    /// SIGTERM to every process still running, then waits up to `within`
    /// for them to exit. Those still running then are killed, and named in
    /// the error; so are those (not killed before) that exited with a
    /// failure, with the end of their logs. The error is one line.
    pub async fn terminate_all(&mut self, within: Duration) -> Result<(), String> {
        for p in &mut self.processes {
            if p.try_exit().is_none() {
                let _ = p.signal(libc::SIGTERM);
            }
        }
        let until = Instant::now() + within;
        loop {
            // Drained, so that no reader thread ever blocks on a full pipe.
            while self.try_next_event().is_some() {}
            let running: Vec<u32> = self
                .processes
                .iter_mut()
                .filter_map(|p| p.try_exit().is_none().then_some(p.pid))
                .collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() >= until {
                self.kill_all();
                return Err(format!(
                    "runners {running:?} did not exit within {within:?} of SIGTERM; they were killed"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failed: Vec<String> = self
            .processes
            .iter()
            .filter(|p| !p.killed)
            .filter_map(|p| {
                let status = p.exit?;
                (!status.success()).then(|| {
                    format!(
                        "pid {} ({status}); its log ends: {}",
                        p.pid,
                        p.log_tail_line(3)
                    )
                })
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("runners failed on stop: {}", failed.join("; ")))
        }
    }

    /// Kills and reaps every process still running.
    pub fn kill_all(&mut self) {
        for p in &mut self.processes {
            if p.try_exit().is_none() {
                let _ = p.kill();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}
