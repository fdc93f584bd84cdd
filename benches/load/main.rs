//! Load runs (BENCHMARKS.md, benchmarks 2 to 8), each against a durable
//! throwaway PostgreSQL on this machine, one file a measurement:
//!
//! * [`drain`]: 100k no-op tasks drained by 1 to 8 runners, in one process and
//!   as separate `session-lock run --noop` processes, against the raw-SQL
//!   limit (pgbench);
//! * [`pooled`]: the in-process drain directly and through PgBouncer;
//! * [`pickup`]: INSERT to execution start on an idle runner, tick alone and
//!   with LISTEN/NOTIFY;
//! * [`failover`]: kill -9 one of 4 runner processes; time until its tasks
//!   run again elsewhere and are finished;
//! * [`fairness`]: spread of tasks held across 2 to 16 sessions, and ticks
//!   until a joining session holds its share;
//! * [`idle`]: statements per second per idle runner and PostgreSQL CPU,
//!   200 runners, LISTEN on and off;
//! * [`footprint`]: peak RSS and CPU per 1,000 tasks of a runner process
//!   (from the multi-process drain runs);
//! * [`diag`]: where the time goes (pg_stat_statements, nested statements);
//! * [`tenants`]: what round-robin pickup across tenant groups costs at 1M
//!   tasks over 10,000 tenants, and how long 100 small tenants wait behind a
//!   big one;
//! * [`bloat`]: a deep queue drained for 10 minutes under a snapshot held
//!   open elsewhere, and after (named only: about 16 minutes);
//! * [`baseline`]: a model of the seed's design (go-session-lock's SQL)
//!   beside session-lock's protocol at 1k, 100k and 1M open tasks (named,
//!   or in `--full`).
//!
//! This file keeps what they share: the arguments, which measurements run
//! and in what order, the server and the bench database ([`Ctx`]), and the
//! runners' plumbing (a store per runner, runner processes, waiting for
//! live sessions).
//!
//! `cargo bench --bench load` runs the default subset (bounded time);
//! `cargo bench --bench load -- --full` the whole matrix; name benchmarks to
//! run only those: `cargo bench --bench load -- drain pickup`. `--reps N`
//! repeats each measurement N times (default 3), `--tasks N` sets the drain
//! size (default 100000), `--minutes N` how long bloat holds its snapshot
//! (default 10), `--runners N,M` the drain's runner counts (default 1,4;
//! 1,2,4,8 in `--full`). `SESSION_LOCK_BENCH_FULL=1` is `--full`.

#[path = "../common/mod.rs"]
mod common;

mod baseline;
mod bloat;
mod diag;
mod drain;
mod failover;
mod fairness;
mod footprint;
mod idle;
mod pickup;
mod pooled;
mod tenants;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use session_lock::{Database, GetWork, PgStore, Runner, RunnerConfig, RunnerHandle, SessionStart};
use session_lock_testkit::embedded::EmbeddedPostgres;
use session_lock_testkit::example::{ExampleTask, NoopTasker};
use session_lock_testkit::{Fleet, RunnerCommand};
use tokio_postgres::Client;

#[derive(Debug, Clone)]
struct Opts {
    full: bool,
    reps: usize,
    tasks: u64,
    /// Minutes the bloat benchmark holds its snapshot.
    minutes: u64,
    /// The drain's runner counts, when given.
    runners: Option<Vec<usize>>,
    only: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            full: std::env::var("SESSION_LOCK_BENCH_FULL").is_ok_and(|v| v != "0" && !v.is_empty()),
            reps: 3,
            tasks: 100_000,
            minutes: 10,
            runners: None,
            only: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--bench" => {}
                "--full" => o.full = true,
                "--reps" => o.reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(3),
                "--tasks" => o.tasks = args.next().and_then(|v| v.parse().ok()).unwrap_or(100_000),
                "--minutes" => o.minutes = args.next().and_then(|v| v.parse().ok()).unwrap_or(10),
                "--runners" => {
                    let given = args.next().unwrap_or_default();
                    let counts: Vec<usize> = given
                        .split(',')
                        .filter_map(|n| n.trim().parse().ok())
                        .collect();
                    if counts.is_empty() || counts.contains(&0) {
                        eprintln!(
                            "bench: --runners takes runner counts above 0, comma-separated (got {given:?})"
                        );
                        std::process::exit(2);
                    }
                    o.runners = Some(counts);
                }
                "--help" | "-h" => {
                    println!(
                        "cargo bench --bench load -- [--full] [--reps N] [--tasks N] [--minutes N] [--runners N,M] [drain|pooled|pickup|failover|fairness|idle|footprint|diag|tenants|baseline|bloat]..."
                    );
                    std::process::exit(0);
                }
                s if s.starts_with('-') => eprintln!("bench: ignoring unknown flag {s}"),
                s => o.only.push(s.to_owned()),
            }
        }
        o
    }

    fn wants(&self, name: &str) -> bool {
        if self.only.is_empty() {
            // diag is for the lead's investigations, not the default run;
            // the baseline (about 7 minutes) runs in the full one, bloat
            // (16 minutes) only when named.
            name != "diag" && name != "bloat" && (name != "baseline" || self.full)
        } else {
            self.only.iter().any(|o| o == name)
        }
    }
}

/// What the benchmarks share: the server and the bench database.
struct Ctx {
    pg: EmbeddedPostgres,
    url: String,
    opts: Opts,
}

fn main() {
    let opts = Opts::parse();
    common::start_results(
        "load",
        &format!(
            "Load benchmarks ({}; {} repetitions)",
            if opts.full {
                "full matrix"
            } else {
                "default subset"
            },
            opts.reps
        ),
    );
    let pg = common::start_server();
    let url = actix_rt::System::new().block_on(common::create_bench_db(&pg));
    let ctx = Ctx { pg, url, opts };
    let started = Instant::now();
    let mut drains = Vec::new();
    if ctx.opts.wants("drain") || ctx.opts.wants("footprint") {
        drains = drain::run(&ctx);
    }
    if ctx.opts.wants("footprint") {
        footprint::report(&drains);
    }
    if ctx.opts.wants("pooled") {
        pooled::run(&ctx);
    }
    if ctx.opts.wants("pickup") {
        pickup::run(&ctx);
    }
    if ctx.opts.wants("failover") {
        failover::run(&ctx);
    }
    if ctx.opts.wants("fairness") {
        fairness::run(&ctx);
    }
    if ctx.opts.wants("idle") {
        idle::run(&ctx);
    }
    if ctx.opts.wants("diag") {
        diag::run(&ctx);
    }
    if ctx.opts.wants("tenants") {
        tenants::run(&ctx);
    }
    if ctx.opts.wants("baseline") {
        baseline::run(&ctx);
    }
    if ctx.opts.wants("bloat") {
        bloat::run(&ctx);
    }
    eprintln!(
        "bench: load done in {:.0} s; tables in {}",
        started.elapsed().as_secs_f64(),
        common::results_dir().join("load.md").display()
    );
}

/// A store on a pool of its own, as each runner has.
async fn store(url: &str) -> PgStore {
    PgStore::connect(url).await.expect("store")
}

/// One session of `start` ticking as a drain-mode runner with a no-op
/// Tasker does (each get_work finishes the previous batch; a sweep at most
/// every `sweep_every`, never when None), inserting as many new tasks as
/// each call finished so the backlog stays where it is, until `stop`.
/// `on_call` sees each call's start, its latency and how many it finished.
async fn steady_drain(
    url: &str,
    start: SessionStart,
    sweep_every: Option<Duration>,
    stop: &AtomicBool,
    mut on_call: impl FnMut(Instant, Duration, u64),
) {
    let store = store(url).await;
    let producer = common::connect(url).await;
    let session = store.start_session(&start).await.expect("session");
    let mut done: Vec<i64> = Vec::new();
    // As a runner: the ids of the previous answer, once there is one.
    let mut known: Option<Vec<i64>> = None;
    let mut swept: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let sweep = sweep_every.is_some_and(|every| swept.is_none_or(|at| at.elapsed() >= every));
        if sweep {
            swept = Some(Instant::now());
        }
        let started = Instant::now();
        let work = store
            .get_work::<ExampleTask>(GetWork {
                finished: &done,
                sweep,
                known: known.as_deref(),
                ..GetWork::new(&session)
            })
            .await
            .expect("get_work");
        let n = work.finished.len() as u64;
        on_call(started, started.elapsed(), n);
        if n > 0 {
            common::insert_tasks(&producer, n).await;
        }
        // Completed at once (a no-op Tasker): finished by the next call.
        done = work.tasks.iter().map(|t| t.id).collect();
        // All of them finished by the next call: nothing else to name.
        known = Some(Vec::new());
    }
    let _ = store.end_session(&session).await;
}

/// A runner of `ExampleTask`s in this process that completes every task at
/// once, on a store of its own.
async fn noop_runner(url: &str, config: RunnerConfig) -> RunnerHandle {
    Runner::<ExampleTask, _, _>::new(config, store(url).await, NoopTasker).start()
}

/// `n` runner processes, `session-lock run` with `args`, each logging
/// warnings to `runner-<i>.log` beside the results.
fn spawn_runners(url: &str, n: usize, args: &[String]) -> Fleet {
    let log_dir = common::results_dir();
    let mut fleet = Fleet::new();
    for i in 0..n {
        let label = format!("runner-{i}");
        fleet
            .spawn(
                RunnerCommand::new(url)
                    .args(args)
                    .log_level("warn")
                    .log_file(log_dir.join(format!("{label}.log")))
                    .keep_log(true)
                    .label(label),
            )
            .unwrap_or_else(|e| panic!("spawn session-lock run: {e}"));
    }
    fleet
}

/// SIGTERM to every runner process, then waits (SIGKILL after 10 s); says
/// on stderr which ones did not stop cleanly.
async fn stop_runners(fleet: &mut Fleet) {
    if let Err(e) = fleet.terminate_all(Duration::from_secs(10)).await {
        eprintln!("bench: {e}");
    }
}

async fn live_sessions(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM session_lock.live_session", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

async fn wait_live_sessions(client: &Client, n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while live_sessions(client).await < n {
        assert!(
            Instant::now() < deadline,
            "{n} sessions did not start in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
