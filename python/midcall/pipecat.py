"""midcall inside Pipecat: every action of the agent as a function of a Pipecat LLM service.

    from midcall.pipecat import register_tools, tools_schema
    call = await rt.start_call(id=..., from_number=...)
    register_tools(llm, call)                                  # llm: any Pipecat LLMService
    context = LLMContext(messages, tools=tools_schema(call))

Each function call the model makes goes through the call's session: the result is sent with
Pipecat's result callback (:func:`midcall.model_result`: ``llm_result``, plus the fallback
line as ``"say"`` on failure), the filler line is pushed into the pipeline as a
``TTSSpeakFrame`` when it fires, and Pipecat's interruption (``InterruptionFrame``) cancels
the handler's task, which is the session's cancel (the action's ``on_interrupt`` applies:
a read is cancelled, a booking already sent finishes).

Needs ``pip install './python[pipecat]'``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional, Set

try:
    from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
    from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
    from pipecat.frames.frames import TTSSpeakFrame
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "midcall.pipecat needs Pipecat: pip install './python[pipecat]' (pipecat-ai)"
    ) from e

from . import Call, model_result

__all__ = ["register_tools", "tools_schema"]


def tools_schema(call: Call) -> ToolsSchema:
    """The agent's actions as a Pipecat ``ToolsSchema`` (for ``LLMContext(tools=...)``)."""
    functions = []
    for t in call.tools("openai"):
        f = t["function"]
        params = f.get("parameters") or {}
        functions.append(
            FunctionSchema(
                name=f["name"],
                description=f.get("description", ""),
                properties=params.get("properties", {}),
                required=list(params.get("required", [])),
            )
        )
    return ToolsSchema(standard_tools=functions)


def register_tools(
    llm: Any,
    call: Call,
    *,
    budget_ms: Optional[int] = None,
    speak_filler: bool = True,
    cancel_on_interruption: bool = True,
) -> List[str]:
    """Registers every action of ``call``'s agent on ``llm`` (``llm.register_function``);
    returns the names. ``budget_ms`` is each tool call's turn budget; Pipecat's own function
    timeout is set a second past it, so midcall's budget and fallback line always come first.
    """
    from . import DEFAULT_BUDGET_MS

    budget = DEFAULT_BUDGET_MS if budget_ms is None else int(budget_ms)
    names = [t["function"]["name"] for t in call.tools("openai")]
    # Speech pushes in flight (a task not referenced may be collected before it runs).
    pending: Set["asyncio.Task[None]"] = set()

    def handler_for(name: str):
        async def handler(params: Any) -> None:
            on_filler = None
            if speak_filler:

                def on_filler(line: str) -> None:
                    frame = TTSSpeakFrame(line)
                    task = asyncio.ensure_future(params.llm.push_frame(frame))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

            args: Dict[str, Any] = dict(params.arguments or {})
            out = await call.tool(
                name,
                args,
                tool_call_id=params.tool_call_id,
                budget_ms=budget,
                on_filler=on_filler,
            )
            await params.result_callback(model_result(out))

        handler.__name__ = f"midcall_{name}"
        return handler

    for name in names:
        llm.register_function(
            name,
            handler_for(name),
            cancel_on_interruption=cancel_on_interruption,
            timeout_secs=budget / 1000 + 1.0,
        )
    return names
