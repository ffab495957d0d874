//! The writer thread: every write of this process, batched into one transaction per round.

use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use workflows::{TenantId, Timestamp, WorkflowKey};

use super::{SqliteConfig, attributes_from_sql, attributes_to_sql, sql, unavailable};
use crate::clock::SharedClock;
use crate::ports::{
    Commit, Delivery, Error, Outgoing, QueueKind, Receipt, RecordWrite, SlotGrant, Woken,
    WriteError,
};

/// A write request.
#[derive(Debug)]
pub(super) enum Op {
    Commit(Vec<Commit>),
    Send(Vec<Outgoing>),
    Receive {
        queue: QueueKind,
        max: usize,
        visibility: Duration,
    },
    Ack {
        queue: QueueKind,
        receipts: Vec<Receipt>,
    },
    Extend {
        queue: QueueKind,
        receipt: Receipt,
        visibility: Duration,
    },
    Quarantine {
        queue: QueueKind,
        receipt: Receipt,
        reason: String,
    },
    MarkCorrupt {
        key: WorkflowKey,
        reason: String,
    },
    PutTenant {
        id: TenantId,
        infra_project: u64,
        app_project: u64,
        record: Vec<u8>,
        create_only: bool,
    },
    Allocate {
        pool: String,
        value: u64,
        owner: String,
    },
    Release {
        pool: String,
        value: u64,
        owner: String,
    },
    AcquireSlot {
        kind: String,
        holder: String,
        tenant: String,
        cap: u32,
        ttl: Duration,
        wake: Vec<u8>,
    },
    ReleaseSlot {
        kind: String,
        holder: String,
        cap: u32,
        ttl: Duration,
    },
    /// Redrive (`back`) or discard dead letters.
    Settle {
        queue: QueueKind,
        ids: Option<Vec<String>>,
        back: bool,
    },
}

/// The answer to a write request, sent only after its transaction committed.
#[derive(Debug)]
pub(super) enum Reply {
    Done,
    Committed(Vec<Result<Vec<Delivery>, WriteError>>),
    /// Deliveries, and when the next message of the queue becomes visible if none was.
    Received(Vec<Delivery>, Option<Timestamp>),
    /// Receipts that were not current.
    Failed(Vec<Receipt>),
    Allocated(bool),
    Slot(SlotGrant, Woken),
    Woken(Woken),
    /// Ids of the dead letters handled.
    Ids(Vec<String>),
}

type Responder = oneshot::Sender<Result<Reply, Error>>;

/// Handle to the writer thread.
pub(super) struct Writer {
    tx: mpsc::Sender<(Op, Responder)>,
}

impl Writer {
    pub(super) fn start(
        conn: Connection,
        config: SqliteConfig,
        clock: SharedClock,
    ) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel::<(Op, Responder)>();
        let gate = activities::gate::write_gate(&config.path);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, rx, &config, &clock, &gate))
            .map_err(unavailable)?;
        Ok(Self { tx })
    }

    pub(super) fn submit(&self, op: Op, respond: Responder) -> Result<(), Error> {
        self.tx
            .send((op, respond))
            .map_err(|_| unavailable("the writer thread stopped"))
    }
}

fn run(
    conn: Connection,
    rx: mpsc::Receiver<(Op, Responder)>,
    config: &SqliteConfig,
    clock: &SharedClock,
    gate: &std::sync::Mutex<()>,
) {
    let mut rounds: u64 = 0;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < config.max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        rounds += 1;
        // Other connections of this process to the file (the simulated cloud) wait on the
        // gate rather than on SQLite's lock.
        let turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = clock.now().as_unix_millis();
        let results = round(&conn, &mut jobs, now, config, rounds);
        drop(turn);
        match results {
            Ok(replies) => {
                for ((_, respond), reply) in jobs.into_iter().zip(replies) {
                    let _ = respond.send(reply);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, requests = jobs.len(), "sqlite write round failed");
                for (_, respond) in jobs {
                    let _ = respond.send(Err(unavailable(&e)));
                }
            }
        }
    }
}

/// One transaction: every job in its own savepoint, then one commit (one fsync).
fn round(
    conn: &Connection,
    jobs: &mut [(Op, Responder)],
    now: i64,
    config: &SqliteConfig,
    rounds: u64,
) -> Result<Vec<Result<Reply, Error>>, Error> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
    let mut replies = Vec::with_capacity(jobs.len());
    for (op, _) in jobs.iter_mut() {
        let op = std::mem::replace(op, Op::Send(Vec::new()));
        let reply = savepoint(conn, "op", |conn| execute(conn, op, now, config));
        replies.push(reply);
    }
    if rounds.is_multiple_of(256) {
        // Forget expired deduplication ids now and then, not on every round.
        let _ = conn.execute("DELETE FROM dedup WHERE expires_at <= ?1", [now]);
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(sql(e));
    }
    Ok(replies)
}

/// Runs `f` inside a savepoint: released if it succeeds, rolled back if it fails.
fn savepoint<T, E>(
    conn: &Connection,
    name: &str,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<Error>,
{
    conn.execute_batch(&format!("SAVEPOINT {name}"))
        .map_err(|e| E::from(sql(e)))?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch(&format!("RELEASE {name}"))
                .map_err(|e| E::from(sql(e)))?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"));
            Err(e)
        }
    }
}

fn execute(conn: &Connection, op: Op, now: i64, config: &SqliteConfig) -> Result<Reply, Error> {
    match op {
        Op::Commit(commits) => {
            let results = commits
                .into_iter()
                .map(|c| savepoint(conn, "c", |conn| commit_one(conn, c, now, config)))
                .collect();
            Ok(Reply::Committed(results))
        }
        Op::Send(batch) => {
            for m in batch {
                insert_message(conn, &m, now, config, None)?;
            }
            Ok(Reply::Done)
        }
        Op::Receive {
            queue,
            max,
            visibility,
        } => receive(conn, queue, max, visibility, now, config),
        Op::Ack { queue, receipts } => {
            let mut failed = Vec::new();
            for r in receipts {
                if !ack(conn, queue, &r)? {
                    failed.push(r);
                }
            }
            Ok(Reply::Failed(failed))
        }
        Op::Extend {
            queue,
            receipt,
            visibility,
        } => {
            let (id, nonce) = parse_receipt(&receipt)
                .ok_or_else(|| Error::Invalid(format!("malformed receipt {:?}", receipt.0)))?;
            let changed = conn
                .prepare_cached(
                    "UPDATE messages SET visible_at = ?1 WHERE id = ?2 AND nonce = ?3 AND queue = ?4",
                )
                .map_err(sql)?
                .execute(params![now + millis(visibility), id, nonce, queue.as_str()])
                .map_err(sql)?;
            if changed == 0 {
                return Err(Error::Invalid(format!(
                    "receipt {} of {queue} is no longer current",
                    receipt.0
                )));
            }
            Ok(Reply::Done)
        }
        Op::Quarantine {
            queue,
            receipt,
            reason,
        } => {
            if let Some((id, nonce)) = parse_receipt(&receipt) {
                dead_letter(conn, queue, id, Some(nonce), &reason, now)?;
            }
            Ok(Reply::Done)
        }
        Op::MarkCorrupt { key, reason } => {
            conn.prepare_cached("UPDATE workflows SET corrupt = ?1 WHERE key = ?2")
                .map_err(sql)?
                .execute(params![reason, key.to_string()])
                .map_err(sql)?;
            Ok(Reply::Done)
        }
        Op::PutTenant {
            id,
            infra_project,
            app_project,
            record,
            create_only,
        } => put_tenant(conn, &id, infra_project, app_project, &record, create_only),
        Op::Allocate { pool, value, owner } => {
            let v = to_i64(value)?;
            let holder: Option<String> = conn
                .prepare_cached("SELECT owner FROM allocations WHERE pool = ?1 AND value = ?2")
                .map_err(sql)?
                .query_row(params![pool, v], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            match holder {
                Some(h) => Ok(Reply::Allocated(h == owner)),
                None => {
                    // The owner may hold another value of the pool already: one each.
                    let inserted = conn
                        .prepare_cached(
                            "INSERT OR IGNORE INTO allocations (pool, value, owner) VALUES (?1, ?2, ?3)",
                        )
                        .map_err(sql)?
                        .execute(params![pool, v, owner])
                        .map_err(sql)?;
                    Ok(Reply::Allocated(inserted == 1))
                }
            }
        }
        Op::Release { pool, value, owner } => {
            conn.prepare_cached(
                "DELETE FROM allocations WHERE pool = ?1 AND value = ?2 AND owner = ?3",
            )
            .map_err(sql)?
            .execute(params![pool, to_i64(value)?, owner])
            .map_err(sql)?;
            Ok(Reply::Done)
        }
        Op::Settle { queue, ids, back } => settle(conn, queue, ids, back, now),
        Op::AcquireSlot {
            kind,
            holder,
            tenant,
            cap,
            ttl,
            wake,
        } => {
            let (grant, woken) =
                Slot::new(&kind, cap, now, ttl).acquire(conn, &holder, &tenant, &wake)?;
            Ok(Reply::Slot(grant, woken))
        }
        Op::ReleaseSlot {
            kind,
            holder,
            cap,
            ttl,
        } => Ok(Reply::Woken(
            Slot::new(&kind, cap, now, ttl).release(conn, &holder)?,
        )),
    }
}

/// One slot request of a kind, in the writer's transaction.
struct Slot<'a> {
    kind: &'a str,
    cap: u32,
    now: i64,
    /// Of leases and places granted or renewed now.
    expires_at: i64,
}

impl<'a> Slot<'a> {
    fn new(kind: &'a str, cap: u32, now: i64, ttl: Duration) -> Self {
        Self {
            kind,
            cap,
            now,
            expires_at: now + millis(ttl),
        }
    }

    fn count(
        &self,
        conn: &Connection,
        query: &str,
        p: &[&dyn rusqlite::ToSql],
    ) -> Result<i64, Error> {
        conn.prepare_cached(query)
            .map_err(sql)?
            .query_row(p, |r| r.get(0))
            .map_err(sql)
    }

    /// Drops what lapsed: a dead worker's leases, a vanished waiter's place.
    fn purge(&self, conn: &Connection) -> Result<(), Error> {
        for table in ["slot_leases", "slot_waiters"] {
            conn.prepare_cached(&format!(
                "DELETE FROM {table} WHERE kind = ?1 AND expires_at <= ?2"
            ))
            .map_err(sql)?
            .execute(params![self.kind, self.now])
            .map_err(sql)?;
        }
        Ok(())
    }

    /// Grants free slots to the head of the line; returns the holders granted and their wake
    /// messages.
    fn promote(&self, conn: &Connection) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let held = self.count(
            conn,
            "SELECT COUNT(*) FROM slot_leases WHERE kind = ?1",
            &[&self.kind],
        )?;
        let free = i64::from(self.cap) - held;
        if free <= 0 {
            return Ok(Vec::new());
        }
        let heads: Vec<(String, String, Vec<u8>)> = conn
            .prepare_cached(
                "SELECT holder, tenant, wake FROM slot_waiters WHERE kind = ?1 ORDER BY round, ticket, holder LIMIT ?2",
            )
            .map_err(sql)?
            .query_map(params![self.kind, free], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)?;
        let mut woken = Vec::new();
        for (holder, tenant, wake) in heads {
            conn.prepare_cached("DELETE FROM slot_waiters WHERE kind = ?1 AND holder = ?2")
                .map_err(sql)?
                .execute(params![self.kind, holder])
                .map_err(sql)?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO slot_leases (kind, holder, tenant, granted_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(sql)?
            .execute(params![self.kind, holder, tenant, self.now, self.expires_at])
            .map_err(sql)?;
            woken.push((holder, wake));
        }
        Ok(woken)
    }

    /// Renews `holder`'s lease, or takes its place in line and grants what is free.
    fn acquire(
        &self,
        conn: &Connection,
        holder: &str,
        tenant: &str,
        wake: &[u8],
    ) -> Result<(SlotGrant, Woken), Error> {
        self.purge(conn)?;
        let granted: Option<i64> = conn
            .prepare_cached(
                "UPDATE slot_leases SET expires_at = ?3 WHERE kind = ?1 AND holder = ?2 RETURNING granted_at",
            )
            .map_err(sql)?
            .query_row(params![self.kind, holder, self.expires_at], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        if let Some(since) = granted {
            let woken = self.promote(conn)?.into_iter().map(|(_, w)| w).collect();
            return Ok((
                SlotGrant::Held {
                    since: Timestamp::from_unix_millis(since),
                },
                woken,
            ));
        }
        let place: Option<(i64, i64)> = conn
            .prepare_cached(
                "UPDATE slot_waiters SET expires_at = ?3, wake = ?4 WHERE kind = ?1 AND holder = ?2 RETURNING round, ticket",
            )
            .map_err(sql)?
            .query_row(params![self.kind, holder, self.expires_at, wake], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql)?;
        let (round, ticket) = match place {
            Some(p) => p,
            None => {
                let round = self.count(
                    conn,
                    "SELECT COUNT(*) FROM slot_leases WHERE kind = ?1 AND tenant = ?2",
                    &[&self.kind, &tenant],
                )? + self.count(
                    conn,
                    "SELECT COUNT(*) FROM slot_waiters WHERE kind = ?1 AND tenant = ?2",
                    &[&self.kind, &tenant],
                )?;
                conn.prepare_cached(
                    "INSERT INTO slot_waiters (kind, holder, tenant, round, ticket, expires_at, wake) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql)?
                .execute(params![self.kind, holder, tenant, round, self.now, self.expires_at, wake])
                .map_err(sql)?;
                (round, self.now)
            }
        };
        let mut woken = Vec::new();
        let mut mine = false;
        for (h, w) in self.promote(conn)? {
            if h == holder {
                mine = true;
            } else {
                woken.push(w);
            }
        }
        if mine {
            return Ok((
                SlotGrant::Held {
                    since: Timestamp::from_unix_millis(self.now),
                },
                woken,
            ));
        }
        let ahead = self.count(
            conn,
            "SELECT COUNT(*) FROM slot_waiters WHERE kind = ?1 AND (round, ticket, holder) < (?2, ?3, ?4)",
            &[&self.kind, &round, &ticket, &holder],
        )?;
        Ok((
            SlotGrant::Waiting {
                ahead: u64::try_from(ahead).unwrap_or(0),
            },
            woken,
        ))
    }

    /// Drops `holder`'s lease or place and grants what is free.
    fn release(&self, conn: &Connection, holder: &str) -> Result<Woken, Error> {
        for table in ["slot_leases", "slot_waiters"] {
            conn.prepare_cached(&format!(
                "DELETE FROM {table} WHERE kind = ?1 AND holder = ?2"
            ))
            .map_err(sql)?
            .execute(params![self.kind, holder])
            .map_err(sql)?;
        }
        self.purge(conn)?;
        Ok(self.promote(conn)?.into_iter().map(|(_, w)| w).collect())
    }
}

fn to_i64(v: u64) -> Result<i64, Error> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{v} is out of range")))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn commit_one(
    conn: &Connection,
    commit: Commit,
    now: i64,
    config: &SqliteConfig,
) -> Result<Vec<Delivery>, WriteError> {
    if let Some(write) = commit.write {
        write_record(conn, &write)?;
    }
    let mut claimed = Vec::new();
    for m in commit.send {
        let claim = commit
            .claim
            .filter(|_| m.queue == QueueKind::Steps && m.delay.is_zero());
        if let Some(d) = insert_message(conn, &m, now, config, claim)? {
            claimed.push(d);
        }
    }
    if let Some((queue, receipt)) = commit.ack {
        // A receipt that is no longer current means the message was delivered again; the
        // new delivery will find this event applied.
        ack(conn, queue, &receipt)?;
    }
    Ok(claimed)
}

fn write_record(conn: &Connection, w: &RecordWrite) -> Result<(), WriteError> {
    let key = w.key.to_string();
    let found: i64 = conn
        .prepare_cached("SELECT version FROM workflows WHERE key = ?1")
        .map_err(sql)?
        .query_row([&key], |r| r.get(0))
        .optional()
        .map_err(sql)?
        .unwrap_or(0);
    let found = u64::try_from(found).unwrap_or(0);
    if found != w.expected_version {
        return Err(WriteError::Conflict {
            key: w.key.clone(),
            expected: w.expected_version,
            found,
        });
    }
    let version = to_i64(w.version)?;
    conn.prepare_cached(
        "INSERT INTO workflows (key, tenant, env, version, state, updated_at, corrupt, record) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7) \
         ON CONFLICT (key) DO UPDATE SET version = ?4, state = ?5, updated_at = ?6, \
         corrupt = NULL, record = ?7",
    )
    .map_err(sql)?
    .execute(params![
        key,
        w.key.tenant.as_str(),
        w.key.env.as_str(),
        version,
        w.state.as_str(),
        w.updated_at.as_unix_millis(),
        w.record,
    ])
    .map_err(sql)?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO history (key, version, event_id, entry) VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(sql)?
    .execute(params![key, version, w.event_id.as_str(), w.history])
    .map_err(sql)?;
    Ok(())
}

/// Inserts `m`; with `claim`, as received already (for that visibility), returning the
/// delivery.
fn insert_message(
    conn: &Connection,
    m: &Outgoing,
    now: i64,
    config: &SqliteConfig,
    claim: Option<Duration>,
) -> Result<Option<Delivery>, Error> {
    if m.body.len() > config.max_message_bytes {
        return Err(Error::TooLarge {
            size: m.body.len(),
            limit: config.max_message_bytes,
        });
    }
    if let Some(dedup) = &m.dedup_id {
        conn.prepare_cached(
            "DELETE FROM dedup WHERE queue = ?1 AND dedup_id = ?2 AND expires_at <= ?3",
        )
        .map_err(sql)?
        .execute(params![m.queue.as_str(), dedup, now])
        .map_err(sql)?;
        let fresh = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO dedup (queue, dedup_id, expires_at) VALUES (?1, ?2, ?3)",
            )
            .map_err(sql)?
            .execute(params![
                m.queue.as_str(),
                dedup,
                now + millis(config.dedup_window)
            ])
            .map_err(sql)?;
        if fresh == 0 {
            // Seen within the window: accepted, and dropped, as SQS FIFO does.
            return Ok(None);
        }
    }
    let (visible_at, receive_count, nonce) = match claim {
        Some(visibility) => (now + millis(visibility), 1, Some(new_nonce())),
        None => (now + millis(m.delay), 0, None),
    };
    conn.prepare_cached(
        "INSERT INTO messages (queue, grp, dedup_id, body, attributes, sent_at, visible_at, receive_count, nonce) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .map_err(sql)?
    .execute(params![
        m.queue.as_str(),
        m.group,
        m.dedup_id,
        m.body,
        attributes_to_sql(&m.attributes),
        now,
        visible_at,
        receive_count,
        nonce,
    ])
    .map_err(sql)?;
    Ok(nonce.map(|nonce| {
        let id = conn.last_insert_rowid();
        Delivery {
            queue: m.queue,
            id: id.to_string(),
            receipt: Receipt(format!("{id}:{nonce}")),
            body: m.body.clone(),
            attributes: m.attributes.clone(),
            receive_count: 1,
            sent_at: Timestamp::from_unix_millis(now),
            group: m.group.clone(),
        }
    }))
}

/// A receipt nonce: random, non-negative so receipts print plainly.
fn new_nonce() -> i64 {
    i64::try_from(fastrand::u64(..) >> 1).unwrap_or(0)
}

struct Row {
    id: i64,
    group: Option<String>,
    body: Vec<u8>,
    attributes: Option<String>,
    sent_at: i64,
    receive_count: i64,
}

fn receive(
    conn: &Connection,
    queue: QueueKind,
    max: usize,
    visibility: Duration,
    now: i64,
    config: &SqliteConfig,
) -> Result<Reply, Error> {
    let q = queue.as_str();
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    // Events are FIFO per group: only a group's oldest message may be delivered, and not
    // while it is in flight (it is then still the oldest, and invisible).
    let query = match queue {
        QueueKind::Events => {
            "SELECT id, grp, body, attributes, sent_at, receive_count FROM messages m \
             WHERE queue = ?1 AND visible_at <= ?2 \
               AND (grp IS NULL OR NOT EXISTS ( \
                    SELECT 1 FROM messages o WHERE o.queue = ?1 AND o.grp = m.grp AND o.id < m.id)) \
             ORDER BY id LIMIT ?3"
        }
        QueueKind::Steps => {
            "SELECT id, grp, body, attributes, sent_at, receive_count FROM messages \
             WHERE queue = ?1 AND visible_at <= ?2 ORDER BY visible_at, id LIMIT ?3"
        }
    };
    let rows: Vec<Row> = conn
        .prepare_cached(query)
        .map_err(sql)?
        .query_map(params![q, now, limit], |r| {
            Ok(Row {
                id: r.get(0)?,
                group: r.get(1)?,
                body: r.get(2)?,
                attributes: r.get(3)?,
                sent_at: r.get(4)?,
                receive_count: r.get(5)?,
            })
        })
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    let mut deliveries = Vec::with_capacity(rows.len());
    let max_receives = i64::from(config.max_receives);
    for row in rows {
        let count = row.receive_count + 1;
        if count > max_receives {
            let reason = format!(
                "received {} times without being acknowledged (max_receives = {max_receives})",
                row.receive_count
            );
            dead_letter(conn, queue, row.id, None, &reason, now)?;
            continue;
        }
        let nonce = new_nonce();
        conn.prepare_cached(
            "UPDATE messages SET visible_at = ?1, receive_count = ?2, nonce = ?3 WHERE id = ?4",
        )
        .map_err(sql)?
        .execute(params![now + millis(visibility), count, nonce, row.id])
        .map_err(sql)?;
        deliveries.push(Delivery {
            queue,
            id: row.id.to_string(),
            receipt: Receipt(format!("{}:{nonce}", row.id)),
            body: row.body,
            attributes: attributes_from_sql(row.attributes),
            receive_count: u32::try_from(count).unwrap_or(u32::MAX),
            sent_at: Timestamp::from_unix_millis(row.sent_at),
            group: row.group,
        });
    }
    let next = if deliveries.is_empty() {
        conn.prepare_cached("SELECT MIN(visible_at) FROM messages WHERE queue = ?1")
            .map_err(sql)?
            .query_row([q], |r| r.get::<_, Option<i64>>(0))
            .map_err(sql)?
            .map(Timestamp::from_unix_millis)
    } else {
        None
    };
    Ok(Reply::Received(deliveries, next))
}

fn parse_receipt(receipt: &Receipt) -> Option<(i64, i64)> {
    let (id, nonce) = receipt.0.split_once(':')?;
    Some((id.parse().ok()?, nonce.parse().ok()?))
}

/// Deletes the delivery `receipt`; false if it is not current.
fn ack(conn: &Connection, queue: QueueKind, receipt: &Receipt) -> Result<bool, Error> {
    let Some((id, nonce)) = parse_receipt(receipt) else {
        return Ok(false);
    };
    let n = conn
        .prepare_cached("DELETE FROM messages WHERE id = ?1 AND nonce = ?2 AND queue = ?3")
        .map_err(sql)?
        .execute(params![id, nonce, queue.as_str()])
        .map_err(sql)?;
    Ok(n == 1)
}

/// Moves message `id` (if its nonce is still `nonce`, when given) to the dead letters.
fn dead_letter(
    conn: &Connection,
    queue: QueueKind,
    id: i64,
    nonce: Option<i64>,
    reason: &str,
    now: i64,
) -> Result<(), Error> {
    let moved = conn
        .prepare_cached(
            "INSERT INTO dead_letters (queue, grp, dedup_id, body, attributes, sent_at, receive_count, reason, dead_at) \
             SELECT queue, grp, dedup_id, body, attributes, sent_at, receive_count, ?1, ?2 \
             FROM messages WHERE id = ?3 AND queue = ?4 AND (?5 IS NULL OR nonce = ?5)",
        )
        .map_err(sql)?
        .execute(params![reason, now, id, queue.as_str(), nonce])
        .map_err(sql)?;
    if moved == 1 {
        conn.prepare_cached("DELETE FROM messages WHERE id = ?1")
            .map_err(sql)?
            .execute([id])
            .map_err(sql)?;
    }
    Ok(())
}

/// Moves dead letters back to their queue (`back`) or deletes them: all of `queue`'s, or the
/// ones with `ids` (an id that is not a number is not found, like one that does not exist).
fn settle(
    conn: &Connection,
    queue: QueueKind,
    ids: Option<Vec<String>>,
    back: bool,
    now: i64,
) -> Result<Reply, Error> {
    let wanted: Vec<i64> = match ids {
        Some(ids) => ids.iter().filter_map(|i| i.parse().ok()).collect(),
        None => conn
            .prepare_cached("SELECT id FROM dead_letters WHERE queue = ?1 ORDER BY id")
            .map_err(sql)?
            .query_map([queue.as_str()], |r| r.get(0))
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)?,
    };
    let mut done = Vec::new();
    for id in wanted {
        if back {
            // The deduplication window is not consulted: the message was accepted once, and
            // the record's own window drops an event that was applied.
            conn.prepare_cached(
                "INSERT INTO messages (queue, grp, dedup_id, body, attributes, sent_at, visible_at) \
                 SELECT queue, grp, dedup_id, body, attributes, sent_at, ?1 \
                 FROM dead_letters WHERE id = ?2 AND queue = ?3",
            )
            .map_err(sql)?
            .execute(params![now, id, queue.as_str()])
            .map_err(sql)?;
        }
        let n = conn
            .prepare_cached("DELETE FROM dead_letters WHERE id = ?1 AND queue = ?2")
            .map_err(sql)?
            .execute(params![id, queue.as_str()])
            .map_err(sql)?;
        if n == 1 {
            done.push(id.to_string());
        }
    }
    Ok(Reply::Ids(done))
}

fn put_tenant(
    conn: &Connection,
    id: &TenantId,
    infra_project: u64,
    app_project: u64,
    record: &[u8],
    create_only: bool,
) -> Result<Reply, Error> {
    if infra_project == app_project {
        return Err(Error::Invalid(format!(
            "tenant {id}: the infra and app repositories must be different GitLab projects (both are {infra_project})"
        )));
    }
    let (infra, app) = (to_i64(infra_project)?, to_i64(app_project)?);
    if create_only {
        let exists: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")
            .map_err(sql)?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        if exists.is_some() {
            return Err(Error::AlreadyExists(format!("tenant {id}")));
        }
    }
    let other: Option<String> = conn
        .prepare_cached(
            "SELECT id FROM tenants WHERE id != ?1 \
             AND (infra_project IN (?2, ?3) OR app_project IN (?2, ?3)) LIMIT 1",
        )
        .map_err(sql)?
        .query_row(params![id.as_str(), infra, app], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    if let Some(other) = other {
        return Err(Error::AlreadyExists(format!(
            "a GitLab project of tenant {id} belongs to tenant {other}"
        )));
    }
    conn.prepare_cached(
        "INSERT INTO tenants (id, infra_project, app_project, record) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (id) DO UPDATE SET infra_project = ?2, app_project = ?3, record = ?4",
    )
    .map_err(sql)?
    .execute(params![id.as_str(), infra, app, record])
    .map_err(sql)?;
    Ok(Reply::Done)
}
