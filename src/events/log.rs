//! The delivery log as its readers open it: deliveries and their attempts, replays and
//! purges, on a SQLite file or a PostgreSQL database.

use std::path::Path;

use crate::store::{LogConn, StoreError};
use crate::time;

/// Reads and replays the delivery log of an outbox database (a SQLite file or a
/// `postgres://` URL).
#[derive(Debug)]
pub struct DeliveryLog {
    conn: LogConn,
}

impl DeliveryLog {
    /// Opens an outbox database (a SQLite file must exist).
    pub fn open(db: impl AsRef<Path>) -> Result<DeliveryLog, StoreError> {
        Ok(DeliveryLog {
            conn: LogConn::open(db.as_ref())?,
        })
    }

    /// Deliveries, newest first; optionally one call's, optionally of one status
    /// (`pending`, `delivered`, `failed`, `skipped`).
    pub fn deliveries(
        &self,
        call: Option<&str>,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<super::DeliveryRecord>, StoreError> {
        self.conn.deliveries(call, status, limit as i64)
    }

    /// The attempts of one delivery, oldest first.
    pub fn attempts(&self, delivery: i64) -> Result<Vec<super::AttemptRecord>, StoreError> {
        self.conn.attempts(delivery)
    }

    /// Makes one delivery due again. Returns how many (0 or 1).
    pub fn replay_id(&mut self, id: i64) -> Result<usize, StoreError> {
        self.conn.replay(Some(id), None, None, time::now_ms())
    }

    /// Whether a delivery with this id is in the log.
    pub fn contains(&self, id: i64) -> Result<bool, StoreError> {
        self.conn.contains(id)
    }

    /// Deletes delivered deliveries finished before `before_ms` (with their attempts and
    /// events), and automation runs finished before it that no delivery refers to, at most
    /// `batch` of each. The delivery task does this for the retention window.
    pub fn purge_delivered(&mut self, before_ms: i64, batch: usize) -> Result<usize, StoreError> {
        self.conn.purge(before_ms, batch as i64)
    }

    /// Makes every delivery of `status` published since `since_ms` due again.
    pub fn replay_since(&mut self, since_ms: i64, status: &str) -> Result<usize, StoreError> {
        self.conn
            .replay(None, Some(since_ms), Some(status), time::now_ms())
    }
}
