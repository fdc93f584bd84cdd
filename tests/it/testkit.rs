//! The testkit's database harness: each test its own database, one server
//! per run, and an embedded server that restarts in place.

use std::sync::Arc;

use session_lock_testkit::db::{external_url, fresh_db};
use session_lock_testkit::embedded::{EmbeddedPostgres, ShutdownMode};
use tokio_postgres::{Client, Config, NoTls};

#[tokio::test]
async fn harness_gives_each_test_its_own_database() {
    let a = fresh_db().await;
    let b = fresh_db().await;
    assert_ne!(a.name, b.name);
    let ca = a.client().await;
    let cb = b.client().await;

    let current: String = ca
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, a.name);

    ca.batch_execute("CREATE TABLE only_in_a (id int)")
        .await
        .unwrap();
    let count = "SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'";
    let in_a: i64 = ca.query_one(count, &[]).await.unwrap().get(0);
    let in_b: i64 = cb.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!((in_a, in_b), (1, 0));

    let new_enough: bool = ca
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 150000",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(new_enough, "the tests need PostgreSQL 15 or later");
}

#[tokio::test]
async fn embedded_server_restarts() {
    if external_url().is_some() {
        eprintln!("skipping embedded_server_restarts: DATABASE_URL is set");
        return;
    }
    // A second server: the shared one serves tests running in parallel.
    let pg = Arc::new(
        blocking(EmbeddedPostgres::start)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let config = admin_config(&pg.url("postgres"));
    let old = connect(&config, "the second server").await;
    old.batch_execute("SELECT 1").await.unwrap();
    let pid_before = pg.pid().expect("running");

    let pg2 = pg.clone();
    blocking(move || pg2.restart(ShutdownMode::Immediate))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let pid_after = pg.pid().expect("running again");
    assert_ne!(pid_before, pid_after);
    assert!(
        old.batch_execute("SELECT 1").await.is_err(),
        "a connection from before the restart still works"
    );
    let new = connect(&config, "the restarted server").await;
    let one: i32 = new.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop((old, new));

    let data_dir = pg.data_dir().to_path_buf();
    assert!(data_dir.exists());
    let pg = Arc::into_inner(pg).expect("no other owner");
    blocking(move || drop(pg)).await;
    assert!(!data_dir.exists(), "{} was not removed", data_dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid_after}")).exists(),
        "the postmaster is still running"
    );
}

fn admin_config(url: &str) -> Config {
    url.parse().unwrap_or_else(|e| panic!("bad URL {url}: {e}"))
}

async fn connect(config: &Config, what: &str) -> Client {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("could not connect to {what}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}
