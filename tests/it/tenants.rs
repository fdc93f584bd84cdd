//! Tenant groups: a task table declared with a group key picks up
//! round-robin across the groups with free tasks, one task of each in turn
//! from where each session's last round stopped, so that small groups are
//! not starved by a big one; tasks without a group are one more group; the
//! rest of a share is filled in order. The worked example is grouped by
//! `tenant`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use session_lock::{Database, GetWork, PgStore, Session, SessionStart, TaskId};
use session_lock_testkit::db::migrated_db;
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

const TTL: Duration = Duration::from_secs(60);

async fn start(store: &PgStore, capacity: u32) -> Session {
    store
        .start_session(&SessionStart::new("tenants", TTL, capacity))
        .await
        .expect("start a session")
}

async fn work(store: &PgStore, session: &Session) -> Vec<ExampleTask> {
    store
        .get_work::<ExampleTask>(GetWork::new(session))
        .await
        .expect("get_work")
        .tasks
}

async fn finish(store: &PgStore, session: &Session, tasks: &[ExampleTask]) {
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    let done = store
        .finish_tasks::<ExampleTask>(session, &ids)
        .await
        .expect("finish");
    assert_eq!(done.len(), ids.len());
}

/// A big tenant inserted first, then ten small ones and three tasks without
/// a tenant.
async fn seed(client: &Client) {
    client
        .batch_execute(
            "INSERT INTO example_task (payload, tenant) SELECT 'big', 'big' FROM generate_series(1, 1000);
             INSERT INTO example_task (payload, tenant)
                  SELECT 'small', 'small-' || lpad((g % 10)::text, 2, '0') FROM generate_series(1, 20) g;
             INSERT INTO example_task (payload) SELECT 'none' FROM generate_series(1, 3);",
        )
        .await
        .expect("seed");
}

#[tokio::test]
async fn pickup_goes_round_robin_across_tenants_from_where_each_session_stopped() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client).await;
    let store = PgStore::connect(&db.url).await.expect("store");
    let session = start(&store, 4).await;

    // Rounds of 4: each takes one task of each group in turn.
    let mut first_pickup: BTreeMap<Option<String>, usize> = BTreeMap::new();
    let mut per_round = Vec::new();
    for round in 0..8 {
        let tasks = work(&store, &session).await;
        assert_eq!(tasks.len(), 4, "round {round}: a full share");
        let groups: BTreeSet<Option<String>> = tasks.iter().map(|t| t.tenant.clone()).collect();
        for t in &tasks {
            first_pickup.entry(t.tenant.clone()).or_insert(round);
        }
        per_round.push(groups);
        finish(&store, &session, &tasks).await;
    }
    // 12 groups (big, ten small, none) in rounds of 4: every group within
    // the first three rounds, each round four different groups.
    for (round, groups) in per_round.iter().enumerate().take(3) {
        assert_eq!(
            groups.len(),
            4,
            "round {round} took four different groups: {groups:?}"
        );
    }
    assert_eq!(
        first_pickup.len(),
        12,
        "every group was served: {first_pickup:?}"
    );
    assert!(
        first_pickup.values().all(|&r| r < 3),
        "every group within three rounds: {first_pickup:?}"
    );
    // Strictly in id order, the small tenants would have waited 1000 tasks.
    let big_done: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task WHERE tenant = 'big' AND finished_at IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        big_done < 10,
        "the big tenant took {big_done} of 32 pickups"
    );
}

#[tokio::test]
async fn two_sessions_share_the_rounds_without_taking_a_task_twice() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client).await;
    let store = PgStore::connect(&db.url).await.expect("store");
    let a = start(&store, 5).await;
    let b = start(&store, 5).await;
    let mut small_seen = BTreeSet::new();
    for _ in 0..4 {
        let (ta, tb) = tokio::join!(work(&store, &a), work(&store, &b));
        let ids_a: BTreeSet<TaskId> = ta.iter().map(|t| t.id).collect();
        let ids_b: BTreeSet<TaskId> = tb.iter().map(|t| t.id).collect();
        assert!(ids_a.is_disjoint(&ids_b), "a task held by two sessions");
        for t in ta.iter().chain(&tb) {
            if let Some(tenant) = t.tenant.as_deref().filter(|t| t.starts_with("small")) {
                small_seen.insert(tenant.to_owned());
            }
        }
        finish(&store, &a, &ta).await;
        finish(&store, &b, &tb).await;
    }
    assert_eq!(
        small_seen.len(),
        10,
        "every small tenant served: {small_seen:?}"
    );
    let holders: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task WHERE session_id IS NOT NULL AND finished_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(holders, 0, "everything held was finished");
}

#[tokio::test]
async fn a_group_column_that_does_not_exist_is_refused_by_name() {
    let db = migrated_db().await;
    let client = db.client().await;
    let err = client
        .batch_execute(
            "SELECT session_lock.declare_task_table('public.example_task', finished_by => 'finished_by', group_by => 'customer')",
        )
        .await
        .expect_err("refused");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "SL005");
    assert!(
        db_err.message().contains("customer"),
        "{}",
        db_err.message()
    );
}

#[tokio::test]
async fn stats_name_the_groups_a_session_holds_most_and_count_the_rest() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO example_task (payload, tenant)
                  SELECT 'x', 'g' || lpad((g % 12)::text, 2, '0') FROM generate_series(0, 47) g;",
        )
        .await
        .expect("seed");
    let store = PgStore::connect(&db.url).await.expect("store");
    let session = start(&store, 14).await;
    assert_eq!(work(&store, &session).await.len(), 14);
    // Among the free tasks: two picked up max_attempts (5) times, three
    // twice, one once.
    client
        .batch_execute(
            "UPDATE example_task SET sl_attempts = 5 WHERE id IN (SELECT id FROM example_task WHERE session_id IS NULL ORDER BY id LIMIT 2);
             UPDATE example_task SET sl_attempts = 2 WHERE id IN (SELECT id FROM example_task WHERE session_id IS NULL AND sl_attempts = 0 ORDER BY id LIMIT 3);
             UPDATE example_task SET sl_attempts = 1 WHERE id IN (SELECT id FROM example_task WHERE session_id IS NULL AND sl_attempts = 0 ORDER BY id LIMIT 1);",
        )
        .await
        .expect("attempts");

    let stats = store
        .task_stats::<ExampleTask>(session.id, 10)
        .await
        .expect("stats")
        .expect("PgStore reads stats");
    let held: Vec<u64> = stats.held_by_group.iter().map(|(_, n)| *n).collect();
    assert_eq!(held.len(), 10, "ten groups named: {stats:?}");
    assert!(
        held.windows(2).all(|w| w[0] >= w[1]),
        "most held first: {stats:?}"
    );
    assert!(
        stats.held_in_other_groups > 0,
        "12 groups held, 2 not named: {stats:?}"
    );
    assert_eq!(
        held.iter().sum::<u64>() + stats.held_in_other_groups,
        14,
        "{stats:?}"
    );
    assert_eq!((stats.quarantined, stats.suspect), (2, 3), "{stats:?}");

    // Another session's holdings are not this one's; a session holding
    // nothing names no group.
    let idle = start(&store, 1).await;
    let none = store
        .task_stats::<ExampleTask>(idle.id, 10)
        .await
        .expect("stats")
        .expect("PgStore reads stats");
    assert!(
        none.held_by_group.is_empty() && none.held_in_other_groups == 0,
        "{none:?}"
    );
    assert_eq!(
        (none.quarantined, none.suspect),
        (2, 3),
        "table-wide: {none:?}"
    );
}

#[tokio::test]
async fn the_tasks_without_a_group_get_their_turn_among_more_groups_than_a_share() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO example_task (payload, tenant)
                  SELECT 'x', chr(65 + (g % 26)) FROM generate_series(0, 259) g;
             INSERT INTO example_task (payload) SELECT 'none' FROM generate_series(1, 5);",
        )
        .await
        .expect("seed");
    let store = PgStore::connect(&db.url).await.expect("store");
    let session = start(&store, 10).await;
    // 26 groups and the NULL one: 27 in a cycle, so the NULL group comes
    // up within three rounds of 10.
    let mut rounds_until_none = None;
    for round in 0..3 {
        let tasks = work(&store, &session).await;
        assert_eq!(tasks.len(), 10);
        if rounds_until_none.is_none() && tasks.iter().any(|t| t.tenant.is_none()) {
            rounds_until_none = Some(round);
        }
        finish(&store, &session, &tasks).await;
    }
    assert_eq!(
        rounds_until_none,
        Some(2),
        "the NULL group follows Z, in the third round"
    );
}

#[tokio::test]
async fn a_foreign_lock_on_a_groups_first_task_passes_to_its_next() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO example_task (payload, tenant) VALUES ('a1', 'a'), ('a2', 'a'), ('b1', 'b'), ('b2', 'b');",
        )
        .await
        .expect("seed");
    let mut foreign = db.client().await;
    let tx = foreign.transaction().await.expect("begin");
    let locked: i64 = tx
        .query_one(
            "SELECT id FROM example_task WHERE payload = 'a1' FOR UPDATE",
            &[],
        )
        .await
        .expect("lock a1")
        .get(0);
    let store = PgStore::connect(&db.url).await.expect("store");
    let session = start(&store, 2).await;
    let tasks = work(&store, &session).await;
    let payloads: BTreeSet<String> = tasks.iter().map(|t| t.payload.clone()).collect();
    assert_eq!(
        payloads,
        BTreeSet::from(["a2".to_owned(), "b1".to_owned()]),
        "group a's next task, not a second of b's; task {locked} stays free"
    );
    tx.rollback().await.expect("rollback");
}

#[tokio::test]
async fn a_cursor_that_no_longer_reads_as_the_group_type_starts_at_the_first_group() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "ALTER TABLE example_task ADD COLUMN shard integer;
             INSERT INTO example_task (payload, shard) SELECT 'x', g % 3 FROM generate_series(1, 9) g;
             SELECT session_lock.declare_task_table('public.example_task', open_when => 'finished_at IS NULL',
                 finish => 'finished_at = now()', finished_by => 'finished_by', group_by => 'shard');",
        )
        .await
        .expect("group by an integer");
    let store = PgStore::connect(&db.url).await.expect("store");
    let session = start(&store, 3).await;
    client
        .execute(
            "UPDATE session_lock.session SET group_cursor = 'acme' WHERE id = $1",
            &[&session.id],
        )
        .await
        .expect("a cursor of the text key of before");
    let tasks = work(&store, &session).await;
    assert_eq!(tasks.len(), 3, "get_work works: {tasks:?}");
}

#[tokio::test]
async fn a_group_key_of_a_type_the_generated_code_cannot_order_is_refused_by_name() {
    let db = migrated_db().await;
    let client = db.client().await;
    let err = client
        .batch_execute(
            "CREATE DOMAIN public.customer_key AS text;
             ALTER TABLE example_task ADD COLUMN customer public.customer_key;
             SELECT session_lock.declare_task_table('public.example_task', open_when => 'finished_at IS NULL',
                 finish => 'finished_at = now()', finished_by => 'finished_by', group_by => 'customer');",
        )
        .await
        .expect_err("refused");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "SL005");
    assert!(
        db_err.message().contains("customer_key"),
        "{}",
        db_err.message()
    );
}
