//! Attempts, retries, quarantine and fencing tokens, at the protocol's
//! level: every pickup counts an attempt and draws a fencing token that
//! grows with every change of holder (whichever session takes the task);
//! a task given back as failed waits out a doubling backoff; a task picked
//! up max_attempts times without finishing is quarantined, counted by
//! nobody's share, until an operator retries it.

use std::time::Duration;

use session_lock::{
    Database, GetWork, Migrator, PgStore, Session, SessionStart, TaskId, TaskTable,
};
use session_lock_testkit::db::{TestDb, migrated_db};
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

const TTL: Duration = Duration::from_secs(60);

struct Setup {
    _db: TestDb,
    store: PgStore,
    client: Client,
}

/// A migrated database whose example table is declared with
/// `max_attempts` and a first backoff of `backoff`, and `tasks` open tasks.
async fn setup(max_attempts: i32, backoff: Duration, tasks: i64) -> Setup {
    let db = migrated_db().await;
    Migrator::new()
        .with_example()
        .task_table(
            TaskTable::new("public.example_task")
                .finished_by("finished_by")
                .max_attempts(max_attempts)
                .retry_backoff(backoff, Duration::from_secs(3600)),
        )
        .run_url(&db.url)
        .await
        .expect("declare with retries");
    let store = PgStore::connect(&db.url).await.expect("store");
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1::bigint) g",
            &[&tasks],
        )
        .await
        .expect("seed");
    Setup {
        _db: db,
        store,
        client,
    }
}

async fn start(store: &PgStore, capacity: u32) -> Session {
    store
        .start_session(&SessionStart::new("retries", TTL, capacity))
        .await
        .expect("start a session")
}

async fn work(store: &PgStore, session: &Session) -> Vec<ExampleTask> {
    let w = store
        .get_work::<ExampleTask>(GetWork::new(session))
        .await
        .expect("get_work");
    assert!(w.unreadable.is_empty(), "rows scan: {:?}", w.unreadable);
    w.tasks
}

/// Ends the session's lease now, as if its process had died.
async fn expire(client: &Client, session: &Session) {
    client
        .execute(
            "UPDATE session_lock.session SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&session.id],
        )
        .await
        .expect("expire");
}

/// Seconds until the task's backoff ends (None: no backoff).
async fn backoff_left(client: &Client, task: TaskId) -> Option<f64> {
    client
        .query_one(
            "SELECT extract(epoch FROM sl_retry_at - clock_timestamp())::float8 FROM example_task WHERE id = $1",
            &[&task],
        )
        .await
        .expect("read sl_retry_at")
        .get(0)
}

async fn end_backoff(client: &Client, task: TaskId) {
    client
        .execute(
            "UPDATE example_task SET sl_retry_at = clock_timestamp() WHERE id = $1",
            &[&task],
        )
        .await
        .expect("end the backoff");
}

#[tokio::test]
async fn the_fencing_token_grows_with_every_holder_even_when_an_older_session_takes_over() {
    let s = setup(5, Duration::from_secs(1), 1).await;
    // The older session (lower id) is full with nothing; the newer one
    // takes the task first.
    let older = start(&s.store, 1).await;
    let newer = start(&s.store, 1).await;
    assert!(older.id < newer.id);
    // Weighted shares of one task over two sessions of capacity 1: the
    // second by id gets it.
    let task = work(&s.store, &newer)
        .await
        .pop()
        .expect("the newer session holds the task");
    let first_fence = task.fence.expect("a pickup draws a token");
    assert_eq!(task.attempts, 1);

    // The account the task updates, fenced by the token.
    s.client
        .batch_execute(
            "CREATE TABLE account (id int PRIMARY KEY, owner text, last_fence bigint NOT NULL DEFAULT 0);
             INSERT INTO account VALUES (1, 'nobody', 0);",
        )
        .await
        .expect("account table");
    let fenced_write =
        "UPDATE account SET owner = $1, last_fence = $2 WHERE id = 1 AND last_fence <= $2";

    // The newer session pauses past its lease; the older one takes over.
    expire(&s.client, &newer).await;
    let taken = work(&s.store, &older).await;
    let task_again = taken
        .iter()
        .find(|t| t.id == task.id)
        .expect("the older session took the task over");
    let second_fence = task_again.fence.expect("a token");
    assert!(
        second_fence > first_fence,
        "the new holder's token {second_fence} must exceed the old one's {first_fence}, though its session id {} is lower than {}",
        older.id,
        newer.id
    );
    assert_eq!(task_again.attempts, task.attempts + 1);

    // The new holder writes; the paused one wakes and tries to.
    let new_write = s
        .client
        .execute(fenced_write, &[&"older", &second_fence])
        .await
        .expect("new holder's write");
    assert_eq!(new_write, 1, "the current holder's write lands");
    let stale_write = s
        .client
        .execute(fenced_write, &[&"newer", &first_fence])
        .await
        .expect("stale holder's write");
    assert_eq!(stale_write, 0, "a stale holder's write is fenced off");
    let owner: String = s
        .client
        .query_one("SELECT owner FROM account WHERE id = 1", &[])
        .await
        .expect("read the account")
        .get(0);
    assert_eq!(owner, "older");
    // And its finish is refused too.
    let finish = s
        .store
        .finish_tasks::<ExampleTask>(&newer, &[task.id])
        .await;
    assert!(matches!(finish, Err(e) if e.is_session_lost()));
}

#[tokio::test]
async fn a_failed_task_waits_out_a_doubling_backoff_before_anyone_picks_it_up() {
    let s = setup(10, Duration::from_secs(30), 1).await;
    let a = start(&s.store, 10).await;
    let task = work(&s.store, &a).await.pop().expect("a task").id;

    for attempt in 1..=3u32 {
        let given = s
            .store
            .fail_tasks::<ExampleTask>(&a, &[task])
            .await
            .expect("fail_tasks");
        assert_eq!(
            given,
            vec![task],
            "attempt {attempt}: the failed task is given back"
        );
        let left = backoff_left(&s.client, task).await.expect("a backoff");
        let expected = 30.0 * f64::from(2u32.pow(attempt - 1));
        assert!(
            (expected - 2.0..=expected).contains(&left),
            "attempt {attempt}: backoff {left:.1} s, expected about {expected} s"
        );
        // Nobody picks it up while it waits, and it counts in no share.
        let b = start(&s.store, 10).await;
        assert!(
            work(&s.store, &b).await.is_empty(),
            "attempt {attempt}: picked up during its backoff"
        );
        assert!(work(&s.store, &a).await.is_empty());
        s.store.end_session(&b).await.expect("end b");
        end_backoff(&s.client, task).await;
        let again = work(&s.store, &a).await;
        assert_eq!(
            again.len(),
            1,
            "attempt {attempt}: picked up again after the backoff"
        );
        assert_eq!(again[0].attempts, attempt as i32 + 1);
    }
    // A task the session no longer holds is not given back by it.
    let b = start(&s.store, 10).await;
    let none = s
        .store
        .fail_tasks::<ExampleTask>(&b, &[task])
        .await
        .expect("fail_tasks");
    assert!(none.is_empty(), "only the holder gives a task back");
}

#[tokio::test]
async fn a_task_picked_up_max_attempts_times_is_quarantined_until_retried() {
    let s = setup(3, Duration::ZERO, 2).await;
    let poison: TaskId = s
        .client
        .query_one("SELECT min(id) FROM example_task", &[])
        .await
        .expect("the first task")
        .get(0);
    // Three holders die holding it (the other task is finished each time it
    // is held, so only the poison one stays open).
    let mut last = None;
    for attempt in 1..=3 {
        let session = start(&s.store, 10).await;
        let tasks = work(&s.store, &session).await;
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        assert!(
            ids.contains(&poison),
            "attempt {attempt}: picked up: {ids:?}"
        );
        let others: Vec<TaskId> = ids.iter().copied().filter(|&id| id != poison).collect();
        s.store
            .finish_tasks::<ExampleTask>(&session, &others)
            .await
            .expect("finish the others");
        expire(&s.client, &session).await;
        last = Some(session);
    }
    let last = last.expect("three holders");

    // Quarantined: nobody picks it up, and it is listed with its attempts
    // and last holder.
    let survivor = start(&s.store, 10).await;
    assert!(
        work(&s.store, &survivor).await.is_empty(),
        "a quarantined task was picked up"
    );
    let listed = s
        .client
        .query(
            "SELECT task_id, attempts, last_session FROM session_lock.quarantined_tasks('public.example_task')",
            &[],
        )
        .await
        .expect("list quarantined");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].get::<_, i64>(0), poison);
    assert_eq!(listed[0].get::<_, i32>(1), 3);
    assert_eq!(listed[0].get::<_, Option<i64>>(2), Some(last.id));

    // The operator retries it: picked up again, its attempts from zero.
    let released: Vec<TaskId> = s
        .client
        .query(
            "SELECT * FROM session_lock.retry_tasks('public.example_task', ARRAY[$1]::bigint[])",
            &[&poison],
        )
        .await
        .expect("retry")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(released, vec![poison]);
    let again = work(&s.store, &survivor).await;
    assert_eq!(
        again.iter().map(|t| (t.id, t.attempts)).collect::<Vec<_>>(),
        vec![(poison, 1)]
    );
    let done = s
        .store
        .finish_tasks::<ExampleTask>(&survivor, &[poison])
        .await
        .expect("finish");
    assert_eq!(done, vec![poison]);
    let open: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .expect("count open")
        .get(0);
    assert_eq!(open, 0, "nothing is lost");
}

#[tokio::test]
async fn retry_refuses_a_table_that_is_not_declared() {
    let s = setup(3, Duration::ZERO, 0).await;
    s.client
        .batch_execute("CREATE TABLE not_tasks (id bigint PRIMARY KEY)")
        .await
        .expect("a table");
    let err = s
        .client
        .query(
            "SELECT * FROM session_lock.retry_tasks('public.not_tasks')",
            &[],
        )
        .await
        .expect_err("an undeclared table is refused");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "SL005");
    assert!(db.message().contains("not_tasks"), "{}", db.message());
}
