//! One PostgreSQL server per test run, one database per test.
//!
//! With `DATABASE_URL` set (a superuser connection), every database is created
//! on that server; otherwise an [`EmbeddedPostgres`] is started on first use and
//! lives until the test process exits (its parent-death signal stops it then).
//!
//! Each `#[tokio::test]` has its own runtime, and a client dies with the runtime
//! that spawned its connection, so nothing here caches clients across tests.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::embedded::EmbeddedPostgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// The run's embedded server, or why it could not start.
static SERVER: OnceLock<Result<EmbeddedPostgres, String>> = OnceLock::new();
/// The run's migrated template database, or why it could not be built.
static TEMPLATE: OnceLock<Result<String, String>> = OnceLock::new();
/// Numbers this process's test databases.
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// The application name test connections use.
const APPLICATION_NAME: &str = "session-lock-tests";

/// `DATABASE_URL`, if set and not empty: the server the databases are
/// created on instead of an embedded one.
pub fn external_url() -> Option<String> {
    std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty())
}

/// The run's embedded server, started on first use; `None` when `DATABASE_URL`
/// is set. Panics with the reason (and what to install) if it cannot start.
///
/// Blocks while the server starts; from async code prefer [`fresh_db`] /
/// [`migrated_db`], which wait on a blocking thread.
pub fn server() -> Option<&'static EmbeddedPostgres> {
    if external_url().is_some() {
        return None;
    }
    let server = SERVER.get_or_init(|| {
        // A plain thread, so no test's runtime is involved in the start.
        std::thread::spawn(|| EmbeddedPostgres::start().map_err(|e| e.to_string()))
            .join()
            .unwrap_or_else(|p| Err(panic_message(&*p)))
    });
    match server {
        Ok(server) => {
            server.cleanup_at_exit();
            Some(server)
        }
        Err(e) => panic!("could not start the test PostgreSQL server: {e}"),
    }
}

/// A superuser connection URL for the server's maintenance database.
fn admin_url() -> String {
    match external_url() {
        Some(url) => url,
        None => server()
            .expect("no DATABASE_URL, so there is an embedded server")
            .url("postgres"),
    }
}

/// A database made for one test. On an external (`DATABASE_URL`) server it is
/// dropped again when this is dropped, unless the test panicked.
#[derive(Debug)]
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// A superuser connection URL for it.
    pub url: String,
}

impl TestDb {
    fn new(name: String, admin_url: &str) -> Self {
        let url = with_dbname(admin_url, &name);
        TestDb { name, url }
    }

    /// Connection settings for the database, with `application_name` set.
    pub fn config(&self) -> Config {
        let mut config: Config = self
            .url
            .parse()
            .unwrap_or_else(|e| panic!("bad test database URL {}: {e}", self.url));
        config.application_name(APPLICATION_NAME);
        config
    }

    /// A new connection to the database, driven by a task on the current runtime.
    pub async fn client(&self) -> Client {
        connect(&self.config(), &self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = external_url() else {
            return; // the embedded server and its databases vanish with the run
        };
        if std::thread::panicking() {
            eprintln!("keeping test database {} for inspection", self.name);
            return;
        }
        run_sql_on_own_thread(
            admin,
            vec![format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )],
        );
    }
}

/// Runs the statements, one at a time, on an admin connection from a fresh
/// thread with its own runtime (the caller's runtime may be shutting down),
/// ignoring errors.
fn run_sql_on_own_thread(admin_url: String, statements: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let config: Config = admin_url.parse().ok()?;
            let (client, conn) = config.connect(NoTls).await.ok()?;
            tokio::spawn(conn);
            for sql in statements {
                let _ = client.batch_execute(&sql).await;
            }
            Some(())
        })
    })
    .join();
}

/// Drops the template database on an external server when the test process
/// exits (the embedded server's data directory goes away by itself).
extern "C" fn drop_template_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let (Some(admin), Some(Ok(name))) = (external_url(), TEMPLATE.get()) {
            run_sql_on_own_thread(
                admin,
                vec![
                    format!("ALTER DATABASE \"{name}\" WITH IS_TEMPLATE false"),
                    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                ],
            );
        }
    });
}

/// A brand-new, empty database (cloned from `template0`) on the run's server.
pub async fn fresh_db() -> TestDb {
    let admin = blocking(admin_url).await;
    let name = next_db_name();
    create_database(&admin, &name, "template0").await;
    TestDb::new(name, &admin)
}

/// A new database with the crate's migrations and the worked example applied.
///
/// The first call of the run builds a template database with
/// `Migrator::new().with_example()`; every call clones it.
pub async fn migrated_db() -> TestDb {
    let admin = blocking(admin_url).await;
    let template = blocking(|| {
        TEMPLATE.get_or_init(|| {
            // Its own thread and runtime, whichever test's runtime asks first.
            std::thread::spawn(build_template)
                .join()
                .unwrap_or_else(|p| Err(panic_message(&*p)))
        })
    })
    .await;
    let template = match template {
        Ok(t) => t,
        Err(e) => panic!("could not build the migrated template database: {e}"),
    };
    let name = next_db_name();
    create_database(&admin, &name, template).await;
    TestDb::new(name, &admin)
}

/// Creates `sl_template_<pid>`, migrates it, and closes it to connections so
/// that it can be cloned concurrently.
fn build_template() -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a runtime: {e}"))?;
    rt.block_on(async {
        let admin_url = admin_url();
        let name = format!("sl_template_{}", std::process::id());
        let admin = connect(&admin_config(&admin_url), "the maintenance database").await;
        // Left over on an external server by an earlier process with our pid?
        // (Each statement alone: DROP DATABASE refuses to run in a transaction.)
        let _ = admin
            .batch_execute(&format!("ALTER DATABASE \"{name}\" WITH IS_TEMPLATE false"))
            .await;
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
        create_database(&admin_url, &name, "template0").await;

        let (mut client, conn) = admin_config(&with_dbname(&admin_url, &name))
            .connect(NoTls)
            .await
            .map_err(|e| format!("connecting to {name}: {}", pg_error(&e)))?;
        let conn = tokio::spawn(conn);
        let report = session_lock::Migrator::new()
            .with_example()
            .run(&mut client)
            .await
            .map_err(|e| format!("migrating {name}: {e}"))?;
        drop(client);
        let _ = conn.await; // the connection is closed once this returns
        let _ = report;

        let lock =
            format!("ALTER DATABASE \"{name}\" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false");
        admin
            .batch_execute(&lock)
            .await
            .map_err(|e| format!("closing {name} to connections: {}", pg_error(&e)))?;
        if external_url().is_some() {
            // SAFETY: an `extern "C"` function that never unwinds.
            unsafe { libc::atexit(drop_template_at_exit) };
        }
        Ok(name)
    })
}

/// `sl_test_<pid>_<n>`.
fn next_db_name() -> String {
    format!(
        "sl_test_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    )
}

/// `CREATE DATABASE name TEMPLATE template`, retrying while something is
/// still connected to the template (SQLSTATE 55006).
async fn create_database(admin_url: &str, name: &str, template: &str) {
    let admin = connect(&admin_config(admin_url), "the maintenance database").await;
    let sql = format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\"");
    let mut attempt = 0;
    loop {
        attempt += 1;
        match admin.batch_execute(&sql).await {
            Ok(()) => return,
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && attempt < 10 => {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => panic!("{sql} failed: {}", pg_error(&e)),
        }
    }
}

fn admin_config(url: &str) -> Config {
    let mut config: Config = url
        .parse()
        .unwrap_or_else(|e| panic!("bad DATABASE_URL {url}: {e}"));
    config.application_name(APPLICATION_NAME);
    config
}

/// Connects and spawns the connection on the current runtime.
async fn connect(config: &Config, what: &str) -> Client {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("could not connect to {what}: {}", pg_error(&e)));
    tokio::spawn(async move {
        // Errors here are connections killed by a server restart or the test's end.
        let _ = conn.await;
    });
    client
}

/// `url` pointing at database `dbname` (URL or `key=value` form).
fn with_dbname(url: &str, dbname: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let query = rest[authority_end..]
                .find('?')
                .map_or("", |q| &rest[authority_end + q..]);
            return format!("{scheme}{}/{dbname}{query}", &rest[..authority_end]);
        }
    }
    format!("{url} dbname={dbname}")
}

/// An error with the server's message and SQLSTATE, if it came from the server.
fn pg_error(e: &tokio_postgres::Error) -> String {
    session_lock::ErrorChain(e).to_string()
}

/// Runs `f` on the runtime's blocking pool, passing its panics on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".into())
}
