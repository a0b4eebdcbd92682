"""A backend that runs nothing: for checking a workflow's shape (a dry run).

Every task resolves as soon as the engine hands it over, in the order its
dependencies allow, without running: a function task's value is ``None`` and an
executable's is ``""`` (no output).  Executable bodies still run in the driver,
because they only build the command line, so a dry run also shows which commands
a workflow would start.  ``WorkflowEngine(dry_run=True)`` uses it, as
radical.asyncflow's engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import EngineClosedError
from ..protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ..spec import TaskSpec
from ._awaitable import AwaitableBackend

__all__ = ["NoopExecutionBackend"]

C = Capability

_NOTHING_RUNS = "a dry run runs nothing"


class NoopExecutionBackend(AwaitableBackend):
    """Resolves every task without running it (``name`` labels it in events)."""

    CAPABILITIES = Capabilities.of(
        C.FUNCTIONS,
        C.EXECUTABLES,
        C.PARALLEL,
        cancel_queued=_NOTHING_RUNS,
        cancel_running=_NOTHING_RUNS,
        kill_executables=_NOTHING_RUNS,
        resources="a dry run accepts any resources= and checks none",
        gpus=_NOTHING_RUNS,
        serializes="nothing is shipped anywhere",
        large_payloads=_NOTHING_RUNS,
        pipeline="the engine hands a task over once its inputs are in",
    )

    def __init__(self, name: str = "noop") -> None:
        self.info = BackendInfo(name, "noop", "0", self.CAPABILITIES)
        self._sink: CompletionSink | None = None
        self._closed = False

    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this NoopExecutionBackend was shut down")
        self._sink = sink

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None, "submit() before start()"
        for spec in specs:
            sink.set_result(spec.uid, None if spec.command is None else "")

    def cancel(self, uids: Sequence[str]) -> None:
        """Nothing is ever pending here."""

    async def shutdown(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"<NoopExecutionBackend {self.info.name!r}>"
