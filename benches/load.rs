//! Load runs (BENCHMARKS.md, benchmarks 2 to 7), each against a durable
//! throwaway PostgreSQL on this machine:
//!
//! * `drain`: 100k no-op tasks drained by 1 to 8 runners, in one process and
//!   as separate `session-lock worker --noop` processes, against the raw-SQL
//!   limit: pgbench running the minimal claim-with-SKIP-LOCKED plus finish
//!   per tick at the same batch size and client count;
//! * `pickup`: INSERT to execution start on an idle runner, tick alone and
//!   with LISTEN/NOTIFY;
//! * `failover`: kill -9 one of 4 worker processes; time until its tasks run
//!   again elsewhere and are finished;
//! * `fairness`: spread of tasks held across 2 to 16 sessions, and ticks
//!   until a joining session holds its share;
//! * `idle`: queries per second per idle runner, PostgreSQL CPU with 50;
//! * `footprint`: peak RSS and CPU per 1,000 tasks of a worker process
//!   (from the multi-process drain runs);
//! * `diag`: where the time goes (pg_stat_statements, nested statements).
//!
//! `cargo bench --bench load` runs the default subset (bounded time);
//! `cargo bench --bench load -- --full` the whole matrix; name benchmarks to
//! run only those: `cargo bench --bench load -- drain pickup`. `--reps N`
//! repeats each measurement N times (default 3), `--tasks N` sets the drain
//! size (default 100000). `SESSION_LOCK_BENCH_FULL=1` is `--full`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use session_lock::{PgStore, Progress, Runner, RunnerConfig, RunnerHandle, TaskId, TaskerError};
use session_lock_testkit::embedded::EmbeddedPostgres;
use session_lock_testkit::example::{ExampleTask, NoopTasker};
use tokio_postgres::Client;

use common::{Table, median, ms, quantile, verdict};

#[derive(Debug, Clone)]
struct Opts {
    full: bool,
    reps: usize,
    tasks: u64,
    only: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            full: std::env::var("SESSION_LOCK_BENCH_FULL").is_ok_and(|v| v != "0" && !v.is_empty()),
            reps: 3,
            tasks: 100_000,
            only: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--bench" => {}
                "--full" => o.full = true,
                "--reps" => o.reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(3),
                "--tasks" => o.tasks = args.next().and_then(|v| v.parse().ok()).unwrap_or(100_000),
                "--help" | "-h" => {
                    println!(
                        "cargo bench --bench load -- [--full] [--reps N] [--tasks N] [drain|pickup|failover|fairness|idle|footprint|diag]..."
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
            // diag is for the lead's investigations, not the default run.
            name != "diag"
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
        drains = bench_drain(&ctx);
    }
    if ctx.opts.wants("footprint") {
        report_footprint(&drains);
    }
    if ctx.opts.wants("pickup") {
        bench_pickup(&ctx);
    }
    if ctx.opts.wants("failover") {
        bench_failover(&ctx);
    }
    if ctx.opts.wants("fairness") {
        bench_fairness(&ctx);
    }
    if ctx.opts.wants("idle") {
        bench_idle(&ctx);
    }
    if ctx.opts.wants("diag") {
        bench_diag(&ctx);
    }
    eprintln!(
        "bench: load done in {:.0} s; tables in {}",
        started.elapsed().as_secs_f64(),
        common::results_dir().join("load.md").display()
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A runner of `ExampleTask`s on its own pool.
async fn store(url: &str) -> PgStore {
    PgStore::connect(url).await.expect("store")
}

/// Worker processes, killed when dropped (also on panic).
struct Workers {
    children: Vec<Child>,
}

impl Workers {
    fn spawn(url: &str, n: usize, args: &[String], piped_stdout: bool) -> Workers {
        let log_dir = common::results_dir();
        let children = (0..n)
            .map(|i| {
                let log = std::fs::File::create(log_dir.join(format!("worker-{i}.log")))
                    .expect("worker log");
                Command::new(session_lock_testkit::session_lock_bin())
                    .arg("run")
                    .arg("--database-url")
                    .arg(url)
                    .args(args)
                    .env("SESSION_LOCK_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(if piped_stdout {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn session-lock run: {e}"))
            })
            .collect();
        Workers { children }
    }

    /// SIGTERM to all, then wait (SIGKILL after 10 s).
    fn stop(&mut self) {
        for c in &self.children {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// Finished tasks and tasks/s between the first and the last finish, on the
/// database clock.
async fn drain_rate(client: &Client) -> (i64, f64) {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM max(finished_at) - min(finished_at))::float8, 0)
               FROM public.example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .expect("rate");
    let n: i64 = row.get(0);
    let secs: f64 = row.get(1);
    (n, if secs > 0.0 { n as f64 / secs } else { 0.0 })
}

// ---------------------------------------------------------------------------
// 2. Drain throughput
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    InProcess,
    Processes,
    Pgbench,
    PgbenchFused,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::InProcess => "in-process",
            Mode::Processes => "processes",
            Mode::Pgbench => "pgbench limit",
            Mode::PgbenchFused => "pgbench fused",
        }
    }
}

#[derive(Debug, Clone)]
struct DrainRun {
    rep: usize,
    mode: Mode,
    runners: usize,
    batch: u32,
    sync: bool,
    tasks: i64,
    rate: f64,
    secs: f64,
    pg_cpu: f64,
    /// Client CPU seconds (the bench process for in-process runs, the sum of
    /// the workers for processes, pgbench's own for the limit).
    client_cpu: f64,
    peak_rss_mib: f64,
}

fn bench_drain(ctx: &Ctx) -> Vec<DrainRun> {
    let (runner_counts, batches, syncs): (Vec<usize>, Vec<u32>, Vec<bool>) = if ctx.opts.full {
        (vec![1, 2, 4, 8], vec![10, 100], vec![true, false])
    } else {
        (vec![1, 4], vec![10, 100], vec![true])
    };
    let modes = [
        Mode::InProcess,
        Mode::Processes,
        Mode::Pgbench,
        Mode::PgbenchFused,
    ];
    let mut runs: Vec<DrainRun> = Vec::new();
    for &sync in &syncs {
        for &batch in &batches {
            for &n in &runner_counts {
                // The default subset drains fewer tasks where a run would be
                // long (one runner at batch 10), keeping the whole default
                // `cargo bench` within its budget.
                let tasks = if !ctx.opts.full && batch == 10 && n == 1 {
                    ctx.opts.tasks.min(20_000)
                } else {
                    ctx.opts.tasks
                };
                // Batch-100 runs last a second or two: repeat them more.
                let reps = if batch >= 100 {
                    ctx.opts.reps.max(5)
                } else {
                    ctx.opts.reps
                };
                for rep in 0..reps {
                    for &mode in &modes {
                        let mut r = drain_once(ctx, mode, n, batch, sync, tasks);
                        r.rep = rep;
                        eprintln!(
                            "bench: drain rep {rep} {} runners={n} batch={batch} sync={sync}: {} tasks in {:.1} s, {:.0} tasks/s",
                            mode.name(),
                            r.tasks,
                            r.secs,
                            r.rate
                        );
                        runs.push(r);
                    }
                }
            }
        }
    }

    let mut t = Table::new(
        "Drain throughput (tasks/s, median of repetitions; ratio = median over repetitions of ours / the pgbench limit measured back to back in the same repetition). pgbench limit: claim, then finish (2 round trips and 2 commits per tick, the issue's model); fused: finish the previous batch and claim the next in one statement (1 round trip, 1 commit per tick)",
        &[
            "sync commit",
            "batch",
            "runners",
            "tasks",
            "in-process",
            "processes",
            "pgbench limit",
            "pgbench fused",
            "in-process / limit",
            "processes / limit",
            "processes / fused",
            "PG CPU s per 1k tasks (in-proc / procs / pgbench)",
        ],
    );
    let mut targets = Vec::new();
    for &sync in &syncs {
        for &batch in &batches {
            for &n in &runner_counts {
                let sel = |m: Mode| -> Vec<&DrainRun> {
                    runs.iter()
                        .filter(|r| {
                            r.mode == m && r.runners == n && r.batch == batch && r.sync == sync
                        })
                        .collect()
                };
                let rate = |m: Mode| median(&sel(m).iter().map(|r| r.rate).collect::<Vec<_>>());
                let pgcpu = |m: Mode| {
                    median(
                        &sel(m)
                            .iter()
                            .map(|r| r.pg_cpu / (r.tasks.max(1) as f64) * 1000.0)
                            .collect::<Vec<_>>(),
                    )
                };
                let tasks = sel(Mode::Pgbench).first().map(|r| r.tasks).unwrap_or(0);
                let (ip, pr, lim) = (
                    rate(Mode::InProcess),
                    rate(Mode::Processes),
                    rate(Mode::Pgbench),
                );
                // Per repetition: ours against the limit run right after.
                let per_rep_vs = |m: Mode, lim: Mode| {
                    let lims = sel(lim);
                    let xs: Vec<f64> = sel(m)
                        .iter()
                        .filter_map(|r| {
                            let l = lims.iter().find(|l| l.rep == r.rep)?;
                            (l.rate > 0.0).then(|| r.rate / l.rate)
                        })
                        .collect();
                    median(&xs)
                };
                let (rip, rpr) = (
                    per_rep_vs(Mode::InProcess, Mode::Pgbench),
                    per_rep_vs(Mode::Processes, Mode::Pgbench),
                );
                let rfu = per_rep_vs(Mode::Processes, Mode::PgbenchFused);
                if batch == 100 && n == 4 && sync {
                    targets.push((rip, rpr));
                }
                t.row(vec![
                    if sync { "on" } else { "off" }.into(),
                    batch.to_string(),
                    n.to_string(),
                    tasks.to_string(),
                    format!("{ip:.0}"),
                    format!("{pr:.0}"),
                    format!("{lim:.0}"),
                    format!("{:.0}", rate(Mode::PgbenchFused)),
                    format!("{:.0} %", rip * 100.0),
                    format!("{:.0} %", rpr * 100.0),
                    format!("{:.0} %", rfu * 100.0),
                    format!(
                        "{:.3} / {:.3} / {:.3}",
                        pgcpu(Mode::InProcess),
                        pgcpu(Mode::Processes),
                        pgcpu(Mode::Pgbench)
                    ),
                ]);
            }
        }
    }
    t.emit("load");
    if !targets.is_empty() {
        let mut tt = Table::new("Drain target", &["target", "figure", "verdict"]);
        for (ip, pr) in targets {
            tt.row(vec![
                ">= 70 % of the limit, batch 100, 4 runners, in one process".into(),
                format!("{:.0} %", ip * 100.0),
                verdict(ip >= 0.7),
            ]);
            tt.row(vec![
                ">= 70 % of the limit, batch 100, 4 runners, as processes".into(),
                format!("{:.0} %", pr * 100.0),
                verdict(pr >= 0.7),
            ]);
        }
        tt.emit("load");
    }
    runs
}

fn drain_once(ctx: &Ctx, mode: Mode, n: usize, batch: u32, sync: bool, tasks: u64) -> DrainRun {
    let postmaster = ctx.pg.pid().expect("postmaster pid");
    actix_rt::System::new().block_on(async {
        let client = common::connect(&ctx.url).await;
        common::set_synchronous_commit(&client, sync).await;
        common::seed(&client, tasks).await;
        let pg0 = common::postgres_cpu_secs(postmaster);
        let self0 = common::self_cpu_secs();
        let mut client_cpu = 0.0;
        let mut peak_rss = 0.0;
        let deadline = Duration::from_secs(900);
        match mode {
            Mode::InProcess => {
                let mut handles: Vec<RunnerHandle> = Vec::new();
                for _ in 0..n {
                    let config = RunnerConfig::builder("bench")
                        .max_tasks(batch)
                        .jitter(Duration::ZERO)
                        .build()
                        .expect("config");
                    let store = store(&ctx.url).await;
                    handles
                        .push(Runner::<ExampleTask, _, _>::new(config, store, NoopTasker).start());
                }
                let t0 = Instant::now();
                loop {
                    let done: u64 = handles.iter().map(|h| h.status().finished).sum();
                    if done >= tasks || t0.elapsed() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                join_all(handles.iter().map(|h| h.stop())).await;
                client_cpu = common::self_cpu_secs() - self0;
            }
            Mode::Processes => {
                let args: Vec<String> = vec![
                    "--noop".into(),
                    "--name".into(),
                    "bench".into(),
                    "--max-tasks".into(),
                    batch.to_string(),
                    "--jitter-ms".into(),
                    "0".into(),
                ];
                let mut workers = Workers::spawn(&ctx.url, n, &args, false);
                let t0 = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let open: i64 = client
                        .query_one(
                            "SELECT count(*) FROM public.example_task WHERE finished_at IS NULL",
                            &[],
                        )
                        .await
                        .expect("open")
                        .get(0);
                    if open == 0 || t0.elapsed() > deadline {
                        break;
                    }
                }
                for c in &workers.children {
                    client_cpu += common::proc_cpu_secs(c.id(), true);
                    peak_rss = f64::max(peak_rss, common::proc_peak_rss_mib(c.id()));
                }
                workers.stop();
            }
            Mode::Pgbench => {
                client_cpu = run_pgbench(ctx, PGBENCH_SCRIPT, n, batch, tasks).await;
            }
            Mode::PgbenchFused => {
                client_cpu = run_pgbench(ctx, PGBENCH_FUSED_SCRIPT, n, batch, tasks).await;
            }
        }
        // Backends that exited are counted once the postmaster has reaped
        // them (into its cutime/cstime): give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pg_cpu = common::postgres_cpu_secs(postmaster) - pg0;
        let (done, rate) = drain_rate(&client).await;
        let secs = if rate > 0.0 { done as f64 / rate } else { 0.0 };
        common::set_synchronous_commit(&client, true).await;
        DrainRun {
            rep: 0,
            mode,
            runners: n,
            batch,
            sync,
            tasks: done,
            rate,
            secs,
            pg_cpu,
            client_cpu,
            peak_rss_mib: peak_rss,
        }
    })
}

/// The minimal faithful model of one tick, as pgbench runs it: claim a batch
/// of free open tasks with FOR UPDATE SKIP LOCKED (one statement, its own
/// commit, returning the ids), then finish exactly those (a second
/// statement and commit). Two round trips and two commits per tick, like
/// the runner's get_work and finish, without the session bookkeeping.
const PGBENCH_SCRIPT: &str = r"\set sid :client_id + 1
WITH claimed AS (UPDATE public.example_task SET session_id = :sid WHERE id = ANY (ARRAY(SELECT id FROM public.example_task WHERE session_id IS NULL AND finished_at IS NULL ORDER BY session_id, id FOR UPDATE SKIP LOCKED LIMIT :batch)) RETURNING id) SELECT coalesce(array_agg(id), '{}') AS ids FROM claimed \gset
UPDATE public.example_task SET finished_at = now(), finished_by = :sid WHERE id = ANY (:ids::bigint[]) AND session_id = :sid AND finished_at IS NULL;
";

/// The one-round-trip model: each tick finishes the batch claimed by the
/// previous one (its ids, carried in a pgbench variable) and claims the
/// next, in one statement and one commit; the extra transactions at the end
/// finish the last batch.
const PGBENCH_FUSED_SCRIPT: &str = r"\set sid :client_id + 1
WITH finished AS (UPDATE public.example_task SET finished_at = now(), finished_by = :sid WHERE id = ANY (:ids::bigint[]) AND session_id = :sid AND finished_at IS NULL RETURNING id), claimed AS (UPDATE public.example_task SET session_id = :sid WHERE id = ANY (ARRAY(SELECT id FROM public.example_task WHERE session_id IS NULL AND finished_at IS NULL ORDER BY session_id, id FOR UPDATE SKIP LOCKED LIMIT :batch)) RETURNING id) SELECT (SELECT count(*) FROM finished) AS done, coalesce((SELECT array_agg(id) FROM claimed), '{}') AS ids \gset
";

/// Runs pgbench with `script` until the table is drained; returns its CPU
/// seconds.
async fn run_pgbench(ctx: &Ctx, script_text: &str, clients: usize, batch: u32, tasks: u64) -> f64 {
    let dir = common::results_dir();
    let fused = script_text == PGBENCH_FUSED_SCRIPT;
    let script = dir.join(if fused {
        "pgbench_fused.sql"
    } else {
        "pgbench_claim_finish.sql"
    });
    std::fs::write(&script, script_text).expect("write pgbench script");
    // Some claims come up short near the end (rows taken by a concurrent
    // claim are skipped), and the fused model finishes each batch one
    // transaction later: run some transactions more than the ideal count.
    // The extra ones find nothing to do.
    let base = tasks.div_ceil(batch as u64 * clients as u64);
    let per_client = base + base / 10 + 3;
    let pgbench = common::session_lock_bin_dir().join("pgbench");
    let args: Vec<String> = vec![
        "-n".into(),
        "-M".into(),
        "prepared".into(),
        "-h".into(),
        ctx.pg.host().into(),
        "-p".into(),
        ctx.pg.port().to_string(),
        "-U".into(),
        ctx.pg.user().into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        clients.min(2).to_string(),
        "-t".into(),
        per_client.to_string(),
        "-D".into(),
        format!("batch={batch}"),
        "-D".into(),
        "ids={}".into(),
        "-f".into(),
        script.display().to_string(),
        common::DB.into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let out = Command::new(&pgbench)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", pgbench.display()));
        // pgbench's own CPU: it is our only child at this point.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we pass.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
        let cpu = usage.ru_utime.tv_sec as f64
            + usage.ru_utime.tv_usec as f64 / 1e6
            + usage.ru_stime.tv_sec as f64
            + usage.ru_stime.tv_usec as f64 / 1e6;
        (out, cpu)
    })
    .await
    .expect("pgbench thread");
    let (out, cpu_children_total) = out;
    if !out.status.success() {
        panic!(
            "pgbench failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // RUSAGE_CHILDREN is cumulative over every reaped child of this process
    // (workers too), so report the increment since the last pgbench.
    static LAST: Mutex<f64> = Mutex::new(0.0);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = cpu_children_total - *last;
    *last = cpu_children_total;
    cpu
}

// ---------------------------------------------------------------------------
// 7. Footprint (from the multi-process drains)
// ---------------------------------------------------------------------------

fn report_footprint(runs: &[DrainRun]) {
    let mut t = Table::new(
        "Worker process footprint during the drain (median of repetitions)",
        &[
            "sync commit",
            "batch",
            "worker processes",
            "peak RSS per worker (MiB)",
            "worker CPU s per 1k tasks (all workers)",
            "PostgreSQL CPU s per 1k tasks",
        ],
    );
    let mut keys: Vec<(bool, u32, usize)> = runs
        .iter()
        .filter(|r| r.mode == Mode::Processes)
        .map(|r| (r.sync, r.batch, r.runners))
        .collect();
    keys.sort();
    keys.dedup();
    keys.reverse();
    for (sync, batch, n) in keys {
        let sel: Vec<&DrainRun> = runs
            .iter()
            .filter(|r| {
                r.mode == Mode::Processes && r.sync == sync && r.batch == batch && r.runners == n
            })
            .collect();
        let per_k = |f: &dyn Fn(&DrainRun) -> f64| {
            median(
                &sel.iter()
                    .map(|r| f(r) / (r.tasks.max(1) as f64) * 1000.0)
                    .collect::<Vec<_>>(),
            )
        };
        t.row(vec![
            if sync { "on" } else { "off" }.into(),
            batch.to_string(),
            n.to_string(),
            format!(
                "{:.1}",
                median(&sel.iter().map(|r| r.peak_rss_mib).collect::<Vec<_>>())
            ),
            format!("{:.4}", per_k(&|r| r.client_cpu)),
            format!("{:.4}", per_k(&|r| r.pg_cpu)),
        ]);
    }
    t.emit("load");
}

// ---------------------------------------------------------------------------
// 3. Pickup latency
// ---------------------------------------------------------------------------

fn bench_pickup(ctx: &Ctx) {
    let samples = |listen: bool| match (ctx.opts.full, listen) {
        (true, _) => 100,
        (false, true) => 40,
        (false, false) => 20,
    };
    let mut t = Table::new(
        "Pickup latency: INSERT to execution start on an idle runner (ms; all repetitions pooled)",
        &[
            "wake-up", "tick", "samples", "p50", "p90", "p99", "max", "target", "verdict",
        ],
    );
    for listen in [true, false] {
        let mut all = Vec::new();
        for rep in 0..ctx.opts.reps {
            let xs = actix_rt::System::new().block_on(pickup_once(ctx, listen, samples(listen)));
            eprintln!(
                "bench: pickup rep {rep} listen={listen}: p50 {:.1} ms p99 {:.1} ms",
                quantile(&xs, 0.5),
                quantile(&xs, 0.99)
            );
            all.extend(xs);
        }
        let p50 = quantile(&all, 0.5);
        t.row(vec![
            if listen {
                "LISTEN/NOTIFY + tick"
            } else {
                "tick alone"
            }
            .into(),
            "1 s".into(),
            all.len().to_string(),
            ms(p50),
            ms(quantile(&all, 0.9)),
            ms(quantile(&all, 0.99)),
            ms(quantile(&all, 1.0)),
            if listen { "p50 <= 10 ms" } else { "(none)" }.into(),
            if listen {
                verdict(p50 <= 10.0)
            } else {
                "-".into()
            },
        ]);
    }
    t.emit("load");
}

async fn pickup_once(ctx: &Ctx, listen: bool, samples: usize) -> Vec<f64> {
    let client = common::connect(&ctx.url).await;
    common::seed(&client, 0).await;
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let rec = lat.clone();
    // Execution start: the wall clock when the tasker is called, against the
    // task's created_at (now() of the inserting transaction), both read from
    // this machine's one real-time clock.
    let tasker = move |tasks: Vec<ExampleTask>, _p: Progress| {
        let now = SystemTime::now();
        let mut ids = Vec::with_capacity(tasks.len());
        {
            let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
            for t in &tasks {
                let d = now.duration_since(t.created_at).unwrap_or(Duration::ZERO);
                rec.push(d.as_secs_f64() * 1e3);
                ids.push(t.id);
            }
        }
        async move { Ok::<Vec<TaskId>, TaskerError>(ids) }
    };
    let config = RunnerConfig::builder("pickup")
        .listen(listen)
        .jitter(Duration::ZERO)
        .build()
        .expect("config");
    let runner = Runner::new(config, store(&ctx.url).await, tasker).start();
    let mut status = runner.subscribe();
    session_lock_testkit::wait_for_status(&mut status, Duration::from_secs(10), |s| s.ticks > 0)
        .await
        .expect("runner ticked");
    // Random gaps, so inserts land at every phase of the tick.
    let mut rng = fastrand::Rng::with_seed(42 + listen as u64);
    for _ in 0..samples {
        let gap = if listen {
            rng.u64(50..300)
        } else {
            rng.u64(200..1200)
        };
        tokio::time::sleep(Duration::from_millis(gap)).await;
        client
            .execute(
                "INSERT INTO public.example_task (payload) VALUES ('pickup')",
                &[],
            )
            .await
            .expect("insert");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lat.lock().map(|v| v.len()).unwrap_or(0) < samples && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.stop().await;
    lat.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ---------------------------------------------------------------------------
// 4. Failover
// ---------------------------------------------------------------------------

fn bench_failover(ctx: &Ctx) {
    let ttls: Vec<u64> = if ctx.opts.full {
        vec![2, 5, 30]
    } else {
        vec![2, 5]
    };
    let tick_s = 1.0;
    let mut t = Table::new(
        "Failover: kill -9 one of 4 worker processes (s after the kill; per-task times pooled over repetitions, 'all' = median over repetitions of the last of the victim's tasks)",
        &[
            "TTL",
            "tasks held by victim",
            "session reclaimed (median)",
            "re-claimed p50 / p99 / all",
            "finished p50 / p99 / all",
            "target p99 <= TTL + tick + 1 s",
            "verdict (finished p99)",
        ],
    );
    for ttl in ttls {
        let mut reclaimed_at = Vec::new();
        let mut restarted = Vec::new();
        let mut finished = Vec::new();
        let mut last_restart = Vec::new();
        let mut last_finish = Vec::new();
        let mut held_counts = Vec::new();
        for rep in 0..ctx.opts.reps {
            let r = actix_rt::System::new().block_on(failover_once(ctx, ttl));
            eprintln!(
                "bench: failover rep {rep} ttl={ttl}s: {} tasks, reclaimed {:.2} s, last re-claim {:.2} s, last finish {:.2} s",
                r.held,
                r.session_reclaimed,
                quantile(&r.restarted, 1.0),
                quantile(&r.finished, 1.0)
            );
            held_counts.push(r.held as f64);
            reclaimed_at.push(r.session_reclaimed);
            last_restart.push(quantile(&r.restarted, 1.0));
            last_finish.push(quantile(&r.finished, 1.0));
            restarted.extend(r.restarted);
            finished.extend(r.finished);
        }
        let bound = ttl as f64 + tick_s + 1.0;
        let p99 = quantile(&finished, 0.99);
        t.row(vec![
            format!("{ttl} s"),
            format!("{:.0}", median(&held_counts)),
            format!("{:.2}", median(&reclaimed_at)),
            format!(
                "{:.2} / {:.2} / {:.2}",
                quantile(&restarted, 0.5),
                quantile(&restarted, 0.99),
                median(&last_restart)
            ),
            format!(
                "{:.2} / {:.2} / {:.2}",
                quantile(&finished, 0.5),
                p99,
                median(&last_finish)
            ),
            format!("{bound:.0} s"),
            verdict(p99 <= bound),
        ]);
    }
    t.emit("load");
}

struct FailoverRun {
    held: usize,
    session_reclaimed: f64,
    restarted: Vec<f64>,
    finished: Vec<f64>,
}

async fn failover_once(ctx: &Ctx, ttl_s: u64) -> FailoverRun {
    let client = common::connect(&ctx.url).await;
    common::set_synchronous_commit(&client, true).await;
    // Enough backlog that every worker stays at its cap (10) throughout.
    common::seed(&client, 2_000 + 500 * (ttl_s + 10)).await;
    let ttl_ms = ttl_s * 1000;
    let args: Vec<String> = [
        "--name",
        "failover",
        "--max-tasks",
        "10",
        "--work-ms",
        "100",
        "--tick-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--ttl-ms".to_string(),
        ttl_ms.to_string(),
        "--heartbeat-ms".to_string(),
        (ttl_ms / 4).to_string(),
    ])
    .collect();
    let mut workers = Workers::spawn(&ctx.url, 4, &args, true);
    // The victim's session id, from its stdout.
    let stdout = workers.children[0].stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<i64>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(id) = line
                .strip_prefix("session_id=")
                .and_then(|s| s.parse().ok())
            {
                let _ = tx.send(id);
            }
        }
    });
    wait_live_sessions(&client, 4, Duration::from_secs(30)).await;
    let victim_session =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("thread")
            .expect("victim session id");
    // Let all four run at their cap for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = &mut workers.children[0];
    let _ = victim.kill(); // SIGKILL
    let t_kill = now_epoch();
    let _ = victim.wait();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held: Vec<i64> = client
        .query(
            "SELECT id FROM public.example_task WHERE session_id = $1 AND finished_at IS NULL",
            &[&victim_session],
        )
        .await
        .expect("held")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(ttl_s + 60);
    loop {
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM public.example_task WHERE id = ANY ($1) AND finished_at IS NULL",
                &[&held],
            )
            .await
            .expect("open")
            .get(0);
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = client
        .query(
            "SELECT (SELECT extract(epoch FROM min(r.started_at))::float8 - $3
                       FROM public.example_task_run r
                      WHERE r.task_id = t.id AND r.session_id <> $2),
                    extract(epoch FROM t.finished_at)::float8 - $3
               FROM public.example_task t WHERE t.id = ANY ($1)",
            &[&held, &victim_session, &t_kill],
        )
        .await
        .expect("times");
    let never = (ttl_s + 60) as f64;
    let restarted = rows
        .iter()
        .map(|r| r.get::<_, Option<f64>>(0).unwrap_or(never))
        .collect();
    let finished = rows
        .iter()
        .map(|r| r.get::<_, Option<f64>>(1).unwrap_or(never))
        .collect();
    let session_reclaimed: f64 = client
        .query_one(
            "SELECT coalesce(extract(epoch FROM reclaimed_at)::float8 - $2, -1) FROM session_lock.session WHERE id = $1",
            &[&victim_session, &t_kill],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1.0);
    workers.stop();
    FailoverRun {
        held: held.len(),
        session_reclaimed,
        restarted,
        finished,
    }
}

// ---------------------------------------------------------------------------
// 5. Fairness
// ---------------------------------------------------------------------------

fn bench_fairness(ctx: &Ctx) {
    let ns = [2usize, 4, 8, 16];
    // Shares are weighted by capacity; every session here has capacity 10,
    // so under the cap each holds floor(open / live) or one more (the
    // remainder spread over the sessions, the newest always among those
    // with one more) and rounding decides who holds what; over it every
    // session should hold max_tasks.
    type Backlog = fn(usize) -> usize;
    let scenarios: Vec<(&str, Backlog)> = if ctx.opts.full {
        vec![
            ("7n+3 (under the cap)", |n| 7 * n + 3),
            ("10n+5 (over the cap)", |n| 10 * n + 5),
        ]
    } else {
        vec![("7n+3 (under the cap)", |n| 7 * n + 3)]
    };
    let mut t = Table::new(
        "Fairness: n sessions holding a steady backlog (a tasker that completes nothing), max_tasks 10, tick 200 ms. Spread = max - min tasks held across the live sessions, sampled every 200 ms for 2 s after 2 s of settling; best possible spread is 1 when n does not divide the backlog. Join = ticks of an (n+1)th session until it holds its fair floor, min(floor(backlog / (n+1)), 10) (shares are weighted by capacity, 10 for all here; the newest session's share is the ceiling, so it may settle one above its floor); 'not in 25' = not within 25 ticks (5 s), with what it held then",
        &[
            "backlog",
            "sessions",
            "tasks",
            "best spread",
            "spread p50",
            "spread max",
            "unheld tasks p50",
            "join: ticks to fair floor (median)",
            "join: s to fair floor (median)",
            "joiner held / fair floor",
        ],
    );
    for (label, backlog_of) in &scenarios {
        for &n in &ns {
            let backlog = backlog_of(n);
            let mut spreads = Vec::new();
            let mut unheld = Vec::new();
            let mut ticks = Vec::new();
            let mut times = Vec::new();
            let mut held = Vec::new();
            let floor = (backlog / (n + 1)).min(10);
            for _ in 0..ctx.opts.reps {
                let r = actix_rt::System::new().block_on(fairness_once(ctx, n, backlog, floor));
                spreads.extend(r.spreads);
                unheld.extend(r.unheld);
                ticks.push(r.join_ticks);
                times.push(r.join_secs);
                held.push(r.joiner_held as f64);
            }
            let best = if backlog % n == 0 || backlog >= 10 * n {
                0
            } else {
                1
            };
            let reached = ticks.iter().filter(|x| x.is_finite()).count();
            let (tk, secs) = if reached * 2 > ticks.len() {
                let ok: Vec<f64> = ticks.iter().copied().filter(|x| x.is_finite()).collect();
                let ts: Vec<f64> = times.iter().copied().filter(|x| x.is_finite()).collect();
                (format!("{:.0}", median(&ok)), format!("{:.2}", median(&ts)))
            } else {
                ("not in 25".to_owned(), "-".to_owned())
            };
            t.row(vec![
                label.to_string(),
                n.to_string(),
                backlog.to_string(),
                best.to_string(),
                format!("{:.0}", quantile(&spreads, 0.5)),
                format!("{:.0}", quantile(&spreads, 1.0)),
                format!("{:.0}", quantile(&unheld, 0.5)),
                tk,
                secs,
                format!("{:.0} / {floor}", median(&held)),
            ]);
        }
    }
    t.emit("load");
}

struct FairnessRun {
    spreads: Vec<f64>,
    unheld: Vec<f64>,
    join_ticks: f64,
    join_secs: f64,
    joiner_held: usize,
}

fn fairness_config(name: &str) -> RunnerConfig {
    RunnerConfig::builder(name)
        .max_tasks(10)
        .tick(Duration::from_millis(200))
        .jitter(Duration::from_millis(200))
        .listen(false)
        .build()
        .expect("config")
}

/// A tasker that holds its tasks: it completes none, so they stay assigned
/// and the backlog stays steady.
fn holding_tasker() -> impl session_lock::Tasker<ExampleTask> {
    |_tasks: Vec<ExampleTask>, _p: Progress| async { Ok::<Vec<TaskId>, TaskerError>(Vec::new()) }
}

async fn fairness_once(ctx: &Ctx, n: usize, backlog: usize, floor: usize) -> FairnessRun {
    let client = common::connect(&ctx.url).await;
    common::seed(&client, backlog as u64).await;
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(
            Runner::new(
                fairness_config("fair"),
                store(&ctx.url).await,
                holding_tasker(),
            )
            .start(),
        );
    }
    wait_live_sessions(&client, n as i64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut spreads = Vec::new();
    let mut unheld = Vec::new();
    for _ in 0..10 {
        let row = client
            .query_one(
                "WITH held AS (
                    SELECT l.id, count(t.id) AS n
                      FROM session_lock.live_session l
                      LEFT JOIN public.example_task t ON t.session_id = l.id AND t.finished_at IS NULL
                     WHERE l.name = 'fair'
                     GROUP BY l.id)
                 SELECT coalesce(max(n) - min(n), 0)::float8,
                        (SELECT count(*) FROM public.example_task WHERE session_id IS NULL AND finished_at IS NULL)::float8
                   FROM held",
                &[],
            )
            .await
            .expect("spread");
        spreads.push(row.get(0));
        unheld.push(row.get(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A session joins: ticks until it holds its fair floor.
    let joiner = Runner::new(
        fairness_config("fair"),
        store(&ctx.url).await,
        holding_tasker(),
    )
    .start();
    let t0 = Instant::now();
    let mut rx = joiner.subscribe();
    let got = session_lock_testkit::wait_for_status(&mut rx, Duration::from_secs(5), |s| {
        s.tasks_held >= floor && s.ticks > 0
    })
    .await;
    let (join_ticks, join_secs) = match got {
        Some(s) => (s.ticks as f64, t0.elapsed().as_secs_f64()),
        None => (f64::NAN, f64::NAN),
    };
    let joiner_held = joiner.status().tasks_held;
    handles.push(joiner);
    join_all(handles.iter().map(|h| h.stop())).await;
    FairnessRun {
        spreads,
        unheld,
        join_ticks,
        join_secs,
        joiner_held,
    }
}

// ---------------------------------------------------------------------------
// 6. Idle cost
// ---------------------------------------------------------------------------

fn bench_idle(ctx: &Ctx) {
    let n = 50usize;
    let window = Duration::from_secs(if ctx.opts.full { 60 } else { 15 });
    let mut qps = Vec::new();
    let mut xps = Vec::new();
    let mut pg = Vec::new();
    let mut client_cpu = Vec::new();
    let mut breakdown = String::new();
    for rep in 0..ctx.opts.reps {
        let r = actix_rt::System::new().block_on(idle_once(ctx, n, window));
        eprintln!(
            "bench: idle rep {rep}: {:.2} statements/s per runner, PG CPU {:.1} %",
            r.0, r.2
        );
        qps.push(r.0);
        xps.push(r.1);
        pg.push(r.2);
        client_cpu.push(r.3);
        breakdown = r.4;
    }
    let mut t = Table::new(
        format!(
            "Idle cost: {n} idle runners in one process, default config (tick 1 s, heartbeat 30 s, LISTEN on), {} s window (median of repetitions)",
            window.as_secs()
        ),
        &[
            "statements/s per runner",
            "transactions/s per runner",
            "PostgreSQL CPU (% of one core)",
            "runner process CPU (% of one core)",
        ],
    );
    t.row(vec![
        format!("{:.2}", median(&qps)),
        format!("{:.2}", median(&xps)),
        format!("{:.1}", median(&pg)),
        format!("{:.1}", median(&client_cpu)),
    ]);
    t.emit("load");
    if !breakdown.is_empty() {
        println!("{breakdown}");
    }
}

async fn idle_snapshot(c: &Client, tracked: bool, calls_q: &str, xact_q: &str) -> (f64, f64) {
    let calls: f64 = if tracked {
        c.query_one(calls_q, &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0.0)
    } else {
        0.0
    };
    // pg_stat_database is updated by backends at most every 500 ms (and
    // when idle): read a fresh snapshot.
    let _ = c.batch_execute("SELECT pg_stat_clear_snapshot()").await;
    let x: f64 = c
        .query_one(xact_q, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0);
    (calls, x)
}

async fn idle_once(ctx: &Ctx, n: usize, window: Duration) -> (f64, f64, f64, f64, String) {
    let postmaster = ctx.pg.pid().expect("postmaster");
    let client = common::connect(&ctx.url).await;
    common::seed(&client, 0).await;
    let tracked = common::track_statements(&client, "top").await;
    let mut handles = Vec::new();
    for _ in 0..n {
        let config = RunnerConfig::builder("idle").build().expect("config");
        handles.push(
            Runner::<ExampleTask, _, _>::new(config, store(&ctx.url).await, NoopTasker).start(),
        );
    }
    wait_live_sessions(&client, n as i64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_q = "SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements
                    WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'";
    let xact_q = "SELECT xact_commit::float8 + xact_rollback::float8 FROM pg_stat_database WHERE datname = current_database()";
    let (c0, x0) = idle_snapshot(&client, tracked, calls_q, xact_q).await;
    let pg0 = common::postgres_cpu_secs(postmaster);
    let self0 = common::self_cpu_secs();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (c1, x1) = idle_snapshot(&client, tracked, calls_q, xact_q).await;
    let secs = t0.elapsed().as_secs_f64();
    let pg_cpu = (common::postgres_cpu_secs(postmaster) - pg0) / secs * 100.0;
    let self_cpu = (common::self_cpu_secs() - self0) / secs * 100.0;
    let mut breakdown = String::new();
    if tracked {
        if let Ok(rows) = client
            .query(
                "SELECT calls::float8, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                   FROM pg_stat_statements
                  WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'
                  ORDER BY calls DESC LIMIT 6",
                &[],
            )
            .await
        {
            breakdown.push_str("idle: statements by calls since tracking started:\n");
            for r in rows {
                let calls: f64 = r.get(0);
                let q: String = r.get(1);
                breakdown.push_str(&format!("  {calls:>8.0}  {q}\n"));
            }
        }
    }
    join_all(handles.iter().map(|h| h.stop())).await;
    common::track_statements(&client, "none").await;
    let qps = if tracked {
        (c1 - c0) / n as f64 / secs
    } else {
        f64::NAN
    };
    // The two snapshot reads are themselves transactions; negligible.
    let xps = (x1 - x0) / n as f64 / secs;
    (qps, xps, pg_cpu, self_cpu, breakdown)
}

// ---------------------------------------------------------------------------
// Diagnosis: where the time goes
// ---------------------------------------------------------------------------

fn bench_diag(ctx: &Ctx) {
    if !common::pg_stat_statements_installed() {
        eprintln!("bench: diag needs pg_stat_statements");
        return;
    }
    for (n, batch) in [(1usize, 10u32), (4, 100)] {
        actix_rt::System::new().block_on(diag_drain(ctx, n, batch));
    }
    actix_rt::System::new().block_on(diag_get_work(ctx, 1_000_000, 100, 100));
}

/// A drain in one process with nested statements tracked: the server's
/// time per tick against the wall time per tick.
async fn diag_drain(ctx: &Ctx, n: usize, batch: u32) {
    let client = common::connect(&ctx.url).await;
    let tasks = ctx.opts.tasks.min(50_000);
    common::seed(&client, tasks).await;
    common::track_statements(&client, "all").await;
    let mut handles = Vec::new();
    for _ in 0..n {
        let config = RunnerConfig::builder("bench")
            .max_tasks(batch)
            .jitter(Duration::ZERO)
            .build()
            .expect("config");
        handles.push(
            Runner::<ExampleTask, _, _>::new(config, store(&ctx.url).await, NoopTasker).start(),
        );
    }
    let t0 = Instant::now();
    while handles.iter().map(|h| h.status().finished).sum::<u64>() < tasks
        && t0.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let ticks: u64 = handles.iter().map(|h| h.status().ticks).sum();
    join_all(handles.iter().map(|h| h.stop())).await;
    let server_ms: f64 = client
        .query_one(
            "SELECT coalesce(sum(total_exec_time), 0) FROM pg_stat_statements
              WHERE toplevel AND (query ILIKE '%example_task_get_work%' OR query ILIKE '%example_task_finish_tasks%')",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0);
    println!(
        "diag: {n} runner(s), batch {batch}: {tasks} tasks in {wall:.2} s, {ticks} ticks; wall per tick per runner {:.3} ms; server execution (get_work + finish, commit excluded) per tick {:.3} ms",
        wall * 1e3 * n as f64 / ticks.max(1) as f64,
        server_ms / ticks.max(1) as f64
    );
    print_statements(
        &client,
        &format!("drain, {n} runner(s) in one process, batch {batch}, {tasks} tasks in {wall:.1} s, {ticks} ticks"),
    )
    .await;
    common::track_statements(&client, "none").await;
}

/// get_work at a large backlog with many sessions, nested statements
/// tracked: which part of the tick costs what.
async fn diag_get_work(ctx: &Ctx, backlog: u64, sessions: usize, max_tasks: u32) {
    use session_lock::{Database, GetWork, SessionStart};
    let client = common::connect(&ctx.url).await;
    common::seed(&client, backlog).await;
    let store = store(&ctx.url).await;
    let ttl = Duration::from_secs(3600);
    let mut ids = Vec::new();
    for _ in 0..sessions {
        ids.push(
            store
                .start_session(&SessionStart::new("diag", ttl, max_tasks))
                .await
                .expect("session"),
        );
    }
    common::track_statements(&client, "all").await;
    for round in 0..3 {
        for session in &ids {
            let work = store
                .get_work::<ExampleTask>(GetWork::new(session))
                .await
                .expect("get_work");
            let done: Vec<i64> = work.tasks.iter().map(|t| t.id).collect();
            if round > 0 {
                common::finish_and_replace(&client, session, &done).await;
            }
        }
    }
    print_statements(
        &client,
        &format!(
            "get_work at {backlog} open tasks, {sessions} sessions, max_tasks {max_tasks}, 3 rounds"
        ),
    )
    .await;
    common::track_statements(&client, "none").await;
}

async fn print_statements(client: &Client, what: &str) {
    let rows = client
        .query(
            "SELECT calls::float8, total_exec_time, mean_exec_time, rows::float8,
                    shared_blks_hit::float8 / greatest(calls, 1),
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
               FROM pg_stat_statements
              WHERE query NOT ILIKE '%pg_stat%'
              ORDER BY total_exec_time DESC LIMIT 16",
            &[],
        )
        .await
        .expect("pg_stat_statements");
    let mut t = Table::new(
        format!(
            "Diagnosis: statements by total time ({what}; nested statements included, so entry points include their parts)"
        ),
        &[
            "calls",
            "total ms",
            "mean ms",
            "rows",
            "blocks hit / call",
            "statement",
        ],
    );
    for r in rows {
        let q: String = r.get(5);
        t.row(vec![
            format!("{:.0}", r.get::<_, f64>(0)),
            format!("{:.0}", r.get::<_, f64>(1)),
            format!("{:.3}", r.get::<_, f64>(2)),
            format!("{:.0}", r.get::<_, f64>(3)),
            format!("{:.1}", r.get::<_, f64>(4)),
            q.replace('|', "\\|"),
        ]);
    }
    t.emit("load");
}
