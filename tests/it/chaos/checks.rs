//! The invariants checked at the end of a run, from the database, and the
//! report. Once every runner has stopped:
//!
//! * no task is left unfinished (lost = 0);
//! * no finish was accepted from a session at or after its expiry, and
//!   every finished task has a completed run by the session that finished
//!   it, ending no later than the finish;
//! * every extra run of a task is explained, as cut short (it never
//!   completed), lease lost (it completed, but its session expired
//!   before the task was finished, by another session) or fenced before
//!   its report (it completed, but its session fenced itself while the
//!   reply to its last write was in flight, and ran it again once the
//!   fence lifted), and started inside a fault window: at most
//!   [`WINDOW_BEFORE`] before a fault began, at most the TTL plus
//!   [`WINDOW_AFTER_TTL`] after it ended;
//! * every failover completed, with p99 at most TTL + tick + 1 s;
//! * tasks a foreign transaction had locked moved within the TTL of its end;
//! * no backend is idle in a transaction and no session is live.
//!
//! The summary is printed before the first assertion, so that a failing run
//! still shows every figure.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio_postgres::Row;

use super::conn::Conn;
use super::faults::FaultWindow;
use super::logs::{Fence, LogCounts, fences};
use super::probes::Failover;
use super::{Chaos, Plan, TICK, TTL};

/// A run counts as inside a fault window if it started at most this long
/// before the fault began (a run in flight when it struck)...
/// The fault windows that restart the server: a crash, and a stop
/// longer than the TTL (each gives it a new postmaster start time).
pub(super) const RESTART: &str = "postgres crash";
pub(super) const STOP: &str = "postgres stop";

const WINDOW_BEFORE: Duration = Duration::from_millis(1500);
/// ... or at most TTL plus this long after the fault ended (a stale holder
/// acting before it notices, a dead pooled connection found on first use).
const WINDOW_AFTER_TTL: Duration = Duration::from_millis(1500);

/// A fence cut a run between its last write and its report if it came no
/// earlier than this before the write, nor later than this after the
/// write's reply could first have reached the runner: the runner's own
/// delays on a loaded machine (an abort that reaches the worker after the
/// fence was logged, a reply read a little after it arrived).
const REPLY_SLACK: Duration = Duration::from_millis(250);

/// Checks the run's outcome and prints the report; panics on the first
/// invariant broken.
pub(super) async fn check(chaos: &mut Chaos, plan: Plan, seed: u64, inserts: u64) {
    let outcome = Outcome::read(&mut chaos.conn).await;
    let fences = fences(&chaos.slots);
    let extras = classify(&outcome.dup_rows, &chaos.windows, &fences);
    if std::env::var("SESSION_LOCK_CHAOS_VERBOSE").is_ok_and(|v| v == "1") {
        for f in &fences {
            eprintln!("fence: {f:?}");
        }
        for e in &extras {
            eprintln!("extra run: {}", e.describe());
        }
    }
    let report = Report {
        plan,
        seed,
        inserts,
        outcome,
        extras,
        failovers: &chaos.failovers,
        lock_releases: &chaos.lock_releases,
        windows: &chaos.windows,
        logs: LogCounts::of(&chaos.slots),
        run_time: chaos.clock.start.elapsed(),
    };
    eprintln!("{report}");
    report.assert_holds(&mut chaos.conn).await;
}

/// What the database says once every runner has stopped.
struct Outcome {
    tasks: i64,
    finished: i64,
    /// Finishes accepted from a session at or after its expiry.
    late: Vec<String>,
    /// Finishes by a session with no completed run of the task.
    never_ran: Vec<String>,
    runs: i64,
    tasks_run: i64,
    stale_starts: i64,
    /// Every run of every task that ran more than once.
    dup_rows: Vec<Row>,
    idle_in_tx: i64,
    live_sessions: i64,
    sessions: i64,
    ended: i64,
    reclaimed: i64,
}

impl Outcome {
    async fn read(conn: &mut Conn) -> Outcome {
        let row = conn
            .row(
                "SELECT count(*), count(*) FILTER (WHERE finished_at IS NOT NULL) FROM example_task",
                &[],
            )
            .await;
        let (tasks, finished): (i64, i64) = (row.get(0), row.get(1));
        let late = conn
            .strings(
                "SELECT format('task %s finished %s by session %s expiring %s', t.id, t.finished_at, t.finished_by, s.expires_at)
                   FROM example_task t LEFT JOIN session_lock.session s ON s.id = t.finished_by
                  WHERE t.finished_at IS NOT NULL AND (s.id IS NULL OR t.finished_at >= s.expires_at)
                  ORDER BY t.id",
                &[],
            )
            .await;
        let never_ran = conn
            .strings(
                "SELECT format('task %s finished %s by session %s', t.id, t.finished_at, t.finished_by)
                   FROM example_task t
                  WHERE t.finished_at IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM example_task_run r
                                     WHERE r.task_id = t.id AND r.session_id = t.finished_by
                                       AND r.finished_at IS NOT NULL AND r.finished_at <= t.finished_at)
                  ORDER BY t.id",
                &[],
            )
            .await;
        let row = conn
            .row(
                "SELECT count(*), count(DISTINCT task_id) FROM example_task_run",
                &[],
            )
            .await;
        let (runs, tasks_run): (i64, i64) = (row.get(0), row.get(1));
        let stale_starts = conn
            .count(
                "SELECT count(*) FROM example_task_run r JOIN session_lock.session s ON s.id = r.session_id
                  WHERE r.started_at >= s.expires_at",
                &[],
            )
            .await;
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
        let row = conn
            .row(
                "SELECT count(*), count(*) FILTER (WHERE ended_at IS NOT NULL),
                        count(*) FILTER (WHERE reclaimed_at IS NOT NULL)
                   FROM session_lock.session",
                &[],
            )
            .await;
        let (sessions, ended, reclaimed): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        Outcome {
            tasks,
            finished,
            late,
            never_ran,
            runs,
            tasks_run,
            stale_starts,
            dup_rows,
            idle_in_tx,
            live_sessions,
            sessions,
            ended,
            reclaimed,
        }
    }

    fn lost(&self) -> i64 {
        self.tasks - self.finished
    }

    fn duplicates(&self) -> i64 {
        self.runs - self.tasks_run
    }
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
    /// It completed, but its completion was never reported: the Tasker
    /// reports a task only once the reply to its last write (the run row's
    /// `finished_at`) has come back, and its session fenced itself while
    /// that reply was in flight, which stopped the run in between. The
    /// runner rightly counted the task not done: the same session ran it
    /// again once a heartbeat lifted the fence, or, the run given back as
    /// failed (or its lease lost), another session ran it after the fence.
    FencedBeforeReport,
    /// It was handed out before the server crashed or stopped and
    /// started again, and its finish came after: only the server
    /// incarnation that handed a task out finishes it (a restart, like a
    /// failover, may have lost the run's own writes, with
    /// `synchronous_commit = off`), so the task ran again.
    ServerRestarted,
    /// None of these: a bug.
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
    /// The fence that cut it before its report, if one did.
    fence: Option<Fence>,
    why: Why,
    window: Option<String>,
}

impl ExtraRun {
    fn describe(&self) -> String {
        let t = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let fence = self.fence.map_or(String::new(), |f| {
            format!(", fenced {:.3}, lifted {}", f.at, t(f.lifted))
        });
        format!(
            "task {} run {} by session {}: started {:.3}, completed {}, session expires {}{fence}; next run by {:?}; task finished {} by {:?}; {:?}, window {:?}",
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

/// Every run of a duplicated task but the one whose completion was
/// accepted, with why it happened and the fault window it started in.
fn classify(dup_rows: &[Row], windows: &[FaultWindow], fences: &[Fence]) -> Vec<ExtraRun> {
    let mut by_task: BTreeMap<i64, Vec<&Row>> = BTreeMap::new();
    for r in dup_rows {
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
            let next: Option<(i64, f64)> = rows.get(i + 1).map(|n| (n.get(2), n.get(3)));
            let next_session = next.map(|(s, _)| s);
            let session: i64 = r.get(2);
            let started: f64 = r.get(3);
            let finished: Option<f64> = r.get(4);
            let session_expires: Option<f64> = r.get(7);
            let fence = finished
                .and_then(|written| fence_before_report(session, written, next, windows, fences));
            let why = match (finished, session_expires, task_finished) {
                (None, _, _) => Why::CutShort,
                (Some(_), Some(exp), Some(done)) if exp <= done && Some(session) != finished_by => {
                    Why::LeaseLost
                }
                _ if fence.is_some() => Why::FencedBeforeReport,
                (Some(_), _, _)
                    if windows.iter().any(|w| {
                        (w.what == RESTART || w.what == STOP)
                            && started <= w.end
                            && next.is_some_and(|(_, again)| again >= w.start)
                    }) =>
                {
                    Why::ServerRestarted
                }
                _ => Why::Unexplained,
            };
            let fence = fence.filter(|_| why == Why::FencedBeforeReport);
            // Inside some window; reported against the nearest fault.
            let distance = |w: &FaultWindow| (w.start - started).max(started - w.end).max(0.0);
            let window = windows
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
                fence,
                why,
                window,
            });
        }
    }
    extras
}

/// The fence of `session` that cut its run between the run's last write
/// (`written`, the row's `finished_at`) and the report that follows the
/// write's reply, if there is one: a fence that came while the reply was in
/// flight (it cannot reach the runner before `written` plus the latency the
/// link then added), within [`REPLY_SLACK`], and was lifted before the
/// task's next run, by the same session, started.
fn fence_before_report(
    session: i64,
    written: f64,
    next: Option<(i64, f64)>,
    windows: &[FaultWindow],
    fences: &[Fence],
) -> Option<Fence> {
    let (next_session, next_started) = next?;
    let in_flight = windows
        .iter()
        .filter(|w| w.start <= written && written <= w.end)
        .map(|w| w.latency)
        .max()
        .unwrap_or_default();
    let slack = REPLY_SLACK.as_secs_f64();
    let (from, to) = (written - slack, written + in_flight.as_secs_f64() + slack);
    fences
        .iter()
        .find(|f| {
            f.session == session
                && (from..=to).contains(&f.at)
                && if next_session == session {
                    // The same session runs it again once the fence lifts.
                    f.lifted.is_some_and(|l| l <= next_started)
                } else {
                    // Given back as failed, or its lease ran out: another
                    // session runs it, after the fence.
                    f.at <= next_started
                }
        })
        .copied()
}

#[test]
fn a_fence_counts_as_cutting_a_run_only_while_its_last_reply_was_in_flight() {
    // The failing run of seed 1796023671825112893, from t = 0 at the run
    // row's finished_at: the latency fault on, session 40 fenced 0.22 s
    // later, lifted at 3.67 s, the next run by session 40 at 3.8 s.
    let t0 = 1_764_487_754.8;
    let latency = [FaultWindow {
        what: "latency".into(),
        start: t0 - 2.0,
        end: t0 + 3.0,
        latency: Duration::from_millis(500),
    }];
    let fence = |session, at: f64, lifted: Option<f64>| Fence {
        session,
        at: t0 + at,
        lifted: lifted.map(|l| t0 + l),
    };
    let next = Some((40, t0 + 3.8));
    let cut = |windows: &[FaultWindow], next, fences: &[Fence]| {
        fence_before_report(40, t0, next, windows, fences).is_some()
    };
    assert!(cut(&latency, next, &[fence(40, 0.22, Some(3.67))]));
    // The reply could have come back 0.5 s after the write, read within
    // the slack: later, the Tasker would have reported it.
    assert!(cut(&latency, next, &[fence(40, 0.74, Some(3.67))]));
    assert!(!cut(&latency, next, &[fence(40, 0.76, Some(3.67))]));
    // A fence well before the write did not cut it after the write.
    assert!(!cut(&latency, next, &[fence(40, -0.26, Some(3.67))]));
    // Without the latency fault, the reply is back at once.
    assert!(cut(&[], next, &[fence(40, 0.2, Some(3.67))]));
    assert!(!cut(&[], next, &[fence(40, 0.3, Some(3.67))]));
    // Another session's fence, a fence never lifted or lifted after the
    // same session's next run began: not this case.
    assert!(!cut(&latency, next, &[fence(41, 0.22, Some(3.67))]));
    assert!(!cut(&latency, next, &[fence(40, 0.22, None)]));
    assert!(!cut(&latency, next, &[fence(40, 0.22, Some(3.9))]));
    // The cut run given back (or its lease lost): another session runs it
    // after the fence, lifted or not; never before it.
    assert!(cut(
        &latency,
        Some((41, t0 + 1.5)),
        &[fence(40, 0.22, None)]
    ));
    assert!(!cut(
        &latency,
        Some((41, t0 + 0.1)),
        &[fence(40, 0.22, None)]
    ));
    assert!(!cut(&latency, None, &[fence(40, 0.22, Some(3.67))]));
}

/// Nearest-rank percentile.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Everything the summary shows and the assertions judge.
struct Report<'a> {
    plan: Plan,
    seed: u64,
    inserts: u64,
    outcome: Outcome,
    extras: Vec<ExtraRun>,
    failovers: &'a [Failover],
    lock_releases: &'a [Failover],
    windows: &'a [FaultWindow],
    logs: LogCounts,
    run_time: Duration,
}

impl Report<'_> {
    /// The failover bound: ttl + tick + 1 s.
    fn bound() -> Duration {
        TTL + TICK + Duration::from_secs(1)
    }

    /// The completed failovers' durations, shortest first.
    fn failover_times(&self) -> Vec<Duration> {
        let mut took: Vec<Duration> = self.failovers.iter().filter_map(|f| f.took).collect();
        took.sort();
        took
    }

    fn count_why(&self, why: Why) -> usize {
        self.extras.iter().filter(|e| e.why == why).count()
    }

    fn outside_windows(&self) -> Vec<&ExtraRun> {
        self.extras.iter().filter(|e| e.window.is_none()).collect()
    }

    /// Panics, with the evidence, on the first invariant broken.
    async fn assert_holds(&self, conn: &mut Conn) {
        let o = &self.outcome;
        let lost = o.lost();
        if lost > 0 {
            let detail = conn
                .strings(
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
                .await;
            panic!(
                "{lost} tasks lost (never finished after the drain):\n{}\nlive sessions: {:?}",
                detail.join("\n"),
                conn.strings(
                    "SELECT format('%s %s held %s', id, name, held) FROM session_lock.live_session",
                    &[]
                )
                .await
            );
        }
        assert!(
            o.late.is_empty(),
            "finishes accepted from an expired session:\n{}",
            o.late.join("\n")
        );
        assert!(
            o.never_ran.is_empty(),
            "tasks finished by a session with no completed run of them:\n{}",
            o.never_ran.join("\n")
        );
        let unexplained_runs: Vec<&ExtraRun> = self
            .extras
            .iter()
            .filter(|e| e.why == Why::Unexplained)
            .collect();
        assert!(
            unexplained_runs.is_empty(),
            "duplicate runs not explained by a cut-short run, a lost lease or a fence before the report:\n{}",
            show(&unexplained_runs)
        );
        let outside = self.outside_windows();
        assert!(
            outside.is_empty(),
            "duplicate runs outside every fault window:\n{}\nwindows: {:?}",
            show(&outside),
            self.windows
        );
        assert_eq!(
            o.duplicates() as usize,
            self.extras.len(),
            "every extra run classified"
        );
        let timeouts: Vec<&Failover> = self.failovers.iter().filter(|f| f.took.is_none()).collect();
        assert!(
            timeouts.is_empty(),
            "failovers that never completed: {timeouts:?}"
        );
        let p99 = percentile(&self.failover_times(), 99.0);
        let bound = Self::bound();
        assert!(
            p99.is_some_and(|p| p <= bound),
            "failover p99 {p99:?} above ttl + tick + 1 s = {bound:?}: {:?}",
            self.failovers
        );
        // The sweep frees them within a tick of a live session; a loaded
        // machine gets the TTL.
        let slow: Vec<&Failover> = self
            .lock_releases
            .iter()
            .filter(|f| f.took.is_none_or(|t| t > TTL))
            .collect();
        assert!(
            slow.is_empty(),
            "tasks a foreign transaction had locked did not move within {TTL:?} of its end: {slow:?}"
        );
        assert_eq!(o.idle_in_tx, 0, "backends left idle in a transaction");
        assert_eq!(
            o.live_sessions, 0,
            "live sessions after every runner stopped"
        );
    }
}

/// The first 20 extra runs, one a line.
fn show(v: &[&ExtraRun]) -> String {
    v.iter()
        .take(20)
        .map(|e| e.describe())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A failover's duration in ms, or TIMEOUT.
fn took_ms(f: &Failover) -> String {
    f.took
        .map_or("TIMEOUT".to_string(), |t| t.as_millis().to_string())
}

impl fmt::Display for Report<'_> {
    /// The summary: every figure of the run, one a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.outcome;
        let (cut, lease_lost, fenced, restarted, unexplained) = (
            self.count_why(Why::CutShort),
            self.count_why(Why::LeaseLost),
            self.count_why(Why::FencedBeforeReport),
            self.count_why(Why::ServerRestarted),
            self.count_why(Why::Unexplained),
        );
        let same_session = self
            .extras
            .iter()
            .filter(|e| e.next_session == Some(e.session))
            .count();
        let mut per_window: BTreeMap<String, usize> = BTreeMap::new();
        for e in &self.extras {
            if let Some(w) = &e.window {
                *per_window.entry(w.clone()).or_default() += 1;
            }
        }
        let took = self.failover_times();
        let p99 = percentile(&took, 99.0);
        let LogCounts {
            fences,
            losses,
            refused,
        } = self.logs;
        writeln!(
            f,
            "==== chaos summary: {} run, seed {} ====",
            self.plan.name, self.seed
        )?;
        writeln!(
            f,
            "tasks                      {} ({} feeder inserts)",
            o.tasks, self.inserts
        )?;
        writeln!(f, "finished                   {}", o.finished)?;
        writeln!(f, "lost                       {}", o.lost())?;
        writeln!(
            f,
            "runs                       {} of {} tasks",
            o.runs, o.tasks_run
        )?;
        writeln!(
            f,
            "duplicates                 {} (explained {}: {cut} cut short, {lease_lost} lease lost, {fenced} fenced before their report, {restarted} handed out before a server restart; unexplained {unexplained}; outside fault windows {})",
            o.duplicates(),
            cut + lease_lost + fenced + restarted,
            self.outside_windows().len()
        )?;
        writeln!(
            f,
            "duplicates per fault       {per_window:?}; {same_session} re-run by the same session"
        )?;
        writeln!(
            f,
            "late finishes accepted     {} (finishes from an expired session)",
            o.late.len()
        )?;
        writeln!(f, "finisher never ran it      {}", o.never_ran.len())?;
        writeln!(
            f,
            "runs started after expiry  {} (a stale holder starting work before its fence fired)",
            o.stale_starts
        )?;
        writeln!(
            f,
            "failovers (ms)             {}",
            self.failovers
                .iter()
                .map(|p| format!("{} {} (held {})", p.what, took_ms(p), p.held_at_fault))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "failover p99               {} ms (bound ttl + tick + 1 s = {} ms; {} samples)",
            p99.map_or("-".to_string(), |d| d.as_millis().to_string()),
            Self::bound().as_millis(),
            took.len()
        )?;
        writeln!(
            f,
            "locked tasks moved (ms)    {} after the foreign lock went",
            self.lock_releases
                .iter()
                .map(|p| format!("{} {}", p.what, took_ms(p)))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "faults injected            {}: {}",
            self.windows.len(),
            self.windows
                .iter()
                .map(|w| format!("{} ({:.1} s)", w.what, w.end - w.start))
                .collect::<Vec<_>>()
                .join("; ")
        )?;
        writeln!(
            f,
            "sessions                   {} started, {} ended, {} reclaimed; runner logs: {fences} fences, {losses} losses (SL001), {refused} refused finishes",
            o.sessions, o.ended, o.reclaimed
        )?;
        writeln!(f, "idle in transaction        {}", o.idle_in_tx)?;
        writeln!(f, "live sessions at the end   {}", o.live_sessions)?;
        writeln!(
            f,
            "run time                   {:.1} s",
            self.run_time.as_secs_f64()
        )
    }
}
