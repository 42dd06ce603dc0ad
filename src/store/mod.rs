//! The durable schema shared by the event outbox, the delivery log, the automation run log and
//! inbound replay protection: one SQLite file (WAL, synchronous=FULL). The modules that use it
//! own their queries; this one owns the tables and opening the file.

use std::path::Path;

use rusqlite::Connection;

/// An error from the outbox database.
#[derive(Debug, thiserror::Error)]
#[error("outbox: {0}")]
pub struct OutboxError(pub(crate) String);

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError(e.to_string())
    }
}

/// Every table: events, deliveries, attempts and endpoints (the outbox); runs and run_steps
/// (the run log); inbound_seen (replay protection).
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    call_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq INTEGER NOT NULL REFERENCES events(seq),
    endpoint TEXT NOT NULL,
    call_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_ms INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    done_ms INTEGER,
    last_error TEXT,
    target TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, due_ms);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(endpoint, call_id, status, event_seq);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT,
    response_prefix BLOB
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts(delivery_id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    automation TEXT NOT NULL,
    trigger TEXT NOT NULL,
    call_id TEXT,
    status TEXT NOT NULL,
    context BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_ms);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS inbound_seen (
    webhook_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL DEFAULT 0,
    disabled_reason TEXT,
    last_success_ms INTEGER,
    failing_since_ms INTEGER
);
"#;

/// Opens (and creates) an outbox database with WAL and synchronous=FULL.
pub(crate) fn open(path: &Path) -> Result<Connection, OutboxError> {
    open_at(path).map_err(|e| {
        let why = e.0.strip_prefix("outbox: ").unwrap_or(&e.0).to_string();
        if why.contains("not a database") {
            OutboxError(format!(
                "{} is not an outbox database (a SQLite file midcall made): {why}",
                path.display()
            ))
        } else {
            OutboxError(format!("{}: {why}", path.display()))
        }
    })
}

fn open_at(path: &Path) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    // Databases made before automations had no `target` column.
    let has_target: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('deliveries') WHERE name = 'target'")?
        .exists([])?;
    if !has_target {
        conn.execute_batch("ALTER TABLE deliveries ADD COLUMN target TEXT")?;
    }
    Ok(conn)
}

/// Opens an outbox database that must already exist (the logs read one; they never create it).
pub(crate) fn open_existing(path: &Path) -> Result<Connection, String> {
    if !path.exists() {
        return Err(format!("{}: no such outbox database", path.display()));
    }
    open(path).map_err(|e| e.to_string())
}

/// A write transaction that takes the write lock when it begins (SQLite `BEGIN IMMEDIATE`), so
/// the busy timeout applies: a deferred one that reads first can fail at once with "database
/// is locked" when another connection committed in between.
pub(crate) fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}
