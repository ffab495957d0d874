//! The port conformance suite on the embedded SQLite backend, plus what only SQLite shows:
//! two backends (as two processes would) sharing one file.

use std::sync::Arc;
use std::time::Duration;

use crate::conformance::{Harness, conformance_tests, slot_tests, step_message, tenant};
use orchestrator::clock::ManualClock;
use orchestrator::ports::{Error, Journal, Queue, QueueKind, Store};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::stack::{Batched, Sequential, Stack};
use workflows::{Domain, Timestamp};

struct Sqlite {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    backend: SqliteBackend,
}

impl Sqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
        let config = SqliteConfig::new(dir.path().join("orchestrator.sqlite"));
        let backend =
            SqliteBackend::open_with_clock(config, Arc::new(clock.clone())).expect("open");
        Self {
            _dir: dir,
            clock,
            backend,
        }
    }
}

impl Harness for Sqlite {
    type Backend = SqliteBackend;

    fn backend(&self) -> &SqliteBackend {
        &self.backend
    }

    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    fn max_receives(&self) -> u32 {
        SqliteConfig::new("x").max_receives
    }
}

/// The suite on SQLite with its own (atomic) journal.
mod conforms {
    use super::*;
    conformance_tests!(Sqlite::new());
    slot_tests!(Sqlite::new());
}

/// The embedded ports with a journal that is not atomic: the one SQS and DynamoDB use.
struct NonAtomic<J> {
    sqlite: Sqlite,
    stack: Stack<SqliteBackend, SqliteBackend, J>,
}

impl<J: Journal> Harness for NonAtomic<J> {
    type Backend = Stack<SqliteBackend, SqliteBackend, J>;

    fn backend(&self) -> &Self::Backend {
        &self.stack
    }

    async fn advance(&self, d: Duration) {
        self.sqlite.advance(d).await;
    }

    fn max_receives(&self) -> u32 {
        self.sqlite.max_receives()
    }
}

fn non_atomic<J>(journal: impl FnOnce(Arc<SqliteBackend>) -> J) -> NonAtomic<J> {
    let sqlite = Sqlite::new();
    let backend = Arc::new(sqlite.backend.clone());
    NonAtomic {
        stack: Stack {
            journal: Arc::new(journal(backend.clone())),
            store: backend.clone(),
            queue: backend,
        },
        sqlite,
    }
}

/// The suite with the `Sequential` journal over the SQLite ports.
mod sequential_conforms {
    use super::*;
    conformance_tests!(non_atomic(|b| Sequential::new(b.clone(), b)));
}

/// The suite with the `Batched` journal over the SQLite ports.
mod batched_conforms {
    use super::*;
    conformance_tests!(non_atomic(|b| Batched::new(b.clone(), b, 64)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_one_file_never_deliver_a_message_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shared.sqlite");
    let a = SqliteBackend::open(SqliteConfig::new(&path)).expect("open a");
    let b = SqliteBackend::open(SqliteConfig::new(&path)).expect("open b");
    let n = 400;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        a.send(chunk.iter().map(|i| step_message(&i.to_string())).collect())
            .await
            .expect("send");
    }
    let drain = |backend: SqliteBackend| async move {
        let mut got = Vec::new();
        loop {
            let batch = backend
                .receive(QueueKind::Steps, 7, Duration::from_secs(60), Duration::ZERO)
                .await
                .expect("receive");
            if batch.is_empty() {
                break got;
            }
            backend
                .ack(
                    QueueKind::Steps,
                    batch.iter().map(|d| d.receipt.clone()).collect(),
                )
                .await
                .expect("ack");
            got.extend(batch.into_iter().map(|d| d.id));
        }
    };
    let (from_a, from_b) = tokio::join!(
        tokio::spawn(drain(a.clone())),
        tokio::spawn(drain(b.clone()))
    );
    let (from_a, from_b) = (from_a.expect("a"), from_b.expect("b"));
    let mut all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(from_a.len() + from_b.len(), n, "every message once");
    assert_eq!(all.len(), n, "no message twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_when_a_message_arrives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend =
        SqliteBackend::open(SqliteConfig::new(dir.path().join("q.sqlite"))).expect("open");
    let receiver = backend.clone();
    let waiting = tokio::spawn(async move {
        receiver
            .receive(
                QueueKind::Steps,
                10,
                Duration::from_secs(30),
                Duration::from_secs(20),
            )
            .await
            .expect("receive")
    });
    tokio::task::yield_now().await;
    backend
        .send(vec![step_message("hello")])
        .await
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken well before the 20 s wait ends")
        .expect("task");
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("durable.sqlite");
    {
        let backend = SqliteBackend::open(SqliteConfig::new(&path)).expect("open");
        backend
            .send(vec![step_message("kept")])
            .await
            .expect("send");
    }
    let backend = SqliteBackend::open(SqliteConfig::new(&path)).expect("reopen");
    let got = backend
        .receive(
            QueueKind::Steps,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"kept");
}

/// A file of table layout 1 (before domains were unique) in which two tenants share a domain:
/// opening it records each tenant's domain, the first registered keeps a shared one, and the
/// other is refused writes until it gets a domain of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_1_file_is_migrated_and_the_first_tenant_keeps_its_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.sqlite");
    drop(SqliteBackend::open(SqliteConfig::new(&path)).expect("create"));
    let acme = tenant("acme", 11, 12);
    let mut late = tenant("hijack", 21, 22);
    late.domain = acme.domain.clone();
    late.created_at = Timestamp::from_unix_millis(2_000);
    let loner = tenant("loner", 31, 32);
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "DROP TABLE tenant_domains; UPDATE meta SET value = '1' WHERE name = 'layout';",
        )
        .expect("back to layout 1");
        // Inserted newest first: the migration goes by registration time, not by row order.
        for t in [&late, &acme, &loner] {
            conn.execute(
                "INSERT INTO tenants (id, infra_project, app_project, record) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    t.id.as_str(),
                    i64::try_from(t.infra_project).expect("small"),
                    i64::try_from(t.app_project).expect("small"),
                    workflows::encode(t)
                ],
            )
            .expect("insert");
        }
    }

    let backend = SqliteBackend::open(SqliteConfig::new(&path)).expect("migrate");
    let layout: String = rusqlite::Connection::open(&path)
        .expect("open")
        .query_row("SELECT value FROM meta WHERE name = 'layout'", [], |r| {
            r.get(0)
        })
        .expect("layout");
    assert_eq!(layout, "2");
    let owner = backend.tenant_by_domain(&acme.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id), Some(acme.id.clone()));
    let owner = backend.tenant_by_domain(&loner.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id), Some(loner.id.clone()));
    match backend.put_tenant(&late, false).await {
        Err(Error::AlreadyExists(what)) => assert!(what.contains("tenant acme"), "{what}"),
        other => panic!("the later tenant kept a shared domain: {other:?}"),
    }
    let mut own = late.clone();
    own.domain = Domain::new("hijack.example").expect("domain");
    backend.put_tenant(&own, false).await.expect("own domain");
    backend
        .put_tenant(&acme, false)
        .await
        .expect("the owner writes");
}

/// The database file and its WAL are private to their owner: they hold tenant records.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_file_and_its_wal_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("private.sqlite");
    let backend = SqliteBackend::open(SqliteConfig::new(&path)).expect("open");
    backend
        .put_tenant(&tenant("acme", 1, 2), true)
        .await
        .expect("write");
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", file.display());
    }
}
