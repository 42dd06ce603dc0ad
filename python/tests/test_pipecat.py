"""midcall.pipecat inside a real Pipecat pipeline: the LLM service is scripted (it emits the
tool calls), the function-call machinery (register_function, run_function_calls, result
callbacks, interruption) is Pipecat's own."""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

logger.remove()
logger.add(sys.stderr, level="WARNING")  # Pipecat logs every frame at DEBUG

import pytest  # noqa: E402

try:
    from pipecat.frames.frames import (  # noqa: E402
        EndFrame,
        Frame,
        FunctionCallCancelFrame,
        FunctionCallFromLLM,
        FunctionCallInProgressFrame,
        FunctionCallResultFrame,
        InterruptionFrame,
        LLMContextFrame,
        TTSSpeakFrame,
    )
except ImportError as e:  # pragma: no cover
    raise ImportError("the Pipecat tests need pipecat-ai: pip install './python[pipecat]'") from e
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.llm_service import LLMService  # noqa: E402
from pipecat.services.settings import LLMSettings  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from midcall.pipecat import register_tools, tools_schema  # noqa: E402


class ScriptedLLM(LLMService):
    """A model that answers every context with the tool calls it was given."""

    def __init__(self, calls):
        settings = LLMSettings(
            model="scripted", system_instruction=None, temperature=None, max_tokens=None,
            top_p=None, top_k=None, frequency_penalty=None, presence_penalty=None, seed=None,
            filter_incomplete_user_turns=False, user_turn_completion_config=None,
        )
        super().__init__(settings=settings)
        self._calls = calls

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)  # handles InterruptionFrame
        if isinstance(frame, LLMContextFrame):
            await self.run_function_calls(
                [
                    FunctionCallFromLLM(
                        function_name=name, tool_call_id=f"pc_{i}", arguments=args,
                        context=frame.context,
                    )
                    for i, (name, args) in enumerate(self._calls)
                ]
            )
        else:
            await self.push_frame(frame, direction)


class Collector(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.frames = []
        self.result = asyncio.Event()
        self.in_progress = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        if isinstance(frame, FunctionCallResultFrame):
            self.result.set()
        if isinstance(frame, FunctionCallInProgressFrame):
            self.in_progress.set()
        if isinstance(frame, FunctionCallCancelFrame):
            self.cancelled.set()
        await self.push_frame(frame, direction)


async def run_pipeline(llm, drive):
    collector = Collector()
    worker = PipelineWorker(Pipeline([llm, collector]), enable_rtvi=False, idle_timeout_secs=None)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(w, frame):
        started.set()

    async def go():
        await asyncio.wait_for(started.wait(), 10)
        await drive(worker, collector)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), go()), 30)
    return collector


async def test_tool_call_reaches_midcall_and_the_result_frame_carries_llm_result(runtime, upstream):
    call = await runtime.start_call(id="pc-ok", from_number="+15551234567")
    llm = ScriptedLLM([("lookup_customer", {}), ("slow_report", {"ms": 500})])
    names = register_tools(llm, call)
    assert names == runtime.actions
    schema = tools_schema(call)
    assert [f.name for f in schema.standard_tools] == runtime.actions

    async def drive(worker, collector):
        await worker.queue_frame(LLMContextFrame(LLMContext(messages=[], tools=schema)))
        while sum(isinstance(f, FunctionCallResultFrame) for f in collector.frames) < 2:
            await asyncio.wait_for(collector.result.wait(), 10)
            collector.result.clear()

    collector = await run_pipeline(llm, drive)
    results = {f.tool_call_id: f.result for f in collector.frames if isinstance(f, FunctionCallResultFrame)}
    recs = {r.tool_call_id: r for r in call.records()}
    assert results["pc_0"] == recs["pc_0"].llm_result == {"customer.name": "Dana Reyes", "customer.id": "cus_1"}
    assert results["pc_1"] == {"report.done": True}
    assert call.state["customer"]["name"] == "Dana Reyes"
    # The slow report's filler was pushed into the pipeline as speech, before its result.
    kinds = [
        ("speak", f.text) if isinstance(f, TTSSpeakFrame) else ("result", f.tool_call_id)
        for f in collector.frames
        if isinstance(f, (TTSSpeakFrame, FunctionCallResultFrame))
    ]
    assert ("speak", "One moment please.") in kinds
    assert kinds.index(("speak", "One moment please.")) < kinds.index(("result", "pc_1"))
    assert recs["pc_1"].filler_fired


async def test_failure_sends_the_fallback_line(runtime):
    call = await runtime.start_call(id="pc-fail")
    llm = ScriptedLLM([("leaky", {})])
    register_tools(llm, call)

    async def drive(worker, collector):
        await worker.queue_frame(LLMContextFrame(LLMContext(messages=[])))
        await asyncio.wait_for(collector.result.wait(), 10)

    collector = await run_pipeline(llm, drive)
    (result,) = [f.result for f in collector.frames if isinstance(f, FunctionCallResultFrame)]
    assert result["error"] == "http_error"
    assert result["say"] == "Sorry."


async def test_interruption_cancels_a_hung_call_through_the_session(runtime, upstream):
    upstream.hang_started.clear()
    upstream.hang_closed.clear()
    call = await runtime.start_call(id="pc-hang")
    llm = ScriptedLLM([("hang", {})])
    register_tools(llm, call, budget_ms=10_000)

    async def drive(worker, collector):
        await worker.queue_frame(LLMContextFrame(LLMContext(messages=[])))
        assert await asyncio.to_thread(upstream.hang_started.wait, 10)
        await worker.queue_frame(InterruptionFrame())
        await asyncio.wait_for(collector.cancelled.wait(), 10)

    collector = await run_pipeline(llm, drive)
    assert not any(isinstance(f, FunctionCallResultFrame) for f in collector.frames)
    # The session recorded the cancel and the server saw its connection closed.
    assert await asyncio.to_thread(upstream.hang_closed.wait, 5)
    assert [r.status for r in call.records()] == ["cancelled"]
    assert call.running == 0
