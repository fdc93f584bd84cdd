//! The test's own connections to the database: they outlive every fault.
//! A [`Conn`] reconnects on its next query after any error (a terminated
//! backend, a crash, a stop), never waits more than 10 s for an answer, and
//! names itself [`APP`] so that the `pg_terminate_backend` fault spares it.
//! [`Conn::rows`] retries through an outage and fails the test only after
//! [`GUARD`].

use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};

use super::{GUARD, POLL};

/// The test's own connections: excluded from `pg_terminate_backend`.
pub(super) const APP: &str = "session-lock-chaos";

pub(super) struct Conn {
    config: Config,
    client: Option<Client>,
}

impl Conn {
    pub(super) fn new(url: &str) -> Conn {
        let mut config: Config = url.parse().expect("a database URL");
        config
            .application_name(APP)
            .connect_timeout(Duration::from_secs(2));
        Conn {
            config,
            client: None,
        }
    }

    /// One attempt: an error (the database's message, or "timed out") drops
    /// the connection, and the next query opens a new one.
    pub(super) async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, conn) = self
                .config
                .connect(NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected");
        let res =
            match tokio::time::timeout(Duration::from_secs(10), client.query(sql, params)).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.to_string())),
                Err(_) => Err("timed out".to_string()),
            };
        if res.is_err() {
            self.client = None;
        }
        res
    }

    /// Retries through outages; fails the test after [`GUARD`].
    pub(super) async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<Row> {
        let start = Instant::now();
        loop {
            match self.query(sql, params).await {
                Ok(rows) => return rows,
                Err(e) => assert!(
                    start.elapsed() < GUARD,
                    "query failing for {GUARD:?}: {e}\n{sql}"
                ),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first row, retried as [`Conn::rows`].
    pub(super) async fn row(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Row {
        let rows = self.rows(sql, params).await;
        rows.into_iter()
            .next()
            .unwrap_or_else(|| panic!("no row from\n{sql}"))
    }

    /// The first column of the first row, retried as [`Conn::rows`].
    pub(super) async fn count(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
        self.row(sql, params).await.get(0)
    }

    /// The first column of every row, as text, retried as [`Conn::rows`].
    pub(super) async fn strings(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Vec<String> {
        self.rows(sql, params)
            .await
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}
