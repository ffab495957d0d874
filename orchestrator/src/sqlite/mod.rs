//! The embedded backend: the `Queue`, `Store` and `Journal` ports on one SQLite file.
//!
//! Writes go through one writer thread per process. It takes every request that is waiting,
//! runs them in one `BEGIN IMMEDIATE` transaction (each inside its own savepoint, so one
//! failing request does not undo the others), commits, and only then answers: so nothing is
//! acknowledged before it is durable, and the commits of many workflows share one fsync (group
//! commit). The file is in WAL mode with `synchronous = FULL`: every commit is fsynced.
//! Reads use a small pool of other connections, which WAL lets run beside the writer.
//! Several processes may share the file: SQLite's locks serialise their writers
//! (`busy_timeout` waits for the lock).

mod schema;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};
use workflows::{
    Domain, EventId, HistoryEntry, State, Tenant, TenantId, Timestamp, WorkflowKey, WorkflowRecord,
};

use crate::clock::{SharedClock, SystemClock};
use crate::ports::queue::Disposal;
use crate::ports::{
    Commit, DeadLetter, Delivery, Error, Journal, Outgoing, Queue, QueueKind, QueueStats, Receipt,
    RecordWrite, SlotEntry, SlotGrant, SlotsView, Store, Woken, WorkflowFilter, WorkflowSummary,
    WriteError,
};
use writer::{Op, Reply, Writer};

/// How the embedded backend behaves.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// A message received this many times without being acknowledged is dead-lettered on its
    /// next receive.
    pub max_receives: u32,
    /// How long a deduplication id is remembered.
    pub dedup_window: Duration,
    /// Largest message body accepted (the same as SQS's, so nothing that works here fails there).
    pub max_message_bytes: usize,
    /// How many requests one write transaction takes at most.
    pub max_batch: usize,
    /// How long to wait for another process's write lock.
    pub busy_timeout: Duration,
    /// How often a long-polling receive looks again when nothing wakes it (other processes'
    /// sends cannot wake it).
    pub poll_interval: Duration,
}

impl SqliteConfig {
    /// Defaults for the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_receives: 10,
            dedup_window: Duration::from_secs(300),
            max_message_bytes: 256 * 1024,
            max_batch: 512,
            busy_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// The backend name in errors.
const BACKEND: &str = "sqlite";

/// `what` failed for a reason of the operating system's (a thread, a task, a file): may pass.
fn unavailable(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::unavailable_by(BACKEND, what, e)
}

/// A SQLite error as a port error. What may pass is `Unavailable`: the file busy or locked by
/// another process, an I/O error, a full disk, no memory, an interrupted statement, a file
/// that cannot be opened now, a schema changed under a prepared statement. What would fail
/// again is `Invalid`: a constraint the data breaks, a table or column this code expects and
/// the file lacks, a value of the wrong type, a file that is not a database or is corrupt.
pub(crate) fn sql(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::{
        CannotOpen, DatabaseBusy, DatabaseLocked, DiskFull, FileLockingProtocolFailed,
        OperationInterrupted, OutOfMemory, SchemaChanged, SystemIoFailure,
    };
    let passing = match &e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            DatabaseBusy
                | DatabaseLocked
                | SystemIoFailure
                | DiskFull
                | OutOfMemory
                | OperationInterrupted
                | CannotOpen
                | FileLockingProtocolFailed
                | SchemaChanged
        ),
        _ => false,
    };
    if passing {
        Error::unavailable_by(BACKEND, "a statement failed", e)
    } else {
        Error::invalid_by("a statement failed on the database file", e)
    }
}

/// `path` cannot be opened as the database, because of `e` (classified as [`sql`] does).
fn opening(path: &Path, e: rusqlite::Error) -> Error {
    let what = format!("cannot open {}", path.display());
    match sql(e) {
        Error::Unavailable { cause, .. } => Error::Unavailable {
            backend: BACKEND,
            what,
            cause,
        },
        Error::Invalid { cause, .. } => Error::Invalid { what, cause },
        other => other,
    }
}

/// Creates the database file, readable and writable by its owner only (mode 0600), unless it
/// exists. SQLite gives its `-wal` and `-shm` files the mode of the database file, so they are
/// private too: the file holds tenant records (signing secrets among them).
fn create_private(path: &Path) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::invalid_by(
            format!("cannot create {}", path.display()),
            e,
        )),
    }
}

/// Opens a connection with the settings every connection of the backend uses.
pub(crate) fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, Error> {
    create_private(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| opening(path, e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| opening(path, e))?;
    for (pragma, value) in [
        ("journal_mode", "WAL"),
        ("synchronous", "FULL"),
        ("foreign_keys", "ON"),
    ] {
        conn.pragma_update(None, pragma, value)
            .map_err(|e| opening(path, e))?;
    }
    Ok(conn)
}

struct Inner {
    config: SqliteConfig,
    clock: SharedClock,
    writer: Writer,
    readers: Mutex<Vec<Connection>>,
    wake: [Notify; 2],
}

/// The embedded backend. Cheap to clone; every clone shares the writer thread.
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.config.path)
            .finish_non_exhaustive()
    }
}

fn queue_index(queue: QueueKind) -> usize {
    match queue {
        QueueKind::Events => 0,
        QueueKind::Steps => 1,
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the backend at `config.path`, on the system clock.
    pub fn open(config: SqliteConfig) -> Result<Self, Error> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// Opens the backend with `clock` deciding visibility, delays and deduplication windows.
    pub fn open_with_clock(config: SqliteConfig, clock: SharedClock) -> Result<Self, Error> {
        let mut conn = open_connection(&config.path, config.busy_timeout)?;
        conn.execute_batch(schema::CREATE)
            .map_err(|e| opening(&config.path, e))?;
        let layout: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE name = 'layout'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| opening(&config.path, e))?;
        match layout.as_deref().map(str::parse::<i64>) {
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('layout', ?1)",
                    [schema::LAYOUT_VERSION.to_string()],
                )
                .map_err(|e| opening(&config.path, e))?;
            }
            Some(Ok(v)) if v == schema::LAYOUT_VERSION => {}
            Some(Ok(v)) if (1..schema::LAYOUT_VERSION).contains(&v) => {
                schema::migrate(&mut conn, v).map_err(|e| opening(&config.path, e))?;
                tracing::info!(path = %config.path.display(), from = v,
                    to = schema::LAYOUT_VERSION, "table layout migrated");
            }
            Some(other) => {
                return Err(Error::invalid(format!(
                    "{} has table layout {other:?}; this code uses layout {}",
                    config.path.display(),
                    schema::LAYOUT_VERSION
                )));
            }
        }
        let writer = Writer::start(conn, config.clone(), clock.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                clock,
                writer,
                readers: Mutex::new(Vec::new()),
                wake: [Notify::new(), Notify::new()],
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.config.path
    }

    /// Sends the request `op` makes with its reply channel to the writer, and waits for the
    /// answer (given once the request's round is committed).
    async fn request<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.writer.submit(op(tx))?;
        rx.await
            .map_err(|_| Error::unavailable(BACKEND, "the writer thread stopped"))?
    }

    fn wake(&self, queues: impl IntoIterator<Item = QueueKind>) {
        for q in queues {
            self.inner.wake[queue_index(q)].notify_waiters();
        }
    }

    /// Runs `f` on a reader connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.take_reader()?;
            let result = f(&conn);
            this.put_reader(conn);
            result
        })
        .await
        .map_err(|e| unavailable("a read task", e))?
    }

    fn take_reader(&self) -> Result<Connection, Error> {
        let pooled = self
            .inner
            .readers
            .lock()
            .map_err(|_| Error::unavailable(BACKEND, "the reader pool is poisoned"))?
            .pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => open_connection(&self.inner.config.path, self.inner.config.busy_timeout),
        }
    }

    fn put_reader(&self, conn: Connection) {
        if let Ok(mut pool) = self.inner.readers.lock()
            && pool.len() < 8
        {
            pool.push(conn);
        }
    }

    async fn dispose_dead_letters(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
        disposal: Disposal,
    ) -> Result<Vec<String>, Error> {
        let ids = self
            .request(|reply| Op::DisposeDeadLetters {
                queue,
                ids,
                disposal,
                reply,
            })
            .await?;
        if disposal == Disposal::Redrive {
            self.wake([queue]);
        }
        Ok(ids)
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_unix_millis()
}

impl Queue for SqliteBackend {
    async fn send(&self, batch: Vec<Outgoing>) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        for m in &batch {
            if m.body.len() > self.inner.config.max_message_bytes {
                return Err(Error::TooLarge {
                    size: m.body.len(),
                    limit: self.inner.config.max_message_bytes,
                });
            }
        }
        let queues: Vec<QueueKind> = batch.iter().map(|m| m.queue).collect();
        self.request(|reply| Op::Send(batch, reply)).await?;
        self.wake(queues);
        Ok(())
    }

    async fn receive(
        &self,
        queue: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for a wake-up before looking, so a send between the look and the wait
            // is not missed.
            let notified = self.inner.wake[queue_index(queue)].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deliveries, next_visible) = self
                .request(|reply| Op::Receive {
                    queue,
                    max,
                    visibility,
                    reply,
                })
                .await?;
            let now = tokio::time::Instant::now();
            if !deliveries.is_empty() || now >= deadline {
                return Ok(deliveries);
            }
            let mut nap = self.inner.config.poll_interval;
            if let Some(at) = next_visible {
                let until = at.since(self.inner.clock.now());
                nap = nap.min(until.max(Duration::from_millis(1)));
            }
            let wake_at = (now + nap).min(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn ack(&self, queue: QueueKind, receipts: Vec<Receipt>) -> Result<Vec<Receipt>, Error> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let failed = self
            .request(|reply| Op::Ack {
                queue,
                receipts,
                reply,
            })
            .await?;
        self.wake([queue]);
        Ok(failed)
    }

    async fn extend(
        &self,
        queue: QueueKind,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), Error> {
        self.request(|reply| Op::Extend {
            queue,
            receipt: receipt.clone(),
            visibility,
            reply,
        })
        .await?;
        if visibility.is_zero() {
            self.wake([queue]);
        }
        Ok(())
    }

    async fn quarantine(&self, delivery: &Delivery, reason: &str) -> Result<(), Error> {
        self.request(|reply| Op::Quarantine {
            queue: delivery.queue,
            receipt: delivery.receipt.clone(),
            reason: reason.to_owned(),
            reply,
        })
        .await?;
        self.wake([delivery.queue]);
        Ok(())
    }

    async fn dead_letters(&self, queue: QueueKind, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, grp, dedup_id, body, sent_at, receive_count, reason, dead_at \
                     FROM dead_letters WHERE queue = ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(
                    params![queue.as_str(), i64::try_from(limit).unwrap_or(i64::MAX)],
                    |r| {
                        Ok(DeadLetter {
                            queue,
                            id: r.get::<_, i64>(0)?.to_string(),
                            group: r.get(1)?,
                            dedup_id: r.get(2)?,
                            body: r.get(3)?,
                            sent_at: Timestamp::from_unix_millis(r.get(4)?),
                            receive_count: r.get(5)?,
                            reason: r.get(6)?,
                            dead_at: Timestamp::from_unix_millis(r.get(7)?),
                        })
                    },
                )
                .map_err(sql)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql)
        })
        .await
    }

    async fn redrive(
        &self,
        queue: QueueKind,
        ids: Option<Vec<String>>,
    ) -> Result<Vec<String>, Error> {
        self.dispose_dead_letters(queue, ids, Disposal::Redrive)
            .await
    }

    async fn discard(&self, queue: QueueKind, ids: Vec<String>) -> Result<Vec<String>, Error> {
        self.dispose_dead_letters(queue, Some(ids), Disposal::Discard)
            .await
    }

    async fn stats(&self, queue: QueueKind) -> Result<QueueStats, Error> {
        let now = ms(self.inner.clock.now());
        self.read(move |conn| {
            let q = queue.as_str();
            let (visible, in_flight, delayed, oldest): (i64, i64, i64, Option<i64>) = conn
                .query_row(
                    "SELECT \
                       COALESCE(SUM(visible_at <= ?2), 0), \
                       COALESCE(SUM(visible_at > ?2 AND nonce IS NOT NULL), 0), \
                       COALESCE(SUM(visible_at > ?2 AND nonce IS NULL), 0), \
                       MIN(sent_at) \
                     FROM messages WHERE queue = ?1",
                    params![q, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .map_err(sql)?;
            let dead: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM dead_letters WHERE queue = ?1",
                    [q],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(QueueStats {
                visible: count(visible),
                in_flight: count(in_flight),
                delayed: count(delayed),
                dead: count(dead),
                oldest_age: oldest.map(|t| {
                    Duration::from_millis(u64::try_from(now.saturating_sub(t)).unwrap_or(0))
                }),
            })
        })
        .await
    }
}

fn decode_record(key: &WorkflowKey, bytes: &[u8]) -> Result<WorkflowRecord, Error> {
    workflows::decode(bytes).map_err(|source| Error::corrupt(format!("record of {key}"), source))
}

fn decode_entry(key: &str, bytes: &[u8]) -> Result<HistoryEntry, Error> {
    workflows::decode(bytes)
        .map_err(|source| Error::corrupt(format!("history entry of {key}"), source))
}

/// The tenant `query` (one `?1` parameter, `param`) finds, if any.
fn one_tenant(
    conn: &Connection,
    query: &str,
    param: impl rusqlite::ToSql,
) -> Result<Option<Tenant>, Error> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached(query)
        .map_err(sql)?
        .query_row([param], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    bytes.map(|b| decode_tenant(&b)).transpose()
}

fn decode_tenant(bytes: &[u8]) -> Result<Tenant, Error> {
    workflows::decode(bytes).map_err(|source| Error::corrupt("tenant record", source))
}

fn parse_state(s: &str) -> Result<State, Error> {
    State::ALL
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| Error::invalid(format!("unknown state {s:?} in the workflows table")))
}

impl Store for SqliteBackend {
    async fn workflow(&self, key: &WorkflowKey) -> Result<Option<WorkflowRecord>, Error> {
        let key = key.clone();
        self.read(move |conn| {
            let bytes: Option<Vec<u8>> = conn
                .prepare_cached("SELECT record FROM workflows WHERE key = ?1")
                .map_err(sql)?
                .query_row([key.to_string()], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            bytes.map(|b| decode_record(&key, &b)).transpose()
        })
        .await
    }

    async fn write(&self, write: RecordWrite) -> Result<(), WriteError> {
        let results = self.commit(vec![Commit {
            write: Some(write),
            ..Commit::default()
        }]);
        match results.await.pop() {
            Some(r) => r.map(|_| ()),
            None => Err(WriteError::Store(Error::unavailable(
                BACKEND,
                "the writer answered nothing",
            ))),
        }
    }

    async fn mark_corrupt(&self, key: &WorkflowKey, reason: &str) -> Result<(), Error> {
        self.request(|reply| Op::MarkCorrupt {
            key: key.clone(),
            reason: reason.to_owned(),
            reply,
        })
        .await
    }

    async fn workflows(
        &self,
        filter: &WorkflowFilter,
        after: Option<&WorkflowKey>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, Error> {
        let filter = filter.clone();
        let after = after.map(ToString::to_string).unwrap_or_default();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT key, state, version, updated_at, corrupt FROM workflows \
                     WHERE key > ?1 \
                       AND (?2 IS NULL OR state = ?2) \
                       AND (?3 IS NULL OR env = ?3) \
                       AND (?4 IS NULL OR tenant = ?4) \
                       AND (?5 IS NULL OR updated_at < ?5) \
                     ORDER BY key LIMIT ?6",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(
                    params![
                        after,
                        filter.state.map(State::as_str),
                        filter.env.map(|e| e.as_str()),
                        filter.tenant.as_ref().map(TenantId::as_str),
                        filter.updated_before.map(ms),
                        i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ))
                    },
                )
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (key, state, version, updated_at, corrupt) = row.map_err(sql)?;
                out.push(WorkflowSummary {
                    key: key
                        .parse()
                        .map_err(|e| Error::invalid(format!("workflows table: {e}")))?,
                    state: parse_state(&state)?,
                    version: u64::try_from(version).unwrap_or(0),
                    updated_at: Timestamp::from_unix_millis(updated_at),
                    corrupt,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn history(
        &self,
        key: &WorkflowKey,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Error> {
        let key = key.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT entry FROM history WHERE key = ?1 AND version > ?2 \
                     ORDER BY version LIMIT ?3",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(
                    params![
                        key,
                        i64::try_from(after_version).unwrap_or(i64::MAX),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(decode_entry(&key, &row.map_err(sql)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn history_of_event(
        &self,
        key: &WorkflowKey,
        event_id: &EventId,
    ) -> Result<Option<HistoryEntry>, Error> {
        let key = key.to_string();
        let event_id = event_id.to_string();
        self.read(move |conn| {
            let bytes: Option<Vec<u8>> = conn
                .prepare_cached(
                    "SELECT entry FROM history WHERE key = ?1 AND event_id = ?2 \
                     ORDER BY version DESC LIMIT 1",
                )
                .map_err(sql)?
                .query_row([&key, &event_id], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            bytes.map(|b| decode_entry(&key, &b)).transpose()
        })
        .await
    }

    async fn put_tenant(&self, tenant: &Tenant, create_only: bool) -> Result<(), Error> {
        self.request(|reply| Op::PutTenant {
            id: tenant.id.clone(),
            domain: tenant.domain.clone(),
            infra_project: tenant.infra_project,
            app_project: tenant.app_project,
            record: workflows::encode(tenant),
            create_only,
            expected: None,
            reply,
        })
        .await
    }

    async fn update_tenant(&self, read: &Tenant, tenant: &Tenant) -> Result<(), Error> {
        if read.id != tenant.id {
            return Err(Error::invalid(format!(
                "tenant {} cannot replace tenant {}",
                tenant.id, read.id
            )));
        }
        self.request(|reply| Op::PutTenant {
            id: tenant.id.clone(),
            domain: tenant.domain.clone(),
            infra_project: tenant.infra_project,
            app_project: tenant.app_project,
            record: workflows::encode(tenant),
            create_only: false,
            expected: Some(Box::new(read.clone())),
            reply,
        })
        .await
    }

    async fn remove_tenant(&self, read: &Tenant) -> Result<(), Error> {
        self.request(|reply| Op::RemoveTenant {
            expected: Box::new(read.clone()),
            reply,
        })
        .await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        let id = id.to_string();
        self.read(move |conn| one_tenant(conn, "SELECT record FROM tenants WHERE id = ?1", id))
            .await
    }

    async fn tenant_by_project(&self, project: u64) -> Result<Option<Tenant>, Error> {
        let project = i64::try_from(project).unwrap_or(-1);
        self.read(move |conn| {
            let query = "SELECT record FROM tenants WHERE infra_project = ?1 OR app_project = ?1";
            one_tenant(conn, query, project)
        })
        .await
    }

    async fn tenant_by_domain(&self, domain: &Domain) -> Result<Option<Tenant>, Error> {
        let domain = domain.to_string();
        self.read(move |conn| {
            let query = "SELECT t.record FROM tenant_domains d JOIN tenants t ON t.id = d.tenant \
                         WHERE d.domain = ?1";
            one_tenant(conn, query, domain)
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, Error> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT record FROM tenants ORDER BY id")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(decode_tenant(&row.map_err(sql)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn allocate(&self, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
        self.request(|reply| Op::Allocate {
            pool: pool.to_owned(),
            value,
            owner: owner.to_owned(),
            reply,
        })
        .await
    }

    async fn release(&self, pool: &str, value: u64, owner: &str) -> Result<(), Error> {
        self.request(|reply| Op::Release {
            pool: pool.to_owned(),
            value,
            owner: owner.to_owned(),
            reply,
        })
        .await
    }

    async fn allocation_of(&self, pool: &str, owner: &str) -> Result<Option<u64>, Error> {
        let (pool, owner) = (pool.to_owned(), owner.to_owned());
        self.read(move |conn| {
            let v: Option<i64> = conn
                .prepare_cached("SELECT value FROM allocations WHERE pool = ?1 AND owner = ?2")
                .map_err(sql)?
                .query_row([pool, owner], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            Ok(v.and_then(|v| u64::try_from(v).ok()))
        })
        .await
    }

    async fn acquire_slot(
        &self,
        kind: &str,
        key: &WorkflowKey,
        holder: &str,
        cap: u32,
        ttl: Duration,
        wake: &[u8],
    ) -> Result<(SlotGrant, Woken), Error> {
        self.request(|reply| Op::AcquireSlot {
            kind: kind.to_owned(),
            holder: holder.to_owned(),
            tenant: key.tenant.to_string(),
            cap,
            ttl,
            wake: wake.to_vec(),
            reply,
        })
        .await
    }

    async fn release_slot(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<Woken, Error> {
        self.request(|reply| Op::ReleaseSlot {
            kind: kind.to_owned(),
            holder: holder.to_owned(),
            cap,
            ttl,
            reply,
        })
        .await
    }

    async fn slots(&self, kind: &str) -> Result<SlotsView, Error> {
        let kind = kind.to_owned();
        let now = self.inner.clock.now().as_unix_millis();
        self.read(move |conn| {
            let entries = |query: &str| -> Result<Vec<SlotEntry>, Error> {
                let mut stmt = conn.prepare_cached(query).map_err(sql)?;
                let rows = stmt
                    .query_map(params![kind, now], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .map_err(sql)?;
                let mut out = Vec::new();
                for row in rows {
                    let (holder, tenant, since, expires_at) = row.map_err(sql)?;
                    out.push(SlotEntry {
                        holder,
                        tenant: TenantId::new(tenant)
                            .map_err(|e| Error::invalid(format!("slot tenant: {e}")))?,
                        since: Timestamp::from_unix_millis(since),
                        expires_at: Timestamp::from_unix_millis(expires_at),
                    });
                }
                Ok(out)
            };
            Ok(SlotsView {
                held: entries(
                    "SELECT holder, tenant, granted_at, expires_at FROM slot_leases WHERE kind = ?1 AND expires_at > ?2 ORDER BY granted_at, holder",
                )?,
                waiting: entries(
                    "SELECT holder, tenant, ticket, expires_at FROM slot_waiters WHERE kind = ?1 AND expires_at > ?2 ORDER BY round, ticket, holder",
                )?,
            })
        })
        .await
    }
}

impl Journal for SqliteBackend {
    fn is_atomic(&self) -> bool {
        true
    }

    async fn commit(&self, commits: Vec<Commit>) -> Vec<Result<Vec<Delivery>, WriteError>> {
        let n = commits.len();
        let queues: Vec<QueueKind> = commits
            .iter()
            .flat_map(|c| c.send.iter().map(|m| m.queue))
            .collect();
        match self.request(|reply| Op::Commit(commits, reply)).await {
            Ok(results) => {
                self.wake(queues);
                results
            }
            Err(e) => (0..n).map(|_| Err(WriteError::Store(e.clone()))).collect(),
        }
    }
}

/// Attributes as stored: a JSON object, or NULL when empty.
pub(crate) fn attributes_to_sql(attributes: &BTreeMap<String, String>) -> Option<String> {
    if attributes.is_empty() {
        None
    } else {
        serde_json::to_string(attributes).ok()
    }
}

/// Attributes as read back; unreadable attributes are dropped rather than failing a receive.
pub(crate) fn attributes_from_sql(text: Option<String>) -> BTreeMap<String, String> {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(conn: &Connection, statement: &str) -> Error {
        sql(conn
            .execute_batch(statement)
            .expect_err("the statement fails"))
    }

    #[test]
    fn what_would_fail_again_is_invalid_and_keeps_sqlites_error() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (x INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .expect("setup");
        for (statement, says) in [
            ("INSERT INTO t VALUES (1)", "UNIQUE constraint failed"),
            ("SELECT * FROM missing", "no such table"),
            ("SELECT nope FROM t", "no such column"),
        ] {
            let e = fails(&conn, statement);
            assert!(matches!(e, Error::Invalid { .. }), "{statement}: {e:?}");
            assert!(!e.is_retryable());
            assert!(crate::ports::chain(&e).contains(says), "{e:?}");
        }
    }

    #[test]
    fn a_database_locked_by_another_connection_is_unavailable() {
        let uri = "file:locked?mode=memory&cache=shared";
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI;
        let first = Connection::open_with_flags(uri, flags).expect("open");
        let second = Connection::open_with_flags(uri, flags).expect("open");
        first
            .execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .expect("the first holds the write lock");
        let e = fails(&second, "INSERT INTO t VALUES (2)");
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable());
    }
}
