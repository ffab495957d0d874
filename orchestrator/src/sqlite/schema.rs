//! The tables of the embedded backend, in one SQLite file.

/// The version of the table layout below, kept in `meta`.
pub(crate) const LAYOUT_VERSION: i64 = 1;

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
