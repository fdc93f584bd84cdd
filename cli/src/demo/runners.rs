//! The demo's runner processes, driven by the testkit's `Fleet`: each is
//! the demo's own executable running `run` with the demo's settings, in a
//! process group of its own, logging into a directory that is removed at
//! the end. A new session gets a bar on the board; a runner that exits
//! without being killed is an error.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use session_lock_testkit::{Fleet, RunnerCommand, RunnerEvent, RunnerProcess};

use super::board::Board;
use super::{DemoArgs, RUNNER_DRAIN_MS, RUNNER_NAME};

/// How long a runner whose stdout closed may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `session-lock run` as the demo's runners run it: one runner name, the
/// demo's settings, the URL in the environment, logs at `warn`, and a
/// process group of their own, so that Ctrl-C reaches the demo only and it
/// decides how the runners end.
pub(super) fn runner_command(url: &str, args: &DemoArgs) -> Result<RunnerCommand, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the session-lock executable: {e}"))?;
    Ok(RunnerCommand::new(url)
        .exe(exe)
        .own_process_group(true)
        .log_level("warn")
        .args([
            "--name".to_string(),
            RUNNER_NAME.into(),
            "--ttl-ms".into(),
            args.ttl_ms.to_string(),
            "--heartbeat-ms".into(),
            args.heartbeat_ms.to_string(),
            "--tick-ms".into(),
            args.tick_ms.to_string(),
            "--max-tasks".into(),
            args.max_tasks.to_string(),
            "--work-ms".into(),
            args.work_ms.to_string(),
            "--drain-timeout-ms".into(),
            RUNNER_DRAIN_MS.to_string(),
        ]))
}

/// Starts one more runner, numbered in the order started, logging to a file
/// of its own in `log_dir`; returns its pid.
pub(super) fn spawn_runner(
    fleet: &mut Fleet,
    command: &RunnerCommand,
    log_dir: &Path,
) -> Result<u32, String> {
    let label = format!("runner-{}", fleet.processes().len() + 1);
    let command = command
        .clone()
        .log_file(log_dir.join(format!("{label}.log")))
        .label(label);
    fleet.spawn(command).map_err(|e| e.to_string())
}

/// What a runner said, recorded by the fleet already: a new session gets a
/// bar; a runner that exits unasked is an error.
pub(super) async fn on_event(
    fleet: &mut Fleet,
    (pid, event): (u32, RunnerEvent),
    fresh: Option<u32>,
    board: &mut Board,
) -> Result<(), String> {
    let Some(p) = fleet.get_mut(pid) else {
        return Ok(());
    };
    match event {
        RunnerEvent::Session(session) => {
            if let [.., old, _] = p.sessions() {
                board.out.say(&format!(
                    "runner pid {pid} lost session {old} and started session {session}"
                ));
            }
            board.add_session(session, pid, fresh == Some(pid));
        }
        RunnerEvent::Closed if !p.was_killed() => {
            let status = p.exit_within(EXIT_TIMEOUT).await;
            return Err(format!(
                "runner pid {pid} exited unexpectedly ({}){}",
                status.map_or("unknown status".into(), |s| s.to_string()),
                log_ends(p)
            ));
        }
        RunnerEvent::Closed => {}
    }
    Ok(())
}

/// Where to look when runners misbehave.
pub(super) fn log_hint(fleet: &Fleet) -> String {
    fleet
        .processes()
        .iter()
        .map(log_ends)
        .find(|t| !t.is_empty())
        .unwrap_or_default()
}

/// The end of a runner's log, as a suffix for an error message.
fn log_ends(p: &RunnerProcess) -> String {
    let tail = p.log_tail_line(3);
    if tail.is_empty() {
        return String::new();
    }
    format!("; its log ends: {tail}")
}

/// The runners' log files, in a temporary directory removed on drop.
pub(super) struct LogDir(PathBuf);

impl LogDir {
    pub(super) fn create() -> Result<LogDir, String> {
        let tmp = std::env::temp_dir();
        // Left behind by demos that were killed with SIGKILL.
        for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("session-lock-demo-"))
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("session-lock-demo-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir)
            .map_err(|e| format!("creating the log directory {}: {e}", dir.display()))?;
        Ok(LogDir(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
