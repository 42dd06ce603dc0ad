//! The run log as its readers open it: a SQLite file or a PostgreSQL database.

use std::path::Path;

use crate::store::{LogConn, RunRecord, StoreError};

/// Reads the run log of an outbox database (a SQLite file or a `postgres://` URL).
#[derive(Debug)]
pub struct RunLog {
    conn: LogConn,
}

impl RunLog {
    /// Opens an outbox database (a SQLite file must exist).
    pub fn open(db: impl AsRef<Path>) -> Result<RunLog, StoreError> {
        Ok(RunLog {
            conn: LogConn::open(db.as_ref())?,
        })
    }

    /// Runs with their steps, newest first; optionally one automation's, optionally of one
    /// status.
    pub fn runs(
        &self,
        automation: Option<&str>,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        self.conn.runs(None, automation, status, limit as i64)
    }

    /// One run by id.
    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.conn.runs(Some(id), None, None, 1)?.pop())
    }
}
