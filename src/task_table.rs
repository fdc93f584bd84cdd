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
}

/// The default [`TaskTable::lock_timeout`].
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

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

    /// The leading name of the generated functions, in the table's schema
    /// (`<prefix>_get_work`, ...). Defaults to the table's name.
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

    /// The table as given.
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// The statement that applies a [`TaskTable`]; every value is a parameter.
pub(crate) const DECLARE: &str = "SELECT session_lock.declare_task_table(\
     $1::text::regclass, open_when => $2, finish => $3, finished_by => $4::text::name, \
     order_by => $5, id_column => $6::text::name, notify => $7, fn_prefix => $8, \
     lock_timeout => $9)";
