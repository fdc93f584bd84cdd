//! A database clock that jumps. Leases are measured by the database's
//! clock at each check, so a jump of that clock moves every lease at once;
//! what must hold whatever it does: a session once reclaimed is never live
//! again, a lease never moves backwards, no finish of a stale holder is
//! accepted, and no task is lost. The server runs under libfaketime
//! (Debian's `faketime`), whose offset the test rewrites to jump the clock
//! of every backend at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use session_lock::{Database, Error, GetWork, Migrator, PgStore, Session, SessionStart, TaskId};
use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres};
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

const TTL: Duration = Duration::from_secs(30);

/// Where Debian's `libfaketime` package puts the preload library.
const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

fn libfaketime() -> &'static str {
    LIBFAKETIME
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime not found at {LIBFAKETIME:?}: install it (Debian: apt-get install faketime)"
            )
        })
}

/// A server whose clock is the real one plus the offset in `offset_file`.
struct JumpingServer {
    server: EmbeddedPostgres,
    offset_file: PathBuf,
}

impl JumpingServer {
    fn start() -> JumpingServer {
        let offset_file = std::env::temp_dir().join(format!(
            "session-lock-clock-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::write(&offset_file, "+0s\n").expect("write the clock offset");
        // The server runs as another user when the tests run as root.
        let _ = std::fs::set_permissions(
            &offset_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        );
        let options = EmbeddedOptions {
            env: vec![
                ("LD_PRELOAD".into(), libfaketime().into()),
                (
                    "FAKETIME_TIMESTAMP_FILE".into(),
                    offset_file.display().to_string(),
                ),
                // Read the file on every call: a jump reaches every backend.
                ("FAKETIME_NO_CACHE".into(), "1".into()),
                // The server's timers and latches keep the real monotonic clock.
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ],
            ..EmbeddedOptions::default()
        };
        let server =
            EmbeddedPostgres::start_with(options).expect("start a server under libfaketime");
        JumpingServer {
            server,
            offset_file,
        }
    }

    /// Sets the database clock to the real one plus `seconds`.
    fn jump_to(&self, seconds: i64) {
        std::fs::write(&self.offset_file, format!("{seconds:+}s\n"))
            .expect("write the clock offset");
    }
}

impl Drop for JumpingServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.offset_file);
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How far the database clock is ahead of this process's, in seconds.
async fn db_ahead(client: &Client) -> f64 {
    let db: f64 = client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .expect("read the database clock")
        .get(0);
    let here = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    db - here
}

/// Seconds left on `session`'s lease by the database clock.
async fn lease_left(client: &Client, session: &Session) -> f64 {
    client
        .query_one(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8
               FROM session_lock.session WHERE id = $1",
            &[&session.id],
        )
        .await
        .expect("read the lease")
        .get(0)
}

async fn held(store: &PgStore, session: &Session) -> Result<Vec<TaskId>, Error> {
    let work = store.get_work::<ExampleTask>(GetWork::new(session)).await?;
    Ok(work.tasks.iter().map(|t| t.id).collect())
}

fn assert_lost<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    match result {
        Err(e) if e.is_session_lost() => {}
        other => panic!("{what}: expected a lost session (SL001), got {other:?}"),
    }
}

#[tokio::test]
async fn a_database_clock_that_jumps_never_revives_a_session_nor_loses_a_task() {
    let server = tokio::task::spawn_blocking(JumpingServer::start)
        .await
        .expect("start the server");
    let url = server.server.url("postgres");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    Migrator::new()
        .with_example()
        .run_url(&url)
        .await
        .expect("migrate");
    client
        .batch_execute(
            "INSERT INTO public.example_task (payload) SELECT 'clock' FROM generate_series(1, 10)",
        )
        .await
        .expect("seed");
    let store = PgStore::connect(&url).await.expect("store");

    // A holds every task.
    let a = store
        .start_session(&SessionStart::new("clock", TTL, 10))
        .await
        .expect("start A");
    let a_held = held(&store, &a).await.expect("A ticks");
    assert_eq!(a_held.len(), 10, "A holds every task");

    // The database clock jumps forward by four leases: A's lease has run out
    // by the database's clock, though its process renewed it a moment ago.
    server.jump_to(120);
    let ahead = db_ahead(&client).await;
    assert!(
        (100.0..140.0).contains(&ahead),
        "libfaketime did not move the database clock: it is {ahead:.1} s ahead"
    );
    let b = store
        .start_session(&SessionStart::new("clock", TTL, 10))
        .await
        .expect("start B");
    let b_held = held(&store, &b).await.expect("B ticks");
    assert_eq!(
        b_held.len(),
        10,
        "B took over A's tasks once A's lease ran out"
    );

    // A is reclaimed: none of its calls is accepted, its finish least of all.
    let finished = store.finish_tasks::<ExampleTask>(&a, &a_held).await;
    assert_lost(finished, "A's finish after the jump");
    assert_lost(
        store.bump_session(&a, TTL).await,
        "A's heartbeat after the jump",
    );
    assert_lost(held(&store, &a).await, "A's tick after the jump");

    // The clock jumps back. A stays reclaimed, whatever its expiry says now;
    // B's lease keeps its expiry (it never moves backwards), so it is
    // lengthened by the jump.
    server.jump_to(0);
    let ahead = db_ahead(&client).await;
    assert!(
        ahead.abs() < 20.0,
        "the database clock did not come back: {ahead:.1} s ahead"
    );
    assert_lost(
        store.bump_session(&a, TTL).await,
        "A's heartbeat after the jump back",
    );
    assert_lost(held(&store, &a).await, "A's tick after the jump back");
    store.bump_session(&b, TTL).await.expect("B renews");
    let left = lease_left(&client, &b).await;
    assert!(
        left > 100.0,
        "B's lease moved backwards with the clock: {left:.1} s left"
    );

    // Nothing was finished by A; B finishes everything.
    let open_by_a: i64 = client
        .query_one(
            "SELECT count(*) FROM public.example_task WHERE finished_by = $1",
            &[&a.id],
        )
        .await
        .expect("count A's finishes")
        .get(0);
    assert_eq!(open_by_a, 0, "a stale holder's finish was accepted");
    let done = store
        .finish_tasks::<ExampleTask>(&b, &b_held)
        .await
        .expect("B finishes");
    assert_eq!(done.len(), 10, "B finishes every task it holds");
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM public.example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .expect("count open")
        .get(0);
    assert_eq!(open, 0, "no task is lost");
    drop(store);
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .expect("stop the server");
}
