//! Drain throughput (BENCHMARKS.md, benchmark 2): how fast N runners empty
//! a table of no-op tasks, against what PostgreSQL allows for the same work.
//!
//! Each run reseeds the table and drains it one way: N `Runner`s in this
//! process, N `session-lock run --noop` processes, or pgbench running the
//! raw-SQL model of a tick (claim with SKIP LOCKED, then finish: the limit;
//! or both in one statement: the fused limit) with N clients at the same
//! batch size. The rate is read from the table, first finish to last, on
//! the database clock (for processes, from the moment every one of them
//! holds a session: a process's start, its migrator run and connections,
//! is not the drain, and the first ones to start would otherwise drain
//! beside the start-up of the rest); the limit runs right after ours in
//! the same repetition, so the ratio compares like moments.
//!
//! What limits the figure: at batch 100, PostgreSQL executing get_work's
//! statements (pickup and finish UPDATEs, the session bump, the PL/pgSQL
//! calls around them) against the model's two; at batch 10, also the
//! runner's wake-ups and thread hops per tick; at 8 runners, the 2 vCPUs
//! shared by runners, backends and pgbench.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use session_lock::RunnerConfig;
use tokio_postgres::Client;

use crate::common::{self, Table, median, verdict};
use crate::{Ctx, noop_runner, spawn_runners, stop_runners, wait_live_sessions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
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
pub(crate) struct DrainRun {
    rep: usize,
    pub(crate) mode: Mode,
    pub(crate) runners: usize,
    pub(crate) batch: u32,
    pub(crate) sync: bool,
    pub(crate) tasks: i64,
    rate: f64,
    secs: f64,
    pub(crate) pg_cpu: f64,
    /// Client CPU seconds (the bench process for in-process runs, the sum of
    /// the runner processes for processes, pgbench's own for the limit).
    pub(crate) client_cpu: f64,
    pub(crate) peak_rss_mib: f64,
}

pub(crate) fn run(ctx: &Ctx) -> Vec<DrainRun> {
    let (mut runner_counts, batches, syncs): (Vec<usize>, Vec<u32>, Vec<bool>) = if ctx.opts.full {
        (vec![1, 2, 4, 8], vec![10, 100], vec![true, false])
    } else {
        (vec![1, 4], vec![10, 100], vec![true])
    };
    if let Some(counts) = &ctx.opts.runners {
        runner_counts.clone_from(counts);
    }
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
        let mut since = None;
        let deadline = Duration::from_secs(900);
        match mode {
            Mode::InProcess => {
                drain_in_process(&ctx.url, n, batch, tasks, deadline).await;
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
                let mut runners = spawn_runners(&ctx.url, n, &args);
                let t0 = Instant::now();
                wait_live_sessions(&client, n as i64, Duration::from_secs(120)).await;
                since = Some(
                    client
                        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
                        .await
                        .expect("clock")
                        .get(0),
                );
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // A probe of the open-task index, not a count: counting
                    // 100k rows ten times a second took a tenth of a core
                    // from the runners being measured.
                    let open: bool = client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM public.example_task WHERE finished_at IS NULL)",
                            &[],
                        )
                        .await
                        .expect("open")
                        .get(0);
                    if !open || t0.elapsed() > deadline {
                        break;
                    }
                }
                for p in runners.processes() {
                    client_cpu += common::proc_cpu_secs(p.pid(), true);
                    peak_rss = f64::max(peak_rss, common::proc_peak_rss_mib(p.pid()));
                }
                stop_runners(&mut runners).await;
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
        let (mut done, mut rate) = drain_rate(&client, since).await;
        if since.is_some() && (done as u64) < tasks / 2 {
            // Most of it drained while processes were still starting: the
            // whole drain is the figure.
            (done, rate) = drain_rate(&client, None).await;
        }
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
    let (out, cpu) = tokio::task::spawn_blocking(move || {
        // RUSAGE_CHILDREN counts every reaped child of this process (the
        // runner processes too): pgbench's own CPU is the increase across
        // its run, when it is the only child.
        let before = children_cpu_secs();
        let out = Command::new(&pgbench)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", pgbench.display()));
        (out, children_cpu_secs() - before)
    })
    .await
    .expect("pgbench thread");
    if !out.status.success() {
        panic!(
            "pgbench failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cpu
}

/// CPU seconds (user + system) of this process's reaped children.
fn children_cpu_secs() -> f64 {
    // SAFETY: rusage is plain integers, valid when zeroed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6
}

/// What [`drain_in_process`] saw before it stopped its runners.
pub(crate) struct InProcessDrain {
    /// Seconds from the runners' start until they had finished the tasks.
    pub(crate) wall: f64,
    /// Ticks of all the runners together.
    pub(crate) ticks: u64,
}

/// Starts `n` no-op runners named `bench` in this process (max_tasks
/// `batch`, no jitter), waits until they have finished `tasks` tasks or
/// `deadline` has passed, and stops them.
pub(crate) async fn drain_in_process(
    url: &str,
    n: usize,
    batch: u32,
    tasks: u64,
    deadline: Duration,
) -> InProcessDrain {
    let mut handles = Vec::new();
    for _ in 0..n {
        let config = RunnerConfig::builder("bench")
            .max_tasks(batch)
            .jitter(Duration::ZERO)
            .build()
            .expect("config");
        handles.push(noop_runner(url, config).await);
    }
    let t0 = Instant::now();
    while handles.iter().map(|h| h.status().finished).sum::<u64>() < tasks
        && t0.elapsed() <= deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = InProcessDrain {
        wall: t0.elapsed().as_secs_f64(),
        ticks: handles.iter().map(|h| h.status().ticks).sum(),
    };
    join_all(handles.iter().map(|h| h.stop())).await;
    drained
}

/// Finished tasks and tasks/s between the first and the last finish, on the
/// database clock.
pub(crate) async fn drain_rate(client: &Client, since: Option<f64>) -> (i64, f64) {
    let row = client
        .query_one(
            "SELECT count(*),
                    coalesce(extract(epoch FROM max(finished_at)
                                      - greatest(min(finished_at), to_timestamp($1::float8)))::float8, 0)
               FROM public.example_task
              WHERE finished_at >= to_timestamp($1::float8)",
            &[&since.unwrap_or(f64::NEG_INFINITY)],
        )
        .await
        .expect("rate");
    let n: i64 = row.get(0);
    let secs: f64 = row.get(1);
    (n, if secs > 0.0 { n as f64 / secs } else { 0.0 })
}
