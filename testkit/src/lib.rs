//! What session-lock's tests, benchmarks and demo share, for your own tests
//! too:
//!
//! - [`embedded`]: a throwaway PostgreSQL started from the installed server
//!   binaries;
//! - [`db`]: one server per test run, one database per test (on the
//!   embedded server, or on `DATABASE_URL`'s);
//! - [`example`]: the worked example's task type and Taskers, over
//!   `public.example_task` (`Migrator::with_example`);
//! - [`pgbouncer`]: a throwaway PgBouncer in transaction mode in front of
//!   a server;
//! - [`process`]: `session-lock run` as child processes, one at a time or a
//!   [`Fleet`];
//! - [`wait_for_status`]: waiting on a runner's status instead of sleeping.
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod db;
pub mod embedded;
pub mod example;
pub mod pgbouncer;
pub mod process;
mod status;

pub use process::{Fleet, RunnerCommand, RunnerEvent, RunnerProcess, session_lock_bin};
pub use status::wait_for_status;
