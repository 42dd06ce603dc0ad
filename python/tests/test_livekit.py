"""midcall.livekit inside a real LiveKit AgentSession (text only: no room, no STT/TTS/VAD):
the model is scripted (it emits the tool calls), the function-tool execution path (argument
parsing, RunContext, tool tasks, speech handles, interruption) is LiveKit's own."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, List

import pytest

try:
    from livekit.agents import Agent, AgentSession, llm
except ImportError as e:  # pragma: no cover
    raise ImportError("the LiveKit tests need livekit-agents: pip install './python[livekit]'") from e
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN
from livekit.agents.utils import shortuuid

from midcall.livekit import INTERRUPTED, function_tools

logging.getLogger("livekit.agents").setLevel(logging.ERROR)


class ScriptedLLM(llm.LLM):
    """Each round answers with the next step: a text, or a list of tool calls."""

    def __init__(self, steps: List[Any]) -> None:
        super().__init__()
        self._steps = list(steps)
        self.rounds = 0

    @property
    def model(self) -> str:
        return "scripted"

    @property
    def provider(self) -> str:
        return "test"

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS,
             parallel_tool_calls=NOT_GIVEN, tool_choice=NOT_GIVEN, extra_kwargs=NOT_GIVEN):
        self.rounds += 1
        step = self._steps.pop(0) if self._steps else "ok"
        return ScriptedStream(self, step, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class ScriptedStream(llm.LLMStream):
    def __init__(self, owner, step, **kw) -> None:
        super().__init__(owner, **kw)
        self._step = step

    async def _run(self) -> None:
        if isinstance(self._step, str):
            delta = llm.ChoiceDelta(role="assistant", content=self._step)
        else:
            delta = llm.ChoiceDelta(role="assistant", tool_calls=list(self._step))
        self._event_ch.send_nowait(llm.ChatChunk(id=shortuuid("req_"), delta=delta))


def tool_call(name: str, args: dict, call_id: str) -> llm.FunctionToolCall:
    return llm.FunctionToolCall(name=name, arguments=json.dumps(args), call_id=call_id)


async def test_function_tool_goes_through_the_session(runtime):
    call = await runtime.start_call(id="lk-ok", from_number="+15551234567")
    tools = function_tools(call)
    assert [t.info.name for t in tools] == runtime.actions
    model = ScriptedLLM([[tool_call("lookup_customer", {}, "lk_1")], "Hello Dana."])
    async with AgentSession(llm=model) as session:
        await session.start(Agent(instructions="front desk", tools=tools))
        result = await asyncio.wait_for(session.run(user_input="hi, it's Dana"), 20)
        result.expect.next_event().is_function_call(name="lookup_customer")
        out = result.expect.next_event().is_function_call_output()
        got = json.loads(out.event().item.output)
        assert not out.event().item.is_error
    (rec,) = call.records()
    assert rec.tool_call_id == "lk_1" and rec.status == "ok"
    assert got == rec.llm_result == {"customer.name": "Dana Reyes", "customer.id": "cus_1"}
    assert call.state["customer"]["id"] == "cus_1"
    assert model.rounds == 2


async def test_filler_is_spoken_with_say(runtime):
    call = await runtime.start_call(id="lk-filler")
    model = ScriptedLLM([[tool_call("slow_report", {"ms": 600}, "lk_f")], "Done."])
    async with AgentSession(llm=model) as session:
        await session.start(Agent(instructions="x", tools=function_tools(call)))
        result = await asyncio.wait_for(session.run(user_input="report please"), 20)
        said = [
            "".join(e.item.content) if isinstance(e.item.content, list) else e.item.content
            for e in result.events
            if e.type == "message"
        ]
    assert "One moment please." in said, said
    (rec,) = call.records()
    assert rec.filler_fired and rec.status == "ok"


async def test_interruption_cancels_a_hung_call_through_the_session(runtime, upstream):
    upstream.hang_started.clear()
    upstream.hang_closed.clear()
    call = await runtime.start_call(id="lk-hang")
    model = ScriptedLLM([[tool_call("hang", {}, "lk_h")], "Sorry about that."])
    async with AgentSession(llm=model) as session:
        await session.start(Agent(instructions="x", tools=function_tools(call, budget_ms=10_000)))
        run = session.run(user_input="check it")
        assert await asyncio.to_thread(upstream.hang_started.wait, 10)
        await session.interrupt()
        result = await asyncio.wait_for(run, 10)
        outputs = [e.item.output for e in result.events if e.type == "function_call_output"]
    assert [json.loads(o) for o in outputs] == [INTERRUPTED]
    assert await asyncio.to_thread(upstream.hang_closed.wait, 5)
    assert [r.status for r in call.records()] == ["cancelled"]
    assert call.running == 0
