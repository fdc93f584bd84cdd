//! The summary the demo ends with, read from the database once the runners
//! stopped: per session the tasks finished and executions, then lost tasks,
//! duplicate executions, failover, rebalance and throughput. A text table,
//! or with `--json` one JSON object whose field names the README documents.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use session_lock_testkit::{Fleet, RunnerProcess};
use tokio_postgres::Client;

use super::db::{self, Snapshot};
use super::{DemoArgs, Fresh, Kill, secs};

/// One session's line in the summary.
#[derive(Debug)]
pub(super) struct SessionRow {
    session: i64,
    pid: Option<u32>,
    finished: u64,
    executions: u64,
    killed: bool,
    fresh: bool,
    end: &'static str,
}

#[derive(Debug)]
pub(super) struct Summary {
    pub(super) tasks: u64,
    finished: u64,
    pub(super) lost: u64,
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

pub(super) async fn summarize(
    client: &Client,
    range: (i64, i64),
    fleet: &Fleet,
    kill: Option<&Kill>,
    fresh: Option<&Fresh>,
    duration: Duration,
    args: &DemoArgs,
) -> Result<Summary, String> {
    let snap = Snapshot::read(client, range).await?;
    let runs = db::executions_by_session(client, range).await?;
    let duplicates = db::duplicate_executions(client, range).await?;
    // The database's clock, once every task is finished.
    let duration = match db::run_duration(client, range).await? {
        Some(d) if snap.finished == u64::from(args.tasks) => d,
        _ => duration,
    };
    let killed_reruns = match kill {
        Some(k) => db::reruns_of(client, range, k.session).await?,
        None => 0,
    };

    let mut sessions: BTreeSet<i64> = fleet.sessions().collect();
    sessions.extend(snap.done_by.keys());
    sessions.extend(runs.keys());
    let ids: Vec<i64> = sessions.iter().copied().collect();
    let info = db::session_ends(client, &ids).await?;
    let per_session = sessions
        .iter()
        .map(|&s| {
            let runner = fleet.announced_by(s);
            let (db_pid, end) = info.get(&s).copied().unwrap_or((0, "unknown"));
            SessionRow {
                session: s,
                pid: runner
                    .map(RunnerProcess::pid)
                    .or_else(|| u32::try_from(db_pid).ok().filter(|&p| p > 0)),
                finished: snap.done_by(s),
                executions: runs.get(&s).copied().unwrap_or(0),
                killed: kill.is_some_and(|k| k.session == s),
                fresh: runner.is_some_and(|p| fresh.is_some_and(|f| f.pid == p.pid())),
                end,
            }
        })
        .collect();
    Ok(Summary {
        tasks: u64::from(args.tasks),
        finished: snap.finished,
        lost: u64::from(args.tasks).saturating_sub(snap.finished),
        executions: runs.values().sum(),
        duplicates,
        killed_reruns,
        failover: kill.and_then(|k| k.failover),
        killed: kill.map(|k| (k.pid, k.session, k.held)),
        rebalance: fresh.and_then(|f| f.first_share),
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

    pub(super) fn to_json(&self) -> String {
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

    pub(super) fn table(&self) -> String {
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
