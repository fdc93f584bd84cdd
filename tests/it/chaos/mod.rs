//! Chaos: four runner processes (`session-lock run`), each reaching
//! PostgreSQL through its own fault-injecting TCP proxy, run thousands of tasks while a
//! seeded fault schedule kills, freezes, partitions and slows them,
//! terminates their backends, crashes and stops the database, and holds row
//! locks of its own on a victim's tasks across the victim's death. Then the
//! backlog drains and the guarantees are checked from the database:
//!
//! * what goes in comes out: no task is left unfinished;
//! * stale holders are fenced: no finish is accepted from a session whose
//!   lease had run out, and every task is finished by a session that ran it;
//! * duplicates happen only in fault windows and are counted: every extra
//!   run of a task was cut short (killed, stopped, its write cut) or belongs
//!   to a session whose lease ran out before the task was finished, and it
//!   started in a fault window;
//! * failover (kill -9, SIGSTOP, blackhole, and kill -9 while a foreign
//!   transaction holds row locks on some of the victim's tasks) takes at
//!   most TTL + tick + 1 s (p99): the time until the victim's session holds
//!   no open task but the locked ones; the locked ones move within a
//!   second or so of the lock's release;
//! * at the end, after SIGTERM: no backend idle in a transaction, no live
//!   session.
//!
//! `chaos_short` runs each fault once (about a minute; CI). `chaos_long`
//! (`--ignored`, or `SESSION_LOCK_CHAOS_LONG=1` for `chaos_short`) runs four
//! rounds and at least 10,000 tasks. `SESSION_LOCK_CHAOS_SEED=N` replays a
//! schedule (the seed is printed first). Run with `--nocapture` to watch the
//! faults as they happen; `SESSION_LOCK_CHAOS_VERBOSE=1` lists every extra
//! run, `SESSION_LOCK_CHAOS_KEEP_LOGS=1` keeps the runners' stderr files.
//!
//! Each runner reaches the database through its own [`proxy`]; a blackhole
//! discards what it carries unless `SESSION_LOCK_CHAOS_BLACKHOLE=hold`.
//!
//! Task durations: the example task sleeps a fixed `--work-ms`, so the
//! four slots run 20, 100, 200 and 300 ms tasks (restarted runners keep their
//! slot's duration).

mod proxy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres, ShutdownMode};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};

use session_lock_testkit::{RunnerCommand, RunnerProcess};

use proxy::Proxy;

/// The test's own connections: excluded from `pg_terminate_backend`.
const APP: &str = "session-lock-chaos";
const DB_NAME: &str = "chaos";

const TTL: Duration = Duration::from_millis(3000);
const HEARTBEAT: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(100);
const MAX_TASKS: u32 = 3;
/// One slot per runner process; each slot's tasks take this long.
const WORK_MS: [u64; 4] = [20, 100, 200, 300];
/// The latency fault: added to every server-to-client chunk.
const LATENCY: Duration = Duration::from_millis(500);
/// How many open tasks the feeder keeps waiting while faults are injected,
/// so that every runner always holds its full share.
const BACKLOG: i64 = 30;

/// How often the database is polled.
const POLL: Duration = Duration::from_millis(50);
/// Guards a single wait (a session, a recovery, a probe): never the thing asserted.
const GUARD: Duration = Duration::from_secs(60);
/// Guards the final drain.
const DRAIN_GUARD: Duration = Duration::from_secs(180);
/// A run counts as inside a fault window if it started at most this long
/// before the fault began (a run in flight when it struck)...
const WINDOW_BEFORE: Duration = Duration::from_millis(1500);
/// ... or at most TTL plus this long after the fault ended (a stale holder
/// acting before it notices, a dead pooled connection found on first use).
const WINDOW_AFTER_TTL: Duration = Duration::from_millis(1500);

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

// ---------------------------------------------------------------------------
// The clock and the fault log.
// ---------------------------------------------------------------------------

/// Wall-clock seconds since the epoch: the database's `now()` on this same host.
fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn log(&self, msg: impl std::fmt::Display) {
        let now = epoch_now();
        let day = now.rem_euclid(86_400.0);
        let (h, m, s) = ((day / 3600.0) as u32, (day / 60.0) as u32 % 60, day % 60.0);
        eprintln!(
            "[chaos {:8.3}s {h:02}:{m:02}:{s:06.3}Z] {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// A fault as injected: when it began and ended, on the database's clock.
#[derive(Debug, Clone)]
struct FaultWindow {
    what: String,
    start: f64,
    end: f64,
}

/// One failover measurement.
#[derive(Debug)]
struct Failover {
    what: String,
    session: i64,
    held_at_fault: i64,
    took: Option<Duration>,
}

// ---------------------------------------------------------------------------
// Runner processes.
// ---------------------------------------------------------------------------

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
struct Slot {
    index: usize,
    work_ms: u64,
    proxy: Proxy,
    url: String,
    runner: RunnerProcess,
    generation: usize,
    retired: Vec<RunnerProcess>,
}

impl Slot {
    fn spawn(index: usize, proxy: Proxy) -> Slot {
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

    /// Starts a new runner process in place of the current (dead) one.
    fn respawn(&mut self) {
        self.generation += 1;
        let label = format!("r{}.{}", self.index, self.generation);
        let new = spawn_runner(label, &self.url, self.work_ms);
        let old = std::mem::replace(&mut self.runner, new);
        self.retired.push(old);
    }

    fn runners(&self) -> impl Iterator<Item = &RunnerProcess> {
        self.retired.iter().chain(std::iter::once(&self.runner))
    }
}

// ---------------------------------------------------------------------------
// The test's own connections: they reconnect across database restarts.
// ---------------------------------------------------------------------------

struct Conn {
    config: Config,
    client: Option<Client>,
}

impl Conn {
    fn new(url: &str) -> Conn {
        let mut config: Config = url.parse().expect("a database URL");
        config
            .application_name(APP)
            .connect_timeout(Duration::from_secs(2));
        Conn {
            config,
            client: None,
        }
    }

    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, conn) = self
                .config
                .connect(NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected");
        let res =
            match tokio::time::timeout(Duration::from_secs(10), client.query(sql, params)).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.to_string())),
                Err(_) => Err("timed out".to_string()),
            };
        if res.is_err() {
            self.client = None;
        }
        res
    }

    /// Retries through outages; fails the test after [`GUARD`].
    async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<Row> {
        let start = Instant::now();
        loop {
            match self.query(sql, params).await {
                Ok(rows) => return rows,
                Err(e) => assert!(
                    start.elapsed() < GUARD,
                    "query failing for {GUARD:?}: {e}\n{sql}"
                ),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn count(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
        self.rows(sql, params).await[0].get(0)
    }
}

const HELD_BY: &str =
    "SELECT count(*) FROM example_task WHERE session_id = $1 AND finished_at IS NULL";
const HELD_BY_BUT: &str = "SELECT count(*) FROM example_task
     WHERE session_id = $1 AND finished_at IS NULL AND id <> ALL ($2::bigint[])";
const OPEN: &str = "SELECT count(*) FROM example_task WHERE finished_at IS NULL";
const IS_LIVE: &str = "SELECT count(*) FROM session_lock.live_session WHERE id = $1";

// ---------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Fault {
    Kill(Vec<usize>),
    /// kill -9 while a foreign transaction holds row locks on two of the
    /// victim's tasks (FOR UPDATE, and a foreign-key child row's FOR KEY
    /// SHARE), released a while after the failover.
    ForeignLock(usize),
    Stop(usize),
    Blackhole(usize),
    Latency,
    TerminateBackends,
    PgCrash,
    PgStop,
}

/// The faults of one round, in a seeded order, with seeded victims.
fn round(rng: &mut fastrand::Rng) -> Vec<Fault> {
    let one = rng.usize(0..WORK_MS.len());
    let mut two: Vec<usize> = (0..WORK_MS.len()).collect();
    rng.shuffle(&mut two);
    two.truncate(2);
    let mut faults = vec![
        Fault::Kill(vec![one]),
        Fault::Kill(two),
        Fault::ForeignLock(rng.usize(0..WORK_MS.len())),
        Fault::Stop(rng.usize(0..WORK_MS.len())),
        Fault::Blackhole(rng.usize(0..WORK_MS.len())),
        Fault::Latency,
        Fault::TerminateBackends,
        Fault::PgCrash,
        Fault::PgStop,
    ];
    rng.shuffle(&mut faults);
    faults
}

struct Chaos {
    clock: Clock,
    pg: Arc<EmbeddedPostgres>,
    db_url: String,
    conn: Conn,
    slots: Vec<Slot>,
    rng: fastrand::Rng,
    windows: Vec<FaultWindow>,
    failovers: Vec<Failover>,
    /// How long the tasks a foreign transaction had locked took to move
    /// once it ended.
    lock_releases: Vec<Failover>,
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
                if let Some(status) = self.slots[i].runner.try_exit() {
                    panic!(
                        "runner {} exited by itself ({status}); stderr:\n{}",
                        self.slots[i].runner.label(),
                        self.slots[i].runner.log_tail(40)
                    );
                }
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

    /// The victim's live session, once it holds at least one open task (or
    /// after a while, holding none: the sample is then reported as such).
    async fn victim_session(&mut self, slot: usize) -> i64 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.slots[slot].runner.current_session() {
                let live = self.conn.count(IS_LIVE, &[&s]).await == 1;
                if live
                    && (self.conn.count(HELD_BY, &[&s]).await > 0
                        || start.elapsed() > Duration::from_secs(10))
                {
                    return s;
                }
            }
            assert!(
                start.elapsed() < GUARD,
                "runner slot {slot} never held a live session"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn record(&mut self, what: String, start: f64, end: f64) {
        self.windows.push(FaultWindow { what, start, end });
    }

    async fn inject(&mut self, fault: &Fault) {
        match fault {
            Fault::Kill(victims) => {
                let mut sessions = Vec::new();
                for &v in victims {
                    sessions.push(self.victim_session(v).await);
                }
                let at = Instant::now();
                let start = epoch_now();
                let mut probes = Vec::new();
                for (&v, &s) in victims.iter().zip(&sessions) {
                    self.slots[v]
                        .runner
                        .signal(libc::SIGKILL)
                        .expect("signal the runner process");
                    let what = format!("kill -9 r{v}");
                    probes.push(spawn_probe(self.db_url.clone(), what, s, Vec::new(), at));
                }
                let who: Vec<String> = victims
                    .iter()
                    .zip(&sessions)
                    .map(|(&v, s)| {
                        format!("r{v} (pid {}, session {s})", self.slots[v].runner.pid())
                    })
                    .collect();
                self.clock
                    .log(format_args!("FAULT kill -9 {}", who.join(", ")));
                self.record(format!("kill -9 {victims:?}"), start, start);
                let delay = self.ms(Duration::from_millis(200), 0..1300);
                tokio::time::sleep(delay).await;
                for &v in victims {
                    let _ = self.slots[v]
                        .runner
                        .wait_exit(Duration::from_secs(10))
                        .await;
                    self.slots[v].respawn();
                    self.clock.log(format_args!(
                        "  restarted r{v} as pid {} ({delay:?} after the kill)",
                        self.slots[v].runner.pid()
                    ));
                }
                self.await_probes(probes).await;
            }
            Fault::ForeignLock(v) => {
                let v = *v;
                let session = self.victim_session(v).await;
                // The lock holder: an operator's SELECT ... FOR UPDATE on
                // one task, an ordinary child-row insert on another.
                let mut foreign = Conn::new(&self.db_url);
                foreign.rows("BEGIN", &[]).await;
                let locked: Vec<i64> = foreign
                    .rows(
                        "SELECT id FROM example_task WHERE session_id = $1 AND finished_at IS NULL
                          ORDER BY id LIMIT 1 FOR UPDATE",
                        &[&session],
                    )
                    .await
                    .iter()
                    .map(|r| r.get(0))
                    .chain(
                        foreign
                            .rows(
                                "INSERT INTO example_task_note (task_id)
                                 SELECT id FROM example_task WHERE session_id = $1 AND finished_at IS NULL
                                  ORDER BY id DESC LIMIT 1 RETURNING task_id",
                                &[&session],
                            )
                            .await
                            .iter()
                            .map(|r| r.get::<_, i64>(0)),
                    )
                    .collect();
                let hold = self.ms(TTL, 1000..2000);
                let at = Instant::now();
                let start = epoch_now();
                self.slots[v]
                    .runner
                    .signal(libc::SIGKILL)
                    .expect("signal the runner process");
                self.clock.log(format_args!(
                    "FAULT kill -9 r{v} (session {session}) while a foreign transaction locks its tasks {locked:?} for {hold:?}"
                ));
                let what = format!("kill -9 r{v} with foreign locks");
                let probe = spawn_probe(self.db_url.clone(), what, session, locked.clone(), at);
                let _ = self.slots[v]
                    .runner
                    .wait_exit(Duration::from_secs(10))
                    .await;
                self.slots[v].respawn();
                self.await_probes(vec![probe]).await;
                tokio::time::sleep_until((at + hold).into()).await;
                foreign.rows("COMMIT", &[]).await;
                let released = Instant::now();
                self.clock
                    .log(format_args!("  the foreign transaction ended"));
                self.record(format!("foreign lock r{v}"), start, epoch_now());
                let probe = spawn_probe(
                    self.db_url.clone(),
                    format!("locked tasks of r{v}"),
                    session,
                    Vec::new(),
                    released,
                );
                let moved = probe.await.expect("lock release probe");
                self.clock.log(format_args!(
                    "  the locked tasks moved {} ms after the lock went",
                    moved
                        .took
                        .map_or("never".to_string(), |t| t.as_millis().to_string())
                ));
                self.lock_releases.push(moved);
            }
            Fault::Stop(v) => {
                let v = *v;
                let session = self.victim_session(v).await;
                let hold = self.ms(TTL, 1000..2000);
                let at = Instant::now();
                let start = epoch_now();
                self.slots[v]
                    .runner
                    .signal(libc::SIGSTOP)
                    .expect("signal the runner process");
                self.clock.log(format_args!(
                    "FAULT SIGSTOP r{v} (pid {}, session {session}) for {hold:?}",
                    self.slots[v].runner.pid()
                ));
                let probe = spawn_probe(
                    self.db_url.clone(),
                    format!("SIGSTOP r{v}"),
                    session,
                    Vec::new(),
                    at,
                );
                tokio::time::sleep_until((at + hold).into()).await;
                self.slots[v]
                    .runner
                    .signal(libc::SIGCONT)
                    .expect("signal the runner process");
                self.clock.log(format_args!("  SIGCONT r{v}"));
                self.record(format!("SIGSTOP r{v}"), start, epoch_now());
                self.await_probes(vec![probe]).await;
                let new = self.slots[v].runner.new_session(Some(session), GUARD).await;
                self.clock
                    .log(format_args!("  r{v} resumed with a new session {new}"));
            }
            Fault::Blackhole(v) => {
                let v = *v;
                let session = self.victim_session(v).await;
                let hold = self.ms(TTL, 1000..2000);
                let at = Instant::now();
                let start = epoch_now();
                self.slots[v].proxy.set(|s| s.blackhole = true);
                self.clock.log(format_args!(
                    "FAULT blackhole r{v}'s link (session {session}) for {hold:?}"
                ));
                let probe = spawn_probe(
                    self.db_url.clone(),
                    format!("blackhole r{v}"),
                    session,
                    Vec::new(),
                    at,
                );
                tokio::time::sleep_until((at + hold).into()).await;
                self.slots[v].proxy.set(|s| s.blackhole = false);
                self.clock.log(format_args!("  healed r{v}'s link"));
                self.record(format!("blackhole r{v}"), start, epoch_now());
                self.await_probes(vec![probe]).await;
                let new = self.slots[v].runner.new_session(Some(session), GUARD).await;
                self.clock
                    .log(format_args!("  r{v} back with a new session {new}"));
            }
            Fault::Latency => {
                let hold = self.ms(Duration::from_secs(4), 0..2000);
                let start = epoch_now();
                for slot in &self.slots {
                    slot.proxy.set(|s| s.latency = LATENCY);
                }
                self.clock.log(format_args!(
                    "FAULT +{LATENCY:?} latency on every runner's link for {hold:?}"
                ));
                tokio::time::sleep(hold).await;
                for slot in &self.slots {
                    slot.proxy.set(|s| s.latency = Duration::ZERO);
                }
                self.clock.log("  latency removed");
                self.record("latency".into(), start, epoch_now());
            }
            Fault::TerminateBackends => {
                let start = epoch_now();
                let killed = self
                    .conn
                    .count(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                          WHERE datname = current_database() AND pid <> pg_backend_pid()
                            AND backend_type = 'client backend'
                            AND application_name IS DISTINCT FROM $1",
                        &[&APP],
                    )
                    .await;
                self.clock.log(format_args!(
                    "FAULT pg_terminate_backend on every runner backend: {killed} terminated"
                ));
                self.record("pg_terminate_backend".into(), start, epoch_now());
            }
            Fault::PgCrash => {
                let start = epoch_now();
                self.clock
                    .log("FAULT postgres restart -m immediate (crash)");
                let pg = self.pg.clone();
                tokio::task::spawn_blocking(move || pg.restart(ShutdownMode::Immediate))
                    .await
                    .expect("restart thread")
                    .unwrap_or_else(|e| panic!("restarting postgres: {e}"));
                self.clock.log("  postgres is back");
                self.record("postgres crash".into(), start, epoch_now());
            }
            Fault::PgStop => {
                let down = self.ms(TTL, 1000..2000);
                let start = epoch_now();
                let pg = self.pg.clone();
                tokio::task::spawn_blocking(move || pg.stop(ShutdownMode::Fast))
                    .await
                    .expect("stop thread")
                    .unwrap_or_else(|e| panic!("stopping postgres: {e}"));
                self.clock.log(format_args!(
                    "FAULT postgres stopped (-m fast) for {down:?}, longer than the TTL"
                ));
                tokio::time::sleep(down).await;
                let pg = self.pg.clone();
                tokio::task::spawn_blocking(move || pg.start_again())
                    .await
                    .expect("start thread")
                    .unwrap_or_else(|e| panic!("starting postgres again: {e}"));
                self.clock.log("  postgres started again");
                self.record("postgres stop".into(), start, epoch_now());
            }
        }
    }

    async fn await_probes(&mut self, probes: Vec<JoinHandle<Failover>>) {
        for probe in probes {
            let f = probe.await.expect("failover probe");
            match f.took {
                Some(took) => self.clock.log(format_args!(
                    "  failover after {}: session {} held {} open tasks, none after {} ms",
                    f.what,
                    f.session,
                    f.held_at_fault,
                    took.as_millis()
                )),
                None => self.clock.log(format_args!(
                    "  failover after {}: session {} still holds tasks after {GUARD:?}",
                    f.what, f.session
                )),
            }
            self.failovers.push(f);
        }
    }
}

/// Polls until `session` holds no open task but those of `except`;
/// measures from `at`.
fn spawn_probe(
    url: String,
    what: String,
    session: i64,
    except: Vec<i64>,
    at: Instant,
) -> JoinHandle<Failover> {
    tokio::spawn(async move {
        let mut conn = Conn::new(&url);
        let mut held_at_fault = None;
        loop {
            if let Ok(rows) = conn.query(HELD_BY_BUT, &[&session, &except]).await {
                let held: i64 = rows[0].get(0);
                held_at_fault.get_or_insert(held);
                if held == 0 {
                    return Failover {
                        what,
                        session,
                        held_at_fault: held_at_fault.unwrap_or(0),
                        took: Some(at.elapsed()),
                    };
                }
            }
            if at.elapsed() > GUARD {
                return Failover {
                    what,
                    session,
                    held_at_fault: held_at_fault.unwrap_or(-1),
                    took: None,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// Keeps [`BACKLOG`] open tasks waiting until told to stop; returns how
/// many insert statements it made.
fn spawn_feeder(url: String, stop: watch::Receiver<bool>) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut conn = Conn::new(&url);
        let mut inserts = 0;
        while !*stop.borrow() {
            if let Ok(rows) = conn.query(OPEN, &[]).await {
                let open: i64 = rows[0].get(0);
                if open < BACKLOG {
                    let n = 2 * BACKLOG - open;
                    if conn
                        .query(
                            "INSERT INTO example_task (payload)
                             SELECT 'chaos ' || g FROM generate_series(1, $1::bigint) g",
                            &[&n],
                        )
                        .await
                        .is_ok()
                    {
                        inserts += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        inserts
    })
}

/// Nearest-rank percentile.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Why an extra run of a task happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    /// It never completed: the process was killed or stopped its work
    /// (fence, lost session), or its bookkeeping write was cut by a fault.
    CutShort,
    /// It completed, but its session's lease ran out before the task was
    /// finished, so the finish was refused and the task ran again.
    LeaseLost,
    /// Neither: a bug.
    Unexplained,
}

struct ExtraRun {
    task: i64,
    run: i64,
    session: i64,
    started: f64,
    finished: Option<f64>,
    session_expires: Option<f64>,
    task_finished: Option<f64>,
    task_finished_by: Option<i64>,
    /// The session of the task's next run.
    next_session: Option<i64>,
    why: Why,
    window: Option<String>,
}

impl ExtraRun {
    fn describe(&self) -> String {
        let t = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        format!(
            "task {} run {} by session {}: started {:.3}, completed {}, session expires {}; next run by {:?}; task finished {} by {:?}; {:?}, window {:?}",
            self.task,
            self.run,
            self.session,
            self.started,
            t(self.finished),
            t(self.session_expires),
            self.next_session,
            t(self.task_finished),
            self.task_finished_by,
            self.why,
            self.window
        )
    }
}

fn runner_log_counts(slots: &[Slot]) -> (usize, usize, usize) {
    let (mut fences, mut losses, mut refused) = (0, 0, 0);
    for slot in slots {
        for runner in slot.runners() {
            let text = runner.log_text();
            fences += text.matches("fencing the session").count();
            losses += text.matches("session lost").count();
            refused += text.matches("finish refused").count();
        }
    }
    (fences, losses, refused)
}

async fn run(plan: Plan) {
    let started = Instant::now();
    let clock = Clock { start: started };
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
    let rng = fastrand::Rng::with_seed(seed);

    // A server of our own: it is crashed and stopped.
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
    let mut chaos = Chaos {
        clock,
        pg: pg.clone(),
        db_url: db_url.clone(),
        conn: Conn::new(&db_url),
        slots,
        rng,
        windows: Vec::new(),
        failovers: Vec::new(),
        lock_releases: Vec::new(),
    };
    chaos.wait_all_live().await;
    for slot in &mut chaos.slots {
        let s = slot.runner.current_session();
        clock.log(format_args!(
            "r{} (pid {}, {} ms tasks) via proxy :{} holds session {s:?}",
            slot.index,
            slot.runner.pid(),
            slot.work_ms,
            slot.proxy.port
        ));
    }

    let (stop_feeding, feeder_stop) = watch::channel(false);
    let feeder = spawn_feeder(db_url.clone(), feeder_stop);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let schedule: Vec<Vec<Fault>> = (0..plan.rounds).map(|_| round(&mut chaos.rng)).collect();
    for (r, faults) in schedule.iter().enumerate() {
        clock.log(format_args!("round {}/{}: {faults:?}", r + 1, plan.rounds));
        for fault in faults {
            chaos.inject(fault).await;
            chaos.wait_all_live().await;
            let gap = chaos.ms(Duration::from_millis(1000), 0..1500);
            tokio::time::sleep(gap).await;
        }
    }

    // Drain: stop feeding, top up to the plan's minimum, wait for the end.
    stop_feeding.send_replace(true);
    let inserts = feeder.await.expect("feeder");
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
        clock.log(format_args!("schedule done; topped up with {n} tasks"));
    }
    let drain_start = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let open = chaos.conn.count(OPEN, &[]).await;
        if open == 0 {
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            clock.log(format_args!("draining: {open} open"));
            last_log = Instant::now();
        }
        if drain_start.elapsed() > DRAIN_GUARD {
            break; // reported as lost below
        }
        tokio::time::sleep(POLL).await;
    }
    clock.log(format_args!("drained in {:?}", drain_start.elapsed()));

    // Stop every runner the graceful way; they end their sessions.
    for slot in &mut chaos.slots {
        if let Some(status) = slot.runner.try_exit() {
            panic!(
                "runner {} exited by itself ({status}); stderr:\n{}",
                slot.runner.label(),
                slot.runner.log_tail(40)
            );
        }
        slot.runner
            .signal(libc::SIGTERM)
            .expect("signal the runner process");
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
    clock.log("all runners stopped after SIGTERM");

    // ---- The checks, from the database. ----
    let conn = &mut chaos.conn;
    let rows = conn
        .rows(
            "SELECT count(*), count(*) FILTER (WHERE finished_at IS NOT NULL) FROM example_task",
            &[],
        )
        .await;
    let (tasks, finished): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    let lost = tasks - finished;
    let late: Vec<String> = conn
        .rows(
            "SELECT format('task %s finished %s by session %s expiring %s', t.id, t.finished_at, t.finished_by, s.expires_at)
               FROM example_task t LEFT JOIN session_lock.session s ON s.id = t.finished_by
              WHERE t.finished_at IS NOT NULL AND (s.id IS NULL OR t.finished_at >= s.expires_at)
              ORDER BY t.id",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    let never_ran: Vec<String> = conn
        .rows(
            "SELECT format('task %s finished %s by session %s', t.id, t.finished_at, t.finished_by)
               FROM example_task t
              WHERE t.finished_at IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM example_task_run r
                                 WHERE r.task_id = t.id AND r.session_id = t.finished_by
                                   AND r.finished_at IS NOT NULL AND r.finished_at <= t.finished_at)
              ORDER BY t.id",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = conn
        .rows(
            "SELECT count(*), count(DISTINCT task_id) FROM example_task_run",
            &[],
        )
        .await;
    let (runs, tasks_run): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    let duplicates = runs - tasks_run;
    let stale_starts = conn
        .count(
            "SELECT count(*) FROM example_task_run r JOIN session_lock.session s ON s.id = r.session_id
              WHERE r.started_at >= s.expires_at",
            &[],
        )
        .await;
    // Every run of every task that ran more than once.
    let dup_rows = conn
        .rows(
            "SELECT r.task_id, r.id, r.session_id,
                    extract(epoch FROM r.started_at)::float8,
                    extract(epoch FROM r.finished_at)::float8,
                    t.finished_by,
                    extract(epoch FROM t.finished_at)::float8,
                    extract(epoch FROM s.expires_at)::float8
               FROM example_task_run r
               JOIN example_task t ON t.id = r.task_id
               LEFT JOIN session_lock.session s ON s.id = r.session_id
              WHERE r.task_id IN (SELECT task_id FROM example_task_run GROUP BY task_id HAVING count(*) > 1)
              ORDER BY r.task_id, r.id",
            &[],
        )
        .await;
    let idle_in_tx = conn
        .count(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            &[],
        )
        .await;
    let live_sessions = conn
        .count("SELECT count(*) FROM session_lock.live_session", &[])
        .await;
    let rows = conn
        .rows(
            "SELECT count(*), count(*) FILTER (WHERE ended_at IS NOT NULL),
                    count(*) FILTER (WHERE reclaimed_at IS NOT NULL)
               FROM session_lock.session",
            &[],
        )
        .await;
    let (sessions, ended, reclaimed): (i64, i64, i64) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));

    // Classify every extra run.
    let mut by_task: BTreeMap<i64, Vec<&Row>> = BTreeMap::new();
    for r in &dup_rows {
        by_task.entry(r.get(0)).or_default().push(r);
    }
    let before = WINDOW_BEFORE.as_secs_f64();
    let after = (TTL + WINDOW_AFTER_TTL).as_secs_f64();
    let mut extras: Vec<ExtraRun> = Vec::new();
    for (task, rows) in &by_task {
        let finished_by: Option<i64> = rows[0].get(5);
        let task_finished: Option<f64> = rows[0].get(6);
        // The run whose completion was accepted: the last completed run of
        // the finishing session.
        let accepted: Option<i64> = rows
            .iter()
            .filter(|r| {
                Some(r.get::<_, i64>(2)) == finished_by && r.get::<_, Option<f64>>(4).is_some()
            })
            .map(|r| r.get::<_, i64>(1))
            .next_back();
        for (i, r) in rows.iter().enumerate() {
            let run: i64 = r.get(1);
            if Some(run) == accepted {
                continue;
            }
            let next_session: Option<i64> = rows.get(i + 1).map(|n| n.get(2));
            let session: i64 = r.get(2);
            let started: f64 = r.get(3);
            let finished: Option<f64> = r.get(4);
            let session_expires: Option<f64> = r.get(7);
            let why = match (finished, session_expires, task_finished) {
                (None, _, _) => Why::CutShort,
                (Some(_), Some(exp), Some(done)) if exp <= done && Some(session) != finished_by => {
                    Why::LeaseLost
                }
                _ => Why::Unexplained,
            };
            // Inside some window; reported against the nearest fault.
            let distance = |w: &FaultWindow| (w.start - started).max(started - w.end).max(0.0);
            let window = chaos
                .windows
                .iter()
                .filter(|w| started >= w.start - before && started <= w.end + after)
                .min_by(|a, b| distance(a).total_cmp(&distance(b)))
                .map(|w| w.what.clone());
            extras.push(ExtraRun {
                task: *task,
                run,
                session,
                started,
                finished,
                session_expires,
                task_finished,
                task_finished_by: finished_by,
                next_session,
                why,
                window,
            });
        }
    }
    let count_why = |w: Why| extras.iter().filter(|e| e.why == w).count();
    let (cut, lease_lost, unexplained) = (
        count_why(Why::CutShort),
        count_why(Why::LeaseLost),
        count_why(Why::Unexplained),
    );
    let same_session = extras
        .iter()
        .filter(|e| e.next_session == Some(e.session))
        .count();
    if std::env::var("SESSION_LOCK_CHAOS_VERBOSE").is_ok_and(|v| v == "1") {
        for e in &extras {
            eprintln!("extra run: {}", e.describe());
        }
    }
    let outside: Vec<&ExtraRun> = extras.iter().filter(|e| e.window.is_none()).collect();
    let mut per_window: BTreeMap<String, usize> = BTreeMap::new();
    for e in &extras {
        if let Some(w) = &e.window {
            *per_window.entry(w.clone()).or_default() += 1;
        }
    }

    let bound = TTL + TICK + Duration::from_secs(1);
    let mut took: Vec<Duration> = chaos.failovers.iter().filter_map(|f| f.took).collect();
    took.sort();
    let p99 = percentile(&took, 99.0);
    let (fences, losses, refused) = runner_log_counts(&chaos.slots);

    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "==== chaos summary: {} run, seed {seed} ====",
        plan.name
    );
    let _ = writeln!(
        summary,
        "tasks                      {tasks} ({inserts} feeder inserts)"
    );
    let _ = writeln!(summary, "finished                   {finished}");
    let _ = writeln!(summary, "lost                       {lost}");
    let _ = writeln!(
        summary,
        "runs                       {runs} of {tasks_run} tasks"
    );
    let _ = writeln!(
        summary,
        "duplicates                 {duplicates} (explained {}: {cut} cut short, {lease_lost} lease lost; unexplained {unexplained}; outside fault windows {})",
        cut + lease_lost,
        outside.len()
    );
    let _ = writeln!(
        summary,
        "duplicates per fault       {per_window:?}; {same_session} re-run by the same session"
    );
    let _ = writeln!(
        summary,
        "late finishes accepted     {} (finishes from an expired session)",
        late.len()
    );
    let _ = writeln!(summary, "finisher never ran it      {}", never_ran.len());
    let _ = writeln!(
        summary,
        "runs started after expiry  {stale_starts} (a stale holder starting work before its fence fired)"
    );
    let _ = writeln!(
        summary,
        "failovers (ms)             {}",
        chaos
            .failovers
            .iter()
            .map(|f| format!(
                "{} {} (held {})",
                f.what,
                f.took
                    .map_or("TIMEOUT".to_string(), |t| t.as_millis().to_string()),
                f.held_at_fault
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        summary,
        "failover p99               {} ms (bound ttl + tick + 1 s = {} ms; {} samples)",
        p99.map_or("-".to_string(), |d| d.as_millis().to_string()),
        bound.as_millis(),
        took.len()
    );
    let _ = writeln!(
        summary,
        "locked tasks moved (ms)    {} after the foreign lock went",
        chaos
            .lock_releases
            .iter()
            .map(|f| format!(
                "{} {}",
                f.what,
                f.took
                    .map_or("TIMEOUT".to_string(), |t| t.as_millis().to_string())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        summary,
        "faults injected            {}: {}",
        chaos.windows.len(),
        chaos
            .windows
            .iter()
            .map(|w| format!("{} ({:.1} s)", w.what, w.end - w.start))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        summary,
        "sessions                   {sessions} started, {ended} ended, {reclaimed} reclaimed; runner logs: {fences} fences, {losses} losses (SL001), {refused} refused finishes"
    );
    let _ = writeln!(summary, "idle in transaction        {idle_in_tx}");
    let _ = writeln!(summary, "live sessions at the end   {live_sessions}");
    let _ = writeln!(
        summary,
        "run time                   {:.1} s",
        started.elapsed().as_secs_f64()
    );
    eprintln!("{summary}");

    let show = |v: &[&ExtraRun]| {
        v.iter()
            .take(20)
            .map(|e| e.describe())
            .collect::<Vec<_>>()
            .join("\n")
    };
    if lost > 0 {
        let detail: Vec<String> = conn
            .rows(
                "SELECT format('task %s: session_id %s (%s), runs %s', t.id, t.session_id,
                        CASE WHEN s.id IS NULL THEN 'no such session'
                             ELSE format('name %s, expires %s, ended %s, reclaimed %s, held %s',
                                         s.name, s.expires_at, s.ended_at, s.reclaimed_at, s.held) END,
                        (SELECT string_agg(format('[session %s %s..%s]', r.session_id, r.started_at, r.finished_at), ' ' ORDER BY r.id)
                           FROM example_task_run r WHERE r.task_id = t.id))
                   FROM example_task t LEFT JOIN session_lock.session s ON s.id = t.session_id
                  WHERE t.finished_at IS NULL ORDER BY t.id",
                &[],
            )
            .await
            .iter()
            .map(|r| r.get(0))
            .collect();
        panic!(
            "{lost} tasks lost (never finished after the drain):\n{}\nlive sessions: {:?}",
            detail.join("\n"),
            conn.rows(
                "SELECT format('%s %s held %s', id, name, held) FROM session_lock.live_session",
                &[]
            )
            .await
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        );
    }
    assert!(
        late.is_empty(),
        "finishes accepted from an expired session:\n{}",
        late.join("\n")
    );
    assert!(
        never_ran.is_empty(),
        "tasks finished by a session with no completed run of them:\n{}",
        never_ran.join("\n")
    );
    let unexplained_runs: Vec<&ExtraRun> = extras
        .iter()
        .filter(|e| e.why == Why::Unexplained)
        .collect();
    assert!(
        unexplained_runs.is_empty(),
        "duplicate runs not explained by a cut-short run or a lost lease:\n{}",
        show(&unexplained_runs)
    );
    assert!(
        outside.is_empty(),
        "duplicate runs outside every fault window:\n{}\nwindows: {:?}",
        show(&outside),
        chaos.windows
    );
    assert_eq!(
        duplicates as usize,
        extras.len(),
        "every extra run classified"
    );
    let timeouts: Vec<&Failover> = chaos
        .failovers
        .iter()
        .filter(|f| f.took.is_none())
        .collect();
    assert!(
        timeouts.is_empty(),
        "failovers that never completed: {timeouts:?}"
    );
    assert!(
        p99.is_some_and(|p| p <= bound),
        "failover p99 {p99:?} above ttl + tick + 1 s = {bound:?}: {:?}",
        chaos.failovers
    );
    // The sweep frees them within a tick of a live session; a loaded
    // machine gets the TTL.
    let slow: Vec<&Failover> = chaos
        .lock_releases
        .iter()
        .filter(|f| f.took.is_none_or(|t| t > TTL))
        .collect();
    assert!(
        slow.is_empty(),
        "tasks a foreign transaction had locked did not move within {TTL:?} of its end: {slow:?}"
    );
    assert_eq!(idle_in_tx, 0, "backends left idle in a transaction");
    assert_eq!(live_sessions, 0, "live sessions after every runner stopped");

    // Clean up: processes, proxies, then the server (blocking).
    drop(chaos);
    let pg = Arc::into_inner(pg).expect("no other owner of the server");
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .expect("server drop");
}
