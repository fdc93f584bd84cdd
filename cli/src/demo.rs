//! `session-lock demo`: the whole idea, live, in well under a minute.
//!
//! It starts a throwaway PostgreSQL (or uses `DATABASE_URL`), applies the
//! migrations, starts `--runners` `session-lock run` processes of one
//! runner name, and seeds `--tasks` rows into `public.example_task`. Then it
//! shows, from the database a few times a second, how many tasks each
//! session holds and has finished: the tasks spread fairly over the runners.
//!
//! At 30 % it kills the runner holding the most tasks with `SIGKILL` and
//! measures the failover: the time until none of the open tasks names the
//! dead session any more (its lease runs out after the TTL, then the next
//! tick of a survivor reclaims its tasks). At 60 % it starts a fresh runner,
//! which takes its share from its first tick. When every task is finished it
//! stops the runners with `SIGTERM` (they drain and end their sessions) and
//! prints a summary: per session the tasks finished and executions, the
//! duplicate executions (tasks the killed runner had started: the library
//! is at-least-once), lost tasks (must be 0), failover time and throughput.
//! `--json` prints that summary as one JSON object on stdout instead, and
//! sends everything else to stderr.
//!
//! With `DATABASE_URL` the demo uses that database: it applies the
//! migrations there, refuses to run if `example_task` already has open tasks
//! (its runners would run them) or if runners of the names `demo` or
//! `example` are alive, counts only the tasks it inserted (their id range),
//! and leaves its finished rows in `example_task` and `example_task_run`.
//!
//! Exit status 1, with a one-line error on stderr, if a task was lost or
//! anything failed, including the `--timeout-s` deadline (default 5 min).
//! On every way out the runners are killed and the throwaway server removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use session_lock::{ErrorChain, Migrator, RunnerConfig};
use session_lock_testkit::embedded::EmbeddedPostgres;
use session_lock_testkit::{Fleet, RunnerCommand, RunnerEvent, RunnerProcess};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_postgres::Client;

/// The runner name of the demo's runner processes.
const RUNNER_NAME: &str = "demo";
/// Runner names whose live sessions would take the demo's tasks.
const RIVAL_NAMES: &[&str] = &[RUNNER_NAME, "example"];
/// The fraction of tasks finished at which one runner is killed.
const KILL_AT: f64 = 0.30;
/// The fraction of tasks finished at which a fresh runner is started.
const JOIN_AT: f64 = 0.60;
/// How often the progress is read from the database.
const REFRESH: Duration = Duration::from_millis(200);
/// How often a plain progress line is printed when output is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(1);
/// How often the killed session's open tasks are counted.
const FAILOVER_POLL: Duration = Duration::from_millis(20);
/// How long a runner may take to print its first session id.
const RUNNER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// The runners' drain timeout on SIGTERM.
const RUNNER_DRAIN_MS: u64 = 10_000;
/// How long the runners may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a runner whose stdout closed may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past `--timeout-s` the demo is cut short if a step hangs.
const BACKSTOP: Duration = Duration::from_secs(60);
/// Width of the progress bars.
const BAR_WIDTH: usize = 26;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Tasks to seed.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    tasks: u32,
    /// Runner processes to start (one more joins later, unless --no-kill).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    runners: u32,
    /// Do not kill a runner part-way (and start no fresh one).
    #[arg(long)]
    no_kill: bool,
    /// Print the summary as one JSON object on stdout; everything else goes to stderr.
    #[arg(long)]
    json: bool,
    /// Simulated work per task, in milliseconds.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    work_ms: u64,
    /// Session TTL in milliseconds: a killed runner's tasks move after about this long.
    #[arg(long, default_value_t = 3000)]
    ttl_ms: u64,
    /// Heartbeat interval in milliseconds (at most ttl / 3).
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// Tick interval in milliseconds.
    #[arg(long, default_value_t = 200)]
    tick_ms: u64,
    /// Most tasks a session holds at once: every runner's capacity.
    #[arg(long, default_value_t = 10)]
    max_tasks: u32,
    /// Give up (kill the runners, report what is left, exit 1) after this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout_s: u64,
    /// Use this database instead of a throwaway PostgreSQL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

pub(crate) fn run(args: DemoArgs) -> Result<(), String> {
    check_args(&args)?;
    let out = Out::new(args.json);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let mut server: Option<EmbeddedPostgres> = None;
    // Outlives the demo: dropping bars can erase them from the screen.
    let mut board = Board::new(&out, args.tasks);
    // The runners live in `demo`'s future: it kills them whenever it ends or
    // is dropped (on a signal), before the server goes below.
    let mut interrupted = false;
    let outcome = rt.block_on(async {
        let mut signals = Signals::new()?;
        tokio::select! {
            outcome = demo(&args, &out, &mut server, &mut board) => outcome,
            name = signals.recv() => {
                interrupted = true;
                Err(format!("interrupted by {name}: the runners were killed"))
            }
            // A backstop: every step has its own timeout within the deadline.
            _ = tokio::time::sleep(Duration::from_secs(args.timeout_s) + BACKSTOP) => Err(format!(
                "the demo did not end within {} s (--timeout-s) plus {} s: the runners were killed",
                args.timeout_s,
                BACKSTOP.as_secs()
            )),
        }
    });
    // Waits for a server start still running on the blocking pool (then drops it).
    drop(rt);
    // The bars stay on screen as they are; what follows is printed below them.
    if interrupted {
        // The terminal echoed ^C below the bars: a redraw would now leave a
        // stray copy of the first bar, so leave them as they were drawn.
        board.freeze();
        if out.multi.is_some() {
            out.plain().line("");
        }
    } else {
        board.finish();
    }
    let out = out.plain();
    if let Some(pg) = server.take() {
        drop(pg);
        out.say("PostgreSQL stopped, its data directory removed");
    }
    let outcome = outcome?;
    if let Some(summary) = &outcome.summary {
        if args.json {
            let mut stdout = io::stdout().lock();
            let _ = writeln!(stdout, "{}", summary.to_json());
        }
        out.say(&summary.table());
    }
    if let Some(e) = outcome.error {
        return Err(e);
    }
    match &outcome.summary {
        Some(s) if s.lost > 0 => Err(format!(
            "{} of {} tasks were lost (not finished)",
            s.lost, s.tasks
        )),
        _ => Ok(()),
    }
}

/// Rejects impossible settings before anything starts.
fn check_args(args: &DemoArgs) -> Result<(), String> {
    let ms = Duration::from_millis;
    RunnerConfig::builder(RUNNER_NAME)
        .ttl(ms(args.ttl_ms))
        .heartbeat(ms(args.heartbeat_ms))
        .tick(ms(args.tick_ms))
        .jitter(ms(args.tick_ms))
        .max_tasks(args.max_tasks)
        .drain_timeout(ms(RUNNER_DRAIN_MS))
        .build()
        .map_err(|e| format!("invalid setting: {e}"))?;
    if let Some(url) = args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        url.parse::<tokio_postgres::Config>().map_err(|e| {
            format!("DATABASE_URL is not a valid PostgreSQL URL or key=value string: {e}")
        })?;
    }
    if !args.no_kill && args.runners < 2 {
        return Err(
            "--runners must be at least 2 so that survivors can take over the killed runner's tasks (or pass --no-kill)"
                .into(),
        );
    }
    Ok(())
}

/// What `demo` ends with: the summary if it got that far, and the error if any.
struct Outcome {
    summary: Option<Summary>,
    error: Option<String>,
}

async fn demo(
    args: &DemoArgs,
    out: &Out,
    server: &mut Option<EmbeddedPostgres>,
    board: &mut Board,
) -> Result<Outcome, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    out.say(&format!(
        "session-lock demo: {} tasks shared by {} runner processes\n  \
         a task takes {} ms of work; a session holds at most {} tasks\n  \
         session lease (ttl) {} ms, heartbeat {} ms, tick {} ms{}",
        args.tasks,
        args.runners,
        args.work_ms,
        args.max_tasks,
        args.ttl_ms,
        args.heartbeat_ms,
        args.tick_ms,
        if args.no_kill {
            ""
        } else {
            "\n  at 30 % one runner is killed, at 60 % a fresh one joins"
        }
    ));

    // The database.
    let external = args.database_url.clone().filter(|u| !u.trim().is_empty());
    let url = match &external {
        Some(url) => {
            out.say("using the database in DATABASE_URL");
            url.clone()
        }
        None => {
            out.say("starting a throwaway PostgreSQL (initdb + postgres)...");
            let started = Instant::now();
            let pg = tokio::task::spawn_blocking(EmbeddedPostgres::start)
                .await
                .map_err(|e| format!("starting PostgreSQL: {e}"))?
                .map_err(|e| format!("cannot start a throwaway PostgreSQL: {e}"))?;
            let url = pg.url("postgres");
            out.say(&format!(
                "PostgreSQL ready on {}:{} in {} (removed at the end)",
                pg.host(),
                pg.port(),
                secs(started.elapsed()),
            ));
            *server = Some(pg);
            url
        }
    };
    let mut client = connect(&url).await?;
    migrate(&mut client).await?;
    out.say("migrations applied (schema session_lock, tables example_task*)");
    if external.is_some() {
        check_database_is_free(&client).await?;
    }

    // The runners.
    let log_dir = LogDir::create()?;
    let command = runner_command(&url, args)?;
    let mut fleet = Fleet::new();
    let started = Instant::now();
    for _ in 0..args.runners {
        spawn_runner(&mut fleet, &command, log_dir.path())?;
    }
    let start_by = deadline.min(Instant::now() + RUNNER_START_TIMEOUT);
    while fleet.processes().iter().any(|p| p.sessions().is_empty()) {
        let event = tokio::time::timeout_at(start_by.into(), fleet.next_event())
            .await
            .map_err(|_| {
                format!(
                    "the runners did not all start a session within {}s{}",
                    RUNNER_START_TIMEOUT.as_secs(),
                    log_hint(&fleet)
                )
            })?;
        on_event(&mut fleet, event, None, board).await?;
    }
    out.say(&format!(
        "{} runners up in {}, each holding a session: a lease kept by heartbeats",
        args.runners,
        secs(started.elapsed())
    ));

    // The tasks.
    let range = seed(&client, args.tasks).await?;
    let seeded = Instant::now();
    board.start(seeded);
    out.say(&format!(
        "seeded {} tasks (example_task ids {}..={})\n  \
         every tick a session takes its share, weighted by capacity (its max_tasks):\n  \
         floor(open * (before + C) / W) - floor(open * before / W), at most C, where C is\n  \
         its capacity, W the live sessions' total and before that of the older ones;\n  \
         every demo runner has capacity {}: shares within one task of open / live sessions",
        args.tasks, range.0, range.1, args.max_tasks
    ));

    let mut run = Run {
        args,
        client: &client,
        range,
        fleet,
        command,
        log_dir: log_dir.path(),
        board,
        seeded,
        deadline,
        kill_wanted: None,
        kill: None,
        fresh: None,
        finished_at: None,
    };
    let error = run.drive().await.err();
    let Run {
        mut fleet,
        kill,
        fresh,
        finished_at,
        ..
    } = run;
    let mut error = error;
    let mut stage = Stage::Killed;
    if error.is_none() {
        out.say("stopping the runners with SIGTERM: they drain and end their sessions");
        stage = Stage::Terminated;
        let stopping = Instant::now();
        match fleet.terminate_all(STOP_TIMEOUT).await {
            Ok(()) => out.say(&format!("runners exited in {}", secs(stopping.elapsed()))),
            Err(e) => error = Some(e),
        }
    }
    fleet.kill_all();
    let duration = finished_at.unwrap_or_else(Instant::now) - seeded;
    let fresh_pid = fresh.as_ref().map(|f| f.pid);
    let rebalance = fresh.and_then(|f| f.first_share);
    let summary = summarize(
        &client,
        range,
        &fleet,
        kill.as_ref(),
        fresh_pid,
        duration,
        args,
    )
    .await;
    let summary = summary.map(|s| Summary { rebalance, ..s });
    let snapshot = Snapshot::read(&client, range).await;
    if let Ok(snapshot) = &snapshot {
        board.update(snapshot, &fleet, kill.as_ref(), fresh_pid, stage);
    }
    board.finish();
    drop(fleet);
    drop(log_dir);
    match summary {
        Ok(summary) => Ok(Outcome {
            summary: Some(summary),
            error,
        }),
        Err(e) => Err(error.unwrap_or(e)),
    }
}

/// The kill and its failover.
struct Kill {
    pid: u32,
    session: i64,
    held: u64,
    at: Instant,
    failover: Option<Duration>,
}

/// The fresh runner started part-way.
struct Fresh {
    pid: u32,
    started: Instant,
    session: Option<(i64, Instant)>,
    first_share: Option<Duration>,
}

/// The running phase: from the seed until every task is finished.
struct Run<'a> {
    args: &'a DemoArgs,
    client: &'a Client,
    range: (i64, i64),
    fleet: Fleet,
    /// Starts one more runner (with `spawn_runner`).
    command: RunnerCommand,
    log_dir: &'a Path,
    board: &'a mut Board,
    seeded: Instant,
    deadline: Instant,
    /// When the kill was due; it happens at the next poll that finds a
    /// runner in the middle of its tasks.
    kill_wanted: Option<Instant>,
    kill: Option<Kill>,
    fresh: Option<Fresh>,
    finished_at: Option<Instant>,
}

impl Run<'_> {
    async fn drive(&mut self) -> Result<(), String> {
        let total = u64::from(self.args.tasks);
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(FAILOVER_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let failover_pending = self.kill.as_ref().is_some_and(|k| k.failover.is_none());
            let kill_pending = self.kill.is_none() && self.kill_wanted.is_some();
            tokio::select! {
                event = self.fleet.next_event() => {
                    let fresh = self.fresh.as_ref().map(|f| f.pid);
                    on_event(&mut self.fleet, event, fresh, self.board).await?;
                    self.note_fresh_session();
                }
                _ = poll.tick(), if failover_pending || kill_pending => match self.kill_wanted {
                    Some(wanted) if self.kill.is_none() => self.try_kill(wanted).await?,
                    _ => self.poll_failover().await?,
                },
                _ = refresh.tick() => {
                    let snap = Snapshot::read(self.client, self.range).await?;
                    let fresh = self.fresh.as_ref().map(|f| f.pid);
                    self.board.update(&snap, &self.fleet, self.kill.as_ref(), fresh, Stage::Running);
                    self.note_fresh_share(&snap);
                    let done = snap.finished as f64 / total as f64;
                    if !self.args.no_kill && self.kill_wanted.is_none() && done >= KILL_AT {
                        self.kill_wanted = Some(Instant::now());
                    }
                    if self.kill.is_some() && self.fresh.is_none() && done >= JOIN_AT {
                        self.start_fresh()?;
                    }
                    if snap.finished >= total && self.finished_at.is_none() {
                        self.finished_at = Some(Instant::now());
                        self.board.out.say(&format!(
                            "all {total} tasks finished, {} after seeding",
                            secs(self.seeded.elapsed())
                        ));
                    }
                    let failover_done = self.kill_wanted.is_none()
                        || self.kill.as_ref().is_some_and(|k| k.failover.is_some());
                    let fresh_up = self.fresh.as_ref().is_none_or(|f| f.session.is_some());
                    if self.finished_at.is_some() && failover_done && fresh_up {
                        return Ok(());
                    }
                    if Instant::now() >= self.deadline {
                        return Err(format!(
                            "timed out after {} s with {} of {} tasks still open",
                            self.args.timeout_s,
                            total - snap.finished.min(total),
                            total
                        ));
                    }
                }
            }
        }
    }

    /// Kills the live runner that is running the most tasks right now (read
    /// just before the kill, so that it dies in the middle of its work and
    /// its tasks really have to move). Waits for the next poll while no
    /// runner runs any, for at most a second or two.
    async fn try_kill(&mut self, wanted: Instant) -> Result<(), String> {
        let live: Vec<(u32, i64)> = self
            .fleet
            .processes()
            .iter()
            .filter(|p| p.is_alive())
            .filter_map(|p| Some((p.pid(), *p.sessions().last()?)))
            .collect();
        let sessions: Vec<i64> = live.iter().map(|&(_, s)| s).collect();
        let rows = self
            .client
            .query(
                "SELECT t.session_id, count(*), count(*) FILTER (WHERE EXISTS ( \
                        SELECT 1 FROM example_task_run r \
                         WHERE r.task_id = t.id AND r.session_id = t.session_id \
                           AND r.finished_at IS NULL)) \
                   FROM example_task t \
                  WHERE t.session_id = ANY($1) AND t.finished_at IS NULL \
                  GROUP BY 1",
                &[&sessions],
            )
            .await
            .map_err(|e| db_error("choosing the runner to kill", &e))?;
        let counts: HashMap<i64, (i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(2), r.get(1))))
            .collect();
        let best = live
            .iter()
            .map(|&(pid, s)| (pid, s, counts.get(&s).copied().unwrap_or((0, 0))))
            .max_by_key(|&(_, _, running_held)| running_held);
        let Some((pid, session, (running, held))) = best else {
            return Ok(());
        };
        let waited = wanted.elapsed();
        let busy_enough = if self.args.work_ms > 0 {
            running > 0
        } else {
            held > 0
        };
        if (!busy_enough && waited < Duration::from_secs(1))
            || (held == 0 && waited < Duration::from_secs(2))
        {
            return Ok(());
        }
        if let Some(p) = self.fleet.get_mut(pid) {
            p.kill()
                .map_err(|e| format!("killing runner pid {pid}: {e}"))?;
        }
        let at = Instant::now();
        // What it held when it died (a finish it sent just before may still
        // have committed): the tasks that must move.
        let held: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM example_task WHERE session_id = $1 AND finished_at IS NULL",
                &[&session],
            )
            .await
            .map_err(|e| db_error("counting the killed session's tasks", &e))?
            .get(0);
        let held = u64::try_from(held).unwrap_or(0);
        self.board.out.say(&format!(
            "killed runner pid {pid} (session {session}) holding {held} tasks, with SIGKILL\n  \
             its lease runs out after the ttl ({} ms); then a survivor frees its tasks",
            self.args.ttl_ms
        ));
        self.kill = Some(Kill {
            pid,
            session,
            held,
            at,
            failover: None,
        });
        Ok(())
    }

    async fn poll_failover(&mut self) -> Result<(), String> {
        let Some(kill) = self.kill.as_mut() else {
            return Ok(());
        };
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM example_task WHERE session_id = $1 AND finished_at IS NULL",
                &[&kill.session],
            )
            .await
            .map_err(|e| db_error("counting the killed session's tasks", &e))?;
        let left: i64 = row.get(0);
        if left == 0 {
            let took = kill.at.elapsed();
            kill.failover = Some(took);
            self.board.out.say(&format!(
                "failover: session {}'s tasks freed {} after the kill; survivors run them",
                kill.session,
                secs(took),
            ));
        }
        Ok(())
    }

    fn start_fresh(&mut self) -> Result<(), String> {
        let pid = spawn_runner(&mut self.fleet, &self.command, self.log_dir)?;
        self.board.out.say(&format!(
            "started a fresh runner, pid {pid}: it joins with a new session"
        ));
        self.fresh = Some(Fresh {
            pid,
            started: Instant::now(),
            session: None,
            first_share: None,
        });
        Ok(())
    }

    fn note_fresh_session(&mut self) {
        let Some(fresh) = self.fresh.as_mut() else {
            return;
        };
        if fresh.session.is_some() {
            return;
        }
        let Some(&session) = self.fleet.get(fresh.pid).and_then(|p| p.sessions().last()) else {
            return;
        };
        fresh.session = Some((session, Instant::now()));
        self.board.out.say(&format!(
            "runner pid {} holds session {session}, {} after it was started",
            fresh.pid,
            secs(fresh.started.elapsed())
        ));
    }

    fn note_fresh_share(&mut self, snap: &Snapshot) {
        let Some(fresh) = self.fresh.as_mut() else {
            return;
        };
        let Some((session, at)) = fresh.session else {
            return;
        };
        if fresh.first_share.is_none() && (snap.held(session) > 0 || snap.done_by(session) > 0) {
            let took = at.elapsed();
            fresh.first_share = Some(took);
            let open = snap.open;
            // The killed session counts as live until its lease runs out.
            let expiring = self.kill.as_ref().is_some_and(|k| k.failover.is_none());
            let live = self
                .fleet
                .processes()
                .iter()
                .filter(|p| p.is_alive())
                .count() as u64
                + u64::from(expiring);
            // Shares are weighted by capacity, and every demo runner has the
            // same: the newest session comes last (before = W - C), so its
            // share is open - floor(open * (live - 1) / live), the ceiling
            // of open / live, at most its capacity. (open is counted only
            // as far as W: past it every session is at its capacity.)
            let cap = u64::from(self.args.max_tasks);
            let live = live.max(1);
            let counted = open.min(live * cap);
            let share = (counted - counted * (live - 1) / live).min(cap);
            self.board.out.say(&format!(
                "rebalanced: session {session} took its first share within {} of joining\n  \
                 its share, the newest of {live} sessions of capacity {cap} (shares weighted by capacity):\n  \
                 min(ceil({open} open / {live}), {cap}) = {share}",
                secs(took),
            ));
        }
    }
}

/// Applies the crate's migrations and the worked example, quietly unless
/// `SESSION_LOCK_LOG` asks for logs.
async fn migrate(client: &mut Client) -> Result<(), String> {
    use tracing::instrument::WithSubscriber;
    let migrator = Migrator::new().with_example();
    let result = if std::env::var_os("SESSION_LOCK_LOG").is_some() {
        migrator.run(client).await
    } else {
        migrator
            .run(client)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
    };
    result
        .map(drop)
        .map_err(|e| format!("applying the migrations: {e}"))
}

/// Connects the demo's own client: a connect timeout and a statement timeout,
/// so a vanished database fails the demo instead of hanging it; the URL's
/// sslmode is honoured as everywhere else.
async fn connect(url: &str) -> Result<Client, String> {
    let options = session_lock::StoreOptions {
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let client = session_lock::connect_one_with(url, options)
        .await
        .map_err(|e| match e {
            session_lock::Error::BadUrl(msg) => {
                format!("DATABASE_URL is not a valid PostgreSQL URL or key=value string: {msg}")
            }
            other => ErrorChain(&other).to_string(),
        })?;
    client
        .batch_execute("SET application_name = 'session-lock-demo'")
        .await
        .map_err(|e| db_error("naming the connection", &e))?;
    Ok(client)
}

/// On a user's database: refuses when others' open tasks or live runners
/// would mix with the demo's.
async fn check_database_is_free(client: &Client) -> Result<(), String> {
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .map_err(|e| db_error("counting open example tasks", &e))?
        .get(0);
    if open > 0 {
        return Err(format!(
            "example_task in the DATABASE_URL database already has {open} open tasks, which the demo's runners would run: \
             finish or delete them first, or unset DATABASE_URL to let the demo start a throwaway PostgreSQL"
        ));
    }
    let names: Vec<String> = RIVAL_NAMES.iter().map(|s| s.to_string()).collect();
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM session_lock.session \
              WHERE name = ANY($1) AND reclaimed_at IS NULL AND ended_at IS NULL AND expires_at > now()",
            &[&names],
        )
        .await
        .map_err(|e| db_error("counting live sessions", &e))?
        .get(0);
    if live > 0 {
        return Err(format!(
            "{live} live session(s) named {} in the DATABASE_URL database would take the demo's tasks: \
             stop those runners (or another demo) first, or unset DATABASE_URL",
            RIVAL_NAMES.join(" or ")
        ));
    }
    Ok(())
}

/// Inserts the tasks in one statement and returns their id range.
async fn seed(client: &Client, tasks: u32) -> Result<(i64, i64), String> {
    let n = i64::from(tasks);
    let payload = format!("session-lock demo {} task ", std::process::id());
    let row = client
        .query_one(
            "WITH ins AS (INSERT INTO example_task (payload) \
                          SELECT $2 || g FROM generate_series(1, $1::bigint) g RETURNING id) \
             SELECT min(id), max(id), count(*) FROM ins",
            &[&n, &payload],
        )
        .await
        .map_err(|e| db_error("seeding the tasks", &e))?;
    let (first, last): (i64, i64) = (row.get(0), row.get(1));
    let in_range: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task WHERE id BETWEEN $1 AND $2",
            &[&first, &last],
        )
        .await
        .map_err(|e| db_error("checking the seeded tasks", &e))?
        .get(0);
    if in_range != n {
        return Err(format!(
            "another process inserted into example_task while the demo seeded it (ids {first}..={last} hold {in_range} rows, not {n}): run the demo again"
        ));
    }
    Ok((first, last))
}

/// The demo's tasks, read from the database.
#[derive(Debug, Default)]
struct Snapshot {
    finished: u64,
    open: u64,
    /// Open tasks per holding session.
    held: HashMap<i64, u64>,
    /// Finished tasks per finishing session.
    done_by: HashMap<i64, u64>,
}

impl Snapshot {
    async fn read(client: &Client, range: (i64, i64)) -> Result<Snapshot, String> {
        let rows = client
            .query(
                "SELECT CASE WHEN finished_at IS NULL THEN session_id ELSE finished_by END, \
                        finished_at IS NULL, count(*) \
                   FROM example_task WHERE id BETWEEN $1 AND $2 GROUP BY 1, 2",
                &[&range.0, &range.1],
            )
            .await
            .map_err(|e| db_error("reading the progress", &e))?;
        let mut snap = Snapshot::default();
        for row in rows {
            let session: Option<i64> = row.get(0);
            let open: bool = row.get(1);
            let n = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
            if open {
                snap.open += n;
                if let Some(s) = session {
                    *snap.held.entry(s).or_default() += n;
                }
            } else {
                snap.finished += n;
                if let Some(s) = session {
                    *snap.done_by.entry(s).or_default() += n;
                }
            }
        }
        Ok(snap)
    }

    fn held(&self, session: i64) -> u64 {
        self.held.get(&session).copied().unwrap_or(0)
    }

    fn done_by(&self, session: i64) -> u64 {
        self.done_by.get(&session).copied().unwrap_or(0)
    }
}

/// One session's line in the summary.
#[derive(Debug)]
struct SessionRow {
    session: i64,
    pid: Option<u32>,
    finished: u64,
    executions: u64,
    killed: bool,
    fresh: bool,
    end: &'static str,
}

#[derive(Debug)]
struct Summary {
    tasks: u64,
    finished: u64,
    lost: u64,
    executions: u64,
    duplicates: u64,
    /// Executions by the killed session of tasks another session finished.
    killed_reruns: u64,
    failover: Option<Duration>,
    killed: Option<(u32, i64, u64)>,
    rebalance: Option<Duration>,
    duration: Duration,
    per_session: Vec<SessionRow>,
    settings: Vec<(&'static str, u64)>,
    database: &'static str,
    ids: (i64, i64),
}

async fn summarize(
    client: &Client,
    range: (i64, i64),
    fleet: &Fleet,
    kill: Option<&Kill>,
    fresh: Option<u32>,
    duration: Duration,
    args: &DemoArgs,
) -> Result<Summary, String> {
    let q = |what: &'static str| move |e: tokio_postgres::Error| db_error(what, &e);
    let (lo, hi) = range;
    let snap = Snapshot::read(client, range).await?;
    let runs = client
        .query(
            "SELECT session_id, count(*) FROM example_task_run WHERE task_id BETWEEN $1 AND $2 GROUP BY 1",
            &[&lo, &hi],
        )
        .await
        .map_err(q("counting executions"))?;
    let runs: HashMap<i64, u64> = runs
        .iter()
        .map(|r| (r.get(0), u64::try_from(r.get::<_, i64>(1)).unwrap_or(0)))
        .collect();
    let duplicates: i64 = client
        .query_one(
            "SELECT count(*) - count(DISTINCT task_id) FROM example_task_run WHERE task_id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await
        .map_err(q("counting duplicate executions"))?
        .get(0);
    // The database's clock: from the seed's commit to the last finish.
    let db_duration: Option<f64> = client
        .query_one(
            "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(created_at))::float8 \
               FROM example_task WHERE id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await
        .map_err(q("reading the run's duration"))?
        .get(0);
    let duration = match db_duration {
        Some(d) if snap.finished == u64::from(args.tasks) && d > 0.0 => Duration::from_secs_f64(d),
        _ => duration,
    };
    let killed_reruns: i64 = match kill {
        Some(k) => client
            .query_one(
                "SELECT count(*) FROM example_task_run r JOIN example_task t ON t.id = r.task_id \
                  WHERE r.task_id BETWEEN $1 AND $2 AND r.session_id = $3 \
                    AND t.finished_by IS DISTINCT FROM $3",
                &[&lo, &hi, &k.session],
            )
            .await
            .map_err(q("counting the killed session's executions"))?
            .get(0),
        None => 0,
    };

    let mut sessions: BTreeSet<i64> = fleet
        .processes()
        .iter()
        .flat_map(|p| p.sessions().iter().copied())
        .collect();
    sessions.extend(snap.done_by.keys());
    sessions.extend(runs.keys());
    let ids: Vec<i64> = sessions.iter().copied().collect();
    let rows = client
        .query(
            "SELECT id, pid, ended_at IS NOT NULL, reclaimed_at IS NOT NULL, expires_at <= now() \
               FROM session_lock.session WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(q("reading the sessions"))?;
    let mut info: HashMap<i64, (i32, &'static str)> = HashMap::new();
    for r in rows {
        let end = if r.get::<_, bool>(2) {
            "ended"
        } else if r.get::<_, bool>(3) {
            "expired, reclaimed"
        } else if r.get::<_, bool>(4) {
            "expired"
        } else {
            "live"
        };
        info.insert(r.get(0), (r.get(1), end));
    }
    let per_session = sessions
        .iter()
        .map(|&s| {
            let runner = fleet.processes().iter().find(|p| p.sessions().contains(&s));
            let (db_pid, end) = info.get(&s).copied().unwrap_or((0, "unknown"));
            SessionRow {
                session: s,
                pid: runner
                    .map(RunnerProcess::pid)
                    .or_else(|| u32::try_from(db_pid).ok().filter(|&p| p > 0)),
                finished: snap.done_by(s),
                executions: runs.get(&s).copied().unwrap_or(0),
                killed: kill.is_some_and(|k| k.session == s),
                fresh: runner.is_some_and(|p| Some(p.pid()) == fresh),
                end,
            }
        })
        .collect();
    Ok(Summary {
        tasks: u64::from(args.tasks),
        finished: snap.finished,
        lost: u64::from(args.tasks).saturating_sub(snap.finished),
        executions: runs.values().sum(),
        duplicates: u64::try_from(duplicates).unwrap_or(0),
        killed_reruns: u64::try_from(killed_reruns).unwrap_or(0),
        failover: kill.and_then(|k| k.failover),
        killed: kill.map(|k| (k.pid, k.session, k.held)),
        rebalance: None,
        duration,
        per_session,
        settings: vec![
            ("runners", u64::from(args.runners)),
            ("work_ms", args.work_ms),
            ("ttl_ms", args.ttl_ms),
            ("heartbeat_ms", args.heartbeat_ms),
            ("tick_ms", args.tick_ms),
            ("max_tasks", u64::from(args.max_tasks)),
        ],
        database: if args
            .database_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
        {
            "DATABASE_URL"
        } else {
            "embedded"
        },
        ids: range,
    })
}

impl Summary {
    fn tasks_per_s(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            self.finished as f64 / s
        } else {
            0.0
        }
    }

    fn to_json(&self) -> String {
        let per_session: Vec<serde_json::Value> = self
            .per_session
            .iter()
            .map(|r| {
                serde_json::json!({
                    "session_id": r.session,
                    "pid": r.pid,
                    "finished": r.finished,
                    "executions": r.executions,
                    "killed": r.killed,
                    "fresh": r.fresh,
                    "end": r.end,
                })
            })
            .collect();
        let settings: serde_json::Map<String, serde_json::Value> = self
            .settings
            .iter()
            .map(|&(k, v)| (k.to_string(), v.into()))
            .collect();
        serde_json::json!({
            "tasks": self.tasks,
            "finished": self.finished,
            "lost": self.lost,
            "executions": self.executions,
            "duplicates": self.duplicates,
            "killed_reruns": self.killed_reruns,
            "failover_ms": self.failover.map(|d| d.as_millis() as u64),
            "rebalance_ms": self.rebalance.map(|d| d.as_millis() as u64),
            "killed_pid": self.killed.map(|k| k.0),
            "killed_session": self.killed.map(|k| k.1),
            "killed_held": self.killed.map(|k| k.2),
            "duration_ms": self.duration.as_millis() as u64,
            "tasks_per_s": (self.tasks_per_s() * 10.0).round() / 10.0,
            "database": self.database,
            "task_ids": [self.ids.0, self.ids.1],
            "settings": settings,
            "per_session": per_session,
        })
        .to_string()
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:>8}  {:>8}  {:>9}  {:>10}  session",
            "session", "pid", "finished", "executions"
        );
        for r in &self.per_session {
            let pid = r.pid.map_or("-".to_string(), |p| p.to_string());
            let note = if r.killed {
                format!("KILLED; {}", r.end)
            } else if r.fresh {
                format!("{} (joined part-way)", r.end)
            } else {
                r.end.to_string()
            };
            let _ = writeln!(
                t,
                "{:>8}  {:>8}  {:>9}  {:>10}  {note}",
                r.session, pid, r.finished, r.executions
            );
        }
        let _ = writeln!(
            t,
            "{:>8}  {:>8}  {:>9}  {:>10}",
            "total", "", self.finished, self.executions
        );
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "tasks {}, finished {}, lost {}",
            self.tasks, self.finished, self.lost
        );
        let _ = write!(
            t,
            "executions {}, duplicate executions {}",
            self.executions, self.duplicates
        );
        if self.duplicates > 0 && self.killed.is_some() {
            if self.killed_reruns == self.duplicates {
                let _ = write!(
                    t,
                    ":\n  all of them tasks the killed runner had started but not finished,\n  \
                     run again by a survivor (delivery is at-least-once)"
                );
            } else {
                let _ = write!(
                    t,
                    ",\n  {} of them tasks the killed runner had started, run again by a survivor",
                    self.killed_reruns
                );
            }
        }
        let _ = writeln!(t);
        match (self.killed, self.failover) {
            (Some((pid, session, held)), Some(f)) => {
                let _ = writeln!(
                    t,
                    "failover {} ms: pid {pid} (session {session}) was killed holding {held} tasks;\n  \
                     they were free once its lease ran out (ttl {} ms) and a survivor ticked",
                    f.as_millis(),
                    self.setting("ttl_ms"),
                );
            }
            (Some((pid, session, _)), None) => {
                let _ = writeln!(
                    t,
                    "failover not measured: pid {pid} (session {session}) was killed, the demo ended first"
                );
            }
            _ => {
                let _ = writeln!(t, "failover: none, no runner was killed");
            }
        }
        if let Some(r) = self.rebalance {
            let _ = writeln!(
                t,
                "rebalance: the fresh runner took its first share within {} ms of joining",
                r.as_millis()
            );
        }
        let _ = write!(
            t,
            "throughput {:.0} tasks/s: {} tasks in {}",
            self.tasks_per_s(),
            self.finished,
            secs(self.duration),
        );
        t
    }

    fn setting(&self, name: &str) -> u64 {
        self.settings
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(0, |&(_, v)| v)
    }
}

/// Where narration and progress go: stdout, or stderr with `--json`; bars
/// when that stream is a terminal, plain lines otherwise.
#[derive(Clone)]
struct Out {
    to_stderr: bool,
    multi: Option<MultiProgress>,
}

impl Out {
    fn new(json: bool) -> Out {
        let term = if json {
            io::stderr().is_terminal()
        } else {
            io::stdout().is_terminal()
        } && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let multi = term.then(|| {
            MultiProgress::with_draw_target(if json {
                ProgressDrawTarget::stderr_with_hz(10)
            } else {
                ProgressDrawTarget::stdout_with_hz(10)
            })
        });
        Out {
            to_stderr: json,
            multi,
        }
    }

    /// The same stream, without bars.
    fn plain(&self) -> Out {
        Out {
            to_stderr: self.to_stderr,
            multi: None,
        }
    }

    /// A line of narration, above the bars if there are any.
    fn say(&self, msg: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => self.line(msg),
        }
    }

    /// A line straight to the stream.
    fn line(&self, msg: &str) {
        if self.to_stderr {
            let _ = writeln!(io::stderr().lock(), "{msg}");
        } else {
            let _ = writeln!(io::stdout().lock(), "{msg}");
        }
    }
}

/// The live view: an overall bar and one bar per session, or a plain line
/// per second.
struct Board {
    out: Out,
    total: u64,
    overall: Option<ProgressBar>,
    bars: BTreeMap<i64, ProgressBar>,
    seeded: Option<Instant>,
    last_plain: Option<Instant>,
}

impl Board {
    fn new(out: &Out, total: u32) -> Board {
        Board {
            out: out.clone(),
            total: u64::from(total),
            overall: None,
            bars: BTreeMap::new(),
            seeded: None,
            last_plain: None,
        }
    }

    fn start(&mut self, seeded: Instant) {
        self.seeded = Some(seeded);
        if let Some(multi) = &self.out.multi {
            let style = ProgressStyle::with_template(&format!(
                "{{prefix:<10}} [{{bar:{BAR_WIDTH}.green}}] {{pos:>6}}/{{len}} {{percent:>3}}%  {{wide_msg}}"
            ))
            .expect("a valid template")
            .progress_chars("█▉▊▋▌▍▎▏ ");
            let bar = ProgressBar::new(self.total)
                .with_style(style)
                .with_prefix("all tasks");
            // Above the session bars, whenever they were added.
            self.overall = Some(multi.insert(0, bar));
        }
    }

    fn add_session(&mut self, session: i64, pid: u32, fresh: bool) {
        let Some(multi) = &self.out.multi else {
            return;
        };
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:<10}} [{{bar:{BAR_WIDTH}.cyan/blue}}] {{pos:>6}} done  {{wide_msg}}"
        ))
        .expect("a valid template")
        .progress_chars("█▉▊▋▌▍▎▏ ");
        let bar = multi.add(
            ProgressBar::new(self.total)
                .with_style(style)
                .with_prefix(format!("session {session}"))
                .with_message(format!("pid {pid}{}", if fresh { ", joined" } else { "" })),
        );
        bar.tick();
        self.bars.insert(session, bar);
    }

    fn update(
        &mut self,
        snap: &Snapshot,
        fleet: &Fleet,
        kill: Option<&Kill>,
        fresh: Option<u32>,
        stage: Stage,
    ) {
        let Some(seeded) = self.seeded else {
            return;
        };
        let last = stage != Stage::Running;
        let elapsed = seeded.elapsed();
        let rate = snap.finished as f64 / elapsed.as_secs_f64().max(0.001);
        let status = |session: i64| -> String {
            let runner = fleet
                .processes()
                .iter()
                .find(|p| p.sessions().contains(&session));
            let pid = runner.map_or("pid ?".into(), |p| format!("pid {}", p.pid()));
            if let Some(k) = kill.filter(|k| k.session == session) {
                return match k.failover {
                    None => format!("KILLED {pid}, holds {}", snap.held(session)),
                    Some(f) => format!("KILLED; failover {}", secs(f)),
                };
            }
            match runner {
                Some(p) if p.sessions().last() != Some(&session) => {
                    format!("{pid} lost this session")
                }
                Some(_) if stage == Stage::Terminated => format!("{pid} ended (SIGTERM)"),
                Some(p) if last || !p.is_alive() => format!("{pid} stopped"),
                Some(p) if Some(p.pid()) == fresh => {
                    format!("{pid} holds {:>2} (fresh)", snap.held(session))
                }
                _ => format!("{pid} holds {:>2}", snap.held(session)),
            }
        };
        if self.out.multi.is_some() {
            if let Some(bar) = &self.overall {
                bar.set_position(snap.finished);
                bar.set_message(format!("{rate:.0} tasks/s, {} open", snap.open));
            }
            for (&session, bar) in &self.bars {
                bar.set_position(snap.done_by(session));
                bar.set_message(status(session));
            }
            return;
        }
        let due = self
            .last_plain
            .is_none_or(|t| t.elapsed() >= PLAIN_EVERY - REFRESH / 2);
        if !(due || last) {
            return;
        }
        self.last_plain = Some(Instant::now());
        let mut line = format!(
            "{:>6.1}s  finished {}/{} ({:.0}%), {rate:.0} tasks/s; per session, done (held):",
            elapsed.as_secs_f64(),
            snap.finished,
            self.total,
            100.0 * snap.finished as f64 / self.total.max(1) as f64,
        );
        let mut sessions: BTreeSet<i64> = fleet
            .processes()
            .iter()
            .flat_map(|p| p.sessions().iter().copied())
            .collect();
        sessions.extend(snap.held.keys());
        for s in sessions {
            let mark = if kill.is_some_and(|k| k.session == s) {
                " KILLED"
            } else {
                ""
            };
            let _ = write!(line, "  s{s} {} ({}){mark}", snap.done_by(s), snap.held(s));
        }
        self.out.line(&line);
    }

    /// Leaves the bars on screen as last drawn, never to be redrawn.
    fn freeze(&mut self) {
        if let Some(multi) = &self.out.multi {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
    }

    /// Leaves the bars on screen, finished.
    fn finish(&mut self) {
        if let Some(bar) = &self.overall {
            bar.abandon();
        }
        for bar in self.bars.values() {
            bar.abandon();
        }
    }
}

/// Where the demo is, for what the board says of a runner no longer
/// running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The runners run: a live update.
    Running,
    /// The last update, the runners killed (the demo failed before it could
    /// stop them).
    Killed,
    /// The last update, the runners stopped with SIGTERM.
    Terminated,
}

/// `session-lock run` as the demo's runners run it: one runner name, the
/// demo's settings, the URL in the environment, logs at `warn`, and a
/// process group of their own, so that Ctrl-C reaches the demo only and it
/// decides how the runners end.
fn runner_command(url: &str, args: &DemoArgs) -> Result<RunnerCommand, String> {
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
fn spawn_runner(fleet: &mut Fleet, command: &RunnerCommand, log_dir: &Path) -> Result<u32, String> {
    let label = format!("runner-{}", fleet.processes().len() + 1);
    let command = command
        .clone()
        .log_file(log_dir.join(format!("{label}.log")))
        .label(label);
    fleet.spawn(command).map_err(|e| e.to_string())
}

/// What a runner said, recorded by the fleet already: a new session gets a
/// bar; a runner that exits unasked is an error.
async fn on_event(
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
fn log_hint(fleet: &Fleet) -> String {
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
struct LogDir(PathBuf);

impl LogDir {
    fn create() -> Result<LogDir, String> {
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

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// SIGINT, SIGTERM and SIGHUP: each ends the demo cleanly.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("installing a signal handler: {e}"));
        Ok(Signals {
            int: sig(SignalKind::interrupt())?,
            term: sig(SignalKind::terminate())?,
            hup: sig(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// A database error with the server's message, if it came from the server,
/// or with its causes ("error connecting to server: Connection refused").
fn db_error(what: &str, e: &tokio_postgres::Error) -> String {
    format!("{what}: {}", ErrorChain(e))
}

/// `1.23 s`.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
