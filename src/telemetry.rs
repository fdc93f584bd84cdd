//! Metrics through the OpenTelemetry metrics API, and the names of the spans
//! the runner emits through `tracing`.
//!
//! The library only records: it never installs a global subscriber or meter
//! provider. Without one installed by the application, everything here is a
//! no-op. Spans follow OpenTelemetry conventions through the special fields
//! `tracing-opentelemetry` understands (`otel.name`, `otel.kind`,
//! `otel.status_code`), and attributes are low-cardinality: the runner name
//! yes, task ids no; task groups only on `session_lock.tasks.held_by_group`,
//! at most the 10 holding most per reading plus `(other)`.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

use crate::store::TaskStats;

/// The instrumentation scope name of the meter, and the prefix of every
/// span and metric name.
pub const SCOPE: &str = "session_lock";

/// Span name of one tick of a runner.
pub const SPAN_TICK: &str = "session_lock.tick";
/// Span name of the `get_work` call within a tick.
pub const SPAN_GET_WORK: &str = "session_lock.get_work";
/// Span name of running the batch on the workers within a tick.
pub const SPAN_RUN_TASKS: &str = "session_lock.run_tasks";
/// Span name of the fenced finish within a tick.
pub const SPAN_FINISH: &str = "session_lock.finish";
/// Span name of giving back the tasks a batch did not complete.
pub const SPAN_FAIL: &str = "session_lock.fail";
/// Span name of starting a session.
pub const SPAN_SESSION_START: &str = "session_lock.session.start";
/// Span name of a failed heartbeat.
pub const SPAN_HEARTBEAT_FAILURE: &str = "session_lock.session.heartbeat_failure";
/// Span name of a session found lost.
pub const SPAN_SESSION_LOSS: &str = "session_lock.session.loss";
/// Span name of ending a session.
pub const SPAN_SESSION_END: &str = "session_lock.session.end";

/// The runner's instruments, all attributed with the runner name only.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    attrs: [KeyValue; 1],
    ticks: Counter<u64>,
    fetched: Counter<u64>,
    finished: Counter<u64>,
    failed: Counter<u64>,
    rejected: Counter<u64>,
    given_back: Counter<u64>,
    tick_duration: Histogram<f64>,
    heartbeat_failures: Counter<u64>,
    session_losses: Counter<u64>,
    fences: Counter<u64>,
    worker_restarts: Counter<u64>,
    stuck: Counter<u64>,
    held: Gauge<u64>,
    held_by_group: Gauge<u64>,
    quarantined: Gauge<u64>,
    suspect: Gauge<u64>,
}

/// The attribute naming a task group on `session_lock.tasks.held_by_group`.
pub const GROUP_ATTRIBUTE: &str = "session_lock.group";
/// Its value for the tasks whose group key is NULL.
pub const GROUP_NONE: &str = "(none)";
/// Its value for the tasks of the groups not named.
pub const GROUP_OTHER: &str = "(other)";

impl Metrics {
    pub(crate) fn new(meter: &Meter, runner: &str) -> Self {
        Metrics {
            attrs: [KeyValue::new("session_lock.runner", runner.to_owned())],
            ticks: meter
                .u64_counter("session_lock.ticks")
                .with_description("Ticks run")
                .with_unit("{tick}")
                .build(),
            fetched: meter
                .u64_counter("session_lock.tasks.fetched")
                .with_description("Tasks handed to the workers")
                .with_unit("{task}")
                .build(),
            finished: meter
                .u64_counter("session_lock.tasks.finished")
                .with_description("Tasks the database confirmed finished")
                .with_unit("{task}")
                .build(),
            failed: meter
                .u64_counter("session_lock.tasks.failed")
                .with_description("Tasks that failed, panicked, timed out or did not scan")
                .with_unit("{task}")
                .build(),
            rejected: meter
                .u64_counter("session_lock.tasks.rejected")
                .with_description("Completed tasks whose finish the database refused (session lost or task moved)")
                .with_unit("{task}")
                .build(),
            given_back: meter
                .u64_counter("session_lock.tasks.given_back")
                .with_description("Tasks a batch did not complete, given back to be retried after their backoff")
                .with_unit("{task}")
                .build(),
            tick_duration: meter
                .f64_histogram("session_lock.tick.duration")
                .with_description("Duration of a tick, get_work to finish")
                .with_unit("s")
                // Seconds, from a millisecond tick to a batch near its timeout.
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ])
                .build(),
            heartbeat_failures: meter
                .u64_counter("session_lock.heartbeat.failures")
                .with_description("Heartbeats that failed")
                .with_unit("{heartbeat}")
                .build(),
            session_losses: meter
                .u64_counter("session_lock.session.losses")
                .with_description("Sessions the database reported lost (SL001)")
                .with_unit("{session}")
                .build(),
            fences: meter
                .u64_counter("session_lock.session.fences")
                .with_description("Times the runner fenced its session: no renewal within ttl - safety margin")
                .with_unit("{fence}")
                .build(),
            worker_restarts: meter
                .u64_counter("session_lock.worker.restarts")
                .with_description("Workers restarted after a panic or a timeout")
                .with_unit("{restart}")
                .build(),
            stuck: meter
                .u64_counter("session_lock.tasks.stuck")
                .with_description("Tasks whose runs outlived the batch timeout and could not be stopped; their session is left to expire")
                .with_unit("{task}")
                .build(),
            held: meter
                .u64_gauge("session_lock.tasks.held")
                .with_description("Tasks the session held at its last tick")
                .with_unit("{task}")
                .build(),
            held_by_group: meter
                .u64_gauge("session_lock.tasks.held_by_group")
                .with_description("Tasks the session holds per group of a grouped table: the groups holding most, the rest as (other)")
                .with_unit("{task}")
                .build(),
            quarantined: meter
                .u64_gauge("session_lock.tasks.quarantined")
                .with_description("The task table's quarantined tasks (all sessions): picked up max_attempts times without finishing")
                .with_unit("{task}")
                .build(),
            suspect: meter
                .u64_gauge("session_lock.tasks.suspect")
                .with_description("The task table's free open tasks (all sessions) picked up at least twice, but fewer than max_attempts times, without finishing")
                .with_unit("{task}")
                .build(),
        }
    }

    pub(crate) fn tick(&self, seconds: f64) {
        self.ticks.add(1, &self.attrs);
        self.tick_duration.record(seconds, &self.attrs);
    }
    pub(crate) fn fetched(&self, n: usize) {
        self.fetched.add(n as u64, &self.attrs);
    }
    pub(crate) fn finished(&self, n: usize) {
        self.finished.add(n as u64, &self.attrs);
    }
    pub(crate) fn failed(&self, n: usize) {
        self.failed.add(n as u64, &self.attrs);
    }
    pub(crate) fn rejected(&self, n: usize) {
        self.rejected.add(n as u64, &self.attrs);
    }
    pub(crate) fn given_back(&self, n: usize) {
        self.given_back.add(n as u64, &self.attrs);
    }
    pub(crate) fn heartbeat_failure(&self) {
        self.heartbeat_failures.add(1, &self.attrs);
    }
    pub(crate) fn session_loss(&self) {
        self.session_losses.add(1, &self.attrs);
    }
    pub(crate) fn fence(&self) {
        self.fences.add(1, &self.attrs);
    }
    pub(crate) fn worker_restart(&self) {
        self.worker_restarts.add(1, &self.attrs);
    }
    pub(crate) fn stuck(&self, n: usize) {
        self.stuck.add(n as u64, &self.attrs);
    }
    pub(crate) fn held(&self, n: usize) {
        self.held.record(n as u64, &self.attrs);
    }
    /// Records a reading of the task table's gauges. A group named in an
    /// earlier reading but not in this one reads 0, so that no gauge keeps a
    /// count the session no longer holds.
    pub(crate) fn task_stats(&self, stats: &TaskStats, earlier: &[String]) -> Vec<String> {
        let mut held: Vec<(String, u64)> = stats
            .held_by_group
            .iter()
            .map(|(group, n)| (group.as_deref().unwrap_or(GROUP_NONE).to_owned(), *n))
            .collect();
        if stats.held_in_other_groups > 0 {
            held.push((GROUP_OTHER.to_owned(), stats.held_in_other_groups));
        }
        for (group, n) in &held {
            self.held_by_group.record(*n, &self.group_attrs(group));
        }
        let named: Vec<String> = held.into_iter().map(|(group, _)| group).collect();
        for gone in earlier.iter().filter(|g| !named.contains(g)) {
            self.held_by_group.record(0, &self.group_attrs(gone));
        }
        self.quarantined.record(stats.quarantined, &self.attrs);
        self.suspect.record(stats.suspect, &self.attrs);
        named
    }
    fn group_attrs(&self, group: &str) -> [KeyValue; 2] {
        [
            self.attrs[0].clone(),
            KeyValue::new(GROUP_ATTRIBUTE, group.to_owned()),
        ]
    }
}
