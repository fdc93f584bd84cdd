//! One migrator at a time per database: a whole run holds a session-level
//! advisory lock, and gives it back however the run ended.

use tokio_postgres::Client;

use super::MigrateError;
use crate::error::describe_db;

/// The key of the session-level advisory lock (`pg_advisory_lock`) held for
/// the whole of [`Migrator::run`](crate::migrate::Migrator::run): the ASCII
/// bytes of `"sesslock"`.
pub const MIGRATION_LOCK_KEY: i64 = 0x7365_7373_6c6f_636b;

/// Takes the lock, waiting for any other migrator first.
pub(super) async fn lock(client: &Client) -> Result<(), MigrateError> {
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .try_get(0)?;
    if !got {
        tracing::info!("waiting for another migrator to finish");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
    }
    Ok(())
}

/// Releases the lock after a run that ended with `result`. The run's own
/// error wins over a failure to release; a successful run fails only if
/// releasing did.
pub(super) async fn unlock<T>(
    client: &Client,
    result: Result<T, MigrateError>,
) -> Result<T, MigrateError> {
    let unlocked = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .and_then(|row| row.try_get::<_, bool>(0));
    match (result, unlocked) {
        (Ok(report), Ok(true)) => Ok(report),
        (Ok(report), Ok(false)) => {
            tracing::warn!("the migration advisory lock was no longer held at the end of the run");
            Ok(report)
        }
        (Ok(_), Err(e)) => Err(MigrateError::Db {
            migration: None,
            source: e,
        }),
        (Err(e), Ok(_)) => Err(e),
        (Err(e), Err(unlock)) => {
            tracing::warn!(error = %describe_db(&unlock), "could not release the migration advisory lock");
            Err(e)
        }
    }
}
