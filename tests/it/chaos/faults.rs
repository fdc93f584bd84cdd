//! The fault schedule and how each fault is applied and undone. A round is
//! every fault once, in a seeded order with seeded victims, so a seed
//! replays the same schedule. Every fault is undone before the next one
//! starts (a killed runner is restarted in its slot, a frozen one
//! continued, a link healed, the database back up), and each leaves a
//! [`FaultWindow`] on the database's clock, against which the checks judge
//! every duplicate run. The faults that take a victim's session away start
//! a [failover probe](super::probes) at the moment they strike.

use std::time::{Duration, Instant};

use session_lock_testkit::embedded::ShutdownMode;
use tokio::task::JoinHandle;

use super::clock::epoch_now;
use super::conn::{APP, Conn};
use super::probes::{Failover, spawn_probe};
use super::{Chaos, GUARD, IS_LIVE, POLL, TTL, WORK_MS};

/// The latency fault: added to every server-to-client chunk.
const LATENCY: Duration = Duration::from_millis(500);

/// The open tasks a session holds.
const HELD_BY: &str =
    "SELECT count(*) FROM example_task WHERE session_id = $1 AND finished_at IS NULL";

#[derive(Debug, Clone)]
pub(super) enum Fault {
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
pub(super) fn round(rng: &mut fastrand::Rng) -> Vec<Fault> {
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

/// How [`Chaos::cut_off`] takes a victim out of the run.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGSTOP, then SIGCONT: the runner process is frozen.
    Sigstop,
    /// Its proxy blackholed, then healed: the runner is partitioned.
    Blackhole,
}

/// A fault as injected: when it began and ended, on the database's clock.
#[derive(Debug, Clone)]
pub(super) struct FaultWindow {
    pub(super) what: String,
    pub(super) start: f64,
    pub(super) end: f64,
    /// Added to every reply a runner read during the window: [`LATENCY`]
    /// for the latency fault, zero for the others.
    pub(super) latency: Duration,
}

impl Chaos {
    /// Applies `fault`, holds it, undoes it, and records its window (and
    /// its failover measurements).
    pub(super) async fn inject(&mut self, fault: &Fault) {
        match fault {
            Fault::Kill(victims) => self.kill(victims).await,
            Fault::ForeignLock(v) => self.kill_under_foreign_locks(*v).await,
            Fault::Stop(v) => self.cut_off(*v, Outage::Sigstop).await,
            Fault::Blackhole(v) => self.cut_off(*v, Outage::Blackhole).await,
            Fault::Latency => self.latency().await,
            Fault::TerminateBackends => self.terminate_backends().await,
            Fault::PgCrash => self.pg_crash().await,
            Fault::PgStop => self.pg_stop().await,
        }
    }

    /// kill -9 every victim at once; each is restarted in its slot after a
    /// seeded delay.
    async fn kill(&mut self, victims: &[usize]) {
        let mut sessions = Vec::new();
        for &v in victims {
            sessions.push(self.victim_session(v).await);
        }
        let at = Instant::now();
        let start = epoch_now();
        let mut probes = Vec::new();
        for (&v, &s) in victims.iter().zip(&sessions) {
            self.slots[v].signal(libc::SIGKILL);
            let what = format!("kill -9 r{v}");
            probes.push(spawn_probe(self.db_url.clone(), what, s, Vec::new(), at));
        }
        let who: Vec<String> = victims
            .iter()
            .zip(&sessions)
            .map(|(&v, s)| format!("r{v} (pid {}, session {s})", self.slots[v].runner.pid()))
            .collect();
        self.clock
            .log(format_args!("FAULT kill -9 {}", who.join(", ")));
        self.record(format!("kill -9 {victims:?}"), start, start);
        let delay = self.ms(Duration::from_millis(200), 0..1300);
        tokio::time::sleep(delay).await;
        for &v in victims {
            self.slots[v].respawn().await;
            self.clock.log(format_args!(
                "  restarted r{v} as pid {} ({delay:?} after the kill)",
                self.slots[v].runner.pid()
            ));
        }
        self.await_probes(probes).await;
    }

    /// kill -9 the victim while a foreign transaction (an operator's SELECT
    /// ... FOR UPDATE on one of its tasks, an ordinary child-row insert on
    /// another) holds row locks, for longer than the TTL: the failover must
    /// move every other task, and the locked ones must move once the
    /// transaction ends.
    async fn kill_under_foreign_locks(&mut self, v: usize) {
        let session = self.victim_session(v).await;
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
        self.slots[v].signal(libc::SIGKILL);
        self.clock.log(format_args!(
            "FAULT kill -9 r{v} (session {session}) while a foreign transaction locks its tasks {locked:?} for {hold:?}"
        ));
        let what = format!("kill -9 r{v} with foreign locks");
        let probe = spawn_probe(self.db_url.clone(), what, session, locked.clone(), at);
        self.slots[v].respawn().await;
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

    /// Cuts the victim off for longer than the TTL, then lets it back: it
    /// must notice it lost its session and start a new one.
    async fn cut_off(&mut self, v: usize, outage: Outage) {
        let session = self.victim_session(v).await;
        let hold = self.ms(TTL, 1000..2000);
        let at = Instant::now();
        let start = epoch_now();
        let slot = &self.slots[v];
        let what = match outage {
            Outage::Sigstop => {
                slot.signal(libc::SIGSTOP);
                self.clock.log(format_args!(
                    "FAULT SIGSTOP r{v} (pid {}, session {session}) for {hold:?}",
                    slot.runner.pid()
                ));
                format!("SIGSTOP r{v}")
            }
            Outage::Blackhole => {
                slot.proxy.set(|s| s.blackhole = true);
                self.clock.log(format_args!(
                    "FAULT blackhole r{v}'s link (session {session}) for {hold:?}"
                ));
                format!("blackhole r{v}")
            }
        };
        let probe = spawn_probe(self.db_url.clone(), what.clone(), session, Vec::new(), at);
        tokio::time::sleep_until((at + hold).into()).await;
        let slot = &self.slots[v];
        let back = match outage {
            Outage::Sigstop => {
                slot.signal(libc::SIGCONT);
                self.clock.log(format_args!("  SIGCONT r{v}"));
                "resumed"
            }
            Outage::Blackhole => {
                slot.proxy.set(|s| s.blackhole = false);
                self.clock.log(format_args!("  healed r{v}'s link"));
                "back"
            }
        };
        self.record(what, start, epoch_now());
        self.await_probes(vec![probe]).await;
        let new = self.slots[v].runner.new_session(Some(session), GUARD).await;
        self.clock
            .log(format_args!("  r{v} {back} with a new session {new}"));
    }

    /// [`LATENCY`] on every runner's link for a seeded 4 to 6 s.
    async fn latency(&mut self) {
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
        self.windows.push(FaultWindow {
            what: "latency".into(),
            start,
            end: epoch_now(),
            latency: LATENCY,
        });
    }

    /// `pg_terminate_backend` on every client backend but the test's own.
    async fn terminate_backends(&mut self) {
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

    /// The database crashes (`-m immediate`) and restarts at once.
    async fn pg_crash(&mut self) {
        let start = epoch_now();
        self.clock
            .log("FAULT postgres restart -m immediate (crash)");
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.restart(ShutdownMode::Immediate))
            .await
            .expect("restart thread")
            .unwrap_or_else(|e| panic!("restarting postgres: {e}"));
        self.clock.log("  postgres is back");
        self.record(super::checks::RESTART.into(), start, epoch_now());
    }

    /// The database stops (`-m fast`) for longer than the TTL, then starts
    /// again: every session is lost.
    async fn pg_stop(&mut self) {
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
        self.record(super::checks::STOP.into(), start, epoch_now());
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

    /// Records the window of a fault that delays no reply.
    fn record(&mut self, what: String, start: f64, end: f64) {
        self.windows.push(FaultWindow {
            what,
            start,
            end,
            latency: Duration::ZERO,
        });
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
