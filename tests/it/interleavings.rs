//! Randomised interleavings of the protocol's calls, checked against the
//! tables and a model of what each session believes.
//!
//! Two runner names share `public.example_task`, 3 to 5 sessions each, of
//! capacities drawn from 1 to 10; each session slot has a store (and so
//! connections) of its own, and starts a new session when its session is
//! killed. The calls: get_work finishing some of the tasks its session
//! holds (sometimes naming tasks it does not hold, or keeping some
//! running), finish_tasks, heartbeats, kills (the lease run out by an
//! UPDATE, as in protocol.rs, or end_session), calls of killed sessions
//! with their stale beliefs, foreign transactions holding row locks across
//! several steps (`SELECT ... FOR UPDATE`, a foreign-key child row, or
//! uncommitted inserts) before they commit or roll back, inserts, reaps,
//! and settles (foreign transactions ended, every session ticks with a
//! sweep). Two shapes:
//!
//! * stepwise: one step at a time, each awaited, its actor and action drawn
//!   from a seeded generator; some steps run 2 to 4 sessions' get_work at
//!   once (`join_all`), with a heartbeat, a finish, a kill (sometimes of one
//!   of them), an insert, a reap or a killed session's call alongside; now
//!   and then a stranding storm (tasks of sessions about to be killed
//!   locked by a foreign transaction, so that reclaims leave them behind
//!   and a reap may orphan them, then a settle); and now and then a server
//!   change (some tasks of one session marked as handed out by another
//!   server, as a failover leaves them: invariant 7). Every invariant is
//!   checked after every step.
//! * free-running: every slot's actor and a chaos actor (kills, killed
//!   sessions' calls, foreign transactions, inserts, reaps) call at will,
//!   with short pauses, for a few epochs. What can be judged while calls
//!   run is judged as each answer arrives (1 against the sessions whose
//!   beliefs are not changing, 2, and 6's once-only); at the end of every
//!   epoch, when all is quiet, everything is checked against the tables.
//!
//! The invariants:
//!  1. no task is held by two live sessions as the clients believe it: the
//!     live sessions' beliefs (what the last get_work returned, minus what
//!     was finished since) are disjoint, and each is exactly the open tasks
//!     the table gives the session; a task a client still runs is never
//!     given back;
//!  2. no finish is accepted from a session that is not live (a killed
//!     session's get_work, finish_tasks and heartbeat get SessionLost,
//!     SL001), and every id a finish returns is one the session believed
//!     it held and asked for; on a call alone, a finish returns exactly what
//!     was asked and held, less the rows a foreign transaction locked FOR
//!     UPDATE (a foreign-key child row must not hold it back); no task is
//!     finished in the table that no finish returned;
//!  3. once settled (foreign transactions ended, every session ticked with
//!     a sweep) no open task names a session that is not live;
//!  4. every live session's held counter equals its open tasks, and the
//!     session is marked waiting (inserts notify while a session of the
//!     table is) exactly when that counter is below its capacity;
//!  5. at the end, after every session of a name ticked twice, each holds
//!     its weighted share: its capacity when the name's open tasks O (its
//!     sessions' and the free ones) reach its live capacity W, otherwise
//!     floor(O*(before+C)/W) - floor(O*before/W), within 1 of O*C/W, the
//!     shares summing to O;
//!  6. nothing is lost: drained at the end, every task ever inserted is
//!     finished, and finish calls returned each id exactly once, to the
//!     session the table records as its finisher;
//!  7. only the server that handed a task out finishes it: no finish
//!     returns a task another server handed out, and a get_work alone of
//!     its holder gives back those neither running in the client nor locked
//!     by a foreign transaction, picking up nothing in that call.
//!
//! A call of a live session fails the test on any error but a lock timeout
//! (55P03) in a group of calls run at once (the protocol's own calls may
//! wait on each other for a while), which is counted and reported. A lock
//! timeout of a call that ran alone fails the test: only a foreign
//! transaction's lock can have made it wait, and the protocol must not wait
//! on those.
//! A call that raced its session's kill may succeed or get SessionLost.
//!
//! A call that raced its session's kill can also be answered late: its
//! transaction committed before the reclaim (the fence holds), but the
//! client may read the answer after the tasks it names moved on, even after
//! they were finished by their next holder. Such tasks are counted as stale
//! answers; for a live session the same would fail invariant 1.
//!
//! Replay: every failure names its seed and the latest steps;
//! `SESSION_LOCK_SEED=<seed>[,<seed>...]` runs those seeds (and
//! `SESSION_LOCK_STEPS=<n>` another number of stepwise steps);
//! `SESSION_LOCK_AUDIT=<dir>` records every row change of the tasks and
//! sessions (audit triggers) and writes them, with the log, to a file in
//! `<dir>` when a seed fails. A stepwise
//! seed fixes every decision as long as the calls answer alike: the calls
//! a step runs at once may interleave differently on a replay, and the
//! draws after such a step may then differ. A free-running seed fixes each
//! actor's draws, not their timing.
//!
//! Every seed runs a world of its own, with a store (and pools) per slot:
//! tens of connections per seed. Six seeds in each of the two tests at once
//! exhaust the embedded server's 300 connections ("too many clients"); run
//! more than three seeds with `--test-threads=1`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use session_lock::{
    Database, Error, GetWork, PgStore, Session as Lease, SessionId, SessionStart, TaskId, Work,
};
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

use session_lock_testkit::db::{TestDb, migrated_db};

/// The two runner names sharing the example table.
const NAMES: [&str; 2] = ["interleave-a", "interleave-b"];
/// Long enough that no lease runs out during a run: only the test kills.
const TTL: Duration = Duration::from_secs(600);
/// Steps per seed, unless `SESSION_LOCK_STEPS` says otherwise.
const STEPS: usize = 400;
/// Seeds per test run, unless `SESSION_LOCK_SEED` names them.
const SEEDS_PER_RUN: usize = 3;
/// Log lines kept for a failure message.
const LOG_LINES: usize = 80;
/// Killed sessions kept for their stale calls.
const ZOMBIES_KEPT: usize = 16;
/// Foreign transactions open at once.
const FOREIGN_MAX: usize = 2;
/// A task id that no row has.
const NO_SUCH_TASK: TaskId = 1_000_000_000_000;

const EXPIRE: &str = "UPDATE session_lock.session SET expires_at = now() - interval '1 second', bumped_at = now() - interval '2 seconds' WHERE id = $1";
/// New tasks, spread over four tenants and none (the table is grouped by
/// tenant, so pickup goes round-robin across them).
const INSERT: &str = "INSERT INTO example_task (payload, tenant) SELECT 'task ' || g, (ARRAY['t1', 't2', 't3', 't4', NULL])[1 + g % 5] FROM generate_series(1, $1::int) g RETURNING id";

// ---------------------------------------------------------------------------
// Seeds and the generator.
// ---------------------------------------------------------------------------

/// The seeds to run: `SESSION_LOCK_SEED` (comma-separated), or fresh ones.
fn seeds() -> Vec<u64> {
    match std::env::var("SESSION_LOCK_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("SESSION_LOCK_SEED={s}: not a list of numbers"))
            })
            .collect(),
        _ => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64;
            let mut rng = Rng::new(now ^ u64::from(std::process::id()) << 40);
            (0..SEEDS_PER_RUN)
                .map(|_| (rng.next() << 31 | rng.next()) % 10_000_000_000)
                .collect()
        }
    }
}

fn steps() -> usize {
    std::env::var("SESSION_LOCK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS)
}

/// A tiny deterministic generator (protocol.rs's `next()`), so that a
/// failing interleaving can be replayed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // One SplitMix64 round, so that neighbouring seeds start apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng(z ^ (z >> 31))
    }

    /// 31 random bits.
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` percent.
    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// Each item with probability `p` percent, in order.
    fn some_of(&mut self, items: impl IntoIterator<Item = TaskId>, p: u64) -> Vec<TaskId> {
        items.into_iter().filter(|_| self.percent(p)).collect()
    }

    /// `k` distinct items of `items` (all of them if fewer), in drawn order.
    fn distinct<T: Copy>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool = items.to_vec();
        let mut out = Vec::new();
        while out.len() < k && !pool.is_empty() {
            out.push(pool.swap_remove(self.below(pool.len())));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// The model.
// ---------------------------------------------------------------------------

/// A session as its client sees it.
#[derive(Debug, Clone)]
struct Session {
    id: SessionId,
    /// The id and the token, as the store's calls take them.
    lease: Lease,
    name: usize,
    capacity: u32,
    /// What its last get_work returned, minus what it finished since.
    believed: BTreeSet<TaskId>,
}

/// One place of a runner: a store and the live session it runs now.
struct Slot {
    store: PgStore,
    session: Session,
    /// Free-running: a kill of the session has begun (it may race the
    /// session's own call).
    dying: Option<Kill>,
    /// Free-running: the kill is done; the slot starts a new session.
    killed: bool,
    /// Free-running: a get_work of the session is under way, so its
    /// beliefs are changing.
    in_flight: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The lease run out (an UPDATE of expires_at, as if heartbeats stopped).
    Expire,
    /// `end_session`.
    End,
}

/// A killed session, with the beliefs it had.
struct Zombie {
    slot: usize,
    session: Session,
    how: Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForeignKind {
    /// `SELECT ... FOR UPDATE` of some tasks.
    ForUpdate,
    /// A child row referencing some tasks (the FK check's FOR KEY SHARE).
    ChildRow,
    /// New tasks, not committed yet.
    PendingInsert,
}

/// A transaction of someone else's, open across steps.
struct Foreign {
    client: Client,
    kind: ForeignKind,
    ids: Vec<TaskId>,
    steps_left: usize,
}

/// How the model sees the session a call acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Live, and not killed by a call of the same step.
    Live,
    /// Live when the step began, and killed by a call of the same step: the
    /// call may come before or after the kill.
    Racing,
    /// Killed in an earlier step.
    Zombie,
}

/// One protocol call (or staged change) of a step.
#[derive(Debug, Clone)]
enum Call {
    GetWork {
        session: Lease,
        finished: Vec<TaskId>,
        running: Vec<TaskId>,
        sweep: bool,
        /// What the client believes it holds, sometimes with ids of other
        /// tasks (`GetWork::known`); None reads the session's range.
        known: Option<Vec<TaskId>>,
    },
    Finish {
        session: Lease,
        ids: Vec<TaskId>,
    },
    Bump {
        session: Lease,
    },
    End {
        session: Lease,
    },
    Expire {
        session: Lease,
    },
    Insert {
        n: i32,
    },
    Reap,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::GetWork {
                session: Lease { id: session, .. },
                finished,
                running,
                sweep,
                known,
            } => {
                write!(f, "get_work s{session}")?;
                if let Some(known) = known {
                    write!(f, " knowing {known:?}")?;
                }
                if !finished.is_empty() {
                    write!(f, " finishing {finished:?}")?;
                }
                if !running.is_empty() {
                    write!(f, " running {running:?}")?;
                }
                if !sweep {
                    write!(f, " no-sweep")?;
                }
                Ok(())
            }
            Call::Finish { session, ids } => write!(f, "finish_tasks s{} {ids:?}", session.id),
            Call::Bump { session } => write!(f, "bump s{}", session.id),
            Call::End { session } => write!(f, "end_session s{}", session.id),
            Call::Expire { session } => write!(f, "expire s{}", session.id),
            Call::Insert { n } => write!(f, "insert {n}"),
            Call::Reap => write!(f, "reap"),
        }
    }
}

struct Planned {
    /// The slot whose store makes the call.
    slot: usize,
    call: Call,
    role: Role,
}

impl Planned {
    fn describe(&self) -> String {
        match self.role {
            Role::Live => self.call.to_string(),
            Role::Racing => format!("{} (racing its kill)", self.call),
            Role::Zombie => format!("{} (killed)", self.call),
        }
    }
}

enum Outcome {
    Work(session_lock::Result<Work<ExampleTask>>),
    Finished(session_lock::Result<Vec<TaskId>>),
    Bumped(session_lock::Result<()>),
    Ended(session_lock::Result<bool>),
    Expired(Result<u64, tokio_postgres::Error>),
    Inserted(Result<Vec<TaskId>, tokio_postgres::Error>),
    Reaped(session_lock::Result<u64>),
}

async fn exec(store: &PgStore, admin: &Client, call: &Call) -> Outcome {
    match call {
        Call::GetWork {
            session,
            finished,
            running,
            sweep,
            known,
        } => Outcome::Work(
            store
                .get_work::<ExampleTask>(GetWork {
                    session,
                    finished,
                    running,
                    sweep: *sweep,
                    known: known.as_deref(),
                })
                .await,
        ),
        Call::Finish { session, ids } => {
            Outcome::Finished(store.finish_tasks::<ExampleTask>(session, ids).await)
        }
        Call::Bump { session } => Outcome::Bumped(store.bump_session(session, TTL).await),
        Call::End { session } => Outcome::Ended(store.end_session(session).await),
        Call::Expire { session } => Outcome::Expired(admin.execute(EXPIRE, &[&session.id]).await),
        Call::Insert { n } => Outcome::Inserted(
            admin
                .query(INSERT, &[n])
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect()),
        ),
        Call::Reap => Outcome::Reaped(store.reap_sessions(Duration::ZERO).await),
    }
}

/// Begins a foreign transaction and takes its locks (or inserts its
/// tasks, whose ids it records).
async fn open_foreign(f: &mut Foreign) -> Result<(), tokio_postgres::Error> {
    f.client.batch_execute("BEGIN").await?;
    match f.kind {
        ForeignKind::ForUpdate => {
            f.client
                .query(
                    "SELECT id FROM example_task WHERE id = ANY ($1) ORDER BY id FOR UPDATE",
                    &[&f.ids],
                )
                .await?;
        }
        ForeignKind::ChildRow => {
            f.client
                .execute(
                    "INSERT INTO example_task_note (task_id, note) SELECT unnest($1::bigint[]), 'a note'",
                    &[&f.ids],
                )
                .await?;
        }
        ForeignKind::PendingInsert => {
            let n = f.ids[0] as i32;
            f.ids = f
                .client
                .query(INSERT, &[&n])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
        }
    }
    Ok(())
}

async fn close_foreign(f: &Foreign, commit: bool) -> Result<(), tokio_postgres::Error> {
    f.client
        .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
        .await
}

/// `SESSION_LOCK_AUDIT`: a directory to write a failing run's row changes
/// to. Setting it installs the audit triggers below (which slow every call
/// a little).
fn audit_dir() -> Option<String> {
    std::env::var("SESSION_LOCK_AUDIT")
        .ok()
        .filter(|d| !d.is_empty())
}

/// Records every change of a task or session row, with the database clock,
/// the transaction and the backend, and again when its transaction ends (a
/// deferred trigger: just before the commit), so that a failure can be
/// ordered as the database saw it.
const AUDIT: &str = r#"
CREATE TABLE public.sl_audit (
    seq    bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    what   text NOT NULL,
    row_id bigint NOT NULL,
    change text NOT NULL,
    xid    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    pid    int NOT NULL DEFAULT pg_backend_pid());
CREATE FUNCTION public.sl_audit_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sl_audit (what, row_id, change)
    VALUES ('task ' || TG_ARGV[0], NEW.id,
            format('session %s -> %s, finished %s -> %s', OLD.session_id, NEW.session_id,
                   OLD.finished_at IS NOT NULL, NEW.finished_at IS NOT NULL));
    RETURN NULL;
END $$;
CREATE FUNCTION public.sl_audit_session() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sl_audit (what, row_id, change)
    VALUES ('session ' || TG_ARGV[0], NEW.id,
            format('held %s -> %s, ended %s, reclaimed %s, expired %s', OLD.held, NEW.held,
                   NEW.ended_at IS NOT NULL, NEW.reclaimed_at IS NOT NULL,
                   NEW.expires_at <= clock_timestamp()));
    RETURN NULL;
END $$;
CREATE TRIGGER sl_audit AFTER UPDATE ON public.example_task
    FOR EACH ROW EXECUTE FUNCTION public.sl_audit_task('update');
CREATE CONSTRAINT TRIGGER sl_audit_end AFTER UPDATE ON public.example_task
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.sl_audit_task('tx end');
CREATE TRIGGER sl_audit AFTER UPDATE ON session_lock.session
    FOR EACH ROW EXECUTE FUNCTION public.sl_audit_session('update');
CREATE CONSTRAINT TRIGGER sl_audit_end AFTER UPDATE ON session_lock.session
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.sl_audit_session('tx end');
"#;

fn is_lock_timeout(e: &Error) -> bool {
    e.db_code() == Some("55P03")
}

// ---------------------------------------------------------------------------
// The database's state.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct TaskRow {
    holder: Option<SessionId>,
    finished: bool,
    finished_by: Option<SessionId>,
    /// Handed out by another server than this one (sl_server).
    elsewhere: bool,
}

#[derive(Debug, Clone)]
struct SessionRow {
    held: i32,
    capacity: i32,
    /// Whether the session waits for new tasks (inserts notify while it
    /// does); None until its first call writes it.
    waiting: Option<bool>,
    live: bool,
    ended: bool,
    reclaimed: bool,
}

#[derive(Debug, Default)]
struct DbState {
    tasks: BTreeMap<TaskId, TaskRow>,
    sessions: BTreeMap<SessionId, SessionRow>,
}

impl DbState {
    async fn read(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let tasks = client
            .query(
                "SELECT id, session_id, finished_at IS NOT NULL, finished_by,
                        coalesce(sl_server <> pg_postmaster_start_time(), false)
                   FROM example_task",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    TaskRow {
                        holder: r.get(1),
                        finished: r.get(2),
                        finished_by: r.get(3),
                        elsewhere: r.get(4),
                    },
                )
            })
            .collect();
        let sessions = client
            .query(
                "SELECT id, held,
                        ended_at IS NULL AND reclaimed_at IS NULL
                            AND expires_at > clock_timestamp(),
                        ended_at IS NOT NULL, reclaimed_at IS NOT NULL,
                        capacity, CASE WHEN task_table IS NOT NULL THEN waiting END
                   FROM session_lock.session",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    SessionRow {
                        held: r.get(1),
                        live: r.get(2),
                        ended: r.get(3),
                        reclaimed: r.get(4),
                        capacity: r.get(5),
                        waiting: r.get(6),
                    },
                )
            })
            .collect();
        Ok(DbState { tasks, sessions })
    }

    /// The open tasks the table gives `session`.
    fn open_held_by(&self, session: SessionId) -> BTreeSet<TaskId> {
        self.tasks
            .iter()
            .filter(|(_, t)| !t.finished && t.holder == Some(session))
            .map(|(&id, _)| id)
            .collect()
    }

    /// The open tasks handed out by another server.
    fn elsewhere(&self) -> BTreeSet<TaskId> {
        self.tasks
            .iter()
            .filter(|(_, t)| !t.finished && t.elsewhere)
            .map(|(&id, _)| id)
            .collect()
    }

    fn free_open(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| !t.finished && t.holder.is_none())
            .count()
    }

    fn open(&self) -> usize {
        self.tasks.values().filter(|t| !t.finished).count()
    }

    fn live(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| s.live)
    }

    fn describe(&self, session: SessionId) -> &'static str {
        match self.sessions.get(&session) {
            None => "missing (reaped)",
            Some(s) if s.live => "live",
            Some(s) if s.reclaimed => "reclaimed",
            Some(s) if s.ended => "ended",
            Some(_) => "expired",
        }
    }
}

// ---------------------------------------------------------------------------
// A run.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Stats {
    steps: usize,
    get_work: usize,
    groups: usize,
    finish_calls: usize,
    finished: usize,
    /// Asked, held, and not finished: a row locked by someone else.
    held_back: usize,
    bumps: usize,
    kills: usize,
    /// Calls that ran while their session was being killed.
    racing: usize,
    /// Tasks such a call returned that, by the time its answer arrived,
    /// another session had picked up and finished.
    stale_answers: usize,
    zombie_calls: usize,
    foreign: usize,
    inserted: usize,
    reaped: usize,
    settles: usize,
    /// Open tasks that settles found with sessions not live (orphans:
    /// with sessions reaped), for the reclaims and sweeps to free.
    stranded: usize,
    orphans: usize,
    /// Tasks any check found with a session not live, or reaped.
    ever_stranded: BTreeSet<TaskId>,
    ever_orphaned: BTreeSet<TaskId>,
    storms: usize,
    /// Tasks marked as handed out by another server, and those given back
    /// for it.
    marked_elsewhere: usize,
    given_back_elsewhere: usize,
    /// Lock timeouts (55P03) of calls in concurrent groups, and of the
    /// foreign transactions' own statements.
    lock_timeouts: Vec<String>,
}

struct World {
    seed: u64,
    test: &'static str,
    db: TestDb,
    admin: Arc<Client>,
    slots: Vec<Slot>,
    zombies: Vec<Zombie>,
    foreign: Vec<Foreign>,
    spare: Vec<Client>,
    /// Foreign transactions whose statement failed, to roll back.
    closing: Vec<Foreign>,
    /// Every task id ever committed to the table.
    inserted: BTreeSet<TaskId>,
    /// Every id a finish returned, and the session it returned it to.
    finished: BTreeMap<TaskId, SessionId>,
    /// The state read by the latest check.
    last: DbState,
    rng: Rng,
    phase: &'static str,
    step: usize,
    /// The calls being applied ran alone (no other call of the test at
    /// the same time).
    alone: bool,
    log: VecDeque<String>,
    stats: Stats,
    started: Instant,
}

impl World {
    async fn new(seed: u64, test: &'static str) -> World {
        let db = migrated_db().await;
        // Quarantine is not modelled here (tests/it/retries.rs has it): a
        // task killed with its holders five times must stay pickable.
        session_lock::Migrator::new()
            .with_example()
            .task_table(
                session_lock::TaskTable::new("public.example_task")
                    .finished_by("finished_by")
                    .group_by("tenant")
                    .no_quarantine(),
            )
            .run_url(&db.url)
            .await
            .expect("declare the example without quarantine");
        let admin = Arc::new(db.client().await);
        admin
            .batch_execute(
                "CREATE TABLE public.example_task_note (
                     task_id bigint NOT NULL REFERENCES public.example_task (id),
                     note    text NOT NULL)",
            )
            .await
            .expect("create the child table");
        if audit_dir().is_some() {
            admin
                .batch_execute(AUDIT)
                .await
                .expect("create the audit triggers");
        }
        let mut spare = Vec::new();
        for _ in 0..FOREIGN_MAX {
            let c = db.client().await;
            c.batch_execute("SET lock_timeout = '5s'")
                .await
                .expect("a foreign connection");
            spare.push(c);
        }
        let mut world = World {
            seed,
            test,
            db,
            admin,
            slots: Vec::new(),
            zombies: Vec::new(),
            foreign: Vec::new(),
            spare,
            closing: Vec::new(),
            inserted: BTreeSet::new(),
            finished: BTreeMap::new(),
            last: DbState::default(),
            rng: Rng::new(seed),
            phase: "setup",
            step: 0,
            alone: true,
            log: VecDeque::new(),
            stats: Stats::default(),
            started: Instant::now(),
        };
        // 3 to 5 sessions of each name, started in a shuffled order.
        let mut names = Vec::new();
        for name in 0..NAMES.len() {
            for _ in 0..world.rng.between(3, 5) {
                names.push(name);
            }
        }
        let order = world.rng.distinct(&names, names.len());
        for name in order {
            let store = PgStore::connect(&world.db.url)
                .await
                .unwrap_or_else(|e| world.fail(format!("a store connects: {e}")));
            let session = world.start_session(&store, name).await;
            world.slots.push(Slot {
                store,
                session,
                dying: None,
                killed: false,
                in_flight: false,
            });
        }
        let tasks = world.rng.between(5, 120) as i32;
        world
            .run_calls(vec![Planned {
                slot: 0,
                call: Call::Insert { n: tasks },
                role: Role::Live,
            }])
            .await;
        world.check().await;
        world
    }

    /// Panics with the seed, how to replay it and the latest steps.
    fn fail(&self, what: impl fmt::Display) -> ! {
        let mut msg = format!(
            "interleavings seed {} failed at {} step {} ({:.1?} in): {what}\n",
            self.seed,
            self.phase,
            self.step,
            self.started.elapsed()
        );
        let _ = writeln!(
            msg,
            "replay: SESSION_LOCK_SEED={} cargo test --test it interleavings::{} -- --nocapture",
            self.seed, self.test
        );
        let _ = writeln!(msg, "the latest steps:");
        for line in &self.log {
            let _ = writeln!(msg, "  {line}");
        }
        if let Some(dir) = audit_dir() {
            let _ = writeln!(msg, "{}", self.write_audit(&dir, &msg));
        }
        panic!("{msg}");
    }

    /// Writes the log and every row change the audit triggers recorded
    /// to `dir`; says where.
    fn write_audit(&self, dir: &str, msg: &str) -> String {
        let url = self.db.url.clone();
        // Its own thread and runtime: this runs while the test's panics.
        let rows = std::thread::spawn(move || -> Result<Vec<String>, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let rows = c
                    .query(
                        "SELECT format('%s %s %s %s: %s (xid %s, pid %s)', seq,
                                to_char(at, 'HH24:MI:SS.US'), what, row_id, change, xid, pid)
                           FROM public.sl_audit ORDER BY seq",
                        &[],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the audit reader panicked".into()));
        let path = format!("{dir}/interleavings-{}-{}.txt", self.test, self.seed);
        let text = match rows {
            Ok(rows) => format!("{msg}\nrow changes (audit):\n{}\n", rows.join("\n")),
            Err(e) => format!("{msg}\nreading the audit failed: {e}\n"),
        };
        match std::fs::write(&path, text) {
            Ok(()) => format!("the log and the row changes: {path}"),
            Err(e) => format!("writing {path}: {e}"),
        }
    }

    fn note(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.log
            .push_back(format!("{ms:8.1} ms {} {}: {line}", self.phase, self.step));
    }

    fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "seed {}: {} steps in {:.1?}; {} get_work ({} concurrent groups), {} finish_tasks, {} tasks finished ({} held back by foreign locks), {} heartbeats, {} kills ({} calls racing their session's kill, {} stale tasks in their answers), {} calls of killed sessions, {} foreign transactions, {} tasks inserted, {} reaped, {} stranding storms, {} tasks marked another server's ({} given back for it), {} settles (which found {} stranded tasks, {} of them orphans); {} tasks seen stranded with a session not live, {} with a reaped one; {} lock timeouts (55P03){}",
            self.seed,
            s.steps,
            self.started.elapsed(),
            s.get_work,
            s.groups,
            s.finish_calls,
            s.finished,
            s.held_back,
            s.bumps,
            s.kills,
            s.racing,
            s.stale_answers,
            s.zombie_calls,
            s.foreign,
            s.inserted,
            s.reaped,
            s.storms,
            s.marked_elsewhere,
            s.given_back_elsewhere,
            s.settles,
            s.stranded,
            s.orphans,
            s.ever_stranded.len(),
            s.ever_orphaned.len(),
            s.lock_timeouts.len(),
            if s.lock_timeouts.is_empty() {
                String::new()
            } else {
                format!(": {}", s.lock_timeouts.join("; "))
            }
        )
    }

    async fn start_session(&mut self, store: &PgStore, name: usize) -> Session {
        let capacity = self.rng.between(1, 10) as u32;
        let lease = store
            .start_session(&SessionStart::new(NAMES[name], TTL, capacity))
            .await
            .unwrap_or_else(|e| self.fail(format!("start_session: {e}")));
        self.note(format!(
            "started s{} ({}, capacity {capacity})",
            lease.id, NAMES[name]
        ));
        Session {
            id: lease.id,
            lease,
            name,
            capacity,
            believed: BTreeSet::new(),
        }
    }

    /// The session a call of `slot` acts for.
    fn session_mut(&mut self, p: &Planned, session: SessionId) -> &mut Session {
        if p.role == Role::Zombie {
            match self.zombies.iter().position(|z| z.session.id == session) {
                Some(i) => &mut self.zombies[i].session,
                None => self.fail(format!("no killed session s{session} in the model")),
            }
        } else if self.slots[p.slot].session.id == session {
            &mut self.slots[p.slot].session
        } else {
            self.fail(format!("slot {} runs no session s{session}", p.slot))
        }
    }

    /// Task ids of every kind, for a session that holds none of them.
    fn strangers(&mut self, session: &BTreeSet<TaskId>) -> Vec<TaskId> {
        let all: Vec<TaskId> = self.inserted.iter().copied().collect();
        let mut out = Vec::new();
        for _ in 0..self.rng.between(1, 2) {
            if all.is_empty() || self.rng.percent(20) {
                out.push(NO_SUCH_TASK);
            } else {
                out.push(self.rng.pick(&all));
            }
        }
        out.retain(|id| !session.contains(id));
        out.sort();
        out.dedup();
        out
    }

    fn locked_for_update(&self) -> BTreeSet<TaskId> {
        self.foreign
            .iter()
            .filter(|f| f.kind == ForeignKind::ForUpdate)
            .flat_map(|f| f.ids.iter().copied())
            .collect()
    }

    /// Runs `f` with `rng` as the world's generator (a free-running actor
    /// draws from its own).
    fn with_rng<T>(&mut self, rng: &mut Rng, f: impl FnOnce(&mut World) -> T) -> T {
        std::mem::swap(&mut self.rng, rng);
        let out = f(self);
        std::mem::swap(&mut self.rng, rng);
        out
    }

    /// Invariant 1 while calls run: the beliefs of `slot`'s session,
    /// just returned, against every live session's that is not changing
    /// (no get_work under way, no kill begun).
    fn check_disjoint(&self, slot: usize) {
        let me = &self.slots[slot].session;
        for (i, other) in self.slots.iter().enumerate() {
            if i == slot || other.in_flight || other.dying.is_some() || other.killed {
                continue;
            }
            let both: Vec<&TaskId> = me.believed.intersection(&other.session.believed).collect();
            if !both.is_empty() {
                self.fail(format!(
                    "invariant 1: tasks {both:?} are believed held by live sessions s{} and s{}",
                    other.session.id, me.id
                ));
            }
        }
    }

    // -- Planning ---------------------------------------------------------

    fn plan_get_work(&mut self, slot: usize) -> Planned {
        let s = self.slots[slot].session.clone();
        let mut finished = if self.rng.percent(60) {
            self.rng.some_of(s.believed.iter().copied(), 50)
        } else {
            Vec::new()
        };
        if self.rng.percent(15) {
            finished.extend(self.strangers(&s.believed));
        }
        let rest: Vec<TaskId> = s
            .believed
            .iter()
            .copied()
            .filter(|t| !finished.contains(t))
            .collect();
        let running = if self.rng.percent(25) {
            self.rng.some_of(rest, 50)
        } else {
            Vec::new()
        };
        let sweep = self.rng.percent(70);
        // A client that read every answer knows all its session holds;
        // ids it does not hold must change nothing.
        // It may leave out what it asks to finish.
        let leave_out = self.rng.percent(50);
        let known = self.rng.percent(70).then(|| {
            let mut known: Vec<TaskId> = s
                .believed
                .iter()
                .copied()
                .filter(|t| !(leave_out && finished.contains(t)))
                .collect();
            if self.rng.percent(15) {
                known.extend(self.strangers(&s.believed));
            }
            known
        });
        Planned {
            slot,
            call: Call::GetWork {
                session: s.lease,
                finished,
                running,
                sweep,
                known,
            },
            role: Role::Live,
        }
    }

    /// A plain tick: nothing finished or running, with a sweep.
    fn plan_tick(&self, slot: usize, finished: Vec<TaskId>) -> Planned {
        Planned {
            slot,
            call: Call::GetWork {
                session: self.slots[slot].session.lease.clone(),
                finished,
                running: Vec::new(),
                sweep: true,
                known: None,
            },
            role: Role::Live,
        }
    }

    fn plan_finish(&mut self, slot: usize) -> Planned {
        let s = self.slots[slot].session.clone();
        let mut ids = self.rng.some_of(s.believed.iter().copied(), 60);
        if ids.is_empty() && !s.believed.is_empty() {
            let all: Vec<TaskId> = s.believed.iter().copied().collect();
            ids.push(self.rng.pick(&all));
        }
        if ids.is_empty() || self.rng.percent(15) {
            ids.extend(self.strangers(&s.believed));
        }
        Planned {
            slot,
            call: Call::Finish {
                session: s.lease,
                ids,
            },
            role: Role::Live,
        }
    }

    fn plan_kill(&mut self, slot: usize) -> Planned {
        let session = self.slots[slot].session.lease.clone();
        let call = if self.rng.percent(50) {
            Call::Expire { session }
        } else {
            Call::End { session }
        };
        Planned {
            slot,
            call,
            role: Role::Live,
        }
    }

    fn plan_bump(&self, slot: usize) -> Planned {
        Planned {
            slot,
            call: Call::Bump {
                session: self.slots[slot].session.lease.clone(),
            },
            role: Role::Live,
        }
    }

    /// A call of a killed session; `all` allows end_session too.
    fn plan_zombie(&mut self, all: bool) -> Option<Planned> {
        if self.zombies.is_empty() {
            return None;
        }
        // Half the time the latest: killed just now, perhaps not reclaimed
        // yet, so that only its own row says it is over.
        let i = if self.rng.percent(50) {
            self.zombies.len() - 1
        } else {
            self.rng.below(self.zombies.len())
        };
        Some(self.plan_zombie_call(i, all))
    }

    /// A call of the killed session `self.zombies[i]`, with its stale
    /// beliefs.
    fn plan_zombie_call(&mut self, i: usize, all: bool) -> Planned {
        let z = &self.zombies[i];
        let (slot, session, believed) =
            (z.slot, z.session.lease.clone(), z.session.believed.clone());
        let call = match self.rng.below(if all { 4 } else { 3 }) {
            0 => Call::GetWork {
                session,
                finished: believed.iter().copied().collect(),
                running: Vec::new(),
                sweep: self.rng.percent(50),
                known: Some(believed.iter().copied().collect()),
            },
            1 => Call::Finish {
                session,
                ids: if believed.is_empty() {
                    self.strangers(&believed)
                } else {
                    believed.iter().copied().collect()
                },
            },
            2 => Call::Bump { session },
            _ => Call::End { session },
        };
        Planned {
            slot,
            call,
            role: Role::Zombie,
        }
    }

    /// 2 to 4 sessions' get_work at once, and sometimes one more call.
    fn plan_group(&mut self) -> Vec<Planned> {
        let all: Vec<usize> = (0..self.slots.len()).collect();
        let k = self.rng.between(2, 4);
        let actors = self.rng.distinct(&all, k);
        let mut plan: Vec<Planned> = actors.iter().map(|&a| self.plan_get_work(a)).collect();
        let others: Vec<usize> = all
            .iter()
            .copied()
            .filter(|s| !actors.contains(s))
            .collect();
        if self.rng.percent(60) {
            match self.rng.below(8) {
                0 => {
                    let a = self.rng.pick(&actors);
                    plan.push(self.plan_bump(a));
                }
                1 if !others.is_empty() => {
                    let o = self.rng.pick(&others);
                    plan.push(self.plan_finish(o));
                }
                2 | 3 if !others.is_empty() => {
                    let o = self.rng.pick(&others);
                    plan.push(self.plan_kill(o));
                }
                4 => {
                    // A session killed while its own get_work runs.
                    let i = self.rng.below(actors.len());
                    plan[i].role = Role::Racing;
                    let victim = plan[i].slot;
                    plan.push(self.plan_kill(victim));
                }
                5 => {
                    let n = self.rng.between(1, 6) as i32;
                    plan.push(Planned {
                        slot: 0,
                        call: Call::Insert { n },
                        role: Role::Live,
                    });
                }
                6 => {
                    if let Some(z) = self.plan_zombie(false) {
                        plan.push(z);
                    }
                }
                _ => {
                    let a = self.rng.pick(&all);
                    plan.push(Planned {
                        slot: a,
                        call: Call::Reap,
                        role: Role::Live,
                    });
                }
            }
        }
        plan
    }

    // -- Running and applying ---------------------------------------------

    /// Runs the planned calls (at once when there are several), checks
    /// what each returned against the model, and updates the model.
    async fn run_calls(&mut self, plan: Vec<Planned>) {
        let described: Vec<String> = plan.iter().map(Planned::describe).collect();
        self.note(described.join(" || "));
        if plan.len() > 1 {
            self.stats.groups += 1;
        }
        let strict = plan.len() == 1;
        self.alone = strict;
        let stores: Vec<PgStore> = plan
            .iter()
            .map(|p| self.slots[p.slot].store.clone())
            .collect();
        let outcomes = {
            let admin = &self.admin;
            join_all(
                plan.iter()
                    .zip(&stores)
                    .map(|(p, store)| exec(store, admin, &p.call)),
            )
            .await
        };
        let locked = self.locked_for_update();
        let mut results = Vec::new();
        let mut kills = Vec::new();
        let mut racing_lost = Vec::new();
        for (p, outcome) in plan.iter().zip(outcomes) {
            let result = self.apply(p, outcome, &locked, strict, &mut kills, &mut racing_lost);
            results.push(result);
        }
        let line = self.log.pop_back().unwrap_or_default();
        self.log
            .push_back(format!("{line}  =>  {}", results.join(" || ")));
        for s in racing_lost {
            if !kills
                .iter()
                .any(|&(slot, _)| self.slots[slot].session.id == s)
            {
                self.fail(format!(
                    "s{s}'s get_work said SessionLost, and its kill in the same step did not happen"
                ));
            }
        }
        for (slot, how) in kills {
            self.replace(slot, how).await;
        }
    }

    /// Applies one call's outcome to the model; returns what it did, for
    /// the log.
    fn apply(
        &mut self,
        p: &Planned,
        outcome: Outcome,
        locked: &BTreeSet<TaskId>,
        strict: bool,
        kills: &mut Vec<(usize, Kill)>,
        racing_lost: &mut Vec<SessionId>,
    ) -> String {
        match p.role {
            Role::Zombie => self.stats.zombie_calls += 1,
            Role::Racing => self.stats.racing += 1,
            Role::Live => {}
        }
        match (&p.call, outcome) {
            (
                Call::GetWork {
                    session: Lease { id: session, .. },
                    finished: asked,
                    running,
                    ..
                },
                Outcome::Work(r),
            ) => {
                self.stats.get_work += 1;
                match (p.role, r) {
                    (Role::Zombie, r) => self.expect_lost(r.map(|_| ()), p),
                    (role, Ok(w)) => {
                        if !w.unreadable.is_empty() {
                            self.fail(format!("unreadable rows: {:?}", w.unreadable));
                        }
                        let believed = self.session_mut(p, *session).believed.clone();
                        self.check_finished(
                            *session,
                            asked,
                            &believed,
                            &w.finished,
                            locked,
                            strict && role == Role::Live,
                        );
                        let mut held = BTreeSet::new();
                        for t in &w.tasks {
                            if t.session_id != Some(*session) {
                                self.fail(format!(
                                    "get_work of s{session} returned task {} of session {:?}",
                                    t.id, t.session_id
                                ));
                            }
                            if let Some(&by) = self.finished.get(&t.id) {
                                if role == Role::Live {
                                    self.fail(format!(
                                        "get_work of s{session} returned task {}, which a finish of s{by} returned",
                                        t.id
                                    ));
                                }
                                // The answer of a call that raced its
                                // session's kill can reach the client after
                                // the session was reclaimed (its call
                                // committed first) and the task was finished
                                // by its next holder: stale, not wrong.
                                self.stats.stale_answers += 1;
                            }
                            if !held.insert(t.id) {
                                self.fail(format!(
                                    "get_work of s{session} returned task {} twice",
                                    t.id
                                ));
                            }
                        }
                        // What is still running in the client is never given back.
                        let kept: Vec<&TaskId> = running
                            .iter()
                            .filter(|t| believed.contains(t) && !held.contains(t))
                            .collect();
                        if !kept.is_empty() && role == Role::Live {
                            self.fail(format!(
                                "get_work of s{session} gave back tasks {kept:?} that were running"
                            ));
                        }
                        // Tasks another server handed out go back, but for
                        // those running here or locked by a foreign
                        // transaction; and a call that gives some back
                        // picks up nothing.
                        if strict && role == Role::Live {
                            let back: BTreeSet<TaskId> = self
                                .last
                                .elsewhere()
                                .intersection(&believed)
                                .filter(|t| !running.contains(t) && !locked.contains(t))
                                .copied()
                                .collect();
                            let kept: Vec<&TaskId> = back.intersection(&held).collect();
                            if !kept.is_empty() {
                                self.fail(format!(
                                    "get_work of s{session} kept tasks {kept:?}, handed out by another server and neither running nor locked"
                                ));
                            }
                            let new: Vec<&TaskId> = held.difference(&believed).collect();
                            if !back.is_empty() && !new.is_empty() {
                                self.fail(format!(
                                    "get_work of s{session} gave back {back:?}, handed out by another server, and picked up {new:?} in the same call"
                                ));
                            }
                            self.stats.given_back_elsewhere += back.len();
                        }
                        let capacity = self.session_mut(p, *session).capacity as usize;
                        if strict
                            && locked.is_empty()
                            && running.is_empty()
                            && held.len() > capacity
                        {
                            self.fail(format!(
                                "s{session} of capacity {capacity} holds {} tasks: {held:?}",
                                held.len()
                            ));
                        }
                        let result = format!("finished {:?}, holds {held:?}", w.finished);
                        self.session_mut(p, *session).believed = held;
                        result
                    }
                    (Role::Racing, Err(e)) if e.is_session_lost() => {
                        racing_lost.push(*session);
                        "lost".into()
                    }
                    (_, Err(e)) => self.unexpected(e, p),
                }
            }
            (
                Call::Finish {
                    session: Lease { id: session, .. },
                    ids,
                },
                Outcome::Finished(r),
            ) => {
                self.stats.finish_calls += 1;
                match (p.role, r) {
                    (Role::Zombie, r) => self.expect_lost(r.map(|_| ()), p),
                    (role, Ok(done)) => {
                        let believed = self.session_mut(p, *session).believed.clone();
                        self.check_finished(
                            *session,
                            ids,
                            &believed,
                            &done,
                            locked,
                            strict && role == Role::Live,
                        );
                        let s = self.session_mut(p, *session);
                        for id in &done {
                            s.believed.remove(id);
                        }
                        format!("finished {done:?}")
                    }
                    (Role::Racing, Err(e)) if e.is_session_lost() => "lost".into(),
                    (_, Err(e)) => self.unexpected(e, p),
                }
            }
            (Call::Bump { .. }, Outcome::Bumped(r)) => {
                self.stats.bumps += 1;
                match (p.role, r) {
                    (Role::Zombie, r) => self.expect_lost(r, p),
                    (_, Ok(())) => "bumped".into(),
                    (Role::Racing, Err(e)) if e.is_session_lost() => "lost".into(),
                    (_, Err(e)) => self.unexpected(e, p),
                }
            }
            (
                Call::End {
                    session: Lease { id: session, .. },
                },
                Outcome::Ended(r),
            ) => match (p.role, r) {
                (Role::Zombie, Ok(ended)) => {
                    // Ends an expired session not reclaimed yet; a no-op
                    // for one already ended, reclaimed or reaped.
                    let expected = self
                        .last
                        .sessions
                        .get(session)
                        .is_some_and(|s| !s.ended && !s.reclaimed);
                    if ended != expected {
                        self.fail(format!(
                            "end_session of killed s{session} ({}) returned {ended}",
                            self.last.describe(*session)
                        ));
                    }
                    format!("ended: {ended}")
                }
                (_, Ok(true)) => {
                    kills.push((p.slot, Kill::End));
                    "ended".into()
                }
                (_, Ok(false)) => self.fail(format!(
                    "end_session of live s{session} said it was already over"
                )),
                (_, Err(e)) => self.unexpected(e, p),
            },
            (
                Call::Expire {
                    session: Lease { id: session, .. },
                },
                Outcome::Expired(r),
            ) => match r {
                Ok(1) => {
                    kills.push((p.slot, Kill::Expire));
                    "expired".into()
                }
                Ok(n) => self.fail(format!("expiring s{session} updated {n} rows")),
                Err(e) => self.fail(format!("expiring s{session}: {e}")),
            },
            (Call::Insert { .. }, Outcome::Inserted(r)) => match r {
                Ok(ids) => {
                    self.stats.inserted += ids.len();
                    self.inserted.extend(&ids);
                    format!("inserted {ids:?}")
                }
                Err(e) => self.fail(format!("inserting tasks: {e}")),
            },
            (Call::Reap, Outcome::Reaped(r)) => match r {
                Ok(n) => {
                    self.stats.reaped += n as usize;
                    format!("reaped {n}")
                }
                Err(e) => self.unexpected(e, p),
            },
            _ => unreachable!("an outcome of another call"),
        }
    }

    /// A call of a killed session must be refused with SessionLost (SL001).
    fn expect_lost(&self, r: session_lock::Result<()>, p: &Planned) -> String {
        match r {
            Err(e @ Error::SessionLost { .. }) if e.db_code() == Some("SL001") => "lost".into(),
            Err(e) => self.fail(format!(
                "{} of a killed session: expected SessionLost (SL001), got {e:?}",
                p.call
            )),
            Ok(()) => self.fail(format!(
                "invariant 2: {} of a killed session was accepted",
                p.call
            )),
        }
    }

    /// A lock timeout of a call in a concurrent group is counted; anything
    /// else fails, a lock timeout of a call that ran alone too (only a
    /// foreign lock can have made it wait, and the protocol must not wait
    /// on those).
    fn unexpected(&mut self, e: Error, p: &Planned) -> String {
        if is_lock_timeout(&e) {
            if self.alone {
                self.fail(format!(
                    "{} ran alone and timed out waiting for a lock (55P03): only a foreign transaction's lock can have held it up, and the protocol must not wait on those: {e:?}",
                    p.describe()
                ));
            }
            self.stats.lock_timeouts.push(format!(
                "{} step {}: {}: {e}",
                self.phase,
                self.step,
                p.describe()
            ));
            return format!("lock timeout: {e}");
        }
        self.fail(format!("{} failed: {e:?}", p.describe()))
    }

    /// Invariant 2, and 6 as finishes return: ids asked for and believed,
    /// each returned once; on a step alone, exactly those not locked.
    fn check_finished(
        &mut self,
        session: SessionId,
        asked: &[TaskId],
        believed: &BTreeSet<TaskId>,
        got: &[TaskId],
        locked: &BTreeSet<TaskId>,
        strict: bool,
    ) {
        let got_set: BTreeSet<TaskId> = got.iter().copied().collect();
        let elsewhere = self.last.elsewhere();
        let refused: Vec<&TaskId> = got_set.intersection(&elsewhere).collect();
        if !refused.is_empty() {
            self.fail(format!(
                "s{session}'s finish returned tasks {refused:?}, handed out by another server: only the server that handed a task out finishes it"
            ));
        }
        if got_set.len() != got.len() {
            self.fail(format!("s{session}'s finish returned an id twice: {got:?}"));
        }
        for &id in got {
            if !asked.contains(&id) {
                self.fail(format!(
                    "s{session}'s finish returned task {id}, which it did not ask for ({asked:?})"
                ));
            }
            if !believed.contains(&id) {
                self.fail(format!(
                    "invariant 2: s{session}'s finish returned task {id}, which it did not believe it held ({believed:?})"
                ));
            }
            if let Some(prev) = self.finished.insert(id, session) {
                self.fail(format!(
                    "invariant 6: task {id} was returned by a finish of s{prev} and again by one of s{session}"
                ));
            }
        }
        self.stats.finished += got.len();
        let due: BTreeSet<TaskId> = asked
            .iter()
            .copied()
            .filter(|t| believed.contains(t))
            .collect();
        self.stats.held_back += due.len() - got_set.len().min(due.len());
        if strict {
            let expected: BTreeSet<TaskId> = due
                .difference(locked)
                .filter(|t| !elsewhere.contains(t))
                .copied()
                .collect();
            if got_set != expected {
                self.fail(format!(
                    "s{session}'s finish of {asked:?} returned {got:?}; it holds {believed:?}, foreign transactions lock {locked:?} FOR UPDATE, another server handed out {elsewhere:?}, so {expected:?} was due"
                ));
            }
        }
    }

    /// Moves a killed slot's session to the zombies and starts a new one.
    async fn replace(&mut self, slot: usize, how: Kill) {
        let store = self.slots[slot].store.clone();
        let name = self.slots[slot].session.name;
        let fresh = self.start_session(&store, name).await;
        self.install(slot, fresh, how);
    }

    /// Gives a slot whose session was killed its new session.
    fn install(&mut self, slot: usize, fresh: Session, how: Kill) {
        self.stats.kills += 1;
        let s = &mut self.slots[slot];
        let old = std::mem::replace(&mut s.session, fresh);
        s.dying = None;
        s.killed = false;
        s.in_flight = false;
        self.zombies.push(Zombie {
            slot,
            session: old,
            how,
        });
        if self.zombies.len() > ZOMBIES_KEPT {
            self.zombies.remove(0);
        }
    }

    // -- Foreign transactions ----------------------------------------------

    /// Draws a foreign transaction: its kind and the rows it locks (none
    /// that another open foreign transaction locks: they would wait for
    /// each other, not for the protocol), on a spare connection.
    fn plan_foreign(&mut self) -> Foreign {
        let client = self.spare.pop().expect("a spare foreign connection");
        let kind = match self.rng.below(10) {
            0..=3 => ForeignKind::ForUpdate,
            4..=6 => ForeignKind::ChildRow,
            _ => ForeignKind::PendingInsert,
        };
        let taken: BTreeSet<TaskId> = self
            .foreign
            .iter()
            .flat_map(|f| f.ids.iter().copied())
            .collect();
        let candidates: Vec<TaskId> = match self.rng.below(10) {
            // Tasks a live session holds (it may finish them, or be
            // killed, while they are locked).
            0..=5 => {
                let holders: Vec<usize> = (0..self.slots.len())
                    .filter(|&s| !self.slots[s].session.believed.is_empty())
                    .collect();
                if holders.is_empty() {
                    Vec::new()
                } else {
                    let slot = self.rng.pick(&holders);
                    self.slots[slot].session.believed.iter().copied().collect()
                }
            }
            // Open tasks, held or free or stranded.
            6..=8 => self
                .last
                .tasks
                .iter()
                .filter(|(_, t)| !t.finished)
                .map(|(&id, _)| id)
                .collect(),
            _ => self.inserted.iter().copied().collect(),
        };
        let candidates: Vec<TaskId> = candidates
            .into_iter()
            .filter(|t| !taken.contains(t))
            .collect();
        let mut ids = match kind {
            // How many to insert.
            ForeignKind::PendingInsert => vec![self.rng.between(1, 4) as TaskId],
            _ => {
                let k = self.rng.between(1, 4);
                self.rng.distinct(&candidates, k)
            }
        };
        ids.sort();
        Foreign {
            client,
            kind,
            ids,
            steps_left: self.rng.between(2, 12),
        }
    }

    /// Registers a foreign transaction that `open_foreign` began.
    fn opened_foreign(&mut self, f: Foreign, result: Result<(), tokio_postgres::Error>) {
        match result {
            Ok(()) => {
                self.note(format!(
                    "foreign {:?} {:?} for {} steps",
                    f.kind, f.ids, f.steps_left
                ));
                self.stats.foreign += 1;
                self.foreign.push(f);
            }
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                // Free-running: the rows were locked by calls under way for
                // longer than the foreign lock_timeout.
                self.stats
                    .lock_timeouts
                    .push(format!("foreign {:?} {:?}: {e}", f.kind, f.ids));
                self.closing.push(f);
            }
            Err(e) => self.fail(format!("foreign {:?} of {:?}: {e}", f.kind, f.ids)),
        }
    }

    /// Ends a foreign transaction that `close_foreign` ended.
    fn closed_foreign(
        &mut self,
        f: Foreign,
        commit: bool,
        result: Result<(), tokio_postgres::Error>,
    ) {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        if let Err(e) = result {
            self.fail(format!("foreign {:?} {:?}: {sql}: {e}", f.kind, f.ids));
        }
        if commit && f.kind == ForeignKind::PendingInsert {
            self.stats.inserted += f.ids.len();
            self.inserted.extend(&f.ids);
        }
        self.note(format!("foreign {:?} {:?}: {sql}", f.kind, f.ids));
        self.spare.push(f.client);
    }

    async fn foreign_begin(&mut self) {
        if self.foreign.len() >= FOREIGN_MAX {
            let i = self.rng.below(self.foreign.len());
            self.foreign_end(i).await;
            return;
        }
        let mut f = self.plan_foreign();
        let result = open_foreign(&mut f).await;
        self.opened_foreign(f, result);
        self.close_failed_foreign().await;
    }

    async fn foreign_end(&mut self, i: usize) {
        let f = self.foreign.remove(i);
        let commit = self.rng.percent(50);
        let result = close_foreign(&f, commit).await;
        self.closed_foreign(f, commit, result);
    }

    /// Rolls back the foreign transactions whose statement failed.
    async fn close_failed_foreign(&mut self) {
        while let Some(f) = self.closing.pop() {
            let result = close_foreign(&f, false).await;
            self.closed_foreign(f, false, result);
        }
    }

    async fn foreign_age(&mut self) {
        let mut i = 0;
        while i < self.foreign.len() {
            self.foreign[i].steps_left = self.foreign[i].steps_left.saturating_sub(1);
            if self.foreign[i].steps_left == 0 {
                self.foreign_end(i).await;
            } else {
                i += 1;
            }
        }
    }

    async fn foreign_end_all(&mut self) {
        while !self.foreign.is_empty() {
            self.foreign_end(0).await;
        }
    }

    // -- Checks ---------------------------------------------------------------

    /// Invariants 1, 2 (no finish the client was not told of), 4 and 6 (no
    /// task lost or finished twice) against the tables.
    async fn check(&mut self) {
        let db = DbState::read(&self.admin)
            .await
            .unwrap_or_else(|e| self.fail(format!("reading the tables: {e}")));
        for slot in &self.slots {
            let id = slot.session.id;
            if !db.live(id) {
                self.fail(format!(
                    "s{id} is live in the model but {} in the table",
                    db.describe(id)
                ));
            }
        }
        for z in &self.zombies {
            if db.live(z.session.id) {
                self.fail(format!(
                    "s{} was killed ({:?}) but is live in the table",
                    z.session.id, z.how
                ));
            }
        }
        let mut owner: BTreeMap<TaskId, SessionId> = BTreeMap::new();
        for slot in &self.slots {
            let s = &slot.session;
            for &t in &s.believed {
                if let Some(other) = owner.insert(t, s.id) {
                    self.fail(format!(
                        "invariant 1: task {t} is believed held by live sessions s{other} and s{}",
                        s.id
                    ));
                }
            }
            let actual = db.open_held_by(s.id);
            if actual != s.believed {
                self.fail(format!(
                    "invariant 1: live s{} believes it holds {:?}, the table gives it {actual:?}",
                    s.id, s.believed
                ));
            }
            let row = &db.sessions[&s.id];
            let held = row.held;
            if held as usize != actual.len() {
                self.fail(format!(
                    "invariant 4: live s{}'s held counter says {held}, it holds {} open tasks",
                    s.id,
                    actual.len()
                ));
            }
            if let Some(waiting) = row.waiting
                && waiting != (held < row.capacity)
            {
                self.fail(format!(
                    "invariant 4: live s{} holds {held} of its capacity {} but is marked {}",
                    s.id,
                    row.capacity,
                    if waiting { "waiting" } else { "not waiting" }
                ));
            }
        }
        let ids: BTreeSet<TaskId> = db.tasks.keys().copied().collect();
        if ids != self.inserted {
            let lost: Vec<_> = self.inserted.difference(&ids).collect();
            let unknown: Vec<_> = ids.difference(&self.inserted).collect();
            self.fail(format!(
                "the table's tasks are not those inserted: missing {lost:?}, unknown {unknown:?}"
            ));
        }
        for (id, t) in &db.tasks {
            match (t.finished, self.finished.get(id)) {
                (true, Some(&by)) if t.finished_by == Some(by) => {}
                (true, Some(&by)) => self.fail(format!(
                    "task {id} was returned finished to s{by}, the table says finished by {:?}",
                    t.finished_by
                )),
                (true, None) => self.fail(format!(
                    "invariant 2: task {id} is finished in the table (by {:?}, {}), but no finish returned it",
                    t.finished_by,
                    t.finished_by.map_or("-", |s| db.describe(s))
                )),
                (false, Some(&by)) => self.fail(format!(
                    "a finish of s{by} returned task {id}, which is still open"
                )),
                (false, None) => {}
            }
            if let Some(h) = t.holder.filter(|&h| !t.finished && !db.live(h)) {
                self.stats.ever_stranded.insert(*id);
                if !db.sessions.contains_key(&h) {
                    self.stats.ever_orphaned.insert(*id);
                }
            }
        }
        self.last = db;
    }

    /// Invariant 3: no open task names a session that is not live.
    fn check_no_strays(&self, after: &str) {
        let strays: Vec<String> = self
            .last
            .tasks
            .iter()
            .filter_map(|(id, t)| match t.holder {
                Some(h) if !t.finished && !self.last.live(h) => {
                    Some(format!("task {id} of s{h} ({})", self.last.describe(h)))
                }
                _ => None,
            })
            .collect();
        if !strays.is_empty() {
            self.fail(format!(
                "invariant 3: after {after}, open tasks are stranded with sessions that are not live: {}",
                strays.join(", ")
            ));
        }
    }

    /// Invariant 5 for one name, from the latest check.
    fn check_shares(&self, name: usize) {
        let mut sessions: Vec<(SessionId, usize)> = self
            .slots
            .iter()
            .filter(|s| s.session.name == name)
            .map(|s| (s.session.id, s.session.capacity as usize))
            .collect();
        sessions.sort();
        let w: usize = sessions.iter().map(|&(_, c)| c).sum();
        let holds: Vec<usize> = sessions
            .iter()
            .map(|&(id, _)| self.last.open_held_by(id).len())
            .collect();
        let free = self.last.free_open();
        let o = holds.iter().sum::<usize>() + free;
        let mut before = 0;
        let mut expected = Vec::new();
        for &(_, c) in &sessions {
            expected.push(if o >= w {
                c
            } else {
                o * (before + c) / w - o * before / w
            });
            before += c;
        }
        let table: Vec<String> = sessions
            .iter()
            .zip(&holds)
            .map(|(&(id, c), h)| format!("s{id} (capacity {c}) holds {h}"))
            .collect();
        let context = format!(
            "{}: {o} open tasks for it ({free} free), live capacity {w}: {}",
            NAMES[name],
            table.join(", ")
        );
        if o < w {
            if holds.iter().sum::<usize>() != o {
                self.fail(format!(
                    "invariant 5: the holdings do not add up to the open tasks; {context}"
                ));
            }
            for (&(id, c), &h) in sessions.iter().zip(&holds) {
                // |h - o*c/w| < 1
                if (h * w).abs_diff(o * c) >= w {
                    self.fail(format!(
                        "invariant 5: s{id} holds {h}, not within 1 of {o}*{c}/{w}; {context}"
                    ));
                }
            }
        }
        if holds != expected {
            self.fail(format!(
                "invariant 5: shares {holds:?}, the weighted shares are {expected:?}; {context}"
            ));
        }
    }

    // -- Phases ----------------------------------------------------------

    /// Foreign transactions end, every session of each name ticks with a
    /// sweep; then invariant 3.
    async fn settle(&mut self, why: &str) {
        self.stats.settles += 1;
        self.foreign_end_all().await;
        for t in self.last.tasks.values() {
            match t.holder {
                Some(h) if !t.finished && !self.last.live(h) => {
                    self.stats.stranded += 1;
                    self.stats.orphans += usize::from(!self.last.sessions.contains_key(&h));
                }
                _ => {}
            }
        }
        for name in 0..NAMES.len() {
            for slot in 0..self.slots.len() {
                if self.slots[slot].session.name == name {
                    let tick = self.plan_tick(slot, Vec::new());
                    self.run_calls(vec![tick]).await;
                    self.check().await;
                }
            }
        }
        self.check_no_strays(why);
    }

    async fn step(&mut self) {
        self.step += 1;
        self.stats.steps += 1;
        self.foreign_age().await;
        let n = self.slots.len();
        let plan = match self.rng.below(100) {
            0..=34 => {
                let slot = self.rng.below(n);
                vec![self.plan_get_work(slot)]
            }
            35..=49 => self.plan_group(),
            50..=59 => {
                let slot = self.rng.below(n);
                vec![self.plan_finish(slot)]
            }
            60..=66 => {
                let slot = self.rng.below(n);
                vec![self.plan_bump(slot)]
            }
            67..=72 => {
                // Half the time a session holding tasks a foreign
                // transaction locks: its reclaim must leave them behind.
                let locked: BTreeSet<TaskId> = self
                    .foreign
                    .iter()
                    .flat_map(|f| f.ids.iter().copied())
                    .collect();
                let holders: Vec<usize> = (0..n)
                    .filter(|&s| !self.slots[s].session.believed.is_disjoint(&locked))
                    .collect();
                let slot = if !holders.is_empty() && self.rng.percent(50) {
                    self.rng.pick(&holders)
                } else {
                    self.rng.below(n)
                };
                let victim = self.slots[slot].session.id;
                let kill = self.plan_kill(slot);
                self.run_calls(vec![kill]).await;
                self.check().await;
                let killed = self.zombies.len().checked_sub(1);
                match killed {
                    // Half the time its client, not told yet, carries on.
                    Some(i) if self.zombies[i].session.id == victim && self.rng.percent(50) => {
                        vec![self.plan_zombie_call(i, true)]
                    }
                    _ => return,
                }
            }
            73..=78 => match self.plan_zombie(true) {
                Some(p) => vec![p],
                None => {
                    let slot = self.rng.below(n);
                    vec![self.plan_bump(slot)]
                }
            },
            79..=85 => {
                self.foreign_begin().await;
                self.check().await;
                return;
            }
            86..=92 => {
                let n = self.rng.between(1, 8) as i32;
                vec![Planned {
                    slot: 0,
                    call: Call::Insert { n },
                    role: Role::Live,
                }]
            }
            93..=94 => {
                let slot = self.rng.below(n);
                vec![Planned {
                    slot,
                    call: Call::Reap,
                    role: Role::Live,
                }]
            }
            95..=96 => {
                self.note("settle".into());
                self.settle("a settle").await;
                return;
            }
            97 => {
                self.storm().await;
                return;
            }
            _ => {
                self.server_changed().await;
                self.check().await;
                return;
            }
        };
        self.run_calls(plan).await;
        self.check().await;
    }

    /// Marks 1 to 3 tasks of one session as handed out by another server
    /// (what a failover leaves: the session came over with the standby, its
    /// tasks' rows name the old primary): its finishes of them must be
    /// refused, and its next get_work must give them back. Not tasks a
    /// foreign transaction has locked (the UPDATE would wait for it).
    async fn server_changed(&mut self) {
        let foreign: BTreeSet<TaskId> = self
            .foreign
            .iter()
            .flat_map(|f| f.ids.iter().copied())
            .collect();
        let holders: Vec<usize> = (0..self.slots.len())
            .filter(|&s| {
                self.slots[s]
                    .session
                    .believed
                    .iter()
                    .any(|t| !foreign.contains(t))
            })
            .collect();
        if holders.is_empty() {
            return;
        }
        let slot = self.rng.pick(&holders);
        let mine: Vec<TaskId> = self.slots[slot]
            .session
            .believed
            .iter()
            .copied()
            .filter(|t| !foreign.contains(t))
            .collect();
        let k = self.rng.between(1, mine.len().min(3));
        let ids = self.rng.distinct(&mine, k);
        self.note(format!(
            "server changed for s{}'s tasks {ids:?}",
            self.slots[slot].session.id
        ));
        self.admin
            .execute(
                "UPDATE example_task SET sl_server = '2000-01-01 00:00:00+00' WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .unwrap_or_else(|e| self.fail(format!("marking tasks as another server's: {e}")));
        self.stats.marked_elsewhere += ids.len();
    }

    /// Strands tasks on purpose: a foreign transaction locks tasks of 2 to
    /// 4 sessions, which are killed; the others tick (their reclaims must
    /// leave the locked tasks behind), maybe a reap makes them orphans; the
    /// lock goes, and a settle must free every one (invariant 3).
    async fn storm(&mut self) {
        self.stats.storms += 1;
        self.note("stranding storm".into());
        self.foreign_end_all().await;
        let holders: Vec<usize> = (0..self.slots.len())
            .filter(|&s| !self.slots[s].session.believed.is_empty())
            .collect();
        let k = self.rng.between(2, 4);
        let victims = self.rng.distinct(&holders, k);
        let mut ids = Vec::new();
        for &v in &victims {
            let mine: Vec<TaskId> = self.slots[v].session.believed.iter().copied().collect();
            let n = self.rng.between(1, 2);
            ids.extend(self.rng.distinct(&mine, n));
        }
        ids.sort();
        let mut f = Foreign {
            client: self.spare.pop().expect("a spare foreign connection"),
            kind: ForeignKind::ForUpdate,
            ids,
            steps_left: usize::MAX,
        };
        let result = open_foreign(&mut f).await;
        self.opened_foreign(f, result);
        self.close_failed_foreign().await;
        self.check().await;
        for v in victims {
            let kill = self.plan_kill(v);
            self.run_calls(vec![kill]).await;
            self.check().await;
        }
        for name in 0..NAMES.len() {
            let slots: Vec<usize> = (0..self.slots.len())
                .filter(|&s| self.slots[s].session.name == name)
                .collect();
            let slot = self.rng.pick(&slots);
            let tick = self.plan_tick(slot, Vec::new());
            self.run_calls(vec![tick]).await;
            self.check().await;
        }
        if self.rng.percent(50) {
            let slot = self.rng.below(self.slots.len());
            self.run_calls(vec![Planned {
                slot,
                call: Call::Reap,
                role: Role::Live,
            }])
            .await;
            self.check().await;
        }
        self.settle("a stranding storm").await;
    }

    /// Settles, checks the shares, drains every task and checks that none
    /// was lost.
    async fn finish(&mut self) {
        self.phase = "settle";
        self.settle("the final settle").await;

        // Invariant 5: no foreign locks, no inserts; each name's sessions
        // tick twice, and hold their weighted shares.
        self.phase = "shares";
        for name in 0..NAMES.len() {
            let slots: Vec<usize> = (0..self.slots.len())
                .filter(|&s| self.slots[s].session.name == name)
                .collect();
            for _round in 0..2 {
                let order = self.rng.distinct(&slots, slots.len());
                for slot in order {
                    self.step += 1;
                    let tick = self.plan_tick(slot, Vec::new());
                    self.run_calls(vec![tick]).await;
                    self.check().await;
                }
            }
            self.check_shares(name);
        }
        for name in 0..NAMES.len() {
            self.check_shares(name);
        }

        // Invariant 6: drain, each session finishing what it holds.
        self.phase = "drain";
        let mut rounds = 0;
        while self.last.open() > 0 {
            rounds += 1;
            if rounds > 500 {
                self.fail(format!(
                    "{} open tasks left after 500 rounds of draining",
                    self.last.open()
                ));
            }
            for slot in 0..self.slots.len() {
                self.step += 1;
                let all: Vec<TaskId> = self.slots[slot].session.believed.iter().copied().collect();
                let tick = self.plan_tick(slot, all);
                self.run_calls(vec![tick]).await;
                self.check().await;
            }
        }
        let done: BTreeSet<TaskId> = self.finished.keys().copied().collect();
        if done != self.inserted {
            let never: Vec<_> = self.inserted.difference(&done).collect();
            self.fail(format!(
                "invariant 6: tasks never returned by a finish: {never:?}"
            ));
        }
        self.check_no_strays("the drain");
    }
}

// ---------------------------------------------------------------------------
// Free-running: every session's actor and a chaos actor call at will;
// the invariants are checked as answers arrive (1, 2, 6) and at the end of
// every epoch, when all are quiet (all of them).
// ---------------------------------------------------------------------------

/// A short pause, so that the actors' calls overlap in varying ways.
async fn pause(rng: &mut Rng) {
    match rng.below(4) {
        0 => tokio::task::yield_now().await,
        1 => {}
        _ => tokio::time::sleep(Duration::from_micros(rng.between(100, 3000) as u64)).await,
    }
}

fn lock(shared: &Mutex<World>) -> std::sync::MutexGuard<'_, World> {
    // A panic under the lock fails the test by itself: report that one.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One session slot's actor: get_work, finish_tasks and heartbeats of its
/// session, and a new session when a kill took the old one.
async fn session_actor(shared: &Mutex<World>, slot: usize, mut rng: Rng, iterations: usize) {
    let (store, admin) = {
        let w = lock(shared);
        (w.slots[slot].store.clone(), w.admin.clone())
    };
    for _ in 0..iterations {
        pause(&mut rng).await;
        let (killed, name, how) = {
            let w = lock(shared);
            let s = &w.slots[slot];
            (s.killed, s.session.name, s.dying.unwrap_or(Kill::Expire))
        };
        if killed && rng.percent(50) {
            // Not told yet: the client carries on with its killed session.
            let planned = {
                let mut w = lock(shared);
                let s = w.slots[slot].session.clone();
                let call = match rng.below(3) {
                    0 => Call::GetWork {
                        session: s.lease,
                        finished: s.believed.iter().copied().collect(),
                        running: Vec::new(),
                        sweep: true,
                        known: None,
                    },
                    1 => Call::Finish {
                        session: s.lease,
                        ids: s.believed.iter().copied().collect(),
                    },
                    _ => Call::Bump { session: s.lease },
                };
                w.note(format!("{call} (killed) begins"));
                Planned {
                    slot,
                    call,
                    role: Role::Zombie,
                }
            };
            let outcome = exec(&store, &admin, &planned.call).await;
            let mut w = lock(shared);
            w.step += 1;
            let (mut kills, mut lost) = (Vec::new(), Vec::new());
            let result = w.apply(
                &planned,
                outcome,
                &BTreeSet::new(),
                false,
                &mut kills,
                &mut lost,
            );
            w.note(format!("{}  =>  {result}", planned.describe()));
        }
        if killed {
            let capacity = rng.between(1, 10) as u32;
            let started = store
                .start_session(&SessionStart::new(NAMES[name], TTL, capacity))
                .await;
            let mut w = lock(shared);
            let lease = started.unwrap_or_else(|e| w.fail(format!("start_session: {e}")));
            w.note(format!(
                "started s{} ({}, capacity {capacity})",
                lease.id, NAMES[name]
            ));
            let fresh = Session {
                id: lease.id,
                lease,
                name,
                capacity,
                believed: BTreeSet::new(),
            };
            w.install(slot, fresh, how);
            continue;
        }
        let roll = rng.below(100);
        let mut planned = {
            let mut w = lock(shared);
            let p = w.with_rng(&mut rng, |w| match roll {
                0..=59 => w.plan_get_work(slot),
                60..=84 => w.plan_finish(slot),
                _ => w.plan_bump(slot),
            });
            if matches!(p.call, Call::GetWork { .. }) {
                w.slots[slot].in_flight = true;
            }
            w.note(format!("{} begins", p.call));
            p
        };
        let outcome = exec(&store, &admin, &planned.call).await;
        let mut w = lock(shared);
        w.step += 1;
        let s = &mut w.slots[slot];
        s.in_flight = false;
        // Killed while the call ran: it may have come before the kill.
        planned.role = if s.dying.is_some() || s.killed {
            Role::Racing
        } else {
            Role::Live
        };
        let (mut kills, mut lost) = (Vec::new(), Vec::new());
        let result = w.apply(
            &planned,
            outcome,
            &BTreeSet::new(),
            false,
            &mut kills,
            &mut lost,
        );
        w.note(format!("{}  =>  {result}", planned.describe()));
        if planned.role == Role::Live && matches!(planned.call, Call::GetWork { .. }) {
            w.check_disjoint(slot);
        }
    }
}

/// Kills, calls of killed sessions, foreign transactions, inserts and
/// reaps, while the sessions' actors run.
async fn chaos_actor(shared: &Mutex<World>, mut rng: Rng, iterations: usize) {
    let admin = lock(shared).admin.clone();
    for _ in 0..iterations {
        pause(&mut rng).await;
        let roll = rng.below(100);
        match roll {
            // A kill: the model counts the session as dying from here on,
            // so that nothing it holds is counted against the others.
            0..=19 => {
                let planned = {
                    let mut w = lock(shared);
                    let alive: Vec<usize> = (0..w.slots.len())
                        .filter(|&s| w.slots[s].dying.is_none() && !w.slots[s].killed)
                        .collect();
                    if alive.len() < 2 {
                        continue;
                    }
                    let victim = rng.pick(&alive);
                    let p = w.with_rng(&mut rng, |w| w.plan_kill(victim));
                    w.slots[victim].dying = Some(match p.call {
                        Call::End { .. } => Kill::End,
                        _ => Kill::Expire,
                    });
                    w.note(format!("{} begins", p.describe()));
                    p
                };
                let store = lock(shared).slots[planned.slot].store.clone();
                let outcome = exec(&store, &admin, &planned.call).await;
                let mut w = lock(shared);
                w.step += 1;
                let (mut kills, mut lost) = (Vec::new(), Vec::new());
                let result = w.apply(
                    &planned,
                    outcome,
                    &BTreeSet::new(),
                    false,
                    &mut kills,
                    &mut lost,
                );
                w.note(format!("{}  =>  {result}", planned.describe()));
                let s = &mut w.slots[planned.slot];
                if kills.is_empty() {
                    s.dying = None; // a lock timeout: it lives on
                } else {
                    s.killed = true;
                }
            }
            // A call of a killed session, an insert or a reap.
            20..=59 => {
                let planned = {
                    let mut w = lock(shared);
                    w.with_rng(&mut rng, |w| match roll {
                        20..=39 => w.plan_zombie(false),
                        40..=54 => Some(Planned {
                            slot: 0,
                            call: Call::Insert {
                                n: w.rng.between(1, 6) as i32,
                            },
                            role: Role::Live,
                        }),
                        _ => Some(Planned {
                            slot: w.rng.below(w.slots.len()),
                            call: Call::Reap,
                            role: Role::Live,
                        }),
                    })
                };
                let Some(planned) = planned else { continue };
                let store = lock(shared).slots[planned.slot].store.clone();
                let outcome = exec(&store, &admin, &planned.call).await;
                let mut w = lock(shared);
                w.step += 1;
                let (mut kills, mut lost) = (Vec::new(), Vec::new());
                let result = w.apply(
                    &planned,
                    outcome,
                    &BTreeSet::new(),
                    false,
                    &mut kills,
                    &mut lost,
                );
                w.note(format!("{}  =>  {result}", planned.describe()));
            }
            // A foreign transaction begins or ends.
            _ => {
                let ending = {
                    let mut w = lock(shared);
                    for f in &mut w.foreign {
                        f.steps_left = f.steps_left.saturating_sub(1);
                    }
                    match w.foreign.iter().position(|f| f.steps_left == 0) {
                        Some(i) => Some(w.foreign.remove(i)),
                        None if w.foreign.len() >= FOREIGN_MAX => Some(w.foreign.remove(0)),
                        None => None,
                    }
                };
                match ending {
                    Some(f) => {
                        let commit = rng.percent(50);
                        let result = close_foreign(&f, commit).await;
                        lock(shared).closed_foreign(f, commit, result);
                    }
                    None => {
                        let mut f = {
                            let mut w = lock(shared);
                            w.with_rng(&mut rng, |w| w.plan_foreign())
                        };
                        let result = open_foreign(&mut f).await;
                        let failed = {
                            let mut w = lock(shared);
                            w.opened_foreign(f, result);
                            w.closing.pop()
                        };
                        if let Some(f) = failed {
                            let result = close_foreign(&f, false).await;
                            lock(shared).closed_foreign(f, false, result);
                        }
                    }
                }
            }
        }
    }
}

async fn run_free(seed: u64, epochs: usize, iterations: usize) -> String {
    let mut world = World::new(seed, "free_running_interleavings_keep_every_invariant").await;
    for epoch in 0..epochs {
        world.phase = "free";
        world.alone = false;
        let n = world.slots.len();
        let actor_rng = |actor: usize| {
            Rng::new(seed ^ ((epoch * 64 + actor + 1) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        };
        let shared = Mutex::new(world);
        {
            let mut actors: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>> =
                Vec::new();
            for slot in 0..n {
                actors.push(Box::pin(session_actor(
                    &shared,
                    slot,
                    actor_rng(slot),
                    iterations,
                )));
            }
            actors.push(Box::pin(chaos_actor(&shared, actor_rng(n), iterations)));
            join_all(actors).await;
        }
        world = shared.into_inner().unwrap_or_else(|p| p.into_inner());
        // Quiet: every answer is in. Killed slots get their new sessions,
        // and everything is checked against the tables.
        world.phase = "epoch end";
        world.note(format!("epoch {epoch} ends"));
        for slot in 0..world.slots.len() {
            if world.slots[slot].killed {
                let how = world.slots[slot].dying.unwrap_or(Kill::Expire);
                world.replace(slot, how).await;
            }
        }
        world.check().await;
        if world.rng.percent(40) {
            world.note("settle".into());
            world.settle("an epoch's settle").await;
        }
        world.stats.steps = world.step;
    }
    world.finish().await;
    world.summary()
}

async fn run_stepwise(seed: u64, steps: usize) -> String {
    let mut world = World::new(seed, "stepwise_interleavings_keep_every_invariant").await;
    world.phase = "step";
    for _ in 0..steps {
        world.step().await;
    }
    world.finish().await;
    world.summary()
}

/// Epochs of the free-running shape, and each actor's calls per epoch.
const EPOCHS: usize = 6;
const ITERATIONS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_running_interleavings_keep_every_invariant() {
    let seeds = seeds();
    eprintln!(
        "free-running interleavings: seeds {seeds:?}, {EPOCHS} epochs of {ITERATIONS} calls per actor (replay one with SESSION_LOCK_SEED=<seed>)"
    );
    let started = Instant::now();
    let summaries = join_all(seeds.iter().map(|&seed| run_free(seed, EPOCHS, ITERATIONS))).await;
    for s in &summaries {
        eprintln!("free-running interleavings {s}");
    }
    eprintln!(
        "free-running interleavings: {} seeds in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stepwise_interleavings_keep_every_invariant() {
    let seeds = seeds();
    let steps = steps();
    eprintln!(
        "stepwise interleavings: seeds {seeds:?}, {steps} steps each (replay one with SESSION_LOCK_SEED=<seed>)"
    );
    let started = Instant::now();
    let summaries = join_all(seeds.iter().map(|&seed| run_stepwise(seed, steps))).await;
    for s in &summaries {
        eprintln!("stepwise interleavings {s}");
    }
    eprintln!(
        "stepwise interleavings: {} seeds in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
}
