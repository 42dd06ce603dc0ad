//! The SQLite engine: one file (WAL, synchronous=FULL), its schema and migrations, and the
//! statements of the outbox ([`outbox`]) and the run log ([`runs`]).

use std::path::Path;

use rusqlite::Connection;

use crate::store::StoreError;

pub(crate) mod outbox;
pub(crate) mod runs;

/// Schema version 1, every table: events, deliveries, attempts and endpoints (the outbox);
/// runs and run_steps (the run log); inbound_seen (replay protection). `IF NOT EXISTS`, so it
/// also adopts a database made before versions were kept.
const SCHEMA_V1: &str = r#"
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
///
/// Switching a new file to WAL takes an exclusive lock for which SQLite may answer "database is
/// locked" at once, without waiting (processes opening an empty file together): such a
/// transient failure is tried again, for up to 10 s.
pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    let mut tries = 0;
    let result = loop {
        match open_at(path) {
            Err(e) if e.is_transient() && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => break r,
        }
    };
    result.map_err(|e| {
        let why = e.message().to_string();
        let message = if why.contains("not a database") {
            format!(
                "outbox: {} is not an outbox database (a SQLite file midcall made): {why}",
                path.display()
            )
        } else {
            format!("outbox: {}: {why}", path.display())
        };
        StoreError {
            message,
            transient: e.is_transient(),
        }
    })
}

/// One step of the schema, applied once, in order, inside the migrating transaction.
struct Migration {
    version: i64,
    what: &'static str,
    apply: fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
}

/// Every schema version this build knows, oldest first. Add to the end; never edit one that
/// has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "the outbox, delivery log, run log and inbound replay tables",
        apply: |tx| tx.execute_batch(SCHEMA_V1),
    },
    Migration {
        version: 2,
        what: "deliveries.target (automation steps' deliveries)",
        apply: |tx| {
            // Version 1 as written already has it; a database from before automations
            // (adopted as version 1) does not.
            let has: bool = tx
                .prepare("SELECT 1 FROM pragma_table_info('deliveries') WHERE name = 'target'")?
                .exists([])?;
            if !has {
                tx.execute_batch("ALTER TABLE deliveries ADD COLUMN target TEXT")?;
            }
            Ok(())
        },
    },
];

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

fn open_at(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Brings the database to [`SCHEMA_VERSION`] in one write transaction (`BEGIN IMMEDIATE`: of
/// several processes opening an empty file at once, one migrates and the others wait for it,
/// then find nothing to do); refuses a database a newer midcall wrote.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, migrated_ms INTEGER NOT NULL)",
    )?;
    let current: i64 = tx
        .query_row("SELECT version FROM schema_version WHERE id = 1", [], |r| {
            r.get(0)
        })
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            e => Err(e),
        })?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::new(format!(
            "schema version {current} was written by a newer midcall; this one knows up to {SCHEMA_VERSION}: upgrade midcall, or point it at another database"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        (m.apply)(&tx).map_err(|e| {
            StoreError::new(format!(
                "migrating to schema version {} ({}): {e}",
                m.version, m.what
            ))
        })?;
    }
    if current < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO schema_version (id, version, migrated_ms) VALUES (1, ?1, ?2) ON CONFLICT(id) DO UPDATE SET version = excluded.version, migrated_ms = excluded.migrated_ms",
            rusqlite::params![SCHEMA_VERSION, crate::time::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Opens an outbox database that must already exist (the logs read one; they never create it).
pub(crate) fn open_existing(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::plain(format!(
            "{}: no such outbox database",
            path.display()
        )));
    }
    open(path)
}

/// A write transaction that takes the write lock when it begins (SQLite `BEGIN IMMEDIATE`), so
/// the busy timeout applies: a deferred one that reads first can fail at once with "database
/// is locked" when another connection committed in between.
pub(crate) fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}
