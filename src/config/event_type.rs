//! The event-type vocabulary: what the config subscribes to and what the event bus publishes.

use std::fmt;

/// What happened on a call. Wire name: `event_<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventType {
    /// A chat message (text) was exchanged.
    Message,
    /// A mid-call action ran.
    Action,
    /// New transcript turns.
    Transcript,
    /// Something failed on the call.
    Error,
    /// A recording is available.
    Recording,
    /// Human or machine answered.
    HumanDetection,
    /// An outbound call did not connect.
    PhoneCallDidNotConnect,
    /// The call connected.
    PhoneCallConnected,
    /// The call ended.
    PhoneCallEnded,
    /// Post-call processing finished.
    PostCallProcessingCompleted,
}

impl EventType {
    /// Every type, in documentation order.
    pub const ALL: [EventType; 10] = [
        EventType::Message,
        EventType::Action,
        EventType::Transcript,
        EventType::Error,
        EventType::Recording,
        EventType::HumanDetection,
        EventType::PhoneCallDidNotConnect,
        EventType::PhoneCallConnected,
        EventType::PhoneCallEnded,
        EventType::PostCallProcessingCompleted,
    ];

    /// The name used in subscriptions (`phone_call_ended`).
    pub fn name(self) -> &'static str {
        match self {
            EventType::Message => "message",
            EventType::Action => "action",
            EventType::Transcript => "transcript",
            EventType::Error => "error",
            EventType::Recording => "recording",
            EventType::HumanDetection => "human_detection",
            EventType::PhoneCallDidNotConnect => "phone_call_did_not_connect",
            EventType::PhoneCallConnected => "phone_call_connected",
            EventType::PhoneCallEnded => "phone_call_ended",
            EventType::PostCallProcessingCompleted => "post_call_processing_completed",
        }
    }

    /// Parses a subscription name; the wire form `event_<name>` is accepted too.
    pub fn parse(s: &str) -> Option<EventType> {
        let s = s.strip_prefix("event_").unwrap_or(s);
        EventType::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event_{}", self.name())
    }
}
