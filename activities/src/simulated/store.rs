//! The `sim_` tables and the reads and writes on them. Every function takes a connection (or
//! a transaction, which derefs to one); the caller decides the transaction.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use workflows::{Timestamp, WorkflowKey};

use super::Error;

/// The version of the `sim_` tables this code writes.
pub(super) const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sim_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sim_resources (
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    id            TEXT NOT NULL,
    workflow      TEXT,
    created_at_ms INTEGER NOT NULL,
    ready_at_ms   INTEGER NOT NULL,
    attrs         TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS sim_resources_by_workflow ON sim_resources (workflow, kind);
CREATE TABLE IF NOT EXISTS sim_priorities (
    priority  INTEGER PRIMARY KEY,
    rule_name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS sim_creations (
    kind  TEXT NOT NULL,
    name  TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS sim_abandons (
    kind  TEXT NOT NULL,
    name  TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS sim_counts (
    kind TEXT PRIMARY KEY,
    live INTEGER NOT NULL,
    peak INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sim_decommissioned (
    workflow TEXT PRIMARY KEY,
    at_ms    INTEGER NOT NULL
);
INSERT OR IGNORE INTO sim_meta (key, value) VALUES ('next_id', 1);
";

/// Opens `path` (created if missing) for several processes to share: WAL, a busy timeout,
/// `synchronous = NORMAL`.
pub(super) fn open_file(path: &Path, busy_timeout: Duration) -> Result<Connection, Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "sqlite file not in wal mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Creates the `sim_` tables if they are missing and checks their version.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let found: Option<i64> = tx
        .query_row(
            "SELECT value FROM sim_meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    match found {
        Some(found) if found > SCHEMA_VERSION => {
            return Err(Error::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO sim_meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// A kind of simulated resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// A security group (`sg-…`), two per tenant environment.
    SecurityGroup,
    /// A packed source tree in the artifact bucket, keyed by commit (`src/<sha>.tar.gz`).
    Artifact,
    /// The instance that runs a tenant's provisioning scripts (`i-…`), gone once the image is.
    Builder,
    /// A machine image (`ami-…`), one per tenant environment and infrastructure commit.
    Image,
    /// A MySQL database instance, one per tenant environment.
    Database,
    /// A target group, one per tenant environment.
    TargetGroup,
    /// A listener rule on the shared load balancer, one per tenant environment.
    ListenerRule,
    /// An Auto Scaling group, one per release rolled out.
    AutoScalingGroup,
}

impl ResourceKind {
    /// Every kind.
    pub const ALL: [ResourceKind; 8] = [
        Self::SecurityGroup,
        Self::Artifact,
        Self::Builder,
        Self::Image,
        Self::Database,
        Self::TargetGroup,
        Self::ListenerRule,
        Self::AutoScalingGroup,
    ];

    /// The snake_case name stored in the tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecurityGroup => "security_group",
            Self::Artifact => "artifact",
            Self::Builder => "builder",
            Self::Image => "image",
            Self::Database => "database",
            Self::TargetGroup => "target_group",
            Self::ListenerRule => "listener_rule",
            Self::AutoScalingGroup => "auto_scaling_group",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResourceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::Corrupt {
                kind: s.chars().take(40).collect(),
                name: String::new(),
                reason: "unknown resource kind".to_owned(),
            })
    }
}

/// A resource of the simulated cloud, as listed for tests and inspection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimResource {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its name, unique within its kind, derived from tenant, environment and release.
    pub name: String,
    /// The id the cloud gave it (`sg-…`, `ami-…`, an ARN, or the name itself).
    pub id: String,
    /// The workflow it belongs to; `None` for artifacts, which are shared by content.
    pub workflow: Option<WorkflowKey>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it is (or was) ready: available, healthy, uploaded.
    pub ready_at: Timestamp,
    /// What else the cloud knows of it (endpoint, priority, image, release, ...).
    pub attributes: serde_json::Value,
}

impl SimResource {
    /// Whether it is ready at `now`.
    pub fn is_ready(&self, now: Timestamp) -> bool {
        self.ready_at <= now
    }
}

/// How many times a resource of one name was created (deletions do not lower it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Creation {
    /// The resource's kind.
    pub kind: ResourceKind,
    /// The resource's name.
    pub name: String,
    /// Creations so far.
    pub count: u64,
    /// Deletions because the step that created it was abandoned (a builder whose build its
    /// workflow gave up); each allows one creation more without it being a duplicate.
    pub abandoned: u64,
}

impl Creation {
    /// Creations beyond the first that no abandonment explains: duplicates.
    pub fn duplicates(&self) -> u64 {
        self.count.saturating_sub(self.abandoned).saturating_sub(1)
    }
}

/// A listener rule priority held by a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriorityAllocation {
    /// The priority.
    pub priority: u32,
    /// The rule holding it.
    pub rule_name: String,
}

/// One row of `sim_resources`.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) kind: ResourceKind,
    pub(super) name: String,
    pub(super) id: String,
    pub(super) workflow: Option<String>,
    pub(super) created_at_ms: i64,
    pub(super) ready_at_ms: i64,
    pub(super) attrs: String,
}

impl Row {
    /// The attributes as `T`.
    pub(super) fn attrs<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(&self.attrs).map_err(|e| self.corrupt(e.to_string()))
    }

    pub(super) fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            kind: self.kind.to_string(),
            name: self.name.clone(),
            reason,
        }
    }

    pub(super) fn into_public(self) -> Result<SimResource, Error> {
        let workflow = match &self.workflow {
            Some(w) => Some(
                w.parse::<WorkflowKey>()
                    .map_err(|e| self.corrupt(e.to_string()))?,
            ),
            None => None,
        };
        let attributes = self.attrs()?;
        Ok(SimResource {
            kind: self.kind,
            name: self.name,
            id: self.id,
            workflow,
            created_at: Timestamp::from_unix_millis(self.created_at_ms),
            ready_at: Timestamp::from_unix_millis(self.ready_at_ms),
            attributes,
        })
    }
}

const COLUMNS: &str = "kind, name, id, workflow, created_at_ms, ready_at_ms, attrs";

impl rusqlite::types::FromSql for ResourceKind {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = value.as_str()?;
        s.parse()
            .map_err(|e: Error| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        kind: row.get(0)?,
        name: row.get(1)?,
        id: row.get(2)?,
        workflow: row.get(3)?,
        created_at_ms: row.get(4)?,
        ready_at_ms: row.get(5)?,
        attrs: row.get(6)?,
    })
}

/// The resource `kind` named `name`, if it exists.
pub(super) fn find(
    conn: &Connection,
    kind: ResourceKind,
    name: &str,
) -> Result<Option<Row>, Error> {
    let sql = format!("SELECT {COLUMNS} FROM sim_resources WHERE kind = ?1 AND name = ?2");
    conn.prepare_cached(&sql)?
        .query_row(params![kind.as_str(), name], read_row)
        .optional()
        .map_err(Error::from)
}

/// The resources of `workflow` (all kinds, or only `kind`), by name.
pub(super) fn list_workflow(
    conn: &Connection,
    workflow: &str,
    kind: Option<ResourceKind>,
) -> Result<Vec<Row>, Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM sim_resources WHERE workflow = ?1 AND (?2 IS NULL OR kind = ?2) \
         ORDER BY kind, name"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![workflow, kind.map(ResourceKind::as_str)], read_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every resource, by kind and name.
pub(super) fn list_all(conn: &Connection) -> Result<Vec<Row>, Error> {
    let sql = format!("SELECT {COLUMNS} FROM sim_resources ORDER BY kind, name");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], read_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A resource about to be created.
pub(super) struct NewResource<'a> {
    pub(super) kind: ResourceKind,
    pub(super) name: &'a str,
    pub(super) workflow: Option<&'a str>,
    pub(super) now_ms: i64,
    pub(super) ready_at_ms: i64,
}

/// Creates a resource and counts the creation. `id_of` turns a fresh number (never handed
/// out before in this file) into the resource's id; `attrs_of` gets that id.
pub(super) fn create<A: Serialize>(
    conn: &Connection,
    new: NewResource<'_>,
    id_of: impl FnOnce(u64) -> String,
    attrs_of: impl FnOnce(&str, u64) -> A,
) -> Result<Row, Error> {
    let n = next_id(conn)?;
    let id = id_of(n);
    let attrs = serde_json::to_string(&attrs_of(&id, n)).map_err(|e| Error::Corrupt {
        kind: new.kind.to_string(),
        name: new.name.to_owned(),
        reason: e.to_string(),
    })?;
    conn.prepare_cached(
        "INSERT INTO sim_resources (kind, name, id, workflow, created_at_ms, ready_at_ms, attrs) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        new.kind.as_str(),
        new.name,
        id,
        new.workflow,
        new.now_ms,
        new.ready_at_ms,
        attrs
    ])?;
    conn.prepare_cached(
        "INSERT INTO sim_creations (kind, name, count) VALUES (?1, ?2, 1) \
         ON CONFLICT (kind, name) DO UPDATE SET count = count + 1",
    )?
    .execute(params![new.kind.as_str(), new.name])?;
    // The most of a kind that ever existed at once: what an account quota would have seen.
    // Kept as a running count (counting the rows would cost a scan per creation); the first
    // creation of a kind counts what is there.
    let counted = conn
        .prepare_cached(
            "UPDATE sim_counts SET live = live + 1, peak = MAX(peak, live + 1) WHERE kind = ?1",
        )?
        .execute(params![new.kind.as_str()])?;
    if counted == 0 {
        conn.prepare_cached(
            "INSERT INTO sim_counts (kind, live, peak) \
             SELECT ?1, COUNT(*), COUNT(*) FROM sim_resources WHERE kind = ?1",
        )?
        .execute(params![new.kind.as_str()])?;
    }
    tracing::info!(kind = %new.kind, name = new.name, id = %id, "resource created");
    Ok(Row {
        kind: new.kind,
        name: new.name.to_owned(),
        id,
        workflow: new.workflow.map(str::to_owned),
        created_at_ms: new.now_ms,
        ready_at_ms: new.ready_at_ms,
        attrs,
    })
}

/// Deletes a resource; `false` if it did not exist.
/// Replaces the attributes of resource `name` of `kind` (a modification in place).
pub(super) fn set_attrs<A: Serialize>(
    conn: &Connection,
    kind: ResourceKind,
    name: &str,
    attrs: &A,
) -> Result<(), Error> {
    let json = serde_json::to_string(attrs).map_err(|e| Error::Corrupt {
        kind: kind.to_string(),
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    conn.prepare_cached("UPDATE sim_resources SET attrs = ?3 WHERE kind = ?1 AND name = ?2")?
        .execute(params![kind.as_str(), name, json])?;
    Ok(())
}

pub(super) fn delete(conn: &Connection, kind: ResourceKind, name: &str) -> Result<bool, Error> {
    let n = conn
        .prepare_cached("DELETE FROM sim_resources WHERE kind = ?1 AND name = ?2")?
        .execute(params![kind.as_str(), name])?;
    if n > 0 {
        conn.prepare_cached("UPDATE sim_counts SET live = live - 1 WHERE kind = ?1")?
            .execute(params![kind.as_str()])?;
        tracing::info!(kind = %kind, name, "resource deleted");
    }
    Ok(n > 0)
}

fn next_id(conn: &Connection) -> Result<u64, Error> {
    let n: i64 = conn
        .prepare_cached(
            "UPDATE sim_meta SET value = value + 1 WHERE key = 'next_id' RETURNING value - 1",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The priority `rule_name` holds, if any.
pub(super) fn priority_of(conn: &Connection, rule_name: &str) -> Result<Option<u32>, Error> {
    Ok(conn
        .prepare_cached("SELECT priority FROM sim_priorities WHERE rule_name = ?1")?
        .query_row([rule_name], |row| row.get(0))
        .optional()?)
}

/// Gives `rule_name` the lowest free priority from `first` (at most `max`). The primary key
/// on `priority` makes a second holder impossible even if two writers raced past the check.
pub(super) fn allocate_priority(
    conn: &Connection,
    rule_name: &str,
    first: u32,
    max: u32,
) -> Result<u32, Error> {
    let lowest_free: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(c) FROM (
                 SELECT ?1 AS c WHERE NOT EXISTS (SELECT 1 FROM sim_priorities WHERE priority = ?1)
                 UNION ALL
                 SELECT p.priority + 1 FROM sim_priorities p
                 WHERE p.priority >= ?1
                   AND NOT EXISTS (SELECT 1 FROM sim_priorities q WHERE q.priority = p.priority + 1)
             )",
        )?
        .query_row([first], |row| row.get(0))?;
    let priority = lowest_free
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p <= max)
        .ok_or(Error::NoFreePriority { first, max })?;
    conn.prepare_cached("INSERT INTO sim_priorities (priority, rule_name) VALUES (?1, ?2)")?
        .execute(params![priority, rule_name])?;
    Ok(priority)
}

/// Frees the priority `rule_name` holds.
pub(super) fn free_priority(conn: &Connection, rule_name: &str) -> Result<(), Error> {
    conn.prepare_cached("DELETE FROM sim_priorities WHERE rule_name = ?1")?
        .execute([rule_name])?;
    Ok(())
}

/// Every allocated priority, lowest first.
pub(super) fn priorities(conn: &Connection) -> Result<Vec<PriorityAllocation>, Error> {
    let mut stmt =
        conn.prepare("SELECT priority, rule_name FROM sim_priorities ORDER BY priority")?;
    let rows = stmt.query_map([], |row| {
        Ok(PriorityAllocation {
            priority: row.get(0)?,
            rule_name: row.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// When `workflow` was last decommissioned, if it was.
pub(super) fn decommissioned_at(conn: &Connection, workflow: &str) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached("SELECT at_ms FROM sim_decommissioned WHERE workflow = ?1")?
        .query_row([workflow], |row| row.get(0))
        .optional()?)
}

/// Whether `workflow` was decommissioned.
pub(super) fn is_decommissioned(conn: &Connection, workflow: &str) -> Result<bool, Error> {
    Ok(decommissioned_at(conn, workflow)?.is_some())
}

/// Records that `workflow` was decommissioned at `now_ms` (the latest time counts: an
/// environment provisioned again can be decommissioned again).
pub(super) fn mark_decommissioned(
    conn: &Connection,
    workflow: &str,
    now_ms: i64,
) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO sim_decommissioned (workflow, at_ms) VALUES (?1, ?2) \
         ON CONFLICT (workflow) DO UPDATE SET at_ms = max(at_ms, excluded.at_ms)",
    )?
    .execute(params![workflow, now_ms])?;
    Ok(())
}

/// Every creation count, by kind and name.
/// The most resources of each kind that existed at once.
pub(super) fn peaks(conn: &Connection) -> Result<Vec<(ResourceKind, u64)>, Error> {
    let mut stmt = conn.prepare("SELECT kind, peak FROM sim_counts ORDER BY kind")?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    rows.map(|r| {
        let (kind, peak) = r?;
        Ok((kind.parse()?, u64::try_from(peak).unwrap_or(0)))
    })
    .collect()
}

pub(super) fn creations(conn: &Connection) -> Result<Vec<Creation>, Error> {
    let mut stmt = conn.prepare(
        "SELECT c.kind, c.name, c.count, COALESCE(a.count, 0) FROM sim_creations c \
         LEFT JOIN sim_abandons a ON a.kind = c.kind AND a.name = c.name \
         ORDER BY c.kind, c.name",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, i64>(3)?,
        ))
    })?;
    rows.map(|r| {
        let (kind, name, count, abandoned) = r?;
        Ok(Creation {
            kind: kind.parse()?,
            name,
            count: u64::try_from(count).unwrap_or(0),
            abandoned: u64::try_from(abandoned).unwrap_or(0),
        })
    })
    .collect()
}

/// Deletes the `kind` resource `name` because the step that made it was abandoned, and
/// counts that (its next creation is not a duplicate). Whether there was one.
pub(super) fn abandon(conn: &Connection, kind: ResourceKind, name: &str) -> Result<bool, Error> {
    let deleted = delete(conn, kind, name)?;
    if deleted {
        conn.prepare_cached(
            "INSERT INTO sim_abandons (kind, name, count) VALUES (?1, ?2, 1) \
             ON CONFLICT (kind, name) DO UPDATE SET count = count + 1",
        )?
        .execute(params![kind.as_str(), name])?;
    }
    Ok(deleted)
}
