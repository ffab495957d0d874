//! The writer thread: every write of this process, batched into one transaction per round.
//!
//! A request ([`Op`]) carries its own reply channel, typed by what the request answers. The
//! writer runs each request of a round in its own savepoint, holds its result until the round's
//! transaction commits, and only then answers: with the result if the commit succeeded, with
//! the commit's error if it did not.

use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use workflows::{Domain, Tenant, TenantId, Timestamp, WorkflowKey};

use super::{SqliteConfig, attributes_from_sql, attributes_to_sql, sql, unavailable};
use crate::clock::SharedClock;
use crate::ports::queue::Disposal;
use crate::ports::{
    Commit, Delivery, Error, Outgoing, QueueKind, Receipt, RecordWrite, SlotGrant, Woken,
    WriteError,
};

/// Where a request's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What a receive answers: the deliveries, and when the queue's next message becomes visible
/// if there were none.
pub(super) type Received = (Vec<Delivery>, Option<Timestamp>);

/// What a commit answers: one result per commit, with the step messages it claimed.
pub(super) type Committed = Vec<Result<Vec<Delivery>, WriteError>>;

/// A write request, with the channel of its answer.
#[derive(Debug)]
pub(super) enum Op {
    Commit(Vec<Commit>, Reply<Committed>),
    Send(Vec<Outgoing>, Reply<()>),
    Receive {
        queue: QueueKind,
        max: usize,
        visibility: Duration,
        reply: Reply<Received>,
    },
    /// Answers the receipts that were not current.
    Ack {
        queue: QueueKind,
        receipts: Vec<Receipt>,
        reply: Reply<Vec<Receipt>>,
    },
    Extend {
        queue: QueueKind,
        receipt: Receipt,
        visibility: Duration,
        reply: Reply<()>,
    },
    Quarantine {
        queue: QueueKind,
        receipt: Receipt,
        reason: String,
        reply: Reply<()>,
    },
    MarkCorrupt {
        key: WorkflowKey,
        reason: String,
        reply: Reply<()>,
    },
    PutTenant {
        id: TenantId,
        domain: Domain,
        infra_project: u64,
        app_project: u64,
        record: Vec<u8>,
        create_only: bool,
        /// The tenant as the caller read it: written only if still stored.
        expected: Option<Box<Tenant>>,
        reply: Reply<()>,
    },
    RemoveTenant {
        /// The tenant as the caller read it: removed only if still stored.
        expected: Box<Tenant>,
        reply: Reply<()>,
    },
    /// Answers whether `owner` holds `value` now.
    Allocate {
        pool: String,
        value: u64,
        owner: String,
        reply: Reply<bool>,
    },
    Release {
        pool: String,
        value: u64,
        owner: String,
        reply: Reply<()>,
    },
    AcquireSlot {
        kind: String,
        holder: String,
        tenant: String,
        cap: u32,
        ttl: Duration,
        wake: Vec<u8>,
        reply: Reply<(SlotGrant, Woken)>,
    },
    ReleaseSlot {
        kind: String,
        holder: String,
        cap: u32,
        ttl: Duration,
        reply: Reply<Woken>,
    },
    /// Redrives or discards dead letters (all of the queue's, or those of `ids`); answers the
    /// ids handled.
    DisposeDeadLetters {
        queue: QueueKind,
        ids: Option<Vec<String>>,
        disposal: Disposal,
        reply: Reply<Vec<String>>,
    },
}

impl Op {
    /// Answers the request with `error` without running it (its round could not start).
    fn fail(self, error: &Error) {
        match self {
            Op::Commit(_, reply) => refuse(reply, error),
            Op::Send(_, reply)
            | Op::Extend { reply, .. }
            | Op::Quarantine { reply, .. }
            | Op::MarkCorrupt { reply, .. }
            | Op::PutTenant { reply, .. }
            | Op::RemoveTenant { reply, .. }
            | Op::Release { reply, .. } => refuse(reply, error),
            Op::Receive { reply, .. } => refuse(reply, error),
            Op::Ack { reply, .. } => refuse(reply, error),
            Op::Allocate { reply, .. } => refuse(reply, error),
            Op::AcquireSlot { reply, .. } => refuse(reply, error),
            Op::ReleaseSlot { reply, .. } => refuse(reply, error),
            Op::DisposeDeadLetters { reply, .. } => refuse(reply, error),
        }
    }
}

fn refuse<T>(reply: Reply<T>, error: &Error) {
    // A requester that went away needs no answer.
    let _ = reply.send(Err(error.clone()));
}

/// A request's answer, held until its round's transaction is committed: sent with the
/// request's result if the commit succeeded, with the commit's error if it did not.
type Answer = Box<dyn FnOnce(Result<(), &Error>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, Error>) -> Answer {
    Box::new(move |committed| {
        let _ = reply.send(committed.map_err(Error::clone).and(result));
    })
}

/// Handle to the writer thread.
pub(super) struct Writer {
    tx: mpsc::Sender<Op>,
}

impl Writer {
    pub(super) fn start(
        conn: Connection,
        config: SqliteConfig,
        clock: SharedClock,
    ) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel::<Op>();
        let gate = activities::gate::write_gate(&config.path);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, rx, &config, &clock, &gate))
            .map_err(|e| unavailable("starting the writer thread", e))?;
        Ok(Self { tx })
    }

    /// Queues `op` for the next round; its answer comes on its reply channel.
    pub(super) fn submit(&self, op: Op) -> Result<(), Error> {
        self.tx
            .send(op)
            .map_err(|_| Error::unavailable(super::BACKEND, "the writer thread stopped"))
    }
}

fn run(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    config: &SqliteConfig,
    clock: &SharedClock,
    gate: &std::sync::Mutex<()>,
) {
    let mut rounds: u64 = 0;
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < config.max_batch {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
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
        round(&conn, ops, now, config, rounds);
        drop(turn);
    }
}

/// One transaction: every request in its own savepoint, then one commit (one fsync), then the
/// answers.
fn round(conn: &Connection, ops: Vec<Op>, now: i64, config: &SqliteConfig, rounds: u64) {
    let requests = ops.len();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE").map_err(sql) {
        tracing::warn!(error = %crate::ports::chain(&e), requests, "sqlite write round not started");
        for op in ops {
            op.fail(&e);
        }
        return;
    }
    let answers: Vec<Answer> = ops
        .into_iter()
        .map(|op| execute(conn, op, now, config))
        .collect();
    if rounds.is_multiple_of(256) {
        // Forget expired deduplication ids now and then, not on every round (by the expiry
        // index: the oldest first, never a scan of the window).
        let _ = conn
            .prepare_cached("DELETE FROM dedup WHERE expires_at <= ?1")
            .and_then(|mut s| s.execute([now]));
    }
    let committed = conn.execute_batch("COMMIT").map_err(sql);
    if let Err(e) = &committed {
        tracing::warn!(error = %crate::ports::chain(e), requests, "sqlite write round failed");
        let _ = conn.execute_batch("ROLLBACK");
    }
    for answer in answers {
        answer(committed.as_ref().map(|_| ()));
    }
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
    // Prepared once per name: a round opens one savepoint per request.
    let run = |statement: &str| {
        conn.prepare_cached(statement)
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(|e| E::from(sql(e)))
    };
    run(&format!("SAVEPOINT {name}"))?;
    match f(conn) {
        Ok(v) => {
            run(&format!("RELEASE {name}"))?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"));
            Err(e)
        }
    }
}

/// Runs `f` in its own savepoint and holds its answer for `reply`.
fn run_op<T: Send + 'static>(
    conn: &Connection,
    reply: Reply<T>,
    f: impl FnOnce(&Connection) -> Result<T, Error>,
) -> Answer {
    answer(reply, savepoint(conn, "op", f))
}

fn execute(conn: &Connection, op: Op, now: i64, config: &SqliteConfig) -> Answer {
    match op {
        Op::Commit(commits, reply) => {
            // Each commit in a savepoint of its own: a conflict undoes only itself.
            let results = commits
                .into_iter()
                .map(|c| savepoint(conn, "c", |conn| commit_one(conn, c, now, config)))
                .collect();
            answer(reply, Ok(results))
        }
        Op::Send(batch, reply) => run_op(conn, reply, |conn| {
            for m in batch {
                insert_message(conn, &m, now, config, None)?;
            }
            Ok(())
        }),
        Op::Receive {
            queue,
            max,
            visibility,
            reply,
        } => run_op(conn, reply, |conn| {
            receive(conn, queue, max, visibility, now, config)
        }),
        Op::Ack {
            queue,
            receipts,
            reply,
        } => run_op(conn, reply, |conn| {
            let mut failed = Vec::new();
            for r in receipts {
                if !ack(conn, queue, &r)? {
                    failed.push(r);
                }
            }
            Ok(failed)
        }),
        Op::Extend {
            queue,
            receipt,
            visibility,
            reply,
        } => run_op(conn, reply, |conn| {
            extend(conn, queue, &receipt, now + millis(visibility))
        }),
        Op::Quarantine {
            queue,
            receipt,
            reason,
            reply,
        } => run_op(conn, reply, |conn| {
            if let Some((id, nonce)) = parse_receipt(&receipt) {
                dead_letter(conn, queue, id, Some(nonce), &reason, now)?;
            }
            Ok(())
        }),
        Op::MarkCorrupt { key, reason, reply } => run_op(conn, reply, |conn| {
            conn.prepare_cached("UPDATE workflows SET corrupt = ?1 WHERE key = ?2")
                .map_err(sql)?
                .execute(params![reason, key.to_string()])
                .map_err(sql)?;
            Ok(())
        }),
        Op::PutTenant {
            id,
            domain,
            infra_project,
            app_project,
            record,
            create_only,
            expected,
            reply,
        } => run_op(conn, reply, |conn| {
            if let Some(read) = expected {
                still_stored(conn, &read)?;
            }
            let projects = (infra_project, app_project);
            put_tenant(conn, &id, &domain, projects, &record, create_only)
        }),
        Op::RemoveTenant { expected, reply } => run_op(conn, reply, |conn| {
            let id = expected.id.as_str();
            let stored: Option<Vec<u8>> = conn
                .prepare_cached("SELECT record FROM tenants WHERE id = ?1")
                .map_err(sql)?
                .query_row([id], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            if stored.is_none() {
                return Ok(());
            }
            still_stored(conn, &expected)?;
            for statement in [
                "DELETE FROM tenant_domains WHERE tenant = ?1",
                "DELETE FROM tenants WHERE id = ?1",
            ] {
                conn.prepare_cached(statement)
                    .map_err(sql)?
                    .execute([id])
                    .map_err(sql)?;
            }
            Ok(())
        }),
        Op::Allocate {
            pool,
            value,
            owner,
            reply,
        } => run_op(conn, reply, |conn| allocate(conn, &pool, value, &owner)),
        Op::Release {
            pool,
            value,
            owner,
            reply,
        } => run_op(conn, reply, |conn| {
            conn.prepare_cached(
                "DELETE FROM allocations WHERE pool = ?1 AND value = ?2 AND owner = ?3",
            )
            .map_err(sql)?
            .execute(params![pool, to_i64(value)?, owner])
            .map_err(sql)?;
            Ok(())
        }),
        Op::DisposeDeadLetters {
            queue,
            ids,
            disposal,
            reply,
        } => run_op(conn, reply, |conn| {
            dispose_dead_letters(conn, queue, ids, disposal, now)
        }),
        Op::AcquireSlot {
            kind,
            holder,
            tenant,
            cap,
            ttl,
            wake,
            reply,
        } => run_op(conn, reply, |conn| {
            Slot::new(&kind, cap, now, ttl).acquire(conn, &holder, &tenant, &wake)
        }),
        Op::ReleaseSlot {
            kind,
            holder,
            cap,
            ttl,
            reply,
        } => run_op(conn, reply, |conn| {
            Slot::new(&kind, cap, now, ttl).release(conn, &holder)
        }),
    }
}

/// Makes the delivery `receipt` invisible until `visible_at`; an error if it is not current.
fn extend(
    conn: &Connection,
    queue: QueueKind,
    receipt: &Receipt,
    visible_at: i64,
) -> Result<(), Error> {
    let (id, nonce) = parse_receipt(receipt)
        .ok_or_else(|| Error::invalid(format!("malformed receipt {:?}", receipt.0)))?;
    let changed = conn
        .prepare_cached(
            "UPDATE messages SET visible_at = ?1 WHERE id = ?2 AND nonce = ?3 AND queue = ?4",
        )
        .map_err(sql)?
        .execute(params![visible_at, id, nonce, queue.as_str()])
        .map_err(sql)?;
    if changed == 0 {
        return Err(Error::invalid(format!(
            "receipt {} of {queue} is no longer current",
            receipt.0
        )));
    }
    Ok(())
}

/// Gives `owner` the `value` of `pool` unless another owner has it or `owner` holds another
/// value of the pool; answers whether `owner` holds `value` now.
fn allocate(conn: &Connection, pool: &str, value: u64, owner: &str) -> Result<bool, Error> {
    let v = to_i64(value)?;
    let holder: Option<String> = conn
        .prepare_cached("SELECT owner FROM allocations WHERE pool = ?1 AND value = ?2")
        .map_err(sql)?
        .query_row(params![pool, v], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    match holder {
        Some(h) => Ok(h == owner),
        None => {
            // The owner may hold another value of the pool already: one each.
            let inserted = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO allocations (pool, value, owner) VALUES (?1, ?2, ?3)",
                )
                .map_err(sql)?
                .execute(params![pool, v, owner])
                .map_err(sql)?;
            Ok(inserted == 1)
        }
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
    i64::try_from(v).map_err(|_| Error::invalid(format!("{v} is out of range")))
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
        // One statement: a new id is inserted, an expired one renewed, a live one left as it
        // is (no row changes), which means seen within the window.
        let fresh = conn
            .prepare_cached(
                "INSERT INTO dedup (queue, dedup_id, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (queue, dedup_id) DO UPDATE SET expires_at = excluded.expires_at \
                 WHERE dedup.expires_at <= ?4",
            )
            .map_err(sql)?
            .execute(params![
                m.queue.as_str(),
                dedup,
                now + millis(config.dedup_window),
                now
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
) -> Result<Received, Error> {
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
    Ok((deliveries, next))
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

/// Moves dead letters back to their queue or deletes them (`disposal`): all of `queue`'s, or
/// the ones with `ids` (an id that is not a number is not found, like one that does not exist).
fn dispose_dead_letters(
    conn: &Connection,
    queue: QueueKind,
    ids: Option<Vec<String>>,
    disposal: Disposal,
    now: i64,
) -> Result<Vec<String>, Error> {
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
        if disposal == Disposal::Redrive {
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
    Ok(done)
}

/// `Ok` if tenant `read` is stored as it is (a change in between is a retryable conflict).
fn still_stored(conn: &Connection, read: &Tenant) -> Result<(), Error> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT record FROM tenants WHERE id = ?1")
        .map_err(sql)?
        .query_row([read.id.as_str()], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    let stored = bytes
        .map(|b| workflows::decode::<Tenant>(&b))
        .transpose()
        .map_err(|source| Error::corrupt(format!("tenant record {}", read.id), source))?;
    if stored.as_ref() == Some(read) {
        Ok(())
    } else {
        Err(Error::unavailable(
            super::BACKEND,
            format!(
                "tenant {} changed since it was read (a concurrent change); read it again and retry",
                read.id
            ),
        ))
    }
}

/// Writes tenant `id` (its `record`), which holds `domain` and the GitLab projects
/// `(infra, app)`, unless another tenant holds one of them.
fn put_tenant(
    conn: &Connection,
    id: &TenantId,
    domain: &Domain,
    (infra_project, app_project): (u64, u64),
    record: &[u8],
    create_only: bool,
) -> Result<(), Error> {
    if infra_project == app_project {
        return Err(Error::invalid(format!(
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
    let owner: Option<String> = conn
        .prepare_cached("SELECT tenant FROM tenant_domains WHERE domain = ?1")
        .map_err(sql)?
        .query_row([domain.as_str()], |r| r.get(0))
        .optional()
        .map_err(sql)?;
    match owner {
        Some(other) if other != id.as_str() => {
            return Err(Error::AlreadyExists(format!(
                "domain {domain} (of tenant {other})"
            )));
        }
        Some(_) => {}
        None => {
            conn.prepare_cached("DELETE FROM tenant_domains WHERE tenant = ?1")
                .map_err(sql)?
                .execute([id.as_str()])
                .map_err(sql)?;
            conn.prepare_cached("INSERT INTO tenant_domains (domain, tenant) VALUES (?1, ?2)")
                .map_err(sql)?
                .execute([domain.as_str(), id.as_str()])
                .map_err(sql)?;
        }
    }
    conn.prepare_cached(
        "INSERT INTO tenants (id, infra_project, app_project, record) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (id) DO UPDATE SET infra_project = ?2, app_project = ?3, record = ?4",
    )
    .map_err(sql)?
    .execute(params![id.as_str(), infra, app, record])
    .map_err(sql)?;
    Ok(())
}
