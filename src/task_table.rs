//! A task table declaration made in Rust: what
//! `session_lock.declare_task_table` takes, applied by
//! [`Migrator::task_table`](crate::Migrator::task_table) at the end of every
//! migration run.
//!
//! A declaration says only what differs between task tables; session-lock
//! generates the protocol from it (README: declaring a task table). The
//! fragments are SQL written by the developer, never built from input: they
//! become part of the generated functions, which run with the owner's
//! rights. They refer to the table's columns unqualified, may not contain
//! `;` or `$`, and are checked against the table when declared.

use std::time::Duration;

/// A task table for session-lock, and what is specific to it. Every setter
/// says its default; the defaults fit a table with a BIGINT `id` and a
/// `finished_at TIMESTAMPTZ` column, open while `finished_at IS NULL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTable {
    pub(crate) table: String,
    pub(crate) open_when: String,
    pub(crate) finish: String,
    pub(crate) finished_by: Option<String>,
    pub(crate) order_by: Option<String>,
    pub(crate) id_column: String,
    /// `Some("")`: the default channel; `None`: no notifications.
    pub(crate) notify: Option<String>,
    pub(crate) fn_prefix: Option<String>,
    pub(crate) lock_timeout: Duration,
    /// `None`: never quarantine.
    pub(crate) max_attempts: Option<i32>,
    pub(crate) retry_backoff: Duration,
    pub(crate) retry_backoff_max: Duration,
    pub(crate) group_by: Option<String>,
}

/// The default [`TaskTable::lock_timeout`].
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// The default [`TaskTable::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;
/// The default [`TaskTable::retry_backoff`].
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// The default longest backoff of [`TaskTable::retry_backoff`].
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(600);

impl TaskTable {
    /// Declares `table` (schema-qualified, e.g. `"public.email"`; resolved
    /// by PostgreSQL as a `regclass`).
    pub fn new(table: impl Into<String>) -> Self {
        TaskTable {
            table: table.into(),
            open_when: "finished_at IS NULL".into(),
            finish: "finished_at = now()".into(),
            finished_by: None,
            order_by: None,
            id_column: "id".into(),
            notify: Some(String::new()),
            fn_prefix: None,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            max_attempts: Some(DEFAULT_MAX_ATTEMPTS),
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            group_by: None,
        }
    }

    /// Which rows are open (still to do): a boolean SQL expression over the
    /// row's columns. Defaults to `finished_at IS NULL`.
    pub fn open_when(mut self, predicate: impl Into<String>) -> Self {
        self.open_when = predicate.into();
        self
    }

    /// How a row is marked finished: a SQL `SET` list over the row's
    /// columns, which must make [`open_when`](Self::open_when) false.
    /// Defaults to `finished_at = now()`.
    pub fn finish(mut self, set_list: impl Into<String>) -> Self {
        self.finish = set_list.into();
        self
    }

    /// A BIGINT column that receives the id of the session that finished
    /// the row. Defaults to none.
    pub fn finished_by(mut self, column: impl Into<String>) -> Self {
        self.finished_by = Some(column.into());
        self
    }

    /// The order of pickup: an `ORDER BY` list over the row's columns (also
    /// the columns of the protocol's index, after `session_id`). Defaults to
    /// the id column (oldest first).
    pub fn order_by(mut self, order: impl Into<String>) -> Self {
        self.order_by = Some(order.into());
        self
    }

    /// The BIGINT primary key column. Defaults to `id`.
    pub fn id_column(mut self, column: impl Into<String>) -> Self {
        self.id_column = column.into();
        self
    }

    /// The channel notified (once per inserting statement) when rows are
    /// inserted, which runners LISTEN on. Defaults to
    /// `session_lock_<table name>`.
    pub fn notify(mut self, channel: impl Into<String>) -> Self {
        self.notify = Some(channel.into());
        self
    }

    /// No notifications: runners find new tasks on their tick alone.
    pub fn no_notify(mut self) -> Self {
        self.notify = None;
        self
    }

    /// The leading name of the generated functions, in the schema
    /// `session_lock` (`<prefix>_get_work`, ...). Defaults to the table's
    /// name.
    pub fn fn_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.fn_prefix = Some(prefix.into());
        self
    }

    /// The longest any statement of the table's protocol waits for a lock
    /// someone else holds, at most a minute. Defaults to
    /// [`DEFAULT_LOCK_TIMEOUT`] (1 second).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// After how many pickups an unfinished task is quarantined: no longer
    /// picked up until an operator retries it (`session-lock retry`). Every
    /// pickup counts, including one whose session then died. 1 to
    /// 1,000,000; defaults to [`DEFAULT_MAX_ATTEMPTS`] (5).
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Never quarantine: a task is picked up again however often it failed.
    pub fn no_quarantine(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// How long a task given back as failed waits before it can be picked
    /// up again, doubled per attempt so far, at most `max` (at most a day,
    /// and `max` at most 7 days). Defaults to [`DEFAULT_RETRY_BACKOFF`] (1
    /// second) and [`DEFAULT_RETRY_BACKOFF_MAX`] (10 minutes). A zero
    /// backoff retries at once.
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.retry_backoff = first;
        self.retry_backoff_max = max;
        self
    }

    /// A column whose value groups the tasks (a tenant, a customer, a
    /// queue; NULL: no group): pickup then goes round-robin across the
    /// groups with free tasks, one task of each in turn, from where each
    /// session's last round stopped, instead of strictly in
    /// [`order_by`](Self::order_by) (which still orders the tasks within a
    /// group), so that a group with ten tasks is not starved by one with a
    /// million. Defaults to none.
    pub fn group_by(mut self, column: impl Into<String>) -> Self {
        self.group_by = Some(column.into());
        self
    }

    /// The table as given.
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// The statement that applies a [`TaskTable`]; every value is a parameter.
pub(crate) const DECLARE: &str = "SELECT session_lock.declare_task_table(\
     $1::text::regclass, open_when => $2, finish => $3, finished_by => $4::text::name, \
     order_by => $5, id_column => $6::text::name, notify => $7, fn_prefix => $8, \
     lock_timeout => $9, max_attempts => $10, retry_backoff => $11, \
     retry_backoff_max => $12, group_by => $13::text::name)";
