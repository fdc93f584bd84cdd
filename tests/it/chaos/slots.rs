//! The runner slots. A slot is one place in the fleet: its own proxy, its
//! own task duration, and one runner process at a time. A runner that a
//! fault kills is replaced in the same slot, with the same proxy and
//! duration and a new generation in its label (`r2.1` is slot 2's second
//! runner); the dead ones are kept, so that their logs count in the report.

use std::time::Duration;

use session_lock_testkit::{RunnerCommand, RunnerProcess};

use super::proxy::Proxy;
use super::{DB_NAME, HEARTBEAT, MAX_TASKS, TICK, TTL, WORK_MS};

/// Starts a chaos runner: the run's TTL, heartbeat, tick and share, tasks
/// taking `work_ms`.
fn spawn_runner(label: String, url: &str, work_ms: u64) -> RunnerProcess {
    let ms = |d: Duration| d.as_millis().to_string();
    let args = [
        ("--ttl-ms", ms(TTL)),
        ("--heartbeat-ms", ms(HEARTBEAT)),
        ("--tick-ms", ms(TICK)),
        ("--max-tasks", MAX_TASKS.to_string()),
        ("--work-ms", work_ms.to_string()),
        ("--drain-timeout-ms", "10000".to_string()),
        // Faults kill holders many times over: quarantine would take tasks
        // the run then counts lost. Far out of reach, it still keeps the
        // isolation of tasks whose holders died twice at work.
        ("--max-attempts", "1000".to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v]);
    RunnerCommand::new(url)
        .label(label)
        .args(args)
        .keep_log(keep_logs())
        .spawn()
        .expect("spawn a runner process")
}

/// `SESSION_LOCK_CHAOS_KEEP_LOGS=1`: keep every runner's stderr file.
fn keep_logs() -> bool {
    std::env::var("SESSION_LOCK_CHAOS_KEEP_LOGS").is_ok_and(|v| v == "1")
}

/// A runner slot: its proxy, its task duration, its current runner process
/// and the ones that were killed.
pub(super) struct Slot {
    pub(super) index: usize,
    pub(super) work_ms: u64,
    pub(super) proxy: Proxy,
    url: String,
    pub(super) runner: RunnerProcess,
    generation: usize,
    retired: Vec<RunnerProcess>,
}

impl Slot {
    pub(super) fn spawn(index: usize, proxy: Proxy) -> Slot {
        let url = format!("postgres://postgres@127.0.0.1:{}/{DB_NAME}", proxy.port);
        let work_ms = WORK_MS[index];
        let runner = spawn_runner(format!("r{index}.0"), &url, work_ms);
        Slot {
            index,
            work_ms,
            proxy,
            url,
            runner,
            generation: 0,
            retired: Vec::new(),
        }
    }

    /// Sends `sig` to the current runner process.
    pub(super) fn signal(&self, sig: libc::c_int) {
        self.runner.signal(sig).expect("signal the runner process");
    }

    /// Fails the test if the current runner has exited: only a fault may
    /// end one, and a killed one is replaced at once.
    pub(super) fn assert_running(&mut self) {
        if let Some(status) = self.runner.try_exit() {
            panic!(
                "runner {} exited by itself ({status}); stderr:\n{}",
                self.runner.label(),
                self.runner.log_tail(40)
            );
        }
    }

    /// Reaps the current runner, killed, and starts a new one in its place.
    pub(super) async fn respawn(&mut self) {
        let _ = self.runner.wait_exit(Duration::from_secs(10)).await;
        self.generation += 1;
        let label = format!("r{}.{}", self.index, self.generation);
        let new = spawn_runner(label, &self.url, self.work_ms);
        let old = std::mem::replace(&mut self.runner, new);
        self.retired.push(old);
    }

    pub(super) fn runners(&self) -> impl Iterator<Item = &RunnerProcess> {
        self.retired.iter().chain(std::iter::once(&self.runner))
    }
}
