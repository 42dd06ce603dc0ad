"""midcall inside LiveKit Agents: every action of the agent as a function tool.

    from midcall.livekit import function_tools
    call = await rt.start_call(id=..., from_number=...)
    agent = Agent(instructions=..., tools=function_tools(call))

The tools are built with LiveKit's raw-schema constructor (``function_tool(f,
raw_schema=...)``) from the agent file's parameters. Each call goes through the call's
session; the filler line is spoken with the AgentSession's ``say`` when it fires; an
interruption of the speech the tool runs under cancels the tool call through the session
(LiveKit itself lets a running tool go on after an interruption: the adapter races it
against ``speech_handle``'s interruption). The model gets :func:`midcall.model_result` as JSON.

Needs ``pip install './python[livekit]'``.
"""

import asyncio
import json
from typing import Any, Dict, List, Optional

try:
    from livekit.agents import RunContext, function_tool
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "midcall.livekit needs LiveKit Agents: pip install './python[livekit]' (livekit-agents)"
    ) from e

from . import Call, model_result

__all__ = ["function_tools", "INTERRUPTED"]

#: What the model is told when the caller interrupted the tool call.
INTERRUPTED = {"error": "cancelled", "message": "the caller interrupted; nothing more was done"}


def function_tools(
    call: Call,
    *,
    budget_ms: Optional[int] = None,
    speak_filler: bool = True,
) -> List[Any]:
    """LiveKit function tools for every action of ``call``'s agent."""
    tools = []
    for t in call.tools("openai"):
        f = t["function"]
        schema = {
            "name": f["name"],
            "description": f.get("description", ""),
            "parameters": f.get("parameters") or {"type": "object", "properties": {}},
        }
        tools.append(function_tool(_tool_for(call, f["name"], budget_ms, speak_filler), raw_schema=schema))
    return tools


def _tool_for(call: Call, name: str, budget_ms: Optional[int], speak_filler: bool):
    # LiveKit reads the annotations: `raw_arguments` by name, `RunContext` by type.
    async def tool(raw_arguments: Dict[str, Any], context: RunContext) -> str:
        on_filler = None
        if speak_filler:

            def on_filler(line: str) -> None:
                context.session.say(line)

        fc = getattr(context, "function_call", None)
        task = asyncio.ensure_future(
            call.tool(
                name,
                dict(raw_arguments or {}),
                tool_call_id=getattr(fc, "call_id", None),
                budget_ms=budget_ms,
                on_filler=on_filler,
            )
        )
        try:
            await context.speech_handle.wait_if_not_interrupted([task])
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            # Interrupted first: cancel through the session (on_interrupt applies).
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return json.dumps(INTERRUPTED)
        return json.dumps(model_result(task.result()))

    tool.__name__ = name
    return tool
