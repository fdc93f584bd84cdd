//! `session-lock run`: one runner over the worked example's table.
//!
//! Its tasker writes an `example_task_run` row per execution (started_at
//! when it starts, finished_at when its work is done), sleeps `--work-ms`,
//! and completes the task. Tools read those rows to count executions and
//! duplicates. A task whose payload is `block:<ms>` blocks its worker's
//! thread that long before its work, as a synchronous Tasker would (no
//! timeout can stop it): with `--batch-timeout-ms` shorter than that, tests
//! drive a stuck task from the outside. With `--noop` it completes every
//! task at once and records nothing (`NoopTasker`, which ignores payloads),
//! so throughput runs measure the coordination alone. It prints
//! `session_id=<id>` on stdout each time it holds a new session, and on
//! SIGTERM or SIGINT sends Stop, drains and exits 0.

use std::time::Duration;

use clap::Args;
use session_lock::task_table::DEFAULT_RETRY_BACKOFF_MAX;
use session_lock::{FailedTasks, Migrator, PgStore, Runner, RunnerConfig, TaskTable};
use session_lock_testkit::example::{ExampleTask, ExampleTasker, NoopTasker};
use tokio::signal::unix::{SignalKind, signal};

/// How often the process looks for a new session to print.
const SESSION_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The database, as a URL or key=value string.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// A URL that reaches the same database directly, when --database-url
    /// leads to a transaction pooler (PgBouncer): the migrations and LISTEN
    /// use it. Without it, behind a pooler, new tasks wait for the tick.
    #[arg(long, env = "DIRECT_DATABASE_URL")]
    direct_url: Option<String>,
    /// The runner name; runners of one name share the tasks.
    #[arg(long, default_value = "example")]
    name: String,
    /// Tick interval in milliseconds.
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Wait between ticks in milliseconds once the task table has no open
    /// task, while listening (new tasks still wake the runner at once); 0
    /// ticks every tick regardless (default: 10 s, or the tick if longer).
    #[arg(long)]
    quiet_tick_ms: Option<u64>,
    /// Heartbeat interval in milliseconds.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Longest one heartbeat may take before it counts as failed, in
    /// milliseconds (heartbeat + this must fit before ttl - safety margin;
    /// default: the heartbeat interval, at most 10 s).
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Session TTL in milliseconds.
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// Most tasks this runner's session holds: its capacity, and its
    /// weight in the fair shares of its name.
    #[arg(long)]
    max_tasks: Option<u32>,
    /// Tasker workers.
    #[arg(long)]
    workers: Option<usize>,
    /// Simulated work per task, in milliseconds.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Most random delay before the first tick, in milliseconds.
    #[arg(long)]
    jitter_ms: Option<u64>,
    /// Longest one batch may run before its unfinished tasks are given up
    /// (they stay assigned and run again) and its worker restarted, in
    /// milliseconds (default 60 s).
    #[arg(long)]
    batch_timeout_ms: Option<u64>,
    /// Drain timeout on stop, in milliseconds.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Complete every task at once and record nothing (no example_task_run
    /// rows, no --work-ms): for benchmarks of the coordination alone.
    #[arg(long)]
    noop: bool,
    /// Declare the example table with this max_attempts: a task picked up
    /// that many times without finishing is quarantined (default 5).
    #[arg(long)]
    max_attempts: Option<i32>,
    /// Declare the example table with this first retry backoff, in
    /// milliseconds (doubled per attempt, at most 10 minutes; default 1 s).
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    /// Keep the tasks a batch did not complete and run them again next tick,
    /// instead of giving them back with a backoff.
    #[arg(long)]
    keep_failed: bool,
}

pub(crate) fn run(args: RunArgs) -> Result<(), String> {
    let config = config(&args)?;
    actix_rt::System::new().block_on(async move {
        // The handlers first: a SIGTERM while starting up ends the process
        // cleanly too (nothing was started yet), instead of killing it.
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let started = async {
            migrate(&args).await?;
            store(&args).await
        };
        let store = tokio::select! {
            store = started => store?,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
        let runner = if args.noop {
            Runner::<ExampleTask, _, _>::new(config, store, NoopTasker).start()
        } else {
            let tasker = ExampleTasker::new(store.clone(), Duration::from_millis(args.work_ms));
            Runner::new(config, store, tasker).start()
        };

        // The session is read every SESSION_POLL, not on every change of
        // the status: that changes several times a tick, and a wake-up of
        // this thread for each cost a draining runner a seventh of its CPU
        // (every 10 ms, still a twelfth).
        let mut poll = tokio::time::interval(SESSION_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut printed = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = poll.tick() => {
                    let status = runner.status();
                    if status.stopped {
                        break;
                    }
                    if status.session.is_some() && status.session != printed {
                        printed = status.session;
                        if let Some(id) = status.session {
                            println!("session_id={id}");
                        }
                    }
                }
            }
        }
        tracing::info!("signal received: stopping");
        runner.stop().await;
        let s = runner.status();
        if !s.left_at_stop.is_empty() {
            tracing::warn!(
                tasks = ?s.left_at_stop,
                "tasks still running at stop: their session was left to expire, and they move to another runner after its ttl"
            );
        }
        tracing::info!(
            finished = s.finished,
            failed = s.failed,
            stuck = s.stuck_tasks,
            "stopped"
        );
        Ok(())
    })
}

fn config(args: &RunArgs) -> Result<RunnerConfig, String> {
    let ms = Duration::from_millis;
    let mut b = RunnerConfig::builder(args.name.clone());
    if let Some(v) = args.ttl_ms {
        b = b.ttl(ms(v));
    }
    if let Some(v) = args.heartbeat_ms {
        b = b.heartbeat(ms(v));
    }
    if let Some(v) = args.heartbeat_timeout_ms {
        b = b.heartbeat_timeout(ms(v));
    }
    if let Some(v) = args.tick_ms {
        b = b.tick(ms(v)).jitter(ms(v));
    }
    if let Some(v) = args.quiet_tick_ms {
        b = b.quiet_tick(ms(v));
    }
    if let Some(v) = args.jitter_ms {
        b = b.jitter(ms(v));
    }
    if let Some(v) = args.max_tasks {
        b = b.max_tasks(v);
    }
    if let Some(v) = args.workers {
        b = b.workers(v);
    }
    if let Some(v) = args.batch_timeout_ms {
        b = b.batch_timeout(ms(v));
    }
    if let Some(v) = args.drain_timeout_ms {
        b = b.drain_timeout(ms(v));
    }
    if args.keep_failed {
        b = b.failed_tasks(FailedTasks::Keep);
    }
    b.build().map_err(|e| e.to_string())
}

/// The store on --database-url, listening on --direct-url when given.
async fn store(args: &RunArgs) -> Result<PgStore, String> {
    PgStore::connect_with_direct(&args.database_url, args.direct_url.as_deref())
        .await
        .map_err(|e| e.to_string())
}

/// Applies the migrations and the example, declared again with this
/// runner's retry settings when it has any.
async fn migrate(args: &RunArgs) -> Result<(), String> {
    let mut migrator = Migrator::new().with_example();
    if args.max_attempts.is_some() || args.retry_backoff_ms.is_some() {
        let mut table = TaskTable::new("public.example_task")
            .finished_by("finished_by")
            .group_by("tenant");
        if let Some(n) = args.max_attempts {
            table = table.max_attempts(n);
        }
        if let Some(ms) = args.retry_backoff_ms {
            table = table.retry_backoff(Duration::from_millis(ms), DEFAULT_RETRY_BACKOFF_MAX);
        }
        migrator = migrator.task_table(table);
    }
    migrator
        .run_url(args.direct_url.as_deref().unwrap_or(&args.database_url))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}
