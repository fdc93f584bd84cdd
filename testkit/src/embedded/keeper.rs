//! The server does not outlive the [`EmbeddedPostgres`](super::EmbeddedPostgres)
//! that started it: it is spawned from a dedicated keeper thread that lives
//! as long as that value, and on Linux it is told (`PR_SET_PDEATHSIG`) to
//! shut down immediately when that thread dies, even if the whole process
//! is killed with `SIGKILL`.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use super::error::{EmbeddedError, io_err};

/// A spawn request for the keeper thread.
type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread that spawns the server.
#[derive(Debug)]
pub(super) struct Keeper {
    /// Sends spawn requests to the keeper thread; `None` once stopped.
    tx: Option<mpsc::Sender<SpawnRequest>>,
    /// The keeper thread.
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts the thread that spawns the server. The server's parent-death
    /// signal fires when this thread ends, which it does only when the
    /// channel closes.
    pub(super) fn start() -> Result<Self, EmbeddedError> {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let thread = thread::Builder::new()
            .name("session-lock-pg-keeper".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(io_err("starting the embedded PostgreSQL keeper thread"))?;
        Ok(Keeper {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Spawns `cmd` from the keeper thread: the outer error if the thread
    /// has gone, the inner one if spawning failed.
    pub(super) fn spawn(&self, cmd: Command) -> Result<io::Result<Child>, EmbeddedError> {
        let tx = self.tx.as_ref().ok_or(EmbeddedError::KeeperGone)?;
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.send((cmd, reply_tx))
            .map_err(|_| EmbeddedError::KeeperGone)?;
        reply_rx.recv().map_err(|_| EmbeddedError::KeeperGone)
    }

    /// Closes the channel, which ends the keeper thread, and waits for it.
    pub(super) fn stop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes the server that `cmd` starts die with the keeper thread that
/// spawns it (Linux only).
pub(super) fn die_with_keeper(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;

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
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
