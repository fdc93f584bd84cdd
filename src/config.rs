//! Runner configuration: a builder with documented defaults, validated at
//! [`RunnerConfigBuilder::build`].

use std::time::Duration;

/// Default session lease: how long a session lives without a heartbeat.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// Default interval between heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// The longest a heartbeat may take by default, unless the heartbeat
/// interval is shorter.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most tasks one session holds at a time.
pub const DEFAULT_MAX_TASKS: u32 = 10;
/// Default interval between ticks when there is no more work to drain.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// Default wait between ticks of a listening runner once its task table
/// has no open task: new tasks still wake it at once.
pub const DEFAULT_QUIET_TICK: Duration = Duration::from_secs(10);
/// Default number of tasker workers.
pub const DEFAULT_WORKERS: usize = 4;
/// Default time one batch may run before it is stopped.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time `Stop` waits for tasks in flight before stopping them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default age after which reclaimed sessions are deleted.
pub const DEFAULT_REAP_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// Default interval between reaping runs.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Default interval between readings of the task table's gauges.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(30);
/// Default longest wait between retries after a database error.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(10);
/// The largest `max_tasks` the SQL functions accept.
pub const MAX_TASKS_LIMIT: u32 = 10_000;
/// The largest worker pool accepted.
pub const MAX_WORKERS: usize = 1024;
/// The longest TTL the SQL functions accept.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest any other duration setting may be (a year): far beyond any
/// sensible value, and far from the overflow of `Instant` arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A configuration value that cannot work, named with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The runner name is empty or too long.
    #[error("runner name {0:?} is invalid: it must be 1 to 200 characters")]
    Name(String),
    /// A duration or size is zero where it must not be.
    #[error("{0} must be more than zero")]
    Zero(&'static str),
    /// A value is above its upper bound.
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        /// The setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// The largest value accepted.
        limit: String,
    },
    /// The heartbeat is not well under the TTL: a single late heartbeat
    /// would lose the session.
    #[error(
        "heartbeat {heartbeat:?} is not well under the session ttl {ttl:?}: it must be at most a third of it, so two heartbeats can fail before the lease runs out"
    )]
    HeartbeatTooSlow {
        /// The heartbeat interval.
        heartbeat: Duration,
        /// The session TTL.
        ttl: Duration,
    },
    /// A heartbeat may take so long that, with the next one, the renewal
    /// lands after the runner would have fenced itself: one slow heartbeat
    /// would cost the lease.
    #[error(
        "heartbeat_timeout {timeout:?} is too long for ttl {ttl:?}: a heartbeat that takes its whole timeout and the next one ({heartbeat:?} later) must land before the fence at ttl - safety_margin ({fence:?}); shorten heartbeat_timeout or the heartbeat, or lengthen the ttl"
    )]
    HeartbeatTimeoutTooLong {
        /// The heartbeat timeout.
        timeout: Duration,
        /// The heartbeat interval.
        heartbeat: Duration,
        /// The session TTL.
        ttl: Duration,
        /// ttl - safety_margin.
        fence: Duration,
    },
    /// Quiet ticks would come more often than ticks.
    #[error(
        "quiet_tick {quiet_tick:?} is shorter than tick {tick:?}: a quiet runner waits longer than a busy one; lengthen it, or set it to zero to turn quiet ticks off"
    )]
    QuietTickTooShort {
        /// The quiet tick.
        quiet_tick: Duration,
        /// The tick interval.
        tick: Duration,
    },
    /// The safety margin leaves no time between a heartbeat and the fence.
    #[error(
        "safety margin {margin:?} is too large for ttl {ttl:?} and heartbeat {heartbeat:?}: it must be less than ttl - heartbeat, or the runner would fence itself between two healthy heartbeats"
    )]
    MarginTooLarge {
        /// The safety margin.
        margin: Duration,
        /// The session TTL.
        ttl: Duration,
        /// The heartbeat interval.
        heartbeat: Duration,
    },
}

/// What a runner does with the tasks of a batch that its Tasker did not
/// complete (it failed, panicked, timed out, or left them unreported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailedTasks {
    /// Gives them back to the table (the task table's `fail_tasks`), each
    /// to wait out its retry backoff (the declaration's `retry_backoff`,
    /// doubled per attempt, at most `retry_backoff_max`) before any session
    /// picks it up again. Every pickup counts an attempt, so a task that
    /// keeps failing is quarantined after the declaration's `max_attempts`.
    #[default]
    GiveBack,
    /// Keeps them, and runs them again on the next tick (go-session-lock's
    /// behaviour). Attempts then count only pickups: a task that fails in
    /// a live session's hands is retried every tick and never quarantined,
    /// though one that kills its runner still is.
    Keep,
}

/// How a runner behaves. Build one with [`RunnerConfig::builder`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerConfig {
    pub(crate) name: String,
    pub(crate) ttl: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) safety_margin: Duration,
    pub(crate) max_tasks: u32,
    pub(crate) tick: Duration,
    pub(crate) quiet_tick: Duration,
    pub(crate) jitter: Duration,
    pub(crate) jitter_seed: Option<u64>,
    pub(crate) workers: usize,
    /// The least of the Tasker's time a batch hands each worker
    /// (`workers::slices`): not a setting, the tests shorten it.
    pub(crate) quantum: Duration,
    pub(crate) batch_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) drain_mode: bool,
    pub(crate) failed_tasks: FailedTasks,
    pub(crate) listen: bool,
    pub(crate) reap_after: Duration,
    pub(crate) reap_interval: Duration,
    pub(crate) stats_interval: Duration,
    pub(crate) retry_max: Duration,
}

impl RunnerConfig {
    /// A builder for a runner called `name`. Sessions of one name share one
    /// task table; runners of different names never interact.
    pub fn builder(name: impl Into<String>) -> RunnerConfigBuilder {
        RunnerConfigBuilder {
            config: RunnerConfig {
                name: name.into(),
                ttl: DEFAULT_TTL,
                heartbeat: DEFAULT_HEARTBEAT,
                heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
                safety_margin: DEFAULT_TTL / 5,
                max_tasks: DEFAULT_MAX_TASKS,
                tick: DEFAULT_TICK,
                quiet_tick: DEFAULT_QUIET_TICK,
                jitter: DEFAULT_TICK,
                jitter_seed: None,
                workers: DEFAULT_WORKERS,
                quantum: crate::workers::QUANTUM,
                batch_timeout: DEFAULT_BATCH_TIMEOUT,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                drain_mode: true,
                failed_tasks: FailedTasks::GiveBack,
                listen: true,
                reap_after: DEFAULT_REAP_AFTER,
                reap_interval: DEFAULT_REAP_INTERVAL,
                stats_interval: DEFAULT_STATS_INTERVAL,
                retry_max: DEFAULT_RETRY_MAX,
            },
            margin_set: false,
            jitter_set: false,
            quiet_tick_set: false,
            heartbeat_timeout_set: false,
        }
    }

    /// The runner's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The session lease.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }
    /// The longest one heartbeat may take.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_timeout
    }
    /// How long before the lease runs out the runner stops using its session.
    pub fn safety_margin(&self) -> Duration {
        self.safety_margin
    }
    /// The wait between ticks once the task table has no open task, while
    /// the runner listens; zero when quiet ticks are off.
    pub fn quiet_tick(&self) -> Duration {
        self.quiet_tick
    }
    /// The most tasks one session holds.
    pub fn max_tasks(&self) -> u32 {
        self.max_tasks
    }
    /// The tick interval.
    pub fn tick(&self) -> Duration {
        self.tick
    }
    /// The most random delay before the first tick.
    pub fn jitter(&self) -> Duration {
        self.jitter
    }
    /// The size of the worker pool.
    pub fn workers(&self) -> usize {
        self.workers
    }
    /// The per-batch timeout.
    pub fn batch_timeout(&self) -> Duration {
        self.batch_timeout
    }
    /// The drain timeout of `Stop`.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }
    /// What happens to the tasks a batch did not complete.
    pub fn failed_tasks(&self) -> FailedTasks {
        self.failed_tasks
    }
}

/// Builds a [`RunnerConfig`]; every setter documents its default.
#[derive(Debug, Clone)]
pub struct RunnerConfigBuilder {
    config: RunnerConfig,
    margin_set: bool,
    jitter_set: bool,
    quiet_tick_set: bool,
    heartbeat_timeout_set: bool,
}

impl RunnerConfigBuilder {
    /// How long a session lives without a heartbeat; its tasks move to the
    /// other sessions this long after the process dies. At most 1 day.
    /// Defaults to [`DEFAULT_TTL`] (2 minutes).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// The interval between heartbeats; at most a third of the TTL.
    /// Defaults to [`DEFAULT_HEARTBEAT`] (30 seconds).
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.config.heartbeat = heartbeat;
        self
    }

    /// The longest one heartbeat may take before it counts as failed and is
    /// retried on another connection. A heartbeat plus this timeout must
    /// fit before the fence (`ttl - safety_margin`), so that one slow
    /// heartbeat never costs the lease. Defaults to the heartbeat interval,
    /// at most [`DEFAULT_HEARTBEAT_TIMEOUT`] (10 seconds).
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.config.heartbeat_timeout = timeout;
        self.heartbeat_timeout_set = true;
        self
    }

    /// How long before the lease would run out, counted from the last
    /// successful heartbeat on this process's monotonic clock, the runner
    /// stops using its session (self-fencing), so a frozen or partitioned
    /// instance stops before the others take its tasks over.
    /// Defaults to a fifth of the TTL.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.config.safety_margin = margin;
        self.margin_set = true;
        self
    }

    /// The most tasks one session holds at a time, 1 to 10,000.
    /// Defaults to [`DEFAULT_MAX_TASKS`] (10).
    pub fn max_tasks(mut self, max_tasks: u32) -> Self {
        self.config.max_tasks = max_tasks;
        self
    }

    /// The interval between ticks when the runner is not draining a backlog.
    /// Defaults to [`DEFAULT_TICK`] (1 second).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.config.tick = tick;
        self
    }

    /// How long a listening runner waits between ticks once its task table
    /// has no open task at all (none free, held by any session, or waiting
    /// out a retry backoff): an INSERT, and a `retry` of quarantined tasks,
    /// notify and wake it at once, so only tasks that become open some
    /// other way (an UPDATE reopening a finished row, a table filled
    /// without triggers) wait up to this long. While any task is open the
    /// runner ticks every `tick`, so a dead session's tasks still move
    /// within its TTL and a tick. An idle fleet then costs the database a
    /// heartbeat and a call per runner per quiet tick instead of a call
    /// per tick. Zero turns quiet ticks off; without LISTEN they never
    /// start. Defaults to [`DEFAULT_QUIET_TICK`] (10 seconds), or the tick
    /// interval when that is longer.
    pub fn quiet_tick(mut self, quiet_tick: Duration) -> Self {
        self.config.quiet_tick = quiet_tick;
        self.quiet_tick_set = true;
        self
    }

    /// The most random delay before the first tick, so instances started
    /// together do not tick in step; zero disables it.
    /// Defaults to the tick interval.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.config.jitter = jitter;
        self.jitter_set = true;
        self
    }

    /// Seeds the jitter, for reproducible runs. Defaults to a seed drawn per
    /// process.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.config.jitter_seed = Some(seed);
        self
    }

    /// The number of tasker workers, each on a thread of its own, 1 to
    /// 1024. Defaults to [`DEFAULT_WORKERS`] (4). A batch goes over as
    /// many of them as its run time pays for: each gets at least 100 µs of
    /// the Tasker's time, by the pace of the last batch that ran in full,
    /// and all of them while that pace is unknown.
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// How long one batch may run before its unfinished tasks are given up
    /// (failed: see [`failed_tasks`](Self::failed_tasks)) and the worker
    /// restarted.
    /// Defaults to [`DEFAULT_BATCH_TIMEOUT`] (60 seconds).
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.config.batch_timeout = timeout;
        self
    }

    /// How long `Stop` lets tasks in flight run before stopping them.
    /// Defaults to [`DEFAULT_DRAIN_TIMEOUT`] (30 seconds).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Whether a tick that filled its whole share starts the next one at
    /// once instead of waiting for the tick interval. Defaults to true.
    pub fn drain_mode(mut self, on: bool) -> Self {
        self.config.drain_mode = on;
        self
    }

    /// What happens to the tasks of a batch that its Tasker did not
    /// complete. Defaults to [`FailedTasks::GiveBack`]: given back with a
    /// backoff, and quarantined after `max_attempts` pickups.
    pub fn failed_tasks(mut self, failed: FailedTasks) -> Self {
        self.config.failed_tasks = failed;
        self
    }

    /// Whether to LISTEN on the task table's notify channel so that new
    /// tasks wake an idle runner at once. Defaults to true (a no-op when the
    /// task type names no channel).
    pub fn listen(mut self, on: bool) -> Self {
        self.config.listen = on;
        self
    }

    /// How long after being reclaimed dead sessions are deleted.
    /// Defaults to [`DEFAULT_REAP_AFTER`] (1 day).
    pub fn reap_after(mut self, age: Duration) -> Self {
        self.config.reap_after = age;
        self
    }

    /// The interval between reaping runs.
    /// Defaults to [`DEFAULT_REAP_INTERVAL`] (10 minutes).
    pub fn reap_interval(mut self, interval: Duration) -> Self {
        self.config.reap_interval = interval;
        self
    }

    /// The interval between readings of the task table's gauges: the
    /// session's held tasks per group (`session_lock.tasks.held_by_group`,
    /// the 10 groups holding most, the rest as `(other)`), and the table's
    /// quarantined and suspect tasks (`session_lock.tasks.quarantined`,
    /// `session_lock.tasks.suspect`). One indexed query each time.
    /// Defaults to [`DEFAULT_STATS_INTERVAL`] (30 seconds).
    pub fn stats_interval(mut self, interval: Duration) -> Self {
        self.config.stats_interval = interval;
        self
    }

    /// The longest wait between retries after a database error (waits grow
    /// from 100 ms, with jitter). Defaults to [`DEFAULT_RETRY_MAX`] (10 seconds).
    pub fn retry_max(mut self, max: Duration) -> Self {
        self.config.retry_max = max;
        self
    }

    /// Checks the configuration and returns it, or the first problem found.
    pub fn build(self) -> Result<RunnerConfig, ConfigError> {
        let mut c = self.config;
        if !self.margin_set {
            c.safety_margin = c.ttl / 5;
        }
        if !self.jitter_set {
            c.jitter = c.tick;
        }
        if !self.quiet_tick_set {
            c.quiet_tick = DEFAULT_QUIET_TICK.max(c.tick);
        }
        if !self.heartbeat_timeout_set {
            c.heartbeat_timeout = c.heartbeat.min(DEFAULT_HEARTBEAT_TIMEOUT);
        }
        if c.name.is_empty() || c.name.chars().count() > 200 {
            return Err(ConfigError::Name(c.name));
        }
        for (what, d) in [
            ("ttl", c.ttl),
            ("heartbeat", c.heartbeat),
            ("heartbeat_timeout", c.heartbeat_timeout),
            ("tick", c.tick),
            ("batch_timeout", c.batch_timeout),
            ("drain_timeout", c.drain_timeout),
            ("reap_interval", c.reap_interval),
            ("stats_interval", c.stats_interval),
            ("retry_max", c.retry_max),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(what));
            }
        }
        for (what, d) in [
            ("heartbeat", c.heartbeat),
            ("heartbeat_timeout", c.heartbeat_timeout),
            ("safety_margin", c.safety_margin),
            ("tick", c.tick),
            ("quiet_tick", c.quiet_tick),
            ("jitter", c.jitter),
            ("batch_timeout", c.batch_timeout),
            ("drain_timeout", c.drain_timeout),
            ("reap_after", c.reap_after),
            ("reap_interval", c.reap_interval),
            ("stats_interval", c.stats_interval),
            ("retry_max", c.retry_max),
        ] {
            if d > MAX_DURATION {
                return Err(ConfigError::TooLarge {
                    what,
                    value: format!("{d:?}"),
                    limit: format!("{MAX_DURATION:?}"),
                });
            }
        }
        if !c.quiet_tick.is_zero() && c.quiet_tick < c.tick {
            return Err(ConfigError::QuietTickTooShort {
                quiet_tick: c.quiet_tick,
                tick: c.tick,
            });
        }
        if c.max_tasks == 0 {
            return Err(ConfigError::Zero("max_tasks"));
        }
        if c.workers == 0 {
            return Err(ConfigError::Zero("workers"));
        }
        if c.ttl > MAX_TTL {
            return Err(ConfigError::TooLarge {
                what: "ttl",
                value: format!("{:?}", c.ttl),
                limit: format!("{MAX_TTL:?}"),
            });
        }
        if c.max_tasks > MAX_TASKS_LIMIT {
            return Err(ConfigError::TooLarge {
                what: "max_tasks",
                value: c.max_tasks.to_string(),
                limit: MAX_TASKS_LIMIT.to_string(),
            });
        }
        if c.workers > MAX_WORKERS {
            return Err(ConfigError::TooLarge {
                what: "workers",
                value: c.workers.to_string(),
                limit: MAX_WORKERS.to_string(),
            });
        }
        if c.heartbeat.checked_mul(3).is_none_or(|h| h > c.ttl) {
            return Err(ConfigError::HeartbeatTooSlow {
                heartbeat: c.heartbeat,
                ttl: c.ttl,
            });
        }
        if c.safety_margin >= c.ttl - c.heartbeat {
            return Err(ConfigError::MarginTooLarge {
                margin: c.safety_margin,
                ttl: c.ttl,
                heartbeat: c.heartbeat,
            });
        }
        let fence = c.ttl - c.safety_margin;
        if c.heartbeat.saturating_add(c.heartbeat_timeout) > fence {
            return Err(ConfigError::HeartbeatTimeoutTooLong {
                timeout: c.heartbeat_timeout,
                heartbeat: c.heartbeat,
                ttl: c.ttl,
                fence,
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn defaults_are_the_seeds_and_valid() {
        let c = RunnerConfig::builder("r").build().unwrap();
        assert_eq!(c.ttl(), Duration::from_secs(120));
        assert_eq!(c.heartbeat(), Duration::from_secs(30));
        assert_eq!(c.max_tasks(), 10);
        assert_eq!(c.safety_margin(), Duration::from_secs(24));
    }

    #[test]
    fn the_quiet_tick_is_never_shorter_than_the_tick_unless_off() {
        let quiet = |b: RunnerConfigBuilder| b.build().unwrap().quiet_tick();
        let r = || RunnerConfig::builder("r");
        assert_eq!(quiet(r()), DEFAULT_QUIET_TICK);
        assert_eq!(
            quiet(r().tick(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(quiet(r().quiet_tick(Duration::ZERO)), Duration::ZERO);
        assert_eq!(
            quiet(r().tick(Duration::from_secs(60)).quiet_tick(Duration::ZERO)),
            Duration::ZERO
        );
    }

    #[test]
    fn jitter_follows_a_changed_tick_unless_set() {
        let c = RunnerConfig::builder("r")
            .tick(Duration::from_millis(300))
            .build()
            .unwrap();
        assert_eq!(c.jitter(), Duration::from_millis(300));
        let c = RunnerConfig::builder("r")
            .tick(Duration::from_millis(300))
            .jitter(Duration::ZERO)
            .build()
            .unwrap();
        assert_eq!(c.jitter(), Duration::ZERO);
    }

    #[test]
    fn huge_durations_are_rejected_not_overflowed() {
        let e = RunnerConfig::builder("r")
            .heartbeat(Duration::MAX)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::TooLarge {
                    what: "heartbeat",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn margin_follows_a_changed_ttl_unless_set() {
        let c = RunnerConfig::builder("r")
            .ttl(Duration::from_secs(10))
            .heartbeat(Duration::from_secs(1))
            .build()
            .unwrap();
        assert_eq!(c.safety_margin(), Duration::from_secs(2));
    }

    #[test]
    fn every_invalid_configuration_gives_its_error() {
        let s = Duration::from_secs;
        let base = || RunnerConfig::builder("valid");
        type Case = (&'static str, RunnerConfigBuilder, ConfigError, &'static str);
        let cases: Vec<Case> = vec![
            (
                "empty name",
                RunnerConfig::builder(""),
                ConfigError::Name(String::new()),
                "runner name",
            ),
            (
                "201-char name",
                RunnerConfig::builder("n".repeat(201)),
                ConfigError::Name("n".repeat(201)),
                "runner name",
            ),
            (
                "zero ttl",
                base().ttl(Duration::ZERO),
                ConfigError::Zero("ttl"),
                "ttl",
            ),
            (
                "zero heartbeat",
                base().heartbeat(Duration::ZERO),
                ConfigError::Zero("heartbeat"),
                "heartbeat",
            ),
            (
                "heartbeat above ttl/3",
                base().ttl(s(30)).heartbeat(Duration::from_millis(10_001)),
                ConfigError::HeartbeatTooSlow {
                    heartbeat: Duration::from_millis(10_001),
                    ttl: s(30),
                },
                "heartbeat",
            ),
            (
                "heartbeat that would overflow",
                base().heartbeat(Duration::MAX),
                ConfigError::TooLarge {
                    what: "heartbeat",
                    value: format!("{:?}", Duration::MAX),
                    limit: format!("{:?}", s(365 * 24 * 3600)),
                },
                "heartbeat",
            ),
            (
                "batch_timeout above a year",
                base().batch_timeout(Duration::MAX),
                ConfigError::TooLarge {
                    what: "batch_timeout",
                    value: format!("{:?}", Duration::MAX),
                    limit: format!("{:?}", s(365 * 24 * 3600)),
                },
                "batch_timeout",
            ),
            (
                "zero tick",
                base().tick(Duration::ZERO),
                ConfigError::Zero("tick"),
                "tick",
            ),
            (
                "zero max_tasks",
                base().max_tasks(0),
                ConfigError::Zero("max_tasks"),
                "max_tasks",
            ),
            (
                "max_tasks 100000",
                base().max_tasks(100_000),
                ConfigError::TooLarge {
                    what: "max_tasks",
                    value: "100000".into(),
                    limit: "10000".into(),
                },
                "max_tasks",
            ),
            (
                "zero workers",
                base().workers(0),
                ConfigError::Zero("workers"),
                "workers",
            ),
            (
                "5000 workers",
                base().workers(5000),
                ConfigError::TooLarge {
                    what: "workers",
                    value: "5000".into(),
                    limit: "1024".into(),
                },
                "workers",
            ),
            (
                "ttl of 2 days",
                base().ttl(s(2 * 24 * 3600)),
                ConfigError::TooLarge {
                    what: "ttl",
                    value: format!("{:?}", s(2 * 24 * 3600)),
                    limit: format!("{:?}", s(24 * 3600)),
                },
                "ttl",
            ),
            (
                "zero batch_timeout",
                base().batch_timeout(Duration::ZERO),
                ConfigError::Zero("batch_timeout"),
                "batch_timeout",
            ),
            (
                "zero drain_timeout",
                base().drain_timeout(Duration::ZERO),
                ConfigError::Zero("drain_timeout"),
                "drain_timeout",
            ),
            (
                "zero reap_interval",
                base().reap_interval(Duration::ZERO),
                ConfigError::Zero("reap_interval"),
                "reap_interval",
            ),
            (
                "zero stats_interval",
                base().stats_interval(Duration::ZERO),
                ConfigError::Zero("stats_interval"),
                "stats_interval",
            ),
            (
                "zero retry_max",
                base().retry_max(Duration::ZERO),
                ConfigError::Zero("retry_max"),
                "retry_max",
            ),
            (
                "safety margin equal to ttl - heartbeat",
                base().ttl(s(10)).heartbeat(s(3)).safety_margin(s(7)),
                ConfigError::MarginTooLarge {
                    margin: s(7),
                    ttl: s(10),
                    heartbeat: s(3),
                },
                "safety margin",
            ),
            (
                "zero heartbeat_timeout",
                base().heartbeat_timeout(Duration::ZERO),
                ConfigError::Zero("heartbeat_timeout"),
                "heartbeat_timeout",
            ),
            (
                "a heartbeat that could land after the fence",
                base().ttl(s(10)).heartbeat(s(3)).heartbeat_timeout(s(6)),
                ConfigError::HeartbeatTimeoutTooLong {
                    timeout: s(6),
                    heartbeat: s(3),
                    ttl: s(10),
                    fence: s(8),
                },
                "heartbeat_timeout 6s is too long for ttl 10s",
            ),
            (
                "a quiet tick shorter than the tick",
                base().tick(s(5)).quiet_tick(s(2)),
                ConfigError::QuietTickTooShort {
                    quiet_tick: s(2),
                    tick: s(5),
                },
                "quiet_tick 2s is shorter than tick 5s",
            ),
            (
                "safety margin above the ttl",
                base().ttl(s(10)).heartbeat(s(3)).safety_margin(s(60)),
                ConfigError::MarginTooLarge {
                    margin: s(60),
                    ttl: s(10),
                    heartbeat: s(3),
                },
                "safety margin",
            ),
        ];
        let mut failures = Vec::new();
        for (case, builder, expected, named) in cases {
            let got = std::panic::catch_unwind(|| builder.build());
            match got {
                Ok(Err(e)) if e == expected => {
                    let shown = e.to_string();
                    if !shown.contains(named) {
                        failures.push(format!("{case}: {shown:?} does not name {named:?}"));
                    }
                    let wrapped = Error::from(e).to_string();
                    if !wrapped.contains(&shown) {
                        failures.push(format!("{case}: Error shows {wrapped:?}"));
                    }
                }
                Ok(Err(e)) => failures.push(format!("{case}: expected {expected:?}, got {e:?}")),
                Ok(Ok(c)) => failures.push(format!("{case}: accepted {c:?}")),
                Err(_) => failures.push(format!("{case}: build() panicked")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));

        // The boundaries themselves are valid.
        let edge = base()
            .ttl(s(9))
            .heartbeat(s(3))
            .safety_margin(Duration::from_millis(5999))
            .heartbeat_timeout(Duration::from_millis(1))
            .max_tasks(10_000)
            .workers(1024)
            .build()
            .expect("heartbeat = ttl/3, margin just under ttl - heartbeat, a heartbeat timeout that just fits, max limits");
        assert_eq!(edge.safety_margin(), Duration::from_millis(5999));
        assert!(RunnerConfig::builder("n".repeat(200)).build().is_ok());
        assert!(base().ttl(s(24 * 3600)).build().is_ok());
    }
}
