//! Where a tool call's time went (connect, TLS, first byte, body, parse, extract, total): a
//! leaf of exec that the errors and the outcome both carry.

use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// Where the time went, where it could be measured. `connect` and `tls` are present only when
/// the action opened a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// DNS and TCP connect.
    pub connect: Option<Duration>,
    /// TLS handshake.
    pub tls: Option<Duration>,
    /// Request sent to response headers received (includes connecting).
    pub ttfb: Option<Duration>,
    /// Reading the body.
    pub body: Option<Duration>,
    /// Parsing the JSON.
    pub parse: Option<Duration>,
    /// Running the extraction queries.
    pub extract: Option<Duration>,
    /// Everything, from the call to `execute` to the outcome.
    pub total: Duration,
}

impl Serialize for Timings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let us = |d: Duration| d.as_micros() as u64;
        let mut m = s.serialize_map(None)?;
        for (k, v) in [
            ("connect_us", self.connect),
            ("tls_us", self.tls),
            ("ttfb_us", self.ttfb),
            ("body_us", self.body),
            ("parse_us", self.parse),
            ("extract_us", self.extract),
        ] {
            if let Some(v) = v {
                m.serialize_entry(k, &us(v))?;
            }
        }
        m.serialize_entry("total_us", &us(self.total))?;
        m.end()
    }
}
