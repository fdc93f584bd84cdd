//! Nothing is left behind for long. Dropping a server stops it and deletes
//! its data directory; a server in a `static` can be cleaned up at exit; and
//! as each data directory is named for the process that made it, the next
//! start in any process removes those of processes that have died, first
//! stopping any server still running in them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::error::{EmbeddedError, io_err};
use super::{EmbeddedPostgres, ShutdownMode};

/// Prefix of the data directories under the temporary directory.
const DIR_PREFIX: &str = "session-lock-pg-";
/// How long `Drop` waits for a fast shutdown before an immediate one.
const DROP_FAST_TIMEOUT: Duration = Duration::from_secs(10);

/// Numbers the data directories of this process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh, empty data directory for this process under the
/// temporary directory, first removing those that dead processes left.
pub(super) fn fresh_data_dir() -> Result<PathBuf, EmbeddedError> {
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
    Ok(data_dir)
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
        st.keeper.stop();
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

/// Registers `pg` with [`AT_EXIT`], and [`cleanup_servers_at_exit`] with
/// `atexit` once.
pub(super) fn at_exit(pg: &'static EmbeddedPostgres) {
    let mut servers = AT_EXIT.lock().unwrap_or_else(PoisonError::into_inner);
    if servers.iter().any(|s| std::ptr::eq(*s, pg)) {
        return;
    }
    servers.push(pg);
    drop(servers);
    AT_EXIT_REGISTERED.call_once(|| {
        // SAFETY: `cleanup_servers_at_exit` is an `extern "C"` function that
        // never unwinds.
        if unsafe { libc::atexit(cleanup_servers_at_exit) } != 0 {
            tracing::debug!("atexit failed: data directories will be left behind");
        }
    });
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
