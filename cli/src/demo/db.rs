//! Every query the demo sends, on a connection of its own that fails
//! instead of hanging when the database goes away. The demo counts only the
//! tasks it inserted (their id range), and on a user's database refuses to
//! start while others' open tasks or live runners would mix with its own.

use std::collections::HashMap;
use std::time::Duration;

use session_lock::{ErrorChain, Migrator};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::RUNNER_NAME;

/// Runner names whose live sessions would take the demo's tasks.
const RIVAL_NAMES: &[&str] = &[RUNNER_NAME, "example"];

/// Applies the crate's migrations and the worked example, quietly unless
/// `SESSION_LOCK_LOG` asks for logs.
pub(super) async fn migrate(client: &mut Client) -> Result<(), String> {
    use tracing::instrument::WithSubscriber;
    let migrator = Migrator::new().with_example();
    let result = if std::env::var_os("SESSION_LOCK_LOG").is_some() {
        migrator.run(client).await
    } else {
        migrator
            .run(client)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
    };
    result
        .map(drop)
        .map_err(|e| format!("applying the migrations: {e}"))
}

/// Connects the demo's own client: a connect timeout and a statement timeout,
/// so a vanished database fails the demo instead of hanging it; the URL's
/// sslmode is honoured as everywhere else.
pub(super) async fn connect(url: &str) -> Result<Client, String> {
    let options = session_lock::StoreOptions {
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let client = session_lock::connect_one_with(url, options)
        .await
        .map_err(|e| match e {
            session_lock::Error::BadUrl(msg) => {
                format!("DATABASE_URL is not a valid PostgreSQL URL or key=value string: {msg}")
            }
            other => ErrorChain(&other).to_string(),
        })?;
    client
        .batch_execute("SET application_name = 'session-lock-demo'")
        .await
        .map_err(|e| db_error("naming the connection", &e))?;
    Ok(client)
}

/// On a user's database: refuses when others' open tasks or live runners
/// would mix with the demo's.
pub(super) async fn check_database_is_free(client: &Client) -> Result<(), String> {
    let open = count(
        client,
        "counting open example tasks",
        "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
        &[],
    )
    .await?;
    if open > 0 {
        return Err(format!(
            "example_task in the DATABASE_URL database already has {open} open tasks, which the demo's runners would run: \
             finish or delete them first, or unset DATABASE_URL to let the demo start a throwaway PostgreSQL"
        ));
    }
    let names: Vec<String> = RIVAL_NAMES.iter().map(|s| s.to_string()).collect();
    let live = count(
        client,
        "counting live sessions",
        "SELECT count(*) FROM session_lock.session \
          WHERE name = ANY($1) AND reclaimed_at IS NULL AND ended_at IS NULL AND expires_at > now()",
        &[&names],
    )
    .await?;
    if live > 0 {
        return Err(format!(
            "{live} live session(s) named {} in the DATABASE_URL database would take the demo's tasks: \
             stop those runners (or another demo) first, or unset DATABASE_URL",
            RIVAL_NAMES.join(" or ")
        ));
    }
    Ok(())
}

/// Inserts the tasks in one statement and returns their id range.
pub(super) async fn seed(client: &Client, tasks: u32) -> Result<(i64, i64), String> {
    let n = i64::from(tasks);
    let payload = format!("session-lock demo {} task ", std::process::id());
    let row = client
        .query_one(
            "WITH ins AS (INSERT INTO example_task (payload) \
                          SELECT $2 || g FROM generate_series(1, $1::bigint) g RETURNING id) \
             SELECT min(id), max(id), count(*) FROM ins",
            &[&n, &payload],
        )
        .await
        .map_err(|e| db_error("seeding the tasks", &e))?;
    let (first, last): (i64, i64) = (row.get(0), row.get(1));
    let in_range = count(
        client,
        "checking the seeded tasks",
        "SELECT count(*) FROM example_task WHERE id BETWEEN $1 AND $2",
        &[&first, &last],
    )
    .await?;
    if in_range != u64::from(tasks) {
        return Err(format!(
            "another process inserted into example_task while the demo seeded it (ids {first}..={last} hold {in_range} rows, not {n}): run the demo again"
        ));
    }
    Ok((first, last))
}

/// The demo's tasks, read from the database.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) finished: u64,
    pub(super) open: u64,
    /// Open tasks per holding session.
    pub(super) held: HashMap<i64, u64>,
    /// Finished tasks per finishing session.
    pub(super) done_by: HashMap<i64, u64>,
}

impl Snapshot {
    pub(super) async fn read(client: &Client, range: (i64, i64)) -> Result<Snapshot, String> {
        let rows = client
            .query(
                "SELECT CASE WHEN finished_at IS NULL THEN session_id ELSE finished_by END, \
                        finished_at IS NULL, count(*) \
                   FROM example_task WHERE id BETWEEN $1 AND $2 GROUP BY 1, 2",
                &[&range.0, &range.1],
            )
            .await
            .map_err(|e| db_error("reading the progress", &e))?;
        let mut snap = Snapshot::default();
        for row in rows {
            let session: Option<i64> = row.get(0);
            let open: bool = row.get(1);
            let n = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
            if open {
                snap.open += n;
                if let Some(s) = session {
                    *snap.held.entry(s).or_default() += n;
                }
            } else {
                snap.finished += n;
                if let Some(s) = session {
                    *snap.done_by.entry(s).or_default() += n;
                }
            }
        }
        Ok(snap)
    }

    pub(super) fn held(&self, session: i64) -> u64 {
        self.held.get(&session).copied().unwrap_or(0)
    }

    pub(super) fn done_by(&self, session: i64) -> u64 {
        self.done_by.get(&session).copied().unwrap_or(0)
    }
}

/// Of `sessions`, each one's open tasks with an execution still running,
/// and all its open tasks: `(running, held)`.
pub(super) async fn running_and_held(
    client: &Client,
    sessions: &[i64],
) -> Result<HashMap<i64, (i64, i64)>, String> {
    let rows = client
        .query(
            "SELECT t.session_id, count(*), count(*) FILTER (WHERE EXISTS ( \
                    SELECT 1 FROM example_task_run r \
                     WHERE r.task_id = t.id AND r.session_id = t.session_id \
                       AND r.finished_at IS NULL)) \
               FROM example_task t \
              WHERE t.session_id = ANY($1) AND t.finished_at IS NULL \
              GROUP BY 1",
            &[&sessions],
        )
        .await
        .map_err(|e| db_error("choosing the runner to kill", &e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(2), r.get(1))))
        .collect())
}

/// The open tasks `session` holds: those of a killed session, which must
/// move.
pub(super) async fn held_by(client: &Client, session: i64) -> Result<u64, String> {
    count(
        client,
        "counting the killed session's tasks",
        "SELECT count(*) FROM example_task WHERE session_id = $1 AND finished_at IS NULL",
        &[&session],
    )
    .await
}

/// Executions of the demo's tasks, per executing session.
pub(super) async fn executions_by_session(
    client: &Client,
    (lo, hi): (i64, i64),
) -> Result<HashMap<i64, u64>, String> {
    let rows = client
        .query(
            "SELECT session_id, count(*) FROM example_task_run WHERE task_id BETWEEN $1 AND $2 GROUP BY 1",
            &[&lo, &hi],
        )
        .await
        .map_err(|e| db_error("counting executions", &e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), u64::try_from(r.get::<_, i64>(1)).unwrap_or(0)))
        .collect())
}

/// Executions of the demo's tasks beyond one per task.
pub(super) async fn duplicate_executions(
    client: &Client,
    (lo, hi): (i64, i64),
) -> Result<u64, String> {
    count(
        client,
        "counting duplicate executions",
        "SELECT count(*) - count(DISTINCT task_id) FROM example_task_run WHERE task_id BETWEEN $1 AND $2",
        &[&lo, &hi],
    )
    .await
}

/// By the database's clock, from the seed's commit to the last finish;
/// `None` until a task is finished after a measurable time.
pub(super) async fn run_duration(
    client: &Client,
    (lo, hi): (i64, i64),
) -> Result<Option<Duration>, String> {
    let seconds: Option<f64> = client
        .query_one(
            "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(created_at))::float8 \
               FROM example_task WHERE id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await
        .map_err(|e| db_error("reading the run's duration", &e))?
        .get(0);
    Ok(seconds.filter(|&s| s > 0.0).map(Duration::from_secs_f64))
}

/// Executions by `session` of the demo's tasks that another session
/// finished: the killed session's tasks run again by a survivor.
pub(super) async fn reruns_of(
    client: &Client,
    (lo, hi): (i64, i64),
    session: i64,
) -> Result<u64, String> {
    count(
        client,
        "counting the killed session's executions",
        "SELECT count(*) FROM example_task_run r JOIN example_task t ON t.id = r.task_id \
          WHERE r.task_id BETWEEN $1 AND $2 AND r.session_id = $3 \
            AND t.finished_by IS DISTINCT FROM $3",
        &[&lo, &hi, &session],
    )
    .await
}

/// Of `sessions`, each one's pid (as the session recorded it) and how it
/// ended: `ended`, `expired, reclaimed`, `expired` or `live`.
pub(super) async fn session_ends(
    client: &Client,
    sessions: &[i64],
) -> Result<HashMap<i64, (i32, &'static str)>, String> {
    let rows = client
        .query(
            "SELECT id, pid, ended_at IS NOT NULL, reclaimed_at IS NOT NULL, expires_at <= now() \
               FROM session_lock.session WHERE id = ANY($1)",
            &[&sessions],
        )
        .await
        .map_err(|e| db_error("reading the sessions", &e))?;
    let mut ends = HashMap::new();
    for r in rows {
        let end = if r.get::<_, bool>(2) {
            "ended"
        } else if r.get::<_, bool>(3) {
            "expired, reclaimed"
        } else if r.get::<_, bool>(4) {
            "expired"
        } else {
            "live"
        };
        ends.insert(r.get(0), (r.get(1), end));
    }
    Ok(ends)
}

/// The one number `sql` selects, a count (never negative); `what` names
/// the query in its error.
async fn count(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, String> {
    let n: i64 = client
        .query_one(sql, params)
        .await
        .map_err(|e| db_error(what, &e))?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A database error with the server's message, if it came from the server,
/// or with its causes ("error connecting to server: Connection refused").
fn db_error(what: &str, e: &tokio_postgres::Error) -> String {
    format!("{what}: {}", ErrorChain(e))
}
