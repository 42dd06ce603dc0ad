"""The Python API against real local HTTP and HTTPS servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import midcall
from conftest import SECRET

# A bound only a real bug exceeds (the machine may be loaded); never a tight figure.
SLACK_S = 2.0

CLI_KEYS = {
    "action", "tool_call_id", "status", "http_status", "attempts", "elapsed_ms", "values",
    "llm_result", "say", "filler_fired", "cache", "deduplicated", "detached", "timings", "error",
}


def _run(code: str, argv=(), **env):
    """Runs `code` in a fresh interpreter (this venv's), with `argv` after it."""
    import os
    import subprocess
    import sys

    e = dict(os.environ)
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, env=e
    )


async def test_ok_writes_values_into_state(runtime):
    call = await runtime.start_call(id="c-ok", from_number="+15551234567")
    out = await call.tool("lookup_customer", {}, tool_call_id="tc_1")
    # The session warmed and the lookup ran over HTTPS with the caller's number.
    assert out.status == "ok", out.to_dict()
    assert out.http_status == 200
    assert out.cache == "miss"
    assert out.values == {"customer.name": "Dana Reyes", "customer.id": "cus_1"}
    assert out.llm_result == {"customer.name": "Dana Reyes", "customer.id": "cus_1"}
    assert call.state["customer"]["name"] == "Dana Reyes"
    assert out.say is None and out.error is None
    assert out.tool_call_id == "tc_1"
    assert out.attempts == 1
    assert out.elapsed_ms > 0
    d = out.to_dict()
    assert set(d) == CLI_KEYS
    assert json.loads(json.dumps(d)) == json.loads(out.to_json())
    assert [r.tool_call_id for r in call.records()] == ["tc_1"]


async def test_cache_hit_sends_nothing(runtime, upstream):
    # The same caller again (a second call): the lookup is answered from the cache. (Within
    # one call an identical re-issue is deduplicated before the cache is asked.)
    call = await runtime.start_call(id="c-cache", from_number="+15550000001")
    first = await call.tool("lookup_customer", {}, tool_call_id="a")
    before = upstream.count("/customer")
    again = await runtime.start_call(id="c-cache-2", from_number="+15550000001")
    second = await again.tool("lookup_customer", {}, tool_call_id="b")
    assert first.cache == "miss"
    assert second.cache == "hit"
    assert second.status == "cache_hit"
    assert second.values == first.values
    assert upstream.count("/customer") == before
    assert again.state["customer"]["name"] == "Dana Reyes"


async def test_timed_out_within_budget_says_the_fallback(runtime, upstream):
    call = await runtime.start_call(id="c-timeout")
    t = time.monotonic()
    out = await call.tool("hang", {}, tool_call_id="tc_h", budget_ms=300)
    took = time.monotonic() - t
    assert out.status == "timed_out", out.to_dict()
    assert out.say == "The system is slow today; let me take a note instead."
    assert out.llm_result["error"] == "timed_out"
    assert 0.3 <= took < 0.3 + SLACK_S


async def test_filler_fires_once_on_the_loop_while_running(runtime):
    call = await runtime.start_call(id="c-filler")
    loop_thread = threading.get_ident()
    heard = []
    done = asyncio.Event()

    def on_filler(line):
        heard.append((line, threading.get_ident(), done.is_set()))

    task = asyncio.create_task(
        call.tool("slow_report", {"ms": 600}, tool_call_id="tc_f", on_filler=on_filler)
    )
    out = await task
    done.set()
    assert out.status == "ok"
    assert out.filler_fired
    assert len(heard) == 1
    line, thread, finished = heard[0]
    assert line == "One moment please."
    assert thread == loop_thread, "on_filler must run on the caller's event loop"
    assert not finished, "the filler must be heard while the call is still running"


async def test_no_filler_for_a_fast_call(runtime):
    call = await runtime.start_call(id="c-nofiller")
    heard = []
    out = await call.tool("slow_report", {"ms": 0}, on_filler=heard.append)
    assert out.status == "ok" and not out.filler_fired
    await asyncio.sleep(0)
    assert heard == []


async def test_cancelled_booking_is_finished_once_and_reissue_is_deduplicated(runtime, upstream):
    upstream.posted.clear()
    upstream.book_delay = 0.4
    before = upstream.count("/book")
    try:
        call = await runtime.start_call(id="c-book")
        task = asyncio.create_task(
            call.tool("book", {"slot": "2025-11-04T09:00"}, tool_call_id="tc_b1")
        )
        # Wait for the server to have the POST: then the booking must finish, not vanish.
        assert await asyncio.to_thread(upstream.posted.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The model re-issues the same booking with a new tool-call id.
        again = await call.tool("book", {"slot": "2025-11-04T09:00"}, tool_call_id="tc_b2")
        assert again.status == "ok", again.to_dict()
        assert again.deduplicated
        assert again.values["appointment.id"].startswith("apt_")
        assert upstream.count("/book") == before + 1, "one booking, sent once"
        recs = call.records()
        assert any(r.detached and r.status == "ok" for r in recs), [r.to_dict() for r in recs]
        assert call.state["appointment"]["id"] == again.values["appointment.id"]
    finally:
        upstream.book_delay = 0.0


async def test_cancelling_a_hung_call_closes_its_connection(runtime, upstream):
    upstream.hang_started.clear()
    upstream.hang_closed.clear()
    call = await runtime.start_call(id="c-hang")
    task = asyncio.create_task(call.tool("hang", {}, tool_call_id="tc_x", budget_ms=10_000))
    assert await asyncio.to_thread(upstream.hang_started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The server sees the connection closed (a GET is cancelled, not finished).
    assert await asyncio.to_thread(upstream.hang_closed.wait, 5)
    recs = call.records()
    assert [r.status for r in recs] == ["cancelled"]
    assert call.running == 0


async def test_held_call_is_discarded_by_barge_in_and_sent_at_end_of_turn(runtime, upstream):
    before = upstream.count("/book")
    call = await runtime.start_call(id="c-held")
    held = asyncio.create_task(call.tool("book_held", {"slot": "a"}, tool_call_id="h1"))
    await asyncio.sleep(0)  # let the task register its held call
    while call.running == 0:
        await asyncio.sleep(0)
    call.barge_in()
    out = await held
    assert out.status == "cancelled"
    assert upstream.count("/book") == before, "a discarded held call is never sent"

    held2 = asyncio.create_task(call.tool("book_held", {"slot": "b"}, tool_call_id="h2"))
    while call.running == 0:
        await asyncio.sleep(0)
    assert upstream.count("/book") == before
    call.end_turn()
    out2 = await held2
    assert out2.status == "ok", out2.to_dict()
    assert upstream.count("/book") == before + 1
    assert call.state["held"]["id"].startswith("apt_")


async def test_unknown_tool_is_rejected_with_the_tool_names(runtime):
    call = await runtime.start_call(id="c-unknown")
    out = await call.tool("lookup_customr", {"x": 1})
    assert out.status == "rejected"
    assert "lookup_customer" in out.llm_result["message"]
    assert "book" in out.llm_result["message"]


async def test_bad_arguments_are_type_errors_naming_the_place(runtime):
    call = await runtime.start_call(id="c-types")
    with pytest.raises(TypeError, match=r"arguments\.when: a value of type datetime"):
        import datetime

        await call.tool("get_item", {"n": 1, "when": datetime.datetime.now()})
    with pytest.raises(TypeError, match=r"arguments: a key of type int"):
        await call.tool("get_item", {1: 2})
    with pytest.raises(ValueError, match="NaN"):
        await call.tool("get_item", {"n": float("nan")})
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested more than"):
        await call.tool("get_item", {"n": loop})
    with pytest.raises(ValueError, match="budget_ms"):
        await call.tool("get_item", {"n": 1}, budget_ms=0)
    # The call goes on.
    out = await call.tool("get_item", {"n": 7})
    assert out.status == "ok" and out.values == {"item.n": 7}


async def test_schema_failure_is_rejected_not_raised(runtime):
    call = await runtime.start_call(id="c-schema")
    out = await call.tool("get_item", {"n": "seven"})
    assert out.status == "rejected"
    assert out.attempts == 0


def test_bad_agent_file_raises_config_error_with_location(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[agent]\nid = "x"\ntenant = "t"\n\n[[actions]]\nname = "a"\nurl = "https://x.example/"\ntimeout_ms = "soon"\n')
    with pytest.raises(midcall.ConfigError) as e:
        midcall.Runtime(p)
    text = str(e.value)
    assert "bad.toml:8" in text, text
    assert "timeout_ms" in text
    with pytest.raises(midcall.ConfigError, match="cannot read"):
        midcall.Runtime(tmp_path / "missing.toml")


def test_bad_options_are_named(agent_file):
    with pytest.raises(ValueError, match=r"allow_networks\[0\]"):
        midcall.Runtime(agent_file, secrets={"CRM_TOKEN": SECRET}, allow_networks=["nope"])
    with pytest.raises(TypeError) as e:
        midcall.Runtime(agent_file, secrets={"CRM_TOKEN": 12345})
    assert "CRM_TOKEN" in str(e.value) and "12345" not in str(e.value)
    with pytest.raises(ValueError, match="format"):
        midcall.Runtime(agent_file, secrets={}).tools("gemini")


async def test_secrets_never_in_repr_or_errors(runtime):
    call = await runtime.start_call(id="c-secret")
    out = await call.tool("leaky", {}, tool_call_id="tc_s")
    assert out.status == "http_error" and out.http_status == 500
    for text in (repr(out), out.to_json(), str(out.to_dict()), out.error or "", repr(runtime),
                 repr(call), str(call.state), str(out.llm_result)):
        assert SECRET not in text
    assert out.say == "Sorry."


async def test_two_hundred_concurrent_tool_calls_on_one_call(runtime, upstream):
    call = await runtime.start_call(id="c-many")
    before = upstream.count("/item")
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(call.tool("get_item", {"n": i}, tool_call_id=f"t{i}", budget_ms=10_000) for i in range(200))
        ),
        60,
    )
    assert [o.status for o in outs] == ["ok"] * 200
    assert sorted(o.values["item.n"] for o in outs) == list(range(200))
    assert upstream.count("/item") == before + 200
    assert len(call.records()) == 200
    assert call.running == 0


def _midcall_bin():
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for p in (os.environ.get("MIDCALL_BIN"), root / "target/debug/midcall", root / "target/release/midcall"):
        if p and Path(p).exists():
            return str(p)
    pytest.fail("the CLI comparisons need the midcall binary: cargo build (or set MIDCALL_BIN)")


def test_tools_are_what_the_cli_prints(runtime, agent_file):
    import subprocess

    for fmt in ("openai", "anthropic"):
        cli = subprocess.run(
            [_midcall_bin(), "tools", str(agent_file), "--format", fmt],
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert runtime.tools(fmt) == json.loads(cli.stdout), fmt
    assert [t["function"]["name"] for t in runtime.tools("openai")] == runtime.actions
    anthropic = runtime.tools("anthropic")
    assert [t["name"] for t in anthropic] == runtime.actions
    assert anthropic[1]["input_schema"]["required"] == ["n"]


async def test_to_dict_is_the_cli_outcome_json(runtime, agent_file):
    import subprocess

    cli = subprocess.run(
        [_midcall_bin(), "exec", str(agent_file), "--action", "get_item", "--args", '{"n": 5}',
         "--allow-http", "--allow-network", "127.0.0.0/8", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    want = json.loads(cli.stdout)
    call = await runtime.start_call(id="c-cli")
    got = (await call.tool("get_item", {"n": 5}, tool_call_id="cli_0")).to_dict()
    assert set(want) - {"state"} == set(got) == CLI_KEYS
    for k in ("action", "tool_call_id", "status", "http_status", "attempts", "values", "llm_result",
              "say", "filler_fired", "cache", "deduplicated", "detached", "error"):
        assert got[k] == want[k], k


async def test_end_then_tools_are_rejected(runtime):
    call = await runtime.start_call(id="c-end")
    assert await call.end(reason="user_hangup", outcome="done") == []
    out = await call.tool("get_item", {"n": 1})
    assert out.status == "rejected"
    with pytest.raises(RuntimeError, match="already ended"):
        await call.end()


async def test_coroutines_work_with_create_task(runtime):
    # start_call, tool and end are real coroutines.
    call = await asyncio.create_task(runtime.start_call(id="c-task"))
    out = await asyncio.create_task(call.tool("get_item", {"n": 3}))
    assert out.values == {"item.n": 3}
    await asyncio.create_task(call.end())


def test_mock_crm_runs_the_example_agent():
    from pathlib import Path

    agent = Path(__file__).resolve().parents[2] / "examples" / "front-desk" / "agent.toml"
    rt = midcall.Runtime(agent, mock=True)

    async def go():
        call = await rt.start_call(id="c-mock", from_number="+15551234567")
        out = await call.tool("check_slots", {"date": "2025-11-04"})
        return call, out

    call, out = asyncio.run(go())
    assert out.status == "ok", out.to_dict()
    assert out.values["slots.count"] == 3
    assert call.state["customer"]["name"] == "Dana Reyes"  # the prefetch at call start
    assert any(r["path"].startswith("/v1/slots") for r in rt.mock_requests())


def test_outbox_records_the_call_events_and_runs_the_automation(tmp_path):
    from pathlib import Path

    agent = Path(__file__).resolve().parents[2] / "examples" / "front-desk" / "agent.toml"
    db = tmp_path / "outbox.db"
    rt = midcall.Runtime(agent, mock=True, outbox=db)

    async def go():
        call = await rt.start_call(id="c-outbox", from_number="+15551234567")
        out = await call.tool("check_slots", {"date": "2025-11-04"})
        runs = await call.end(reason="user_hangup", outcome="appointment_booked")
        await rt.close()
        return out, runs

    out, runs = asyncio.run(go())
    assert out.status == "ok"
    assert len(runs) == 1, runs  # the front desk's call_completed automation (crm-sync)
    # Read the file from another process: Python's sqlite3 is a second copy of SQLite, and two
    # copies in one process break each other's file locks and WAL mapping (SQLite's own
    # warning; here it ended the interpreter with SIGBUS once in CI).
    p = _run(
        "import json, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "kinds = [r[0] for r in c.execute(\"SELECT type FROM events WHERE call_id = 'c-outbox' ORDER BY seq\")]\n"
        "runs = c.execute('SELECT COUNT(*) FROM runs').fetchone()[0]\n"
        "print(json.dumps([kinds, runs]))",
        argv=[str(db)],
    )
    assert p.returncode == 0, p.stderr
    kinds, run_rows = json.loads(p.stdout)
    # What the front desk's webhooks subscribe to, and the automation's delivery.
    assert kinds == ["event_phone_call_ended", "event_post_call_processing_completed", "automation:crm-sync"], kinds
    assert run_rows == 1


def test_the_pipecat_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "pipecat_bot.py"
    p = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 tool calls from the model, 3 ok, 1 with a fallback line" in p.stdout, p.stdout
    assert "(filler)" in p.stdout
    assert "[cache hit]" in p.stdout





def test_importing_midcall_imports_neither_framework():
    p = _run("import sys, midcall; print(sorted(m for m in ('pipecat', 'livekit') if m in sys.modules))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_an_adapter_without_its_framework_names_the_extra():
    # A framework that is not installed (None in sys.modules makes its import fail).
    p = _run(
        "import sys; sys.modules['pipecat'] = None; sys.modules['livekit'] = None\n"
        "for m in ('midcall.pipecat', 'midcall.livekit'):\n"
        "    try:\n"
        "        __import__(m)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    assert p.returncode == 0, p.stderr
    assert "pip install './python[pipecat]'" in p.stdout, p.stdout
    assert "pip install './python[livekit]'" in p.stdout, p.stdout


def test_the_interpreter_exits_cleanly_with_tool_calls_still_running(agent_file, upstream):
    # Tool calls hung at exit, a filler pending, a call never ended: the process must still
    # exit 0 (the runtime's threads never touch the interpreter: no Fatal Python error).
    code = f"""
import asyncio, midcall
rt = midcall.Runtime({str(agent_file)!r}, secrets={{"CRM_TOKEN": "x"}},
                     allow_networks=["127.0.0.0/8"], ca_certs=[{str(upstream.cert_pem)!r}])
async def main():
    call = await rt.start_call(id="exit")
    for i in range(20):
        asyncio.ensure_future(call.tool("hang", {{}}, budget_ms=10_000, on_filler=print))
        asyncio.ensure_future(call.tool("slow_report", {{"ms": 2000}}, on_filler=print))
    await asyncio.sleep(0.2)
asyncio.run(main())
print("done")
"""
    for _ in range(3):
        p = _run(code)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "Fatal Python error" not in p.stderr
        assert p.stdout.strip().endswith("done"), p.stdout
