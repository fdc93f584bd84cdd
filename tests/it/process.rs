//! `session-lock worker` as a child process, shared by the process tests
//! (worker.rs) and the chaos test (chaos.rs).
//!
//! The worker prints `session_id=N` on stdout whenever it starts a session;
//! a reader thread forwards those ids, so a test can wait for a session
//! instead of sleeping. stderr goes to a file whose tail is printed when the
//! test fails. Dropping a [`WorkerProcess`] SIGKILLs and reaps it; PDEATHSIG
//! kills it too should the test process die first.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_session-lock");

/// Numbers the stderr files of this test process's workers.
static NEXT_LOG: AtomicU64 = AtomicU64::new(0);

/// A running `session-lock worker`.
pub struct WorkerProcess {
    pub label: String,
    child: Child,
    sessions_rx: mpsc::UnboundedReceiver<i64>,
    /// Every session announced and received so far, in order.
    sessions: Vec<i64>,
    log: PathBuf,
    keep_log: bool,
}

impl WorkerProcess {
    /// Starts `session-lock worker --database-url URL ARGS...`. `keep_log`
    /// keeps the stderr file after a passing test too.
    pub fn spawn(
        label: impl Into<String>,
        url: &str,
        args: impl IntoIterator<Item = String>,
        keep_log: bool,
    ) -> WorkerProcess {
        let label = label.into();
        let log = std::env::temp_dir().join(format!(
            "session-lock-worker-{}-{}-{label}.log",
            std::process::id(),
            NEXT_LOG.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut cmd = Command::new(BIN);
        cmd.arg("worker")
            .args(["--database-url", url])
            .args(args)
            .env("SESSION_LOCK_LOG", "info")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // SAFETY: prctl is async-signal-safe; the worker dies with the thread
        // that spawned it, should the test process be killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, sessions_rx) = mpsc::unbounded_channel();
        let reader_label = label.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(id) = line.trim().strip_prefix("session_id=") {
                    let id: i64 = id.parse().unwrap_or_else(|e| {
                        panic!("worker {reader_label} printed a bad line {line:?}: {e}")
                    });
                    let _ = tx.send(id);
                }
            }
        });
        WorkerProcess {
            label,
            child,
            sessions_rx,
            sessions: Vec::new(),
            log,
            keep_log,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits an i32")
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not reaped yet (only Drop and
        // wait_exit reap it).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// The session announced last, of those announced so far.
    pub fn current_session(&mut self) -> Option<i64> {
        while let Ok(id) = self.sessions_rx.try_recv() {
            self.sessions.push(id);
        }
        self.sessions.last().copied()
    }

    /// Whether the worker announced a session not yet received by
    /// [`next_session`](Self::next_session) or seen by
    /// [`current_session`](Self::current_session).
    pub fn announced_another(&mut self) -> bool {
        match self.sessions_rx.try_recv() {
            Ok(id) => {
                self.sessions.push(id);
                true
            }
            Err(_) => false,
        }
    }

    /// The next session the worker announces, in order.
    pub async fn next_session(&mut self, within: Duration) -> i64 {
        match tokio::time::timeout(within, self.sessions_rx.recv()).await {
            Ok(Some(id)) => {
                self.sessions.push(id);
                id
            }
            Ok(None) => self.no_session("closed its stdout without a new session"),
            Err(_) => self.no_session(&format!("announced no new session within {within:?}")),
        }
    }

    /// Waits for a session other than `after` (any, if `None`), starting
    /// from the latest one announced.
    pub async fn new_session(&mut self, after: Option<i64>, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(id) = self.current_session().filter(|&id| Some(id) != after) {
                return id;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.sessions_rx.recv()).await {
                Ok(Some(id)) => self.sessions.push(id),
                Ok(None) => self.no_session("closed its stdout without a new session"),
                Err(_) => self.no_session(&format!("announced no new session within {within:?}")),
            }
        }
    }

    fn no_session(&mut self, what: &str) -> ! {
        panic!(
            "worker {} {what} (exit {:?}); stderr:\n{}",
            self.label,
            self.child.try_wait(),
            self.log_tail(40)
        )
    }

    /// `None` while the process runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "worker {} did not exit within {within:?}; stderr:\n{}",
                self.label,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the worker wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill(); // SIGKILL ends a stopped process too
        }
        let _ = self.child.wait();
        if self.keep_log {
            eprintln!("kept worker {} stderr: {}", self.label, self.log.display());
        } else if std::thread::panicking() {
            eprintln!(
                "--- worker {} (pid {}) stderr, last lines ({}):\n{}",
                self.label,
                self.child.id(),
                self.log.display(),
                self.log_tail(40)
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
