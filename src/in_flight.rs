//! A runner's runs in flight, and the deadline of the batch they belong to,
//! shared by the fetcher, the session actor and the supervisor.
//!
//! The fetcher shares worker 0's thread, so that handing a batch to that
//! worker and taking its outcome back wakes no other thread (two thread
//! wake-ups less per tick: a third of a runner's CPU at the default batch).
//! A Tasker that blocks worker 0's thread then stops the fetcher's timers
//! with it, so the batch's deadline is kept here too, where the session
//! actor, whose thread no Tasker runs on, reads it.
//!
//! What it keeps true:
//! - Every task of a slice handed to a worker and not yet returned is in
//!   [`InFlight::ids`].
//! - A batch still running `batch_timeout` + `STUCK_GRACE` after it started
//!   is reported stuck once, by whichever of the fetcher (its own timer) and
//!   the session actor (at each heartbeat, and at the deadline of a batch a
//!   heartbeat found running) sees it first; whoever reports it, the session
//!   is no longer renewed. Each heartbeat asks before it renews, so no
//!   renewal follows a deadline unseen.
//! - From the moment a batch is reported stuck until it has returned, no
//!   heartbeat renews the session, even before the fetcher's report
//!   reaches the session actor. When it has returned, [`Begun::end`] says
//!   so once, and the fetcher tells the session actor, which renews again.
//! - Whenever the session actor stops letting the fetcher use the session
//!   (fenced, lost, suspended, stopping), it stops the tick's runs itself
//!   ([`InFlight::abort`]): the fetcher, which does the same, may be held
//!   up on the thread of a Tasker that blocks it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::AbortHandle;

use tokio::time::Instant;

use crate::config::RunnerConfig;
use crate::status::StatusTx;
use crate::store::SessionId;
use crate::task::TaskId;
use crate::telemetry::Metrics;

/// The slices handed out and not yet returned, and the batch they belong to.
#[derive(Clone, Debug, Default)]
pub(crate) struct InFlight(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// The ids of each slice not yet returned (a batch's slices are
    /// disjoint).
    slices: Mutex<Vec<Arc<[TaskId]>>>,
    batch: Mutex<Option<Batch>>,
    /// The stop handles of the tick in flight, one per slice handed out.
    aborts: Mutex<Option<Vec<AbortHandle>>>,
    /// How many times the runs in flight were stopped: a tick that sees it
    /// move after it began stops each slice it hands out from then on.
    stops: AtomicU64,
}

/// The batch in flight.
#[derive(Debug, Clone, Copy)]
struct Batch {
    session: SessionId,
    /// When it counts as stuck.
    deadline: Instant,
    /// The batch timeout it was given, for the report.
    timeout: Duration,
    /// It has been reported stuck.
    reported: bool,
}

/// What the session actor's watch finds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Watch {
    /// No run in flight (a batch whose slices have all returned is about
    /// to end), none reported stuck.
    Nothing,
    /// A batch in flight that is stuck at this moment, unless it returns
    /// first: look again then.
    Until(Instant),
    /// A batch of this session, given this batch timeout, past its
    /// deadline: the caller reports it stuck now.
    Stuck(SessionId, Duration),
    /// A batch of this session already reported stuck and still in flight:
    /// not to be renewed.
    Reported(SessionId),
    /// No batch in flight, but runs of one that will not say they returned
    /// (its tick was dropped): leave things as they are.
    Orphaned,
}

impl InFlight {
    pub(crate) fn add(&self, slice: &Arc<[TaskId]>) {
        lock(&self.0.slices).push(slice.clone());
    }

    pub(crate) fn returned(&self, slice: &Arc<[TaskId]>) {
        let mut slices = lock(&self.0.slices);
        if let Some(at) = slices.iter().position(|s| Arc::ptr_eq(s, slice)) {
            slices.swap_remove(at);
        }
    }

    /// Every id still running, in order.
    pub(crate) fn ids(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = lock(&self.0.slices)
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// A batch of `session`'s tasks starts, with `timeout`: it is stuck
    /// `grace` past it. It is in flight until [`Begun::end`], or until the
    /// guard is dropped (its tick was).
    pub(crate) fn begin(&self, session: SessionId, timeout: Duration, grace: Duration) -> Begun {
        *lock(&self.0.batch) = Some(Batch {
            session,
            deadline: Instant::now() + timeout.saturating_add(grace),
            timeout,
            reported: false,
        });
        Begun(Some(self.clone()))
    }

    /// The fetcher's own timer saw the batch outlive its deadline: true if
    /// nobody has reported it yet and a slice still runs (the caller
    /// reports it now).
    pub(crate) fn report(&self) -> bool {
        let running = !lock(&self.0.slices).is_empty();
        match lock(&self.0.batch).as_mut() {
            Some(b) if !b.reported && running => {
                b.reported = true;
                true
            }
            _ => false,
        }
    }

    /// The session actor's look at the batch in flight. A batch whose
    /// slices have all returned is not stuck, whatever the time: its tick
    /// is about to end it.
    pub(crate) fn watch(&self, now: Instant) -> Watch {
        let running = !lock(&self.0.slices).is_empty();
        match lock(&self.0.batch).as_mut() {
            Some(b) if b.reported => Watch::Reported(b.session),
            Some(_) if !running => Watch::Nothing,
            Some(b) if now >= b.deadline => {
                b.reported = true;
                Watch::Stuck(b.session, b.timeout)
            }
            Some(b) => Watch::Until(b.deadline),
            None if running => Watch::Orphaned,
            None => Watch::Nothing,
        }
    }

    /// A tick starts. Returns the count of stops so far, for
    /// [`InFlight::hand_out`].
    pub(crate) fn tick_began(&self) -> u64 {
        let mut aborts = lock(&self.0.aborts);
        *aborts = Some(Vec::new());
        self.0.stops.load(Ordering::SeqCst)
    }

    /// The tick has ended (or its actor restarted): nothing left to stop.
    pub(crate) fn tick_ended(&self) {
        *lock(&self.0.aborts) = None;
    }

    /// Stops the runs of the tick in flight, if any (those a Tasker does
    /// not block return at once, as failed), and those it hands out after
    /// this.
    pub(crate) fn abort(&self) {
        let aborts = lock(&self.0.aborts);
        self.0.stops.fetch_add(1, Ordering::SeqCst);
        for handle in aborts.iter().flatten() {
            handle.abort();
        }
    }

    /// Adds a slice's stop handle to the tick's (which began when the count
    /// of stops was `stops`), and stops it at once if the runs were stopped
    /// since: a stop that came while the tick was getting its work found no
    /// handle to stop, and the fetcher may not have heard of it.
    pub(crate) fn hand_out(&self, handle: AbortHandle, stops: u64) {
        let mut aborts = lock(&self.0.aborts);
        if self.0.stops.load(Ordering::SeqCst) != stops {
            handle.abort();
        }
        if let Some(aborts) = aborts.as_mut() {
            aborts.push(handle);
        }
    }
}

/// The batch in flight, from [`InFlight::begin`].
#[derive(Debug)]
pub(crate) struct Begun(Option<InFlight>);

impl Begun {
    /// The batch has returned: true if it had been reported stuck.
    pub(crate) fn end(mut self) -> bool {
        self.0
            .take()
            .and_then(|f| lock(&f.0.batch).take())
            .is_some_and(|b| b.reported)
    }
}

impl Drop for Begun {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            lock(&f.0.batch).take();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reports the runs Stop leaves running: the session is not ended.
pub(crate) fn report_left(runner: &str, left: &[TaskId]) {
    tracing::error!(runner, tasks = ?left,
        "stopping with runs that do not return: their session is left to expire, not ended");
}

/// Reports `session`'s runs in flight stuck past `timeout`: the log line,
/// the metric and the status.
pub(crate) fn report_stuck(
    config: &RunnerConfig,
    metrics: &Metrics,
    status: &StatusTx,
    session: SessionId,
    stuck: &[TaskId],
    timeout: Duration,
) {
    tracing::error!(
        runner = %config.name,
        session,
        tasks = ?stuck,
        batch_timeout = ?timeout,
        "runs outlived the batch timeout and cannot be stopped (a Tasker blocking its thread?): no longer renewing the session"
    );
    metrics.stuck(stuck.len());
    status.send_modify(|s| {
        s.stuck_tasks += stuck.len() as u64;
        s.last_error = Some(format!(
            "tasks {stuck:?} still running past the batch timeout of {timeout:?}: session {session} left to expire"
        ));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_reported_once_by_whoever_sees_its_deadline_first() {
        let (timeout, grace) = (Duration::from_secs(1), Duration::from_secs(2));
        let in_flight = InFlight::default();
        assert_eq!(in_flight.watch(Instant::now()), Watch::Nothing);
        let slice: Arc<[TaskId]> = vec![1].into();
        let begun = in_flight.begin(7, timeout, grace);
        in_flight.add(&slice);
        let deadline = Instant::now() + Duration::from_secs(3);
        assert_eq!(in_flight.watch(Instant::now()), Watch::Until(deadline));
        assert_eq!(in_flight.watch(deadline), Watch::Stuck(7, timeout));
        // Seen by the watch: the fetcher's timer does not report it again,
        // and every later look says it is not to be renewed.
        assert!(!in_flight.report());
        assert_eq!(in_flight.watch(deadline), Watch::Reported(7));
        in_flight.returned(&slice);
        assert!(begun.end(), "a batch reported stuck says so when it ends");
        assert_eq!(in_flight.watch(deadline), Watch::Nothing);

        let begun = in_flight.begin(8, timeout, grace);
        in_flight.add(&slice);
        assert!(in_flight.report(), "the fetcher's timer saw it first");
        // Before its Stuck reaches the session actor, a heartbeat already
        // finds the batch not to be renewed.
        assert_eq!(in_flight.watch(Instant::now()), Watch::Reported(8));
        in_flight.returned(&slice);
        assert!(begun.end());

        let begun = in_flight.begin(9, timeout, grace);
        assert!(!begun.end(), "a batch back in time was never stuck");

        // Every slice returned, the tick not ended yet: not stuck.
        let begun = in_flight.begin(10, timeout, grace);
        let late = Instant::now() + Duration::from_secs(9);
        assert_eq!(in_flight.watch(late), Watch::Nothing);
        assert!(!begun.end());

        // A tick dropped with its batch in flight leaves no batch, but the
        // runs it never heard back from stay counted.
        let begun = in_flight.begin(11, timeout, grace);
        in_flight.add(&slice);
        drop(begun);
        assert_eq!(in_flight.watch(Instant::now()), Watch::Orphaned);
        in_flight.returned(&slice);
        assert_eq!(in_flight.watch(Instant::now()), Watch::Nothing);
    }

    #[test]
    fn abort_stops_the_slices_of_the_tick_in_flight_and_those_it_hands_out_after() {
        use futures_util::future::Abortable;
        let in_flight = InFlight::default();
        in_flight.abort(); // nothing in flight: nothing to do
        let stops = in_flight.tick_began();
        let (handle, registration) = AbortHandle::new_pair();
        let first = Abortable::new(std::future::pending::<()>(), registration);
        in_flight.hand_out(handle, stops);
        assert!(!first.is_aborted(), "a slice of a tick not stopped runs");
        in_flight.abort();
        assert!(first.is_aborted());
        // Handed out after the stop (the tick was getting its work then).
        let (handle, registration) = AbortHandle::new_pair();
        let late = Abortable::new(std::future::pending::<()>(), registration);
        in_flight.hand_out(handle, stops);
        assert!(late.is_aborted());
        in_flight.tick_ended();
        // The next tick starts afresh.
        let stops = in_flight.tick_began();
        let (handle, registration) = AbortHandle::new_pair();
        let next = Abortable::new(std::future::pending::<()>(), registration);
        in_flight.hand_out(handle, stops);
        assert!(!next.is_aborted());
    }

    #[test]
    fn ids_are_those_of_slices_not_returned() {
        let in_flight = InFlight::default();
        let (a, b): (Arc<[TaskId]>, Arc<[TaskId]>) = (vec![5, 1].into(), vec![3].into());
        in_flight.add(&a);
        in_flight.add(&b);
        assert_eq!(in_flight.ids(), vec![1, 3, 5]);
        in_flight.returned(&a);
        assert_eq!(in_flight.ids(), vec![3]);
    }
}
