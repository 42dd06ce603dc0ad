//! Event webhooks: types and envelope, Standard Webhooks signing, a durable SQLite outbox,
//! delivery with retries, and the delivery log.
//!
//! Owns the envelope, signing, publishing (the bus), the delivery worker and the delivery
//! log; the SQL is `store`'s. Reaches other modules' deliveries only through
//! `DeliveryTargets`, which they register. May call: `store`, `cache`, `config`,
//! `transport`, `template`, `jsonpath`, `state`, `time`; never `exec` or above.

mod bus;
mod deliver;
mod log;
pub mod signing;

pub use crate::store::{AttemptRecord, DeliveryRecord, StoreError};
pub(crate) use bus::{event_id, DeliveryTargets, ResolvedTarget};
pub use bus::{BusError, EventBus, EventBusBuilder, PublishError, DEFAULT_RETRY_SCHEDULE};
pub use log::DeliveryLog;

/// How a `--db` value is shown in messages and banners: a SQLite path as given, a
/// `postgres://` URL with its password replaced by `***`.
pub fn display_db(db: &str) -> String {
    crate::store::Location::of(std::path::Path::new(db)).shown()
}

pub use crate::config::EventType;
use serde_json::{json, Value};

use crate::state::{CallInfo, Transcript};
use crate::time;

/// An event: its type and its payload. The envelope (`type`, call fields, `timestamp`) is
/// added when it is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened.
    pub kind: EventType,
    /// The type's payload.
    pub payload: Value,
}

impl Event {
    /// Any event with a payload.
    pub fn new(kind: EventType, payload: Value) -> Event {
        Event { kind, payload }
    }

    /// New transcript turns, in the transcript shape.
    pub fn transcript(turns: &Transcript) -> Event {
        Event::new(
            EventType::Transcript,
            json!({"transcript": turns.to_value()}),
        )
    }

    /// The call ended: its duration, why, and the full transcript.
    pub fn phone_call_ended(
        duration_seconds: f64,
        end_reason: &str,
        transcript: &Transcript,
    ) -> Event {
        Event::new(
            EventType::PhoneCallEnded,
            json!({"duration_seconds": duration_seconds, "end_reason": end_reason, "transcript": transcript.to_value()}),
        )
    }

    /// Post-call processing finished, with its results object.
    pub fn post_call_processing_completed(results: Value) -> Event {
        Event::new(EventType::PostCallProcessingCompleted, results)
    }

    /// Something failed on the call.
    pub fn error(code: &str, message: &str) -> Event {
        Event::new(EventType::Error, json!({"code": code, "message": message}))
    }

    /// A recording is available.
    pub fn recording(url: &str, duration_seconds: f64) -> Event {
        Event::new(
            EventType::Recording,
            json!({"url": url, "duration_seconds": duration_seconds}),
        )
    }

    /// The call connected.
    pub fn phone_call_connected() -> Event {
        Event::new(EventType::PhoneCallConnected, json!({}))
    }

    /// The wire envelope for a call, timestamped `timestamp_ms`.
    pub fn envelope(&self, call: &CallInfo, timestamp_ms: i64) -> Value {
        json!({
            "type": self.kind.to_string(),
            "call_id": call.id,
            "from_number": call.from_number,
            "to_number": call.to_number,
            "is_outgoing": call.is_outgoing,
            "timestamp": time::rfc3339_ms(timestamp_ms),
            "payload": self.payload,
        })
    }
}

/// The post-call payload (`event_post_call_processing_completed`'s, and `payload.*` of
/// call_completed automations): call id, numbers, duration, outcome, agent id, name and phone
/// number, the full transcript, and the call's state variables as `custom_fields`.
pub fn post_call_payload(
    set: &crate::config::ActionSet,
    call: &crate::state::Call,
    end: &crate::state::CallEnd,
) -> Value {
    let agent = set.agent();
    json!({
        "call_id": call.info.id,
        "from_number": call.info.from_number,
        "to_number": call.info.to_number,
        "is_outgoing": call.info.is_outgoing,
        "started_at": call.info.started_at,
        "duration_seconds": (end.duration.as_millis() as f64) / 1000.0,
        "end_reason": end.end_reason,
        "outcome": end.outcome,
        "agent": {
            "id": agent.id,
            "name": agent.name.as_deref().unwrap_or(&agent.id),
            "phone_number": agent.phone_number,
        },
        "transcript": call.transcript.to_value(),
        "custom_fields": call.state.to_value(),
    })
}
