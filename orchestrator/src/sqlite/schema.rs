//! The tables of the embedded backend, in one SQLite file, and the migration of files of an
//! older layout.

use rusqlite::{Connection, TransactionBehavior};
use workflows::Tenant;

/// The version of the table layout below, kept in `meta`. Layout 1 had no `tenant_domains`;
/// [`super::migrate`] fills it from the tenant records.
pub(crate) const LAYOUT_VERSION: i64 = 2;

/// Creates what is missing; safe to run from several processes at once.
pub(crate) const CREATE: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Both logical queues. A message is deliverable when visible_at <= now; receiving it pushes
-- visible_at to now + visibility and gives it a fresh receipt nonce.
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY,
    queue         TEXT    NOT NULL,
    grp           TEXT,
    dedup_id      TEXT,
    body          BLOB    NOT NULL,
    attributes    TEXT,
    sent_at       INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    nonce         INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_queue_visible ON messages (queue, visible_at);
CREATE INDEX IF NOT EXISTS messages_by_group ON messages (queue, grp, id);

-- FIFO deduplication ids seen within the window.
CREATE TABLE IF NOT EXISTS dedup (
    queue      TEXT    NOT NULL,
    dedup_id   TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (queue, dedup_id)
) WITHOUT ROWID;
-- Expired ids are forgotten oldest first; expiry times only grow, so this index is appended to.
CREATE INDEX IF NOT EXISTS dedup_by_expiry ON dedup (expires_at);

CREATE TABLE IF NOT EXISTS dead_letters (
    id            INTEGER PRIMARY KEY,
    queue         TEXT    NOT NULL,
    grp           TEXT,
    dedup_id      TEXT,
    body          BLOB    NOT NULL,
    attributes    TEXT,
    sent_at       INTEGER NOT NULL,
    receive_count INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    dead_at       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, id);

CREATE TABLE IF NOT EXISTS workflows (
    key        TEXT    PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    env        TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    state      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    corrupt    TEXT,
    record     BLOB    NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS workflows_by_state ON workflows (state, key);

CREATE TABLE IF NOT EXISTS history (
    key      TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    event_id TEXT    NOT NULL,
    entry    BLOB    NOT NULL,
    PRIMARY KEY (key, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_event ON history (key, event_id);

CREATE TABLE IF NOT EXISTS tenants (
    id            TEXT    PRIMARY KEY,
    infra_project INTEGER NOT NULL UNIQUE,
    app_project   INTEGER NOT NULL UNIQUE,
    record        BLOB    NOT NULL
) WITHOUT ROWID;

-- Which tenant holds a domain: one tenant per domain, one domain per tenant.
CREATE TABLE IF NOT EXISTS tenant_domains (
    domain TEXT PRIMARY KEY,
    tenant TEXT NOT NULL UNIQUE
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS allocations (
    pool  TEXT    NOT NULL,
    value INTEGER NOT NULL,
    owner TEXT    NOT NULL,
    PRIMARY KEY (pool, value)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS allocations_by_owner ON allocations (pool, owner);

-- Leased slots capping concurrent activities of a kind, and the line of those waiting for one
-- (served by round, then ticket: see `Store::acquire_slot`). Times are Unix milliseconds.
CREATE TABLE IF NOT EXISTS slot_leases (
    kind       TEXT    NOT NULL,
    holder     TEXT    NOT NULL,
    tenant     TEXT    NOT NULL,
    granted_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, holder)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slot_leases_by_tenant ON slot_leases (kind, tenant);
CREATE TABLE IF NOT EXISTS slot_waiters (
    kind       TEXT    NOT NULL,
    holder     TEXT    NOT NULL,
    tenant     TEXT    NOT NULL,
    round      INTEGER NOT NULL,
    ticket     INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    wake       BLOB    NOT NULL,
    PRIMARY KEY (kind, holder)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slot_waiters_in_order ON slot_waiters (kind, round, ticket, holder);
CREATE INDEX IF NOT EXISTS slot_waiters_by_tenant ON slot_waiters (kind, tenant);
CREATE INDEX IF NOT EXISTS slot_waiters_by_expiry ON slot_waiters (kind, expires_at);
"#;

/// Brings a file of layout `from` to [`LAYOUT_VERSION`], in one immediate transaction (so two
/// processes opening an old file at once migrate it once).
///
/// From layout 1: fills `tenant_domains` from the tenant records. Where older tenants share a
/// domain, the first registered keeps it and the others are logged: they are refused every
/// write until they are given a domain of their own, and the AWS reconcilers never let them
/// take over the first one's listener rule (it is tagged with the first one's tenant id).
pub(crate) fn migrate(conn: &mut Connection, from: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have migrated the file since it was read.
    let layout: String = tx.query_row("SELECT value FROM meta WHERE name = 'layout'", [], |r| {
        r.get(0)
    })?;
    if layout != from.to_string() {
        return tx.commit();
    }
    if from == 1 {
        let mut tenants: Vec<Tenant> = Vec::new();
        {
            let mut stmt = tx.prepare("SELECT id, record FROM tenants")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let (id, bytes): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
                match workflows::decode::<Tenant>(&bytes) {
                    Ok(t) => tenants.push(t),
                    Err(e) => tracing::warn!(tenant = %id, error = %e,
                        "tenant record does not decode; its domain is not recorded"),
                }
            }
        }
        tenants.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        for t in &tenants {
            let added = tx.execute(
                "INSERT OR IGNORE INTO tenant_domains (domain, tenant) VALUES (?1, ?2)",
                [t.domain.as_str(), t.id.as_str()],
            )?;
            if added == 0 {
                tracing::warn!(tenant = %t.id, domain = %t.domain,
                    "domain already held by an earlier tenant; give this tenant its own domain");
            }
        }
    }
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'layout'",
        [LAYOUT_VERSION.to_string()],
    )?;
    tx.commit()
}
