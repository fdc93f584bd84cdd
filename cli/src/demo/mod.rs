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
//!
//! Its parts: `db` (every query it sends), `runners` (its runner processes,
//! driven by the testkit's `Fleet`), `board` (the live view), `report` (the
//! summary) and `signals` (the ways a user ends it).

mod board;
mod db;
mod report;
mod runners;
mod signals;

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use session_lock::RunnerConfig;
use session_lock_testkit::embedded::EmbeddedPostgres;
use session_lock_testkit::{Fleet, RunnerCommand};
use tokio_postgres::Client;

use board::{Board, Out, Stage};
use db::{Snapshot, check_database_is_free, connect, migrate, seed};
use report::{Summary, summarize};
use runners::{LogDir, log_hint, on_event, runner_command, spawn_runner};
use signals::Signals;

/// The runner name of the demo's runner processes.
const RUNNER_NAME: &str = "demo";
/// The fraction of tasks finished at which one runner is killed.
const KILL_AT: f64 = 0.30;
/// The fraction of tasks finished at which a fresh runner is started.
const JOIN_AT: f64 = 0.60;
/// How often the progress is read from the database.
const REFRESH: Duration = Duration::from_millis(200);
/// How often the killed session's open tasks are counted.
const FAILOVER_POLL: Duration = Duration::from_millis(20);
/// How long a runner may take to print its first session id.
const RUNNER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// The runners' drain timeout on SIGTERM.
const RUNNER_DRAIN_MS: u64 = 10_000;
/// How long the runners may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long past `--timeout-s` the demo is cut short if a step hangs.
const BACKSTOP: Duration = Duration::from_secs(60);

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
    let summary = summarize(
        &client,
        range,
        &fleet,
        kill.as_ref(),
        fresh.as_ref(),
        duration,
        args,
    )
    .await;
    let snapshot = Snapshot::read(&client, range).await;
    if let Ok(snapshot) = &snapshot {
        board.update(snapshot, &fleet, kill.as_ref(), fresh.as_ref(), stage);
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
                    self.board.update(
                        &snap,
                        &self.fleet,
                        self.kill.as_ref(),
                        self.fresh.as_ref(),
                        Stage::Running,
                    );
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
        let counts = db::running_and_held(self.client, &sessions).await?;
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
        let held = db::held_by(self.client, session).await?;
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
        if db::held_by(self.client, kill.session).await? == 0 {
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

/// `1.23 s`.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
