//! A minimal agent loop that embeds midcall, as a voice agent runtime would: start the call
//! (warm-up and prefetch), run the model's tool calls under a per-turn budget, speak fillers and
//! fallback lines, read values from the conversation state, and complete the call (events and
//! the call_completed automation, through a durable outbox).
//!
//! It runs offline: a tiny local server stands in for the CRM. Run it with
//! `cargo run --example embed`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use midcall::exec::Budget;
use midcall::transport::EgressPolicy;
use midcall::{
    ActionSet, Automations, CallEnd, CallInfo, EventBus, MapSecrets, Runtime, Syntax, ToolCall,
    Turn,
};

/// A stand-in CRM on 127.0.0.1: customer lookup, open slots (slow, so the filler plays) and
/// booking.
async fn mock_crm() -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let (delay, body) = if req.starts_with("GET /customers") {
                        (
                            0,
                            json!({"data": {"customer": {"id": "cus_42", "name": "Ada", "tier": "gold"}}}),
                        )
                    } else if req.starts_with("POST /hooks/") {
                        println!(
                            "  (CRM) received the call-completed webhook, signed: {}",
                            req.contains("webhook-signature: v1,")
                        );
                        (0, json!({"received": true}))
                    } else if req.starts_with("GET /slots") {
                        (
                            600,
                            json!({"slots": [{"start": "09:00", "available": true}, {"start": "10:00", "available": false}, {"start": "15:00", "available": true}]}),
                        )
                    } else {
                        (0, json!({"id": "apt_1001", "status": "booked"}))
                    };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let body = body.to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn agent(origin: &str) -> Result<ActionSet, midcall::LoadError> {
    let text = format!(
        r#"
[agent]
id = "front-desk"
tenant = "acme-dental"

[[actions]]
name = "lookup_customer"
description = "Look up the caller's account by phone number"
url = "{origin}/customers?phone={{{{call.from_number}}}}"
headers = {{ Authorization = "Bearer {{{{secrets.CRM_TOKEN}}}}" }}
timeout_ms = 800
cache = {{ ttl_s = 300, scope = "tenant" }}
prefetch = "call_start"
extract = {{ "customer.name" = "$.data.customer.name", "customer.id" = "$.data.customer.id" }}

[[actions]]
name = "check_slots"
description = "List open appointment slots on a day"
url = "{origin}/slots?date={{{{args.date}}}}"
parameters = {{ type = "object", required = ["date"], properties = {{ date = {{ type = "string" }} }} }}
timeout_ms = 1500
filler = {{ after_ms = 300, say = "Let me check the calendar." }}
extract = {{ "slots.open" = {{ path = "$.slots[?@.available == true].start", all = true }} }}

[[actions]]
name = "book_appointment"
description = "Book a slot"
method = "POST"
url = "{origin}/appointments"
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string" }} }} }}
body = {{ customer_id = "{{{{state.customer.id}}}}", slot = "{{{{args.slot}}}}" }}
extract = {{ "appointment.id" = "$.id" }}
on_failure = {{ say = "I couldn't book that; the office will call you back.", set = {{ "appointment.pending" = true }} }}

[[automations]]
id = "crm-sync"
trigger = {{ on = "call_completed", agents = "all" }}
steps = [ {{ send_webhook = {{ url = "{origin}/hooks/call-completed", signing_secret = "{{{{secrets.WEBHOOK_SECRET}}}}" }} }} ]
"#
    );
    ActionSet::from_str("embed.toml", &text, Syntax::Toml)
}

fn now() -> String {
    "2025-11-03T19:33:18.330Z".to_string()
}

/// One outcome as a timeline line: status, HTTP code, time, values or the fallback.
fn show(o: &midcall::Outcome) {
    let values: Vec<String> = o.values.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    println!(
        "  {:<18} {:<10} {:>4} {:>7.1} ms{}{}",
        o.action,
        o.status.as_str(),
        o.http_status.map(|c| c.to_string()).unwrap_or_default(),
        o.timings.total.as_secs_f64() * 1000.0,
        if o.deduplicated {
            "  [deduplicated: nothing sent]"
        } else {
            ""
        },
        if values.is_empty() {
            String::new()
        } else {
            format!("  {}", values.join(", "))
        },
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = mock_crm().await?;
    let agent = Arc::new(agent(&format!("http://127.0.0.1:{port}"))?);
    let db = std::env::temp_dir().join(format!("midcall-embed-{}.db", std::process::id()));

    // One runtime per process, configured once: network, secrets and the durable event bus.
    // Real deployments keep the default HTTPS-only policy; this demo talks to loopback.
    let runtime = Runtime::builder()
        .egress(
            EgressPolicy::new()
                .allow_http(true)
                .allow_network("127.0.0.0/8".parse()?),
        )
        .secrets(Arc::new(
            MapSecrets::new()
                .with("CRM_TOKEN", "demo-token")
                .with("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ))
        .event_bus(EventBus::builder(&db).webhooks(&agent))
        .build()?;
    let bus = runtime.event_bus().ok_or("no bus")?.clone();
    // The call_completed automations register with the runtime: `call.end` queues them.
    let automations = Automations::builder(agent.clone(), runtime.clone(), bus.clone()).start()?;

    // The call connects: warm connections and prefetch the caller's account.
    let info = CallInfo {
        id: "call_embed_1".into(),
        agent_id: "front-desk".into(),
        tenant: "acme-dental".into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: now(),
    };
    let call = runtime
        .start_call(agent.clone(), info, Duration::from_millis(500))
        .await;
    println!("call connected; prefetched:");
    call.start_report().prefetched.iter().for_each(show);

    // Turn 1: the model asks for open slots. The filler plays while the slow lookup runs.
    call.add_turn(Turn::user("Can I come in tomorrow?", now()));
    let slots = call
        .tool(
            "check_slots",
            ToolCall::new("tc_1", json!({"date": "2025-11-04"})),
            Budget::new(Duration::from_millis(1500)),
        )
        .on_filler(|line| println!("  agent says (filler): {line}"))
        .await;
    show(&slots);
    println!("  the model gets {}", slots.llm_result);

    // Turn 2: the model books; the caller barges in and the model re-issues the same call.
    for id in ["tc_2", "tc_3"] {
        let o = call
            .tool(
                "book_appointment",
                ToolCall::new(id, json!({"slot": "15:00"})),
                Budget::new(Duration::from_millis(1500)),
            )
            .await;
        if let Some(line) = &o.say {
            println!("  agent says (fallback): {line}");
        }
        show(&o);
        call.barge_in();
    }
    call.add_turn(Turn::ai(
        "You're booked for 3 pm tomorrow.",
        now(),
        Some(2),
        Some("node_confirm".into()),
    ));
    println!("final state: {}", call.state_value());

    // The call ends: phone_call_ended and the post-call results are published durably, and the
    // call_completed automation sends the post-call payload to the CRM, signed.
    let end = CallEnd::new(Duration::from_secs(42), "user_hangup").outcome("appointment_booked");
    let runs = call.end(end).await?;
    automations.wait_idle(Duration::from_secs(5)).await;
    let log = bus.log()?;
    for _ in 0..250 {
        if log.deliveries(None, Some("pending"), 10)?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let plural = if runs.len() == 1 { "run" } else { "runs" };
    println!("call ended; {} automation {plural} queued", runs.len());
    for d in log.deliveries(None, None, 10)? {
        println!("  delivery to {:<40} {}", d.endpoint, d.status);
    }
    automations.shutdown(Duration::from_secs(1)).await;
    bus.close().await;
    let _ = std::fs::remove_file(&db);
    Ok(())
}
