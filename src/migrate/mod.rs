//! Applies the session-lock SQL (and, optionally, your own SQL) to a database.
//!
//! # Sets and files
//!
//! Migrations come in *sets*, applied in this order:
//!
//! 1. `session_lock`: the crate's own schema and functions, embedded in the
//!    binary at compile time (always present);
//! 2. `example`: the worked example task table and functions, added by
//!    [`Migrator::with_example`];
//! 3. your directories, added by [`Migrator::with_dir`] (set names `app`,
//!    `app2`, `app3`… in call order) or [`Migrator::with_named_dir`] (a name
//!    you choose).
//!
//! Within a set, files run in file-name order, comparing a leading number
//! numerically (`2_x` before `10_x`; zero-padding like `0002_x` works too).
//! The suffix decides how often a file runs (the split comes from
//! go-session-lock):
//!
//! * `*.up.sql` ([`MigrationKind::Once`]) is applied exactly once per
//!   database. Once applied it must never change: the migrator refuses to run
//!   if its checksum differs from the recorded one. Add a new file instead.
//! * `*.alwaysup.sql` ([`MigrationKind::Always`]) is re-applied on every run.
//!   It holds `CREATE OR REPLACE FUNCTION`s and the like, so editing it is how
//!   you change a function.
//!
//! # Bookkeeping
//!
//! The migrator creates the schema `session_lock` and the table
//! `session_lock.schema_migration (set_name, file, kind, checksum, applied_at)`
//! itself. Every file applied gets a row there, with the hex SHA-256 of its
//! bytes; rows of always-files are refreshed on every run.
//!
//! # Transactions and concurrency
//!
//! Each file runs in its own transaction, together with its bookkeeping row,
//! as one simple-protocol query, so a file may hold several statements and
//! dollar-quoted function bodies. It therefore must not contain transaction
//! control (`BEGIN`, `COMMIT`) nor statements that cannot run inside a
//! transaction block (`CREATE INDEX CONCURRENTLY`, `VACUUM`).
//!
//! A whole run holds the session-level advisory lock [`MIGRATION_LOCK_KEY`],
//! so any number of instances may run the migrator at start-up at once: they
//! take turns, and each once-file is applied by exactly one of them. The lock
//! is session-level, so the connection must be a real session (not a
//! transaction-mode pooler such as PgBouncer in `transaction` mode).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), session_lock::MigrateError> {
//! use session_lock::Migrator;
//!
//! let report = Migrator::new().with_dir("migrations")?.run(client).await?;
//! println!("applied {:?}, already there {:?}", report.applied, report.skipped);
//! # Ok(())
//! # }
//! ```

mod bookkeeping;
mod error;
mod generated;
mod location;
mod lock;
mod migration;
mod migrator;
mod statements;
mod version;

pub use error::MigrateError;
pub use lock::MIGRATION_LOCK_KEY;
pub use migration::{CORE_SET, EXAMPLE_SET, Migration, MigrationKind};
pub use migrator::{Migrator, Report};
