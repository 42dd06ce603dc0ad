//! Who is at fault, as the issue that reshaped the error types asked: a tool call after the
//! call ended is its caller's (not a render error), and a tool call that times out waiting
//! for an identical call already running is the local turn's fault only when the turn's
//! budget, not the action's own timeout, cut it (as a request's own time-out is judged).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use midcall::exec::{Budget, Fault, Status};
use midcall::{ActionSet, CallEnd, Runtime, ToolCall};

use crate::support::{call_info, load_toml, loopback_policy, AGENT};

fn runtime() -> Runtime {
    Runtime::builder()
        .egress(loopback_policy())
        .build()
        .unwrap()
}

/// A write held to the end of the turn: nothing is ever sent while the turn goes on, so the
/// timers are the only thing that can end an identical call waiting for it.
fn held_write(timeout_ms: u64) -> Arc<ActionSet> {
    let text = format!(
        "{AGENT}[[actions]]\nname = \"book\"\ndescription = \"d\"\nurl = \"http://127.0.0.1:9/book\"\nmethod = \"POST\"\nhold = \"end_of_turn\"\ntimeout_ms = {timeout_ms}\n"
    );
    Arc::new(load_toml(&text).unwrap())
}

#[tokio::test]
async fn a_tool_call_after_the_call_ended_is_the_callers_and_not_a_render_error() {
    let rt = runtime();
    let call = rt
        .start_call(held_write(1000), call_info(), Duration::from_secs(1))
        .await;
    call.end(CallEnd::new(Duration::from_secs(1), "hangup"))
        .await
        .unwrap();
    let o = call
        .tool(
            "book",
            ToolCall::new("tc_late", json!({})),
            Budget::new(Duration::from_secs(5)),
        )
        .await;
    assert_eq!(o.status, Status::Rejected);
    let e = o.error.expect("an error");
    assert!(e.is_call_ended(), "{e:?}");
    assert!(!e.is_render(), "{e:?}");
    assert_eq!(e.fault(), Fault::Caller);
    assert!(e.to_string().contains("the call has ended"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_dedupe_waiter_cut_by_the_budget_is_local_and_by_its_own_timeout_is_not() {
    let rt = runtime();
    let call = rt
        .start_call(held_write(2000), call_info(), Duration::from_secs(1))
        .await;
    // The first call leads, held until the end of the turn (which never comes here).
    let leader = call.tool(
        "book",
        ToolCall::new("tc_1", json!({"slot": "9am"})),
        Budget::new(Duration::from_secs(60)),
    );
    // An identical call with a budget shorter than the action's timeout: the budget cuts it.
    let cut = call.tool(
        "book",
        ToolCall::new("tc_2", json!({"slot": "9am"})),
        Budget::new(Duration::from_millis(300)),
    );
    let o = cut.await;
    assert_eq!(o.status, Status::TimedOut, "{o:?}");
    let e = o.error.expect("an error");
    assert!(e.to_string().contains("identical call"), "{e}");
    assert_eq!(e.fault(), Fault::Local, "the turn's budget ended it");

    // An identical call with a budget longer than the action's timeout: its own timeout
    // ends the wait, which is not the turn's doing.
    let own = call.tool(
        "book",
        ToolCall::new("tc_3", json!({"slot": "9am"})),
        Budget::new(Duration::from_secs(60)),
    );
    let o = own.await;
    assert_eq!(o.status, Status::TimedOut, "{o:?}");
    let e = o.error.expect("an error");
    assert!(e.to_string().contains("identical call"), "{e}");
    assert_eq!(e.fault(), Fault::Upstream, "its own timeout ended it");
    call.barge_in();
    assert_eq!(leader.await.status, Status::Cancelled);
}
