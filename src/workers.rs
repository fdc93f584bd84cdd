//! The worker pool: actors that run the user's Tasker on slices of a batch.
//!
//! Each worker has a thread (an arbiter) of its own, so a Tasker that
//! blocks its thread holds up only its own worker (worker 0's thread is
//! also the fetcher's, whose ticks wait for the batch anyway), and runs one
//! slice at a time: a worker never starts a slice before the previous one
//! returned. A slice counts as in flight until its worker says, on its own
//! thread, that it returned.
//! Each worker catches what the Tasker does wrong. An error keeps the tasks
//! it reported complete and gives the rest back for a later tick; a panic or
//! a timeout does the same and then restarts the worker (a panic could have
//! left the Tasker's state half-updated, and a timed-out Tasker's future is
//! dropped mid-flight). Ids the Tasker was not given are ignored and
//! reported; ids given twice count once.
//!
//! A batch is spread over as many workers as its expected run time pays
//! for ([`slices`]): each worker is handed at least a quantum
//! ([`QUANTUM`]) of the Tasker's time, by the pace of the last batch that
//! ran in full, and a batch of unknown pace goes over every worker. So a
//! Tasker that takes microseconds does not pay for waking every worker's
//! thread each tick, and one that takes longer runs its batch side by
//! side.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::{AbortRegistration, Abortable};

use crate::error::Panic;
use crate::in_flight::InFlight;
use crate::status::StatusTx;
use crate::task::{Task, TaskId};
use crate::tasker::{Progress, Tasker};
use crate::telemetry::Metrics;

/// Run the Tasker on `tasks` (whose ids are `ids`, read by the fetcher),
/// giving up after `timeout` or when aborted.
pub(crate) struct RunSlice<T> {
    pub(crate) tasks: Vec<T>,
    pub(crate) ids: Arc<[TaskId]>,
    pub(crate) timeout: Duration,
    pub(crate) abort: AbortRegistration,
    /// Where the slice is counted in flight until it returns: told here,
    /// on the worker's thread, so that it is told even while the fetcher's
    /// thread (worker 0's) is blocked.
    pub(crate) runs: InFlight,
}

impl<T: Task> Message for RunSlice<T> {
    type Result = SliceOutcome;
}

/// What became of a slice.
#[derive(Debug, Default)]
pub(crate) struct SliceOutcome {
    /// Tasks the Tasker completed (reported through Progress or returned),
    /// restricted to the slice, each once.
    pub(crate) completed: Vec<TaskId>,
    /// Tasks of the slice not completed: they stay assigned and run again.
    pub(crate) failed: usize,
    /// Why some tasks failed, if they did.
    pub(crate) error: Option<String>,
    /// How long the Tasker took on the slice (wall time).
    pub(crate) ran: Duration,
}

/// The least of the Tasker's time worth a worker of its own: below it,
/// waking another worker's thread and waiting for its reply costs about as
/// much as running beside it saves.
pub(crate) const QUANTUM: Duration = Duration::from_micros(100);

/// How many of `workers` a batch of `tasks` is spread over, given the
/// Tasker's time per task in the last batch that ran in full (`pace`): as
/// many as get a `quantum` each, at least one; every worker (up to one per
/// task) when the pace is unknown.
pub(crate) fn slices(
    workers: usize,
    tasks: usize,
    pace: Option<Duration>,
    quantum: Duration,
) -> usize {
    let most = workers.min(tasks).max(1);
    let Some(pace) = pace else {
        return most;
    };
    let total = pace.as_nanos().saturating_mul(tasks as u128);
    let wanted = total.div_ceil(quantum.as_nanos().max(1)).max(1);
    most.min(usize::try_from(wanted).unwrap_or(usize::MAX))
}

/// The Tasker's time per task over a batch's slices, if every task of it
/// completed: a batch with failures says nothing reliable about the next.
pub(crate) fn pace(outcomes: &[SliceOutcome]) -> Option<Duration> {
    let mut ran = Duration::ZERO;
    let mut tasks = 0u32;
    for o in outcomes {
        if o.failed > 0 || o.error.is_some() {
            return None;
        }
        ran = ran.saturating_add(o.ran);
        tasks = tasks.saturating_add(u32::try_from(o.completed.len()).unwrap_or(u32::MAX));
    }
    ran.checked_div(tasks)
}

pub(crate) struct Worker<T, K> {
    index: usize,
    runner: Arc<str>,
    tasker: Arc<K>,
    status: StatusTx,
    metrics: Metrics,
    _task: PhantomData<fn() -> T>,
}

impl<T: Task, K: Tasker<T>> Worker<T, K> {
    pub(crate) fn new(
        index: usize,
        runner: Arc<str>,
        tasker: Arc<K>,
        status: StatusTx,
        metrics: Metrics,
    ) -> Self {
        Worker {
            index,
            runner,
            tasker,
            status,
            metrics,
            _task: PhantomData,
        }
    }
}

impl<T: Task, K: Tasker<T>> Actor for Worker<T, K> {
    type Context = Context<Self>;
}

impl<T: Task, K: Tasker<T>> Supervised for Worker<T, K> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::info!(runner = %self.runner, worker = self.index, "worker restarted");
        self.metrics.worker_restart();
        self.status.send_modify(|s| s.worker_restarts += 1);
    }
}

enum Ending {
    Returned(Vec<TaskId>),
    Failed(String),
    Panicked(String),
    TimedOut(Duration),
    Aborted,
}

impl<T: Task, K: Tasker<T>> Handler<RunSlice<T>> for Worker<T, K> {
    // Atomic: the worker takes no other message until the slice returns.
    type Result = AtomicResponse<Self, SliceOutcome>;

    fn handle(&mut self, msg: RunSlice<T>, _ctx: &mut Context<Self>) -> Self::Result {
        let given = msg.ids;
        let runs = msg.runs;
        let progress = Progress::default();
        let tasker = self.tasker.clone();
        let timeout = msg.timeout;
        let fut = async move {
            // The call itself goes inside the guarded future: a Tasker may
            // panic before it even returns its future.
            let reported = progress.clone();
            let started = Instant::now();
            let run = AssertUnwindSafe(async move { tasker.run(msg.tasks, reported).await })
                .catch_unwind();
            let run = Abortable::new(tokio::time::timeout(timeout, run), msg.abort);
            let ending = match run.await {
                Err(_aborted) => Ending::Aborted,
                Ok(Err(_elapsed)) => Ending::TimedOut(timeout),
                Ok(Ok(Err(panic))) => Ending::Panicked(Panic::from_payload(&*panic).to_string()),
                Ok(Ok(Ok(Err(e)))) => Ending::Failed(e.to_string()),
                Ok(Ok(Ok(Ok(ids)))) => Ending::Returned(ids),
            };
            (ending, progress.take(), started.elapsed())
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |(ending, reported, ran), act, ctx| {
                runs.returned(&given);
                act.outcome(ctx, &given, ending, reported, ran)
            },
        )))
    }
}

impl<T: Task, K: Tasker<T>> Worker<T, K> {
    fn outcome(
        &mut self,
        ctx: &mut Context<Self>,
        given: &[TaskId],
        ending: Ending,
        mut reported: Vec<TaskId>,
        ran: Duration,
    ) -> SliceOutcome {
        let mut error = None;
        let mut restart = false;
        match ending {
            Ending::Returned(ids) => reported.extend(ids),
            Ending::Failed(e) => error = Some(format!("tasker failed: {e}")),
            Ending::Panicked(p) => {
                error = Some(format!("tasker panicked: {p}"));
                restart = true;
            }
            Ending::TimedOut(t) => {
                error = Some(format!("tasker timed out after {t:?} (batch timeout)"));
                restart = true;
            }
            Ending::Aborted => {
                error = Some("tasker stopped: session fenced or runner stopping".into())
            }
        }
        let (completed, foreign) = restrict(reported, given);
        if !foreign.is_empty() {
            tracing::warn!(
                runner = %self.runner,
                worker = self.index,
                ids = ?foreign,
                "the tasker reported ids it was not given; ignored"
            );
            let note = format!("tasker reported ids it was not given: {foreign:?}");
            error = Some(match error {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        let failed = given.len() - completed.len();
        if let Some(e) = &error {
            tracing::warn!(runner = %self.runner, worker = self.index, failed, error = %e, "slice did not fully complete");
        }
        if restart {
            // Supervised: actix starts a fresh worker on the same address.
            ctx.stop();
        }
        SliceOutcome {
            completed,
            failed,
            error,
            ran,
        }
    }
}

/// What the Tasker reported, split into the given ids it completed (each
/// once, in the order reported) and the ids it was not given. Most Taskers
/// report exactly the ids they were given, in order (which are distinct:
/// a batch holds each task once), and that needs no sets.
fn restrict(reported: Vec<TaskId>, given: &[TaskId]) -> (Vec<TaskId>, Vec<TaskId>) {
    if reported == given {
        return (reported, Vec::new());
    }
    let given_set: HashSet<TaskId> = given.iter().copied().collect();
    let mut seen = HashSet::with_capacity(reported.len());
    let mut foreign = Vec::new();
    let mut completed = Vec::with_capacity(reported.len());
    for id in reported {
        if !given_set.contains(&id) {
            foreign.push(id);
        } else if seen.insert(id) {
            completed.push(id);
        }
    }
    (completed, foreign)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(completed: usize, failed: usize, ran_us: u64) -> SliceOutcome {
        SliceOutcome {
            completed: (0..completed as TaskId).collect(),
            failed,
            error: (failed > 0).then(|| "tasker failed".to_owned()),
            ran: Duration::from_micros(ran_us),
        }
    }

    #[test]
    fn a_batch_of_unknown_pace_goes_over_every_worker_one_task_each_at_least() {
        assert_eq!(slices(4, 10, None, QUANTUM), 4);
        assert_eq!(slices(4, 3, None, QUANTUM), 3);
        assert_eq!(slices(4, 0, None, QUANTUM), 1);
    }

    #[test]
    fn each_worker_gets_a_quantum_of_the_taskers_time() {
        let us = Duration::from_micros;
        // 10 tasks of 1 µs: one worker.
        assert_eq!(slices(4, 10, Some(us(1)), QUANTUM), 1);
        // 10 tasks of 10 µs: exactly one quantum.
        assert_eq!(slices(4, 10, Some(us(10)), QUANTUM), 1);
        // 10 tasks of 25 µs: 250 µs, three quanta.
        assert_eq!(slices(4, 10, Some(us(25)), QUANTUM), 3);
        // Slow tasks: every worker, never more workers than tasks.
        assert_eq!(slices(4, 10, Some(Duration::from_secs(1)), QUANTUM), 4);
        assert_eq!(slices(4, 2, Some(Duration::from_secs(1)), QUANTUM), 2);
        // A pace of zero (a clock too coarse to see it) is one worker.
        assert_eq!(slices(4, 100, Some(Duration::ZERO), QUANTUM), 1);
        // No overflow at the extremes.
        assert_eq!(slices(1024, usize::MAX, Some(Duration::MAX), QUANTUM), 1024);
        assert_eq!(slices(4, 10, Some(us(1)), Duration::ZERO), 4);
    }

    #[test]
    fn reported_ids_are_restricted_to_the_given_each_once() {
        assert_eq!(restrict(vec![1, 2, 3], &[1, 2, 3]), (vec![1, 2, 3], vec![]));
        assert_eq!(restrict(vec![3, 1], &[1, 2, 3]), (vec![3, 1], vec![]));
        assert_eq!(
            restrict(vec![2, 9, 2, 1], &[1, 2, 3]),
            (vec![2, 1], vec![9])
        );
        assert_eq!(restrict(vec![], &[1]), (vec![], vec![]));
    }

    #[test]
    fn pace_is_the_taskers_time_per_task_of_a_batch_that_ran_in_full() {
        let us = Duration::from_micros;
        assert_eq!(pace(&[outcome(3, 0, 30), outcome(2, 0, 70)]), Some(us(20)));
        assert_eq!(pace(&[outcome(3, 0, 30), outcome(1, 1, 70)]), None);
        assert_eq!(pace(&[]), None);
        assert_eq!(pace(&[outcome(0, 0, 5)]), None);
    }
}
