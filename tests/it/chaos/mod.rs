//! Chaos: four runner processes (`session-lock run`), each reaching
//! PostgreSQL through its own fault-injecting TCP proxy, run thousands of
//! tasks while a seeded fault schedule kills, freezes, partitions and slows them,
//! terminates their backends, crashes and stops the database, and holds row
//! locks of its own on a victim's tasks across the victim's death. Then the
//! backlog drains and the guarantees are checked from the database:
//!
//! * what goes in comes out: no task is left unfinished;
//! * stale holders are fenced: no finish is accepted from a session whose
//!   lease had run out, and every task is finished by a session that ran it;
//! * duplicates happen only in fault windows and are counted: every extra
//!   run of a task was cut short (killed, stopped, its write cut), belongs
//!   to a session whose lease ran out before the task was finished, or was
//!   stopped by its session's fence after its last write but before the
//!   Tasker could report it (and the same session ran it again once the
//!   fence lifted), and it started in a fault window;
//! * failover (kill -9, SIGSTOP, blackhole, and kill -9 while a foreign
//!   transaction holds row locks on some of the victim's tasks) takes at
//!   most TTL + tick + 1 s (p99): the time until the victim's session holds
//!   no open task but the locked ones; the locked ones move within the
//!   TTL of the lock's release (a second or so on an idle machine);
//! * at the end, after SIGTERM: no backend idle in a transaction, no live
//!   session.
//!
//! `chaos_short` runs each fault once (about a minute; CI). `chaos_long`
//! (`--ignored`, or `SESSION_LOCK_CHAOS_LONG=1` for `chaos_short`) runs four
//! rounds and at least 10,000 tasks. `SESSION_LOCK_CHAOS_SEED=N` replays a
//! schedule (the seed is printed first). Run with `--nocapture` to watch the
//! faults as they happen; `SESSION_LOCK_CHAOS_VERBOSE=1` lists every fence
//! and every extra run, `SESSION_LOCK_CHAOS_KEEP_LOGS=1` keeps the runners' stderr files.
//!
//! Each runner reaches the database through its own [`proxy`]; a blackhole
//! discards what it carries unless `SESSION_LOCK_CHAOS_BLACKHOLE=hold`.
//!
//! [`run`] goes in phases, one function each: [`set_up`] (a server of its
//! own, the database, a proxy and a runner per slot), [`start`] (every
//! runner live, the [`feeder`] on), [`fault_loop`] (the [`faults`], each
//! followed by every runner live again), [`drain`], [`stop`] (SIGTERM),
//! [`checks::check`], [`tear_down`].
//!
//! Task durations: the example task sleeps a fixed `--work-ms`, so the
//! four slots run 20, 100, 200 and 300 ms tasks (restarted runners keep their
//! slot's duration).

mod checks;
mod clock;
mod conn;
mod faults;
mod feeder;
mod logs;
mod probes;
mod proxy;
mod slots;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres};
use tokio_postgres::NoTls;

use clock::Clock;
use conn::Conn;
use faults::{FaultWindow, round};
use feeder::Feeder;
use probes::Failover;
use proxy::Proxy;
use slots::Slot;

const DB_NAME: &str = "chaos";

const TTL: Duration = Duration::from_millis(3000);
const HEARTBEAT: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(100);
const MAX_TASKS: u32 = 3;
/// One slot per runner process; each slot's tasks take this long.
const WORK_MS: [u64; 4] = [20, 100, 200, 300];

/// How often the database is polled.
const POLL: Duration = Duration::from_millis(50);
/// Guards a single wait (a session, a recovery, a probe): never the thing asserted.
const GUARD: Duration = Duration::from_secs(60);
/// Guards the final drain.
const DRAIN_GUARD: Duration = Duration::from_secs(180);

const OPEN: &str = "SELECT count(*) FROM example_task WHERE finished_at IS NULL";
const IS_LIVE: &str = "SELECT count(*) FROM session_lock.live_session WHERE id = $1";

#[derive(Debug, Clone, Copy)]
struct Plan {
    name: &'static str,
    rounds: usize,
    /// At least this many tasks in all; the feeder adds more while faults run.
    min_tasks: i64,
}

const SHORT: Plan = Plan {
    name: "short",
    rounds: 1,
    min_tasks: 2000,
};
const LONG: Plan = Plan {
    name: "long",
    rounds: 4,
    min_tasks: 10_000,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    let long = std::env::var("SESSION_LOCK_CHAOS_LONG").is_ok_and(|v| v == "1");
    run(if long { LONG } else { SHORT }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "several minutes: run with --ignored (or SESSION_LOCK_CHAOS_LONG=1 for chaos_short)"]
async fn chaos_long() {
    run(LONG).await;
}

async fn run(plan: Plan) {
    let clock = Clock {
        start: Instant::now(),
    };
    let seed = std::env::var("SESSION_LOCK_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    clock.log(format_args!(
        "chaos {} run, seed {seed} (replay with SESSION_LOCK_CHAOS_SEED={seed}); ttl {TTL:?}, heartbeat {HEARTBEAT:?}, tick {TICK:?}, max_tasks {MAX_TASKS}, work ms per runner {WORK_MS:?}",
        plan.name
    ));
    let mut chaos = set_up(clock, seed).await;
    let feeder = start(&mut chaos).await;
    fault_loop(&mut chaos, plan).await;
    let inserts = drain(&mut chaos, plan, feeder).await;
    stop(&mut chaos).await;
    checks::check(&mut chaos, plan, seed, inserts).await;
    tear_down(chaos).await;
}

/// The state of one run: the server, the runner slots, the seeded
/// randomness, and what the faults recorded for the checks.
struct Chaos {
    clock: Clock,
    db_url: String,
    conn: Conn,
    slots: Vec<Slot>,
    rng: fastrand::Rng,
    windows: Vec<FaultWindow>,
    failovers: Vec<Failover>,
    /// How long the tasks a foreign transaction had locked took to move
    /// once it ended.
    lock_releases: Vec<Failover>,
    /// Last, so that it is dropped after the runners and proxies.
    pg: Arc<EmbeddedPostgres>,
}

impl Chaos {
    fn ms(&mut self, base: Duration, extra_ms: std::ops::Range<u64>) -> Duration {
        base + Duration::from_millis(self.rng.u64(extra_ms))
    }

    /// Waits until every slot's process holds a live session (announced on
    /// its stdout and live in the database).
    async fn wait_all_live(&mut self) {
        let start = Instant::now();
        for i in 0..self.slots.len() {
            loop {
                self.slots[i].assert_running();
                if let Some(s) = self.slots[i].runner.current_session() {
                    if self.conn.count(IS_LIVE, &[&s]).await == 1 {
                        break;
                    }
                }
                assert!(
                    start.elapsed() < GUARD,
                    "runner {} holds no live session after {GUARD:?}; stderr:\n{}",
                    self.slots[i].runner.label(),
                    self.slots[i].runner.log_tail(40)
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// A server of the run's own (it is crashed and stopped), the database
/// migrated with the example task type and a child table, and one proxy
/// and runner process per slot.
async fn set_up(clock: Clock, seed: u64) -> Chaos {
    let pg = tokio::task::spawn_blocking(|| {
        EmbeddedPostgres::start_with(EmbeddedOptions {
            durable: false,
            // A crash must not lose acknowledged commits (fsync stays off:
            // the OS does not crash).
            extra_settings: vec![("synchronous_commit".into(), "on".into())],
            ..EmbeddedOptions::default()
        })
    })
    .await
    .expect("start thread")
    .unwrap_or_else(|e| panic!("{e}"));
    let pg = Arc::new(pg);
    {
        let mut admin = Conn::new(&pg.url("postgres"));
        admin
            .query(&format!("CREATE DATABASE {DB_NAME}"), &[])
            .await
            .unwrap_or_else(|e| panic!("creating the chaos database: {e}"));
    }
    let db_url = pg.url(DB_NAME);
    {
        let (mut client, conn) = tokio_postgres::connect(&db_url, NoTls)
            .await
            .expect("connecting to the chaos database");
        let conn = tokio::spawn(conn);
        session_lock::Migrator::new()
            .with_example()
            .run(&mut client)
            .await
            .expect("migrating the chaos database");
        // A child table, so a foreign transaction can lock a task the way
        // an application's foreign key does.
        client
            .batch_execute(
                "CREATE TABLE example_task_note (task_id bigint NOT NULL REFERENCES example_task (id))",
            )
            .await
            .expect("creating the child table");
        drop(client);
        let _ = conn.await;
    }
    let upstream = SocketAddr::from(([127, 0, 0, 1], pg.port()));
    let mut slots = Vec::new();
    for i in 0..WORK_MS.len() {
        let proxy = Proxy::start(upstream).await;
        slots.push(Slot::spawn(i, proxy));
    }
    Chaos {
        clock,
        conn: Conn::new(&db_url),
        db_url,
        slots,
        rng: fastrand::Rng::with_seed(seed),
        windows: Vec::new(),
        failovers: Vec::new(),
        lock_releases: Vec::new(),
        pg,
    }
}

/// Every runner holds a live session; the feeder runs, and has had a few
/// seconds to fill every runner's share.
async fn start(chaos: &mut Chaos) -> Feeder {
    chaos.wait_all_live().await;
    for slot in &mut chaos.slots {
        let s = slot.runner.current_session();
        chaos.clock.log(format_args!(
            "r{} (pid {}, {} ms tasks) via proxy :{} holds session {s:?}",
            slot.index,
            slot.runner.pid(),
            slot.work_ms,
            slot.proxy.port
        ));
    }

    let feeder = Feeder::start(chaos.db_url.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    feeder
}

/// The plan's rounds, drawn from the seed up front; after every fault each
/// runner holds a live session again before a seeded gap and the next one.
async fn fault_loop(chaos: &mut Chaos, plan: Plan) {
    let schedule: Vec<Vec<_>> = (0..plan.rounds).map(|_| round(&mut chaos.rng)).collect();
    for (r, faults) in schedule.iter().enumerate() {
        chaos
            .clock
            .log(format_args!("round {}/{}: {faults:?}", r + 1, plan.rounds));
        for fault in faults {
            chaos.inject(fault).await;
            chaos.wait_all_live().await;
            let gap = chaos.ms(Duration::from_millis(1000), 0..1500);
            tokio::time::sleep(gap).await;
        }
    }
}

/// Stops the feeder, tops the tasks up to the plan's minimum and waits until
/// none is open (or [`DRAIN_GUARD`]: the checks then report the lost ones);
/// returns the feeder's insert count.
async fn drain(chaos: &mut Chaos, plan: Plan, feeder: Feeder) -> u64 {
    let inserts = feeder.stop().await;
    let total = chaos
        .conn
        .count("SELECT count(*) FROM example_task", &[])
        .await;
    if total < plan.min_tasks {
        let n = plan.min_tasks - total;
        chaos
            .conn
            .rows(
                "INSERT INTO example_task (payload) SELECT 'chaos top-up ' || g FROM generate_series(1, $1::bigint) g",
                &[&n],
            )
            .await;
        chaos
            .clock
            .log(format_args!("schedule done; topped up with {n} tasks"));
    }
    let drain_start = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let open = chaos.conn.count(OPEN, &[]).await;
        if open == 0 {
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            chaos.clock.log(format_args!("draining: {open} open"));
            last_log = Instant::now();
        }
        if drain_start.elapsed() > DRAIN_GUARD {
            break; // reported as lost below
        }
        tokio::time::sleep(POLL).await;
    }
    chaos
        .clock
        .log(format_args!("drained in {:?}", drain_start.elapsed()));
    inserts
}

/// SIGTERM to every runner, none of which may have exited by itself: each
/// must end its session and exit successfully.
async fn stop(chaos: &mut Chaos) {
    for slot in &mut chaos.slots {
        slot.assert_running();
        slot.signal(libc::SIGTERM);
    }
    for slot in &mut chaos.slots {
        let status = slot.runner.wait_exit(Duration::from_secs(40)).await;
        assert!(
            status.success(),
            "runner {} exited {status} after SIGTERM; stderr:\n{}",
            slot.runner.label(),
            slot.runner.log_tail(40)
        );
    }
    chaos.clock.log("all runners stopped after SIGTERM");
}

/// Runner processes and proxies go first, then the server (blocking).
async fn tear_down(chaos: Chaos) {
    let pg = chaos.pg.clone();
    drop(chaos);
    let pg = Arc::into_inner(pg).expect("no other owner of the server");
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .expect("server drop");
}
