//! Least privilege and TLS.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use session_lock::{
    Database, Migrator, PgStore, Progress, Runner, RunnerConfig, SessionStart, StoreOptions, Task,
    TaskerError, TlsMode,
};
use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::wait_for_status;

use session_lock_testkit::db::migrated_db;

const DEADLINE: Duration = Duration::from_secs(60);

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[actix_rt::test]
async fn a_runtime_role_with_execute_only_runs_the_runner_and_touches_nothing_else() {
    let db = migrated_db().await;
    let admin = db.client().await;
    // The documented setup (README, least privilege): a group role the
    // migrations grant EXECUTE to, and a login role in it.
    let role = format!("{}_runtime", db.name);
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'session_lock_runtime') THEN
                     CREATE ROLE session_lock_runtime NOLOGIN;
                 END IF;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;
             CREATE ROLE {role} LOGIN IN ROLE session_lock_runtime;"
        ))
        .await
        .unwrap();
    // Re-applying the always-files grants the runtime role what it needs.
    let mut owner = db.client().await;
    Migrator::new()
        .with_example()
        .run(&mut owner)
        .await
        .unwrap();
    admin
        .execute(
            "INSERT INTO example_task (payload) SELECT 'lp' FROM generate_series(1, 40)",
            &[],
        )
        .await
        .unwrap();

    let mut config = db.config();
    config.user(&role);
    let store = PgStore::from_config(config.clone(), StoreOptions::default())
        .await
        .unwrap();
    let tasker = |tasks: Vec<ExampleTask>, _: Progress| async move {
        Ok::<_, TaskerError>(tasks.iter().map(Task::id).collect())
    };
    let runner_config = RunnerConfig::builder("least-privilege")
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .build()
        .unwrap();
    let runner = Runner::new(runner_config, store.clone(), tasker).start();
    let mut status = runner.subscribe();
    let done = wait_for_status(&mut status, DEADLINE, |s| s.finished >= 40).await;
    assert!(
        done.is_some(),
        "the runner finished its tasks as the runtime role: {:?}",
        runner.status()
    );
    runner.stop().await;
    let open: i64 = admin
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    let (host, pid): (String, i32) = {
        let row = admin
            .query_one(
                "SELECT host, pid FROM session_lock.session WHERE name = 'least-privilege'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        pid as u32,
        std::process::id(),
        "the session records our pid"
    );
    assert!(!host.is_empty());

    // Everything else is refused to the runtime role.
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let forbidden = [
        "SELECT * FROM example_task",
        "UPDATE example_task SET finished_at = now()",
        "DELETE FROM example_task",
        "SELECT * FROM session_lock.session",
        "UPDATE session_lock.session SET expires_at = now() + interval '1 day'",
        "SELECT * FROM session_lock.live_session",
        "SELECT * FROM example_task_run",
        "SELECT session_lock.example_task_free_of(ARRAY[1::bigint], 10)",
        "SELECT session_lock.example_task_finish_ids(1, ARRAY[1::bigint])",
        "SELECT session_lock.example_task_count_open('x', 1, 0, 10::bigint)",
        "SELECT session_lock.example_task_sweep(1, NULL, true)",
        "SELECT session_lock.end_session(1)",
        "CREATE FUNCTION session_lock.intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SELECT session_lock.generate_task_tables()",
        "SELECT session_lock.declare_task_table('public.example_task')",
        "SELECT session_lock.forget_task_table('public.example_task')",
        "SELECT session_lock.work_begin(1, 10, interval '1 minute')",
        "SELECT session_lock.lock_session(1)",
        "CREATE TABLE public.intruder (id int)",
    ];
    for sql in forbidden {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("42501"), "{sql}: {err:?}");
    }
    // And a role outside session_lock_runtime cannot even start a session.
    let outsider = format!("{}_outsider", db.name);
    admin
        .batch_execute(&format!("CREATE ROLE {outsider} LOGIN"))
        .await
        .unwrap();
    let mut config = db.config();
    config.user(&outsider);
    let store = PgStore::from_config(config, StoreOptions::default())
        .await
        .unwrap();
    let err = store
        .start_session(&SessionStart::new("x", Duration::from_secs(60), 10))
        .await
        .unwrap_err();
    assert_eq!(err.db_code(), Some("42501"), "{err}");
    drop(client);
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {role}; DROP ROLE {role}; DROP ROLE {outsider}"
        ))
        .await
        .ok();
}

struct Pki {
    dir: PathBuf,
    trusted_ca: PathBuf,
    other_ca: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

/// A CA, a server certificate for `localhost` only (so that connecting by
/// IP fails verify-full but passes verify-ca), and an unrelated CA. The
/// server's files go into its data dir, owned by the server's user.
fn make_pki(data_dir: &Path) -> Pki {
    let dir = std::env::temp_dir().join(format!("session-lock-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (issuer, ca_pem) = ca("session-lock test CA");
    let (_, other_pem) = ca("someone else's CA");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();

    let owner = std::fs::metadata(data_dir).unwrap();
    for (name, body, mode) in [
        ("server.crt", cert.pem(), 0o644),
        ("server.key", key.serialize_pem(), 0o600),
    ] {
        let path = data_dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
    }
    let trusted_ca = dir.join("ca.pem");
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&trusted_ca, ca_pem).unwrap();
    std::fs::write(&other_ca, other_pem).unwrap();
    Pki {
        dir,
        trusted_ca,
        other_ca,
    }
}

async fn ssl_in_use(store: &PgStore) -> Result<bool, String> {
    let conn = store.client().await.map_err(|e| format!("{e:?}"))?;
    let row = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_verify_ca_and_verify_full_against_a_self_signed_server() {
    // A server of our own: TLS is switched on with ALTER SYSTEM.
    let pg =
        tokio::task::spawn_blocking(|| EmbeddedPostgres::start_with(EmbeddedOptions::default()))
            .await
            .unwrap()
            .expect("start a Postgres for the TLS test");
    let pki = make_pki(pg.data_dir());
    let admin = session_lock::connect_one(&pg.url("postgres"))
        .await
        .unwrap();
    // One statement per call: ALTER SYSTEM refuses a multi-statement batch.
    for sql in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let mut migrate = session_lock::connect_one(&pg.url("postgres"))
        .await
        .unwrap();
    Migrator::new().run(&mut migrate).await.unwrap();

    let port = pg.port();
    let url =
        |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");
    let ca = pki.trusted_ca.display().to_string();
    let other = pki.other_ca.display().to_string();

    // The reload is asynchronous: wait until a require connection works.
    let require = PgStore::connect(&url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        match ssl_in_use(&require).await {
            Ok(true) => break,
            other => assert!(start.elapsed() < DEADLINE, "TLS never came up: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let cases: &[(&str, String, bool)] = &[
        ("disable", url("127.0.0.1", "sslmode=disable"), false),
        ("prefer", url("127.0.0.1", "sslmode=prefer"), true),
        ("require", url("127.0.0.1", "sslmode=require"), true),
        (
            "verify-ca by IP",
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            true,
        ),
        (
            "verify-full by name",
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            true,
        ),
    ];
    for (what, url, encrypted) in cases {
        let store = PgStore::connect(url).await.unwrap();
        assert_eq!(ssl_in_use(&store).await, Ok(*encrypted), "{what}");
        // The protocol works over it.
        store
            .start_session(&SessionStart::new("tls", Duration::from_secs(30), 10))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    let refused: &[(&str, String, &str)] = &[
        (
            "verify-full by IP: the certificate names localhost only",
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "certificate not valid for name",
        ),
        (
            "verify-full against another CA",
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            "UnknownIssuer",
        ),
        (
            "verify-ca against another CA",
            url(
                "127.0.0.1",
                &format!("sslmode=verify-ca&sslrootcert={other}"),
            ),
            "UnknownIssuer",
        ),
    ];
    for (what, url, reason) in refused {
        let store = PgStore::connect(url).await.unwrap();
        let err = store
            .start_session(&SessionStart::new("tls", Duration::from_secs(30), 10))
            .await
            .expect_err(what);
        let text = err.to_string();
        assert!(text.contains(reason), "{what}: expected {reason} in {text}");
        let err = session_lock::connect_one(url).await.expect_err(what);
        assert!(
            err.to_string().contains(reason),
            "{what} (connect_one): {err}"
        );
    }

    // A missing root certificate is a clear configuration error.
    let err = PgStore::connect(&url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    assert_eq!(
        session_lock::tls::parse_url(&url("localhost", "sslmode=verify-full"))
            .map(|(_, m)| m)
            .unwrap_err()
            .to_string(),
        "bad database URL: sslmode=verify-full needs sslrootcert=PATH, the PEM file of the certificate authority to trust"
    );
    let _ = TlsMode::Require;
    drop(pki);
}
