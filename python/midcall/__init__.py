"""midcall: tool calls for voice AI agents, in-process.

A tool call the model makes (look up the caller, check slots, book) becomes an HTTP request
on a warm pooled connection, held to a latency budget, cached where the agent file allows,
its values extracted into the call's state, with a filler line while it runs and a fallback
line when it fails. The work happens in Rust on midcall's own threads; the GIL is released
while it runs.

    import midcall
    rt = midcall.Runtime("agent.toml", secrets={"CRM_TOKEN": "..."})
    call = await rt.start_call(id="c1", from_number="+15551234567")
    out = await call.tool("lookup_customer", {"phone": "+15551234567"}, tool_call_id="tc_1")
    out.status, out.llm_result, out.say, call.state

Adapters: ``midcall.pipecat`` (Pipecat) and ``midcall.livekit`` (LiveKit Agents); importing
``midcall`` needs neither framework.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import _native
from ._native import ConfigError, Outcome

__all__ = ["Runtime", "Call", "Outcome", "ConfigError", "DEFAULT_BUDGET_MS", "model_result"]

#: The turn budget of a tool call when ``budget_ms`` is not given (the action's own
#: ``timeout_ms`` still applies).
DEFAULT_BUDGET_MS: int = _native.DEFAULT_BUDGET_MS

PathLike = Union[str, "os.PathLike[str]"]


# One wake-up queue per event loop: the runtime's threads queue outcomes and filler lines and
# wake the loop through a socket it watches; the loop drains them (see _native.Waker).
_wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()


def _waker() -> Any:
    loop = asyncio.get_running_loop()
    w = _wakers.get(loop)
    if w is None:
        w = _native.Waker(weakref.ref(loop))
        loop.add_reader(w.fileno(), w.drain)
        _wakers[loop] = w
    return w


class Runtime:
    """One agent file, loaded and checked, with its connection pool, cache and breakers.

    Create one per agent per process and share it across calls.

    - ``secrets``: ``{name: value}`` for ``{{secrets.NAME}}``; by default each is read from
      the environment variable ``MIDCALL_SECRET_<NAME>``. Values never appear in errors,
      ``repr`` or logs.
    - ``allow_http`` / ``allow_networks``: extend the file's ``[egress]`` (plain http, private
      networks such as ``"127.0.0.0/8"`` for a local test server).
    - ``ca_certs``: PEM files whose certificates are trusted as extra roots.
    - ``outbox``: a SQLite file, or a ``postgres://`` URL shared with the rest of a fleet;
      with it, event webhooks and automations run (durable,
      signed, retried). Without it no events are sent.
    - ``mock``: answer every host the agent calls from the bundled mock CRM (in-process, demo
      secrets): the examples use it; no keys, no network.

    Raises :class:`ConfigError` (the located text ``midcall check`` prints) for a bad file.
    """

    __slots__ = ("_n",)

    def __init__(
        self,
        agent: PathLike,
        *,
        secrets: Optional[Mapping[str, str]] = None,
        allow_http: bool = False,
        allow_networks: Sequence[str] = (),
        ca_certs: Sequence[PathLike] = (),
        outbox: Optional[PathLike] = None,
        mock: bool = False,
    ) -> None:
        if secrets is not None and not isinstance(secrets, dict):
            secrets = dict(secrets)
        self._n = _native.Runtime(
            os.fspath(agent),
            secrets=secrets,
            allow_http=bool(allow_http),
            allow_networks=[str(n) for n in allow_networks],
            ca_certs=[os.fspath(p) for p in ca_certs],
            outbox=None if outbox is None else os.fspath(outbox),
            mock=bool(mock),
        )

    def tools(self, format: str = "openai") -> List[Dict[str, Any]]:
        """The tool definitions for the model, ``"openai"`` or ``"anthropic"``: what
        ``midcall tools`` prints."""
        return self._n.tools(format)

    @property
    def agent_id(self) -> str:
        return self._n.agent_id

    @property
    def tenant(self) -> str:
        return self._n.tenant

    @property
    def actions(self) -> List[str]:
        """The agent's action (tool) names."""
        return self._n.actions

    def connections_opened(self) -> int:
        return self._n.connections_opened()

    def mock_requests(self) -> List[Dict[str, Any]]:
        """The requests the bundled mock CRM answered (``mock=True``)."""
        return self._n.mock_requests()

    async def start_call(
        self,
        id: Optional[str] = None,
        from_number: str = "",
        to_number: Optional[str] = None,
        is_outgoing: bool = False,
        *,
        within_ms: int = 1000,
    ) -> "Call":
        """Starts a call's session: warms a connection to every host the agent calls and runs
        its ``prefetch = "call_start"`` actions, all within ``within_ms``."""
        n = await self._n.start_call(
            id, str(from_number), to_number, bool(is_outgoing), int(within_ms), _waker()
        )
        return Call(n, self)

    async def close(self) -> None:
        """Writes queued events to the outbox and stops the automations (with ``outbox``)."""
        await self._n.close(_waker())

    def __repr__(self) -> str:
        return repr(self._n)


class Call:
    """One live call. Tool calls on it run concurrently; each ends in exactly one recorded
    state (``records()``)."""

    __slots__ = ("_n", "runtime", "__weakref__")

    def __init__(self, native: Any, runtime: Runtime) -> None:
        self._n = native
        #: The runtime the call runs on (its agent's tools: ``call.runtime.tools()``).
        self.runtime = runtime

    @property
    def id(self) -> str:
        return self._n.id

    @property
    def info(self) -> Dict[str, Any]:
        return self._n.info

    @property
    def state(self) -> Dict[str, Any]:
        """The conversation variables now, as a nested dict (a copy)."""
        return self._n.state

    @property
    def transcript(self) -> List[Dict[str, Any]]:
        return self._n.transcript

    @property
    def running(self) -> int:
        """Tool calls started and not yet ended (held, running or finishing detached)."""
        return self._n.running

    def records(self) -> List[Outcome]:
        return self._n.records()

    def add_turn(self, role: str, text: str) -> None:
        """Appends a turn: ``"user"`` (the caller) or ``"ai"``."""
        self._n.add_turn(role, text)

    def set(self, path: str, value: Any) -> None:
        """Sets one conversation variable by dotted path."""
        self._n.set(path, value)

    async def tool(
        self,
        name: str,
        arguments: Optional[Mapping[str, Any]] = None,
        *,
        tool_call_id: Optional[str] = None,
        budget_ms: Optional[int] = None,
        on_filler: Optional[Callable[[str], Any]] = None,
    ) -> Outcome:
        """Runs the tool call the model made, by the name it sent, within ``budget_ms``
        (default :data:`DEFAULT_BUDGET_MS`).

        ``on_filler(line)`` is called on this event loop, once, if the action is still running
        at its ``filler.after_ms``. Cancelling the task that awaits this is the session's
        cancel (the action's ``on_interrupt`` applies). An unknown name returns a
        ``rejected`` outcome listing the agent's tools.
        """
        r = self._n.tool(name, arguments, tool_call_id, budget_ms, on_filler, _waker())
        if type(r) is Outcome:
            return r
        return await r

    def tools(self, format: str = "openai") -> List[Dict[str, Any]]:
        """The agent's tool definitions (``Runtime.tools``)."""
        return self.runtime.tools(format)

    def end_turn(self) -> None:
        """Sends the calls held for the end of the turn (``hold = "end_of_turn"``)."""
        self._n.end_turn()

    def barge_in(self) -> None:
        """The caller talked over the agent: held calls end ``cancelled`` without being sent,
        running ones follow their ``on_interrupt``."""
        self._n.barge_in()

    async def end(self, reason: str = "user_hangup", outcome: Optional[str] = None) -> List[str]:
        """Ends the call: waits for calls finishing detached, publishes the end events and
        queues the call_completed automations (with an outbox); returns their run ids."""
        return await self._n.end(str(reason), None if outcome is None else str(outcome), _waker())

    def __repr__(self) -> str:
        return repr(self._n)


def model_result(out: Outcome) -> Dict[str, Any]:
    """What a framework adapter hands the model: ``llm_result`` on success; on failure
    ``llm_result`` (``{"error", "message"}``) with the fallback line to speak as ``"say"``."""
    result = out.llm_result
    if not out.ok and out.say is not None:
        result = dict(result)
        result["say"] = out.say
    return result
