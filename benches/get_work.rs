//! get_work latency against the backlog (BENCHMARKS.md, benchmark 1).
//!
//! One database per backlog (1k, 100k, 1M open tasks) on one durable
//! server. For each number of live sessions (1, 10, 100) and max_tasks (10,
//! 100; each session's capacity, given when it starts), every database gets
//! that many sessions, which take turns. A turn is one timed
//! `PgStore::get_work` with a sweep (the call a runner makes once per tick:
//! check the lease, reclaim, sweep for orphans, count, pick up its share,
//! return its tasks) and, untimed, the session finishing its batch through
//! the fenced finish and inserting as many new tasks, so the
//! backlog stays where it is and every timed call picks up a full share, as
//! in a drain. Two kinds of turn, which differ in what the *other* sessions
//! hold while one calls:
//! * `busy`: a session finishes its batch just before its next call, so
//!   between calls it holds the batch, as a runner does while its Tasker
//!   runs it (a drain's steady state);
//! * `idle`: a session finishes right after its call, so the others hold
//!   nothing: every open task is free, the worst case for the bounded count
//!   (it walks up to the live sessions' total capacity in free tasks).
//!
//! Each timed call is followed, in the interleaved pass, by the raw-SQL
//! claim of as many tasks on the same database (the drain benchmark's
//! pgbench limit: one `UPDATE ... WHERE id = ANY (ARRAY(SELECT ... FOR
//! UPDATE SKIP LOCKED LIMIT n))` statement of the same free tasks in the
//! same order as the pickup, for a session of its own name but with none
//! of the protocol), so that what the backlog costs PostgreSQL itself can
//! be told apart from what it costs get_work.
//!
//! Two measurements per configuration:
//! * criterion, one backlog after the other (mean and its confidence
//!   interval, in criterion's own output);
//! * the table: an interleaved pass, one turn on each backlog in rotation
//!   plus two floor calls (`SELECT 1`, a one-row committed UPDATE), so that
//!   the machine's noise, which on a shared 2-vCPU box changes from one
//!   second to the next, falls on every backlog alike. p50 and p99 of the
//!   individual calls come from this pass.
//!
//! The sessions are 1, 10 and 100, each at max_tasks 10 and 100, and 1,000
//! at max_tasks 10 (a big fleet of one name: every call reads every live
//! session's row). Beside the latencies, the PostgreSQL CPU per call: the
//! CPU of the store's backends (which run nothing but get_work here) over
//! the interleaved pass, per call.
//!
//! `cargo bench --bench get_work`; `SESSION_LOCK_BENCH_BACKLOGS=1000,1000000`
//! narrows the backlogs, `SESSION_LOCK_BENCH_QUICK=1` shortens everything,
//! `SESSION_LOCK_BENCH_ROUNDS=N` sets the interleaved rounds (default 400),
//! `SESSION_LOCK_BENCH_SESSIONS=100`, `SESSION_LOCK_BENCH_MAX_TASKS=100` and
//! `SESSION_LOCK_BENCH_TURNS=busy` narrow the other axes.

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use session_lock::{Database, GetWork, PgStore, Session, SessionStart, StoreOptions};
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

use common::{Table, median, ms, quantile, verdict};

const TTL: Duration = Duration::from_secs(3600);

/// Which sessions hold their batch between calls (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turns {
    Busy,
    Idle,
}

impl Turns {
    fn name(self) -> &'static str {
        match self {
            Turns::Busy => "busy",
            Turns::Idle => "idle",
        }
    }
}

impl std::str::FromStr for Turns {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busy" => Ok(Turns::Busy),
            "idle" => Ok(Turns::Idle),
            other => Err(format!("unknown turn kind {other:?}: busy or idle")),
        }
    }
}

/// One backlog's database.
struct Db {
    backlog: u64,
    store: PgStore,
    client: Client,
    sessions: Vec<Session>,
    /// Per session, the batch it holds until its next turn (busy turns).
    batches: Vec<Vec<i64>>,
    turns: Turns,
    next: usize,
    /// Tasks returned by the last timed call.
    last_batch: usize,
    /// The raw-SQL claim, prepared on `client`.
    raw_claim: tokio_postgres::Statement,
    /// The session the raw claim holds its tasks in, from [`Db::prepare`].
    raw_session: Option<Session>,
}

/// The store's application_name: its backends are the ones that run
/// get_work (the bench's own client has none).
const STORE_APPLICATION: &str = "session-lock";

impl Db {
    /// Ends every session and frees every open task, then starts `n`
    /// sessions of capacity `max_tasks` and lets each take and finish one
    /// share.
    async fn prepare(&mut self, n: usize, max_tasks: u32, turns: Turns) {
        self.client
            .batch_execute(
                "UPDATE public.example_task SET session_id = NULL WHERE session_id IS NOT NULL AND finished_at IS NULL;
                 DELETE FROM session_lock.session;",
            )
            .await
            .expect("reset");
        self.client
            .batch_execute("VACUUM ANALYZE public.example_task")
            .await
            .expect("vacuum");
        self.sessions.clear();
        self.batches = vec![Vec::new(); n];
        self.turns = turns;
        for _ in 0..n {
            let id = self
                .store
                .start_session(&SessionStart::new("bench", TTL, max_tasks))
                .await
                .expect("start_session");
            self.sessions.push(id);
        }
        self.raw_session = Some(self.start_raw_session(max_tasks).await);
        for i in 0..n {
            self.turn(i).await;
        }
        self.next = 0;
    }

    /// The raw claim's session: a runner name of its own, so that it has
    /// no part in the bench sessions' shares, and bound to the task table
    /// by one get_work (whose pickup it finishes and replaces), because
    /// the sweep frees the tasks of a session bound to no table, live or
    /// not. Live and bound, it keeps the tasks it claims until it finishes
    /// them; its lease is as long as the bench sessions', and it starts
    /// afresh with them at every configuration.
    async fn start_raw_session(&self, capacity: u32) -> Session {
        let session = self
            .store
            .start_session(&SessionStart::new("raw-claim", TTL, capacity))
            .await
            .expect("start the raw claim's session");
        let work = self
            .store
            .get_work::<ExampleTask>(GetWork {
                sweep: false,
                ..GetWork::new(&session)
            })
            .await
            .expect("bind the raw claim's session");
        let ids: Vec<i64> = work.tasks.iter().map(|t| t.id).collect();
        self.finish_and_replace(&session, &ids).await;
        session
    }

    /// The next session's turn: the get_work latency in ms, and how many
    /// tasks the call returned.
    async fn next_turn(&mut self) -> (f64, usize) {
        let i = self.next % self.sessions.len();
        self.next += 1;
        let elapsed = self.turn(i).await;
        (elapsed.as_secs_f64() * 1e3, self.last_batch)
    }

    /// One turn: the timed get_work, and the untimed finish-and-replace
    /// of the session's batch, before the call (busy) or after it (idle).
    /// The call is a tick's first (with the sweep) and finishes nothing
    /// itself, so that it measures get_work alone, as before the finish
    /// was fused into it.
    async fn turn(&mut self, i: usize) -> Duration {
        let session = self.sessions[i].clone();
        let held = std::mem::take(&mut self.batches[i]);
        self.finish_and_replace(&session, &held).await;
        let t0 = Instant::now();
        let work = self
            .store
            .get_work::<ExampleTask>(GetWork::new(&session))
            .await
            .expect("get_work");
        let elapsed = t0.elapsed();
        let ids: Vec<i64> = work.tasks.iter().map(|t| t.id).collect();
        self.last_batch = ids.len();
        match self.turns {
            Turns::Busy => self.batches[i] = ids,
            Turns::Idle => self.finish_and_replace(&session, &ids).await,
        }
        elapsed
    }

    /// The raw-SQL model of the same pickup, the drain benchmark's pgbench
    /// limit (BENCHMARKS.md, section 2): untimed, inserts `n` tasks (so
    /// that `n` are free even when the sessions hold every other one);
    /// timed, claims `n` free tasks with FOR UPDATE SKIP LOCKED in one
    /// statement and commit; untimed, finishes what it claimed, so the
    /// backlog stays put. The tasks are claimed for a session of its own
    /// (see [`Db::start_raw_session`]), but nothing of the protocol runs:
    /// no lease check, no share, no counter. What it costs at each backlog
    /// is what PostgreSQL itself charges for claiming that many tasks
    /// there.
    async fn raw_claim(&self, n: usize) -> f64 {
        let session = self.raw_session.as_ref().expect("prepared").id;
        common::insert_tasks(&self.client, n as u64).await;
        let t0 = Instant::now();
        let row = self
            .client
            .query_one(&self.raw_claim, &[&(n as i64), &session])
            .await
            .expect("raw claim");
        let elapsed = t0.elapsed().as_secs_f64() * 1e3;
        let ids: Vec<i64> = row.get(0);
        assert_eq!(ids.len(), n, "the raw claim finds its {n} free tasks");
        self.client
            .execute(
                "UPDATE public.example_task SET finished_at = now(), finished_by = $2
                  WHERE id = ANY ($1) AND session_id = $2 AND finished_at IS NULL",
                &[&ids, &session],
            )
            .await
            .expect("finish raw claim");
        elapsed
    }

    /// CPU seconds so far of the backends of this database's store.
    async fn store_cpu(&self) -> f64 {
        self.client
            .query(
                "SELECT pid FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = $1",
                &[&STORE_APPLICATION],
            )
            .await
            .expect("store backends")
            .iter()
            .map(|r| common::proc_cpu_secs(r.get::<_, i32>(0) as u32, false))
            .sum()
    }

    /// Finishes `ids` for `session` and inserts as many new tasks.
    async fn finish_and_replace(&self, session: &Session, ids: &[i64]) {
        common::finish_and_replace(&self.client, session, ids).await;
    }
}

/// The floor calls, on their own connection: a bare round trip and a
/// one-row committed UPDATE (round trip + WAL fsync).
async fn floor_calls(client: &Client) -> (f64, f64) {
    let t0 = Instant::now();
    client.query_one("SELECT 1", &[]).await.expect("select 1");
    let a = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    client
        .execute("UPDATE bench_floor SET v = v + 1 WHERE k = 1", &[])
        .await
        .expect("update");
    (a, t0.elapsed().as_secs_f64() * 1e3)
}

struct Pass {
    turns: Turns,
    sessions: usize,
    max_tasks: u32,
    /// Per backlog, in the order of `dbs`: latencies in ms.
    calls: Vec<Vec<f64>>,
    /// Per backlog: tasks returned per call.
    batches: Vec<Vec<f64>>,
    /// Per backlog: the raw claim of as many tasks, in ms.
    raw: Vec<Vec<f64>>,
    /// Per backlog: PostgreSQL CPU per get_work, in ms.
    cpu: Vec<f64>,
    select1: Vec<f64>,
    commit: Vec<f64>,
}

fn env_num(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A comma-separated list from the environment, or `default`.
fn env_list<T: std::str::FromStr + Copy>(name: &str, default: &[T]) -> Vec<T> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<T>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let quick = std::env::var_os("SESSION_LOCK_BENCH_QUICK").is_some();
    let rounds = env_num("SESSION_LOCK_BENCH_ROUNDS").unwrap_or(if quick { 100 } else { 400 });
    let backlogs: Vec<u64> = env_list("SESSION_LOCK_BENCH_BACKLOGS", &[1_000, 100_000, 1_000_000]);
    let session_counts: Vec<usize> = env_list("SESSION_LOCK_BENCH_SESSIONS", &[1, 10, 100, 1_000]);
    let max_tasks_list: Vec<u32> = env_list("SESSION_LOCK_BENCH_MAX_TASKS", &[10, 100]);
    let turn_kinds: Vec<Turns> = std::env::var("SESSION_LOCK_BENCH_TURNS")
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().parse().unwrap_or_else(|e| panic!("{e}")))
                .collect()
        })
        .unwrap_or_else(|_| vec![Turns::Busy, Turns::Idle]);

    common::start_results(
        "get_work",
        "Benchmark 1: get_work latency against the backlog",
    );
    let pg = common::start_server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut dbs, floor_client) = rt.block_on(async {
        let mut dbs = Vec::new();
        let mut first_url = None;
        for &backlog in &backlogs {
            let url = common::create_db(&pg, &format!("bench_{backlog}")).await;
            let store = PgStore::from_config(
                url.parse().expect("url"),
                StoreOptions {
                    pool_size: 2,
                    ..StoreOptions::default()
                },
            )
            .await
            .expect("store");
            let client = common::connect(&url).await;
            first_url.get_or_insert(url);
            eprintln!("bench: seeding {backlog} open tasks");
            common::seed(&client, backlog).await;
            let raw_claim = client
                .prepare(
                    "WITH claimed AS (
                         UPDATE public.example_task SET session_id = $2
                          WHERE id = ANY (ARRAY(
                                    SELECT id FROM public.example_task
                                     WHERE session_id IS NULL AND finished_at IS NULL
                                     ORDER BY session_id, id
                                     FOR UPDATE SKIP LOCKED
                                     LIMIT $1))
                         RETURNING id)
                     SELECT coalesce(array_agg(id), '{}') FROM claimed",
                )
                .await
                .expect("prepare raw claim");
            dbs.push(Db {
                backlog,
                store,
                client,
                sessions: Vec::new(),
                batches: Vec::new(),
                turns: Turns::Busy,
                next: 0,
                last_batch: 0,
                raw_claim,
                raw_session: None,
            });
        }
        let floor = common::connect(&first_url.expect("a backlog")).await;
        (dbs, floor)
    });

    let mut c = Criterion::default()
        .sample_size(if quick { 10 } else { 20 })
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 800 } else { 2000 }))
        .without_plots()
        .configure_from_args();

    let mut passes = Vec::new();
    for &turns in &turn_kinds {
        for &n in &session_counts {
            for &max_tasks in &max_tasks_list {
                // A thousand sessions at the default max_tasks only.
                if n >= 1_000 && max_tasks != 10 {
                    continue;
                }
                rt.block_on(async {
                    for db in dbs.iter_mut() {
                        db.prepare(n, max_tasks, turns).await;
                    }
                });
                let mut group = c.benchmark_group(format!(
                    "get_work/{}/sessions={n}/max_tasks={max_tasks}",
                    turns.name()
                ));
                for db in dbs.iter_mut() {
                    group.bench_function(BenchmarkId::new("open_tasks", db.backlog), |b| {
                        b.iter_custom(|iters| {
                            rt.block_on(async {
                                let mut total = 0.0;
                                for _ in 0..iters {
                                    total += db.next_turn().await.0;
                                }
                                Duration::from_secs_f64(total / 1e3)
                            })
                        })
                    });
                }
                group.finish();

                // The interleaved pass.
                let mut pass = Pass {
                    turns,
                    sessions: n,
                    max_tasks,
                    calls: vec![Vec::with_capacity(rounds); dbs.len()],
                    batches: vec![Vec::with_capacity(rounds); dbs.len()],
                    raw: vec![Vec::with_capacity(rounds); dbs.len()],
                    cpu: vec![0.0; dbs.len()],
                    select1: Vec::with_capacity(rounds),
                    commit: Vec::with_capacity(rounds),
                };
                rt.block_on(async {
                    let mut cpu0 = Vec::new();
                    for db in &dbs {
                        cpu0.push(db.store_cpu().await);
                    }
                    for r in 0..rounds {
                        for k in 0..dbs.len() {
                            // Rotate the order so no backlog always goes first.
                            let j = (r + k) % dbs.len();
                            let (x, n) = dbs[j].next_turn().await;
                            pass.calls[j].push(x);
                            pass.batches[j].push(n as f64);
                            if n > 0 {
                                let y = dbs[j].raw_claim(n).await;
                                pass.raw[j].push(y);
                            }
                        }
                        let (a, b) = floor_calls(&floor_client).await;
                        pass.select1.push(a);
                        pass.commit.push(b);
                    }
                    for (j, db) in dbs.iter().enumerate() {
                        pass.cpu[j] = (db.store_cpu().await - cpu0[j]) * 1e3 / rounds as f64;
                    }
                });
                eprintln!(
                    "bench: get_work {} turns, sessions={n} max_tasks={max_tasks}: p50 {}",
                    turns.name(),
                    pass.calls
                        .iter()
                        .zip(&dbs)
                        .map(|(xs, db)| format!("{}={:.2} ms", db.backlog, quantile(xs, 0.5)))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                passes.push(pass);
            }
        }
    }
    report(&dbs, &passes, rounds);
    drop(dbs);
    drop(floor_client);
    drop(rt);
    drop(pg);
}

fn report(dbs: &[Db], passes: &[Pass], rounds: usize) {
    let base = dbs.iter().position(|d| d.backlog == 1_000);
    let top = dbs.iter().position(|d| d.backlog == 1_000_000);
    let mut t = Table::new(
        format!(
            "get_work latency, interleaved pass ({rounds} calls per cell; ms). Floor = the same moments' bare round trip and one-row committed UPDATE"
        ),
        &[
            "turns",
            "sessions",
            "max_tasks",
            "open tasks",
            "tasks per call",
            "p50",
            "p99",
            "p50 / p50 at 1k",
            "raw claim p50 / p99",
            "p50 / raw claim p50",
            "PG CPU per call",
            "floor SELECT 1 p50 / p99",
            "floor commit p50 / p99",
        ],
    );
    let mut targets = Table::new(
        "get_work targets",
        &["target", "configuration", "figure", "verdict"],
    );
    let mut ratios = Vec::new();
    for p in passes {
        for (k, db) in dbs.iter().enumerate() {
            let xs = &p.calls[k];
            let p50 = quantile(xs, 0.5);
            let ratio = base.map(|b| p50 / quantile(&p.calls[b], 0.5));
            t.row(vec![
                p.turns.name().to_string(),
                p.sessions.to_string(),
                p.max_tasks.to_string(),
                db.backlog.to_string(),
                format!("{:.0}", quantile(&p.batches[k], 0.5)),
                ms(p50),
                ms(quantile(xs, 0.99)),
                ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                format!(
                    "{} / {}",
                    ms(quantile(&p.raw[k], 0.5)),
                    ms(quantile(&p.raw[k], 0.99))
                ),
                format!("{:.2}x", p50 / quantile(&p.raw[k], 0.5)),
                ms(p.cpu[k]),
                format!(
                    "{} / {}",
                    ms(quantile(&p.select1, 0.5)),
                    ms(quantile(&p.select1, 0.99))
                ),
                format!(
                    "{} / {}",
                    ms(quantile(&p.commit, 0.5)),
                    ms(quantile(&p.commit, 0.99))
                ),
            ]);
        }
        if let (Some(b), Some(tp)) = (base, top) {
            let r = quantile(&p.calls[tp], 0.5) / quantile(&p.calls[b], 0.5);
            let raw = quantile(&p.raw[tp], 0.5) / quantile(&p.raw[b], 0.5);
            ratios.push(r);
            targets.row(vec![
                "p50 at 1M <= 1.5x p50 at 1k".into(),
                format!(
                    "{} turns, {} session{}, max_tasks {}",
                    p.turns.name(),
                    p.sessions,
                    if p.sessions == 1 { "" } else { "s" },
                    p.max_tasks
                ),
                format!(
                    "{r:.2}x ({} vs {} tasks per call; raw claim {raw:.2}x)",
                    quantile(&p.batches[tp], 0.5),
                    quantile(&p.batches[b], 0.5)
                ),
                verdict(r <= 1.5),
            ]);
        }
    }
    if let Some(tp) = top {
        for p in passes.iter().filter(|p| p.sessions == 100) {
            let p99 = quantile(&p.calls[tp], 0.99);
            targets.row(vec![
                "p99 < 5 ms at 1M, 100 sessions".into(),
                format!("{} turns, max_tasks {}", p.turns.name(), p.max_tasks),
                format!(
                    "{} ms (floor commit p99 {} ms)",
                    ms(p99),
                    ms(quantile(&p.commit, 0.99))
                ),
                verdict(p99 < 5.0),
            ]);
        }
    }
    t.emit("get_work");
    targets.emit("get_work");
    if !ratios.is_empty() {
        eprintln!("bench: median p50 ratio 1M/1k = {:.2}x", median(&ratios));
    }
}
