"""A Pipecat pipeline whose model's tool calls run through midcall.

No keys, no audio device, no network: the model is scripted (it makes the tool calls a real
model would make on this call), and the agent's hosts are answered by midcall's bundled mock
CRM (``mock=True``), which is slow and broken on purpose in places. Pipecat's own function
calling runs everything else: ``register_function``, the result callbacks, the speech frames.

    pip install './python[pipecat]'
    python python/examples/pipecat_bot.py [path/to/agent.toml]
"""

import asyncio
import json
import sys
import time
from pathlib import Path

from loguru import logger

logger.remove()
logger.add(sys.stderr, level="WARNING")  # Pipecat logs every frame at DEBUG

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    FunctionCallFromLLM,
    FunctionCallResultFrame,
    LLMContextFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.frame_processor import FrameProcessor  # noqa: E402
from pipecat.services.llm_service import LLMService  # noqa: E402
from pipecat.services.settings import LLMSettings  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

import midcall  # noqa: E402
from midcall.pipecat import register_tools, tools_schema  # noqa: E402

AGENT = Path(__file__).resolve().parents[2] / "examples" / "front-desk" / "agent.toml"

# What the caller says, and the tool calls the model makes in answer.
SCRIPT = [
    ("Hi, it's Dana. Can I book a cleaning next Tuesday?",
     [("lookup_customer", {}), ("check_slots", {"date": "2025-11-04", "kind": "cleaning"})]),
    ("3 pm, please. And is my insurance still on file?",
     [("book_appointment", {"slot": "2025-11-04T15:00", "reason": "cleaning"}), ("verify_insurance", {})]),
]


class ScriptedLLM(LLMService):
    """Answers each context with the next turn's tool calls (in parallel, as models do)."""

    def __init__(self, turns):
        settings = LLMSettings(
            model="scripted", system_instruction=None, temperature=None, max_tokens=None,
            top_p=None, top_k=None, frequency_penalty=None, presence_penalty=None, seed=None,
            filter_incomplete_user_turns=False, user_turn_completion_config=None,
        )
        super().__init__(settings=settings)
        self._turns = list(turns)
        self._n = 0

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            calls = []
            for name, args in self._turns.pop(0) if self._turns else []:
                self._n += 1
                calls.append(FunctionCallFromLLM(
                    function_name=name, tool_call_id=f"tc_{self._n}", arguments=args,
                    context=frame.context))
            await self.run_function_calls(calls)
        else:
            await self.push_frame(frame, direction)


class Printer(FrameProcessor):
    """Prints what would be spoken and every tool result, as they arrive."""

    def __init__(self, call, t0):
        super().__init__()
        self.call, self.t0, self.results = call, t0, asyncio.Queue()

    def ms(self):
        return f"{(time.monotonic() - self.t0) * 1000:7.0f}"

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSSpeakFrame):
            print(f"{self.ms()}  speak  \"{frame.text}\"  (filler)")
        elif isinstance(frame, FunctionCallResultFrame):
            out = next(r for r in self.call.records() if r.tool_call_id == frame.tool_call_id)
            flags = [f for f, on in (("cache hit", out.cache == "hit"), ("filler", out.filler_fired),
                                     ("fallback", out.say is not None)) if on]
            print(f"{self.ms()}  tool   {frame.function_name} {json.dumps(dict(frame.arguments))}"
                  f" -> {out.status} in {out.elapsed_ms:.1f} ms" + (f"  [{', '.join(flags)}]" if flags else ""))
            print(f"                 to the model: {json.dumps(frame.result)}")
            await self.results.put(frame)
        await self.push_frame(frame, direction)


async def main(agent_path: Path) -> int:
    rt = midcall.Runtime(agent_path, mock=True)
    t0 = time.monotonic()
    call = await rt.start_call(id="call_pipecat_demo", from_number="+15551234567")
    print(f"midcall {rt.agent_id}: call {call.id} connected; tools: {', '.join(rt.actions)}")
    print(f"   t ms  who    what")
    llm = ScriptedLLM([calls for _, calls in SCRIPT])
    register_tools(llm, call)
    printer = Printer(call, t0)
    worker = PipelineWorker(Pipeline([llm, printer]), enable_rtvi=False, idle_timeout_secs=None)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(w, frame):
        started.set()

    context = LLMContext(messages=[], tools=tools_schema(call))

    async def converse():
        await asyncio.wait_for(started.wait(), 10)
        for said, calls in SCRIPT:
            print(f"{printer.ms()}  user   \"{said}\"")
            call.add_turn("user", said)
            context.add_message({"role": "user", "content": said})
            await worker.queue_frame(LLMContextFrame(context))
            for _ in calls:
                await asyncio.wait_for(printer.results.get(), 10)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), converse())
    await call.end(reason="user_hangup", outcome="appointment_booked")
    # The model's tool calls (the call-start prefetch is recorded too, with no tool-call id).
    records = [r for r in call.records() if r.tool_call_id]
    print(f"\n{len(records)} tool calls from the model, "
          f"{sum(r.ok for r in records)} ok, {sum(not r.ok for r in records)} with a fallback line; "
          f"state: {json.dumps(call.state)}")
    return 0 if len(records) == sum(len(c) for _, c in SCRIPT) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else AGENT)))
