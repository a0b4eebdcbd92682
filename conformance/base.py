"""The fixtures class adapter authors subclass, and the scenario runner.

Every conformance test is an ``async def`` scenario that receives a fresh
:class:`~asyncflow.WorkflowEngine` on the adapter's backend.  :func:`scenario`
turns it into an ordinary synchronous pytest test that runs it in a new event loop
and always shuts the engine down, so the suite needs no asyncio plugin and does
not collide with one the adapter's project already uses.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ..engine import WorkflowEngine
from ..protocol import Capability, ExecutionBackend

__all__ = ["BackendFixtures", "scenario"]

USER_PROPERTY = "asyncflow_backend"


class BackendFixtures:
    """Override :meth:`backend` to return a *new* backend object per test.

    It may attach to a runtime your own session-scoped fixture started; the
    engine shuts the backend down after each test, so an attached backend must
    leave that runtime running.
    """

    #: seconds one scenario may take before it fails (a hang becomes a failure)
    scenario_timeout: float = 120.0

    @pytest.fixture
    def backend(self) -> ExecutionBackend:
        raise pytest.UsageError(
            f"{type(self).__name__} must override the `backend` fixture to return "
            "the adapter under test (see asyncflow.conformance)"
        )


Scenario = Callable[..., Coroutine[Any, Any, None]]


def scenario(
    *requires: Capability, timeout: float | None = None
) -> Callable[[Scenario], Callable[..., None]]:
    """Make ``async def test_x(self, flow, ...)`` a test needing ``requires``."""

    def decorate(fn: Scenario) -> Callable[..., None]:
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["self", "flow"], fn
        extra = params[2:]

        def test(
            self: BackendFixtures,
            backend: ExecutionBackend,
            request: pytest.FixtureRequest,
            **kwargs: Any,
        ) -> None:
            info = backend.info
            request.node.user_properties.append(
                (USER_PROPERTY, f"{info.name} ({info.runtime} {info.runtime_version})")
            )
            for cap in requires:
                if cap not in info.capabilities:
                    pytest.skip(
                        f"capability {cap.value!r} not declared by "
                        f"{info.name}: {info.capabilities.why_not(cap)}"
                    )
            limit = timeout or self.scenario_timeout

            async def main() -> None:
                flow = WorkflowEngine(backend=backend)
                try:
                    await asyncio.wait_for(fn(self, flow, **kwargs), limit)
                finally:
                    await asyncio.wait_for(flow.shutdown(), 60)

            asyncio.run(main())

        test.__name__ = fn.__name__
        test.__qualname__ = fn.__qualname__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        base = [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY),
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY),
        ]
        test.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            base + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
        )
        test.asyncflow_scenario = True  # type: ignore[attr-defined]
        return test

    return decorate
