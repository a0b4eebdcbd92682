"""The benchmark workloads, each written once for asyncflow and once for a raw
runtime's own API, so the two sides do exactly the same work.

Each workload is one :class:`Workload` record in :data:`WORKLOADS`: its two
sides, its task count and answer, and the backends that cannot run it at full
size.  Task bodies live at module level so every runtime ships them by
reference, and import what they need inside the body so a runtime that ships
them by value (raw radical.pilot, see :mod:`.rawrp`) can run them too.  A
workload's ``expected`` answer is worked out from first principles, without
running tasks: the cross-check compares every run, on both sides and every
backend, with it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine import WorkflowEngine
from .raw import Raw

ARRAY_ITEMS = 131072  # float64: 1 MiB per array
SLEEP = 0.02
#: fixed task counts: these workloads measure something other than volume
MAPS, NAPS, EXECS = 32, 100, 200
#: the task-duration sweep: seconds of CPU work per task, and the most tasks
#: each runs (two seconds of work on two workers)
WORK = {"work1ms": (0.001, 4_000), "work10ms": (0.01, 400), "work100ms": (0.1, 40)}
#: the workers the bench gives every backend, for a makespan's ideal
WORKERS = 2
#: each workload runs once at this size, untimed, before it is measured, so
#: that imports and first-call costs (numpy, function shipping) are not timed
#: (not with --quick: a smoke test, whose figures are not for comparing)
WARMUP = 4


def ident(x: int) -> int:
    return x


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def make_array(i: int) -> Any:
    import numpy as np

    return np.full(ARRAY_ITEMS, float(i))


def array_total(*arrays: Any) -> float:
    return float(sum(a.sum() for a in arrays))


def nap(i: int) -> int:
    import time

    time.sleep(SLEEP)
    return i


def work(i: int, seconds: float) -> int:
    """Busy for ``seconds`` of CPU (not asleep: a runtime that packs tasks
    must see the work)."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return i


def run_true() -> str:
    """Raw runtimes' executable: like an executable task, it returns the
    command's output, so both sides capture stdout and stderr."""
    import subprocess

    return subprocess.run(
        ["/bin/true"], capture_output=True, text=True, check=True
    ).stdout


def diamonds(n: int) -> int:
    """A diamond is four tasks: size ``n`` runs a quarter as many, at least one."""
    return max(1, n // 4)


def _at_most(most: int, n: int) -> int:
    return min(n, most)


def _triangle_at_most(most: int, n: int) -> int:
    return triangle(min(n, most))


def triangle(m: int) -> int:
    """0 + 1 + ... + (m - 1): the sum of the task indices of an ``m``-task run."""
    return m * (m - 1) // 2


# -- asyncflow side -------------------------------------------------------------
async def af_fanout(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(ident)
    return sum(await asyncio.gather(*[t(i) for i in range(n)]))


async def af_chain(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(inc)
    x = t(0)
    for _ in range(n - 1):
        x = t(x)
    return await x


async def af_diamond(flow: WorkflowEngine, n: int) -> Any:
    i_, n_, a_ = (
        flow.function_task(ident),
        flow.function_task(inc),
        flow.function_task(add),
    )
    bottoms = []
    for i in range(diamonds(n)):
        top = i_(i)
        bottoms.append(a_(n_(top), n_(top)))
    return sum(await asyncio.gather(*bottoms))


async def af_mapreduce(flow: WorkflowEngine, n: int) -> Any:
    m, r = flow.function_task(make_array), flow.function_task(array_total)
    return await r(*[m(i) for i in range(min(n, MAPS))])


async def af_sleep(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(nap)
    return sum(await asyncio.gather(*[t(i) for i in range(min(n, NAPS))]))


def _af_work(seconds: float, most: int) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def run(flow: WorkflowEngine, n: int) -> Any:
        t = flow.function_task(work)
        return sum(await asyncio.gather(*[t(i, seconds) for i in range(min(n, most))]))

    return run


async def af_exec(flow: WorkflowEngine, n: int) -> Any:
    t = flow.executable_task(lambda: ["/bin/true"])
    out = await asyncio.gather(*[t() for _ in range(min(n, EXECS))])
    return len(out)


# -- raw side ---------------------------------------------------------------------
# Independent tasks go through ``raw.map`` (one bulk submission where the runtime
# has one); a dependent task gets its upstream handles as arguments, which the
# runtime resolves itself or the driver waits for (see :mod:`.raw`).
def raw_fanout(raw: Raw, n: int) -> Any:
    return sum(raw.gather(raw.map(ident, [(i,) for i in range(n)])))


def raw_chain(raw: Raw, n: int) -> Any:
    x = raw.submit(inc, 0)
    for _ in range(n - 1):
        x = raw.submit(inc, x)
    return raw.gather([x])[0]


def raw_diamond(raw: Raw, n: int) -> Any:
    tops = raw.map(ident, [(i,) for i in range(diamonds(n))])
    lefts = raw.map(inc, [(t,) for t in tops])
    rights = raw.map(inc, [(t,) for t in tops])
    return sum(raw.gather(raw.map(add, list(zip(lefts, rights, strict=True)))))


def raw_mapreduce(raw: Raw, n: int) -> Any:
    maps = raw.map(make_array, [(i,) for i in range(min(n, MAPS))])
    return raw.gather([raw.submit(array_total, *maps)])[0]


def raw_sleep(raw: Raw, n: int) -> Any:
    return sum(raw.gather(raw.map(nap, [(i,) for i in range(min(n, NAPS))])))


def _raw_work(seconds: float, most: int) -> Callable[[Raw, int], Any]:
    def run(raw: Raw, n: int) -> Any:
        calls = [(i, seconds) for i in range(min(n, most))]
        return sum(raw.gather(raw.map(work, calls)))

    return run


def raw_exec(raw: Raw, n: int) -> Any:
    return len(raw.gather(raw.executables(["/bin/true"], min(n, EXECS), run_true)))


@dataclass(frozen=True)
class Cap:
    """The largest size one backend runs a workload at (a full run, and
    ``--quick``), and why: the run notes it wherever it cuts a size."""

    full: int
    quick: int
    why: str


@dataclass(frozen=True)
class Workload:
    """One workload: the same work written for asyncflow and for a raw
    runtime's own API, its task count and right answer at size ``n``, and the
    backends that cannot run it at full size.  The bench reads nothing else
    about a workload, so adding one is adding a record."""

    name: str
    description: str
    asyncflow: Callable[[WorkflowEngine, int], Coroutine[Any, Any, Any]]
    raw: Callable[[Raw, int], Any]
    tasks: Callable[[int], int]
    expected: Callable[[int], Any]
    caps: Mapping[str, Cap] = field(default_factory=dict)

    def sizes_for(
        self, backend: str, sizes: list[int], quick: bool
    ) -> tuple[list[int], str | None]:
        """The sizes ``backend`` runs this workload at, and why if any were
        capped.

        A size above the cap runs at the cap instead (once, however many sizes
        were above it), so every backend reports every workload; where that
        leaves one size of several, a tenth of the cap joins it, so cost growth
        still shows.  Sizes that come to the same task count (the fixed-count
        workloads) run once, at the smallest."""
        cap = self.caps.get(backend)
        if not cap:
            return self._one_per_count(sizes), None
        sizes, cut = self._under(sizes, cap.quick if quick else cap.full)
        return self._one_per_count(sizes), cap.why if cut else None

    def _under(self, sizes: list[int], most: int) -> tuple[list[int], bool]:
        """``sizes`` with those above ``most`` run at it, and whether any was."""
        cut = any(self.tasks(n) > self.tasks(most) for n in sizes)
        several = len({self.tasks(n) for n in sizes}) > 1
        if cut and several and all(n >= most for n in sizes):
            sizes = [*sizes, max(1, most // 10)]
        return [min(n, most) for n in sizes], cut

    def _one_per_count(self, sizes: list[int]) -> list[int]:
        """The smallest of the sizes that come to each task count, in order."""
        out: dict[int, int] = {}
        for n in sorted(sizes):
            out.setdefault(self.tasks(n), n)
        return sorted(out.values())


RADICAL_RATE = (
    "radical.pilot runs about 10 tasks/s on local.localhost and a dependent hop "
    "takes about 0.25 s"
)
RADICAL_PAYLOADS = (
    "the adapter declares no large_payloads: each 1 MiB array travels inside "
    "radical.pilot task messages"
)


def _radical(full: int, quick: int, why: str = RADICAL_RATE) -> dict[str, Cap]:
    return {"radical": Cap(full, quick, why)}


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "fanout",
            "n independent no-op tasks, every result gathered (fan-out/fan-in)",
            af_fanout,
            raw_fanout,
            tasks=lambda n: n,
            expected=triangle,
            caps=_radical(300, 12),
        ),
        Workload(
            "chain",
            "n tasks, each taking the previous one's result",
            af_chain,
            raw_chain,
            tasks=lambda n: n,
            expected=lambda n: n,
            caps=_radical(50, 6),
        ),
        Workload(
            "diamond",
            "n / 4 diamonds: one task, two tasks on its result, one on both",
            af_diamond,
            raw_diamond,
            tasks=lambda n: 4 * diamonds(n),
            expected=lambda n: diamonds(n) * (diamonds(n) + 1),
            caps=_radical(200, 12),
        ),
        Workload(
            "mapreduce",
            f"up to {MAPS} tasks making 1 MiB numpy arrays, one task summing them",
            af_mapreduce,
            raw_mapreduce,
            tasks=lambda n: min(n, MAPS) + 1,
            expected=lambda n: float(ARRAY_ITEMS * triangle(min(n, MAPS))),
            caps=_radical(8, 3, RADICAL_PAYLOADS),
        ),
        Workload(
            "sleep",
            f"up to {NAPS} independent {SLEEP * 1000:.0f} ms sleeps: makespan "
            "against the ideal",
            af_sleep,
            raw_sleep,
            tasks=lambda n: min(n, NAPS),
            expected=lambda n: triangle(min(n, NAPS)),
            caps=_radical(300, 12),
        ),
        *(
            Workload(
                name,
                f"up to {most} independent tasks of {seconds * 1000:g} ms of CPU "
                "work: makespan against the ideal (the task-duration sweep)",
                _af_work(seconds, most),
                _raw_work(seconds, most),
                tasks=functools.partial(_at_most, most),
                expected=functools.partial(_triangle_at_most, most),
                caps=_radical(300, 12),
            )
            for name, (seconds, most) in WORK.items()
        ),
        Workload(
            "exec",
            f"up to {EXECS} runs of /bin/true, output captured",
            af_exec,
            raw_exec,
            tasks=lambda n: min(n, EXECS),
            expected=lambda n: min(n, EXECS),
            caps=_radical(300, 12),
        ),
    )
}
