"""Run code from the reference page exactly as written, with only the import
line changed (``radical.asyncflow`` -> ``asyncflow``).

The page uses top-level ``await`` (as in Jupyter or ``python -m asyncio``), so
blocks are compiled with ``PyCF_ALLOW_TOP_LEVEL_AWAIT`` and awaited in a loop.
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path
from typing import Any

PAGE = Path(__file__).parent / "reference" / "execution-backends.md"


def blocks() -> list[str]:
    text = PAGE.read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [
        re.sub(r"\s*# \(\d\)!", "", c).replace(
            "from radical.asyncflow import", "from asyncflow import"
        )
        for c in code
    ]


def block_with(marker: str) -> str:
    (found,) = [b for b in blocks() if marker in b]
    return found


async def run_blocks(sources: list[str], namespace: dict[str, Any]) -> None:
    for source in sources:
        code = compile(source, str(PAGE), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = types.FunctionType(code, namespace)()
        if result is not None:  # a coroutine when the block awaits at top level
            await result


#: the one line of the page's HPC example that names its backend
PAGE_BACKEND = "RadicalExecutionBackend({'resource': 'local.localhost'})"


def hpc_example(cls: str, args: str) -> list[str]:
    """The page's HPC example (setup, task, workflow, five workflows at once) with
    only its backend line changed, to ``cls(args)``, and the import to match."""
    setup = block_with("flow = WorkflowEngine(backend=backend)")
    assert PAGE_BACKEND in setup and "import RadicalExecutionBackend" in setup
    setup = setup.replace(PAGE_BACKEND, f"{cls}({args})").replace(
        "import RadicalExecutionBackend", f"import {cls}"
    )
    return [
        setup,
        block_with("@flow.executable_task"),
        block_with("async def run_wf"),
        block_with("asyncio.gather(*[run_wf(i)"),
    ]
