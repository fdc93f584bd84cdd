//! What is applied is what `session_lock.schema_migration` says: the
//! migrator creates that table itself and reads it before a run, and each
//! file runs in one transaction together with its row there, so a file is
//! recorded exactly when it was applied.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::pin;

use futures_core::Stream;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::location::failure;
use super::version::recorded_release;
use super::{MigrateError, Migration, MigrationKind};
use crate::error::describe_db;

const BOOTSTRAP: &str = "\
CREATE SCHEMA IF NOT EXISTS session_lock;
CREATE TABLE IF NOT EXISTS session_lock.schema_migration (
    set_name   text        NOT NULL,
    file       text        NOT NULL,
    kind       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (set_name, file)
);
ALTER TABLE session_lock.schema_migration ADD COLUMN IF NOT EXISTS applied_by text;";

const RECORD_ONCE: &str = "INSERT INTO session_lock.schema_migration (set_name, file, kind, checksum, applied_by) \
     VALUES ($1, $2, $3, $4, $5)";

const RECORD_ALWAYS: &str = "INSERT INTO session_lock.schema_migration (set_name, file, kind, checksum, applied_by) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (set_name, file) DO UPDATE \
     SET kind = EXCLUDED.kind, checksum = EXCLUDED.checksum, applied_at = now(), \
         applied_by = EXCLUDED.applied_by";

/// What the bookkeeping table holds: (set, file) -> (checksum, the
/// session-lock release that applied it).
pub(super) type Recorded = HashMap<(String, String), (String, Option<String>)>;

/// Creates the bookkeeping table if need be, and reads it.
pub(super) async fn recorded(client: &Client) -> Result<Recorded, MigrateError> {
    client.batch_execute(BOOTSTRAP).await?;
    let rows = client
        .query(
            "SELECT set_name, file, checksum, applied_by FROM session_lock.schema_migration",
            &[],
        )
        .await?;
    let mut recorded = Recorded::with_capacity(rows.len());
    for row in rows {
        recorded.insert(
            (row.try_get(0)?, row.try_get(1)?),
            (row.try_get(2)?, row.try_get(3)?),
        );
    }
    Ok(recorded)
}

/// Runs one file and records it, in one transaction.
pub(super) async fn apply(
    client: &mut Client,
    m: &Migration,
    checksum: &str,
) -> Result<(), MigrateError> {
    let db_err = |source| MigrateError::Db {
        migration: Some(m.name()),
        source,
    };
    let tx = client.transaction().await.map_err(db_err)?;
    if let Err((e, completed)) = execute_counting(tx.client(), &m.sql).await {
        rollback(tx, m).await;
        return Err(failure(m, e, Some(completed)));
    }
    let record = match m.kind {
        MigrationKind::Once => RECORD_ONCE,
        MigrationKind::Always => RECORD_ALWAYS,
    };
    let by = recorded_release(m);
    if let Err(e) = tx
        .execute(record, &[&m.set, &m.file, &m.kind.as_str(), &checksum, &by])
        .await
    {
        rollback(tx, m).await;
        return Err(db_err(e));
    }
    // A deferred constraint of the file may fail only here.
    tx.commit().await.map_err(|e| failure(m, e, None))
}

async fn rollback(tx: tokio_postgres::Transaction<'_>, m: &Migration) {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(migration = %m.name(), error = %describe_db(&e), "rollback failed");
    }
}

/// Runs `sql` with the simple query protocol; on error also returns how many
/// statements had completed, which identifies the failing one.
async fn execute_counting(
    client: &Client,
    sql: &str,
) -> Result<(), (tokio_postgres::Error, usize)> {
    let stream = client.simple_query_raw(sql).await.map_err(|e| (e, 0))?;
    let mut stream = pin!(stream);
    let mut completed = 0;
    while let Some(msg) = poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        match msg {
            Ok(SimpleQueryMessage::CommandComplete(_)) => completed += 1,
            Ok(_) => {}
            Err(e) => return Err((e, completed)),
        }
    }
    Ok(())
}
