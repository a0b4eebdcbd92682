"""The run report at 100 and 10,000 tasks: its size, how long it takes to
write and to load in headless Chromium, and a screenshot of each for the docs
(docs/report/report-100.png, docs/report/report-10000.png).

    python benchmarks/report_screenshots.py [--tasks 100 10000] [--out docs/report]

The workflow is a pipeline per sample (fetch, parse, analyse), a summary per
ten samples, one merge, and one validation that fails with a dependent that
therefore never runs; tasks sleep a few milliseconds each on eight threads so
that the timeline has something to show.  Load time is from navigation until
the page's script has drawn everything (``body[data-ready]``), the median of
three loads.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine  # noqa: E402
from tests.browser import Browser, distinct_colours  # noqa: E402


def named(name: str) -> Callable[..., float]:
    """A step that sleeps: the report shows tasks by their function's name."""

    def work(seconds: float, *inputs: object) -> float:
        time.sleep(seconds)
        return seconds

    work.__name__ = work.__qualname__ = name
    return work


def validate(seconds: float, *inputs: object) -> None:
    time.sleep(seconds)
    raise ValueError("sample 3: checksum mismatch (expected 0x3f2a, got 0x0000)")


async def pipeline(flow: WorkflowEngine, tasks: int, scale: float) -> None:
    """Exactly ``tasks`` tasks (at least 16)."""
    rng = random.Random(tasks)
    names = ("fetch", "parse", "analyse", "summarise", "merge", "publish")
    step = {name: flow.function_task(named(name)) for name in names}
    check = flow.function_task(validate)
    samples = (tasks - 3) * 10 // 31
    spare = tasks - 3 - 3 * samples - (samples + 9) // 10
    ms = lambda low, high: rng.uniform(low, high) * scale  # noqa: E731
    analysed = []
    for i in range(samples):
        parsed = step["parse"](ms(1, 3), step["fetch"](ms(2, 6)))
        analysed.append(step["analyse"](ms(1, 8), parsed))
        if i == 3:
            failed = check(ms(1, 2), parsed)
    summaries = [
        step["summarise"](ms(2, 5), *analysed[k : k + 10])
        for k in range(0, samples, 10)
    ]
    extra = [step["fetch"](ms(1, 3)) for _ in range(spare)]
    outputs = [step["merge"](ms(5, 10), *summaries), *extra]
    outputs += [failed, step["publish"](ms(1, 2), failed)]
    await asyncio.gather(*outputs, return_exceptions=True)


def write_report(path: Path, tasks: int) -> tuple[float, float]:
    """Run the workflow and write its report; (run seconds, write seconds)."""
    scale = 0.002 if tasks <= 1000 else 0.0003

    async def main() -> tuple[float, float]:
        backend = ConcurrentExecutionBackend(ThreadPoolExecutor(8))
        async with WorkflowEngine(backend=backend) as flow:
            flow.record_trace()
            begin = time.perf_counter()
            await pipeline(flow, tasks, scale)
            ran = time.perf_counter() - begin
            begin = time.perf_counter()
            flow.export_report(str(path))
            return ran, time.perf_counter() - begin

    with ThreadPoolExecutor(1) as pool:  # Playwright's loop may hold this thread
        return pool.submit(asyncio.run, main()).result()


def measure(browser: Browser, path: Path, shot: Path) -> tuple[float, float, int]:
    """(median load seconds, the script's own render ms, screenshot colours)."""
    loads, renders = [], []
    for _ in range(3):
        page = browser.open(path, ready="document.body.dataset.ready === '1'")
        if page.errors or page.blocked:
            raise SystemExit(f"{path}: errors {page.errors}, fetched {page.blocked}")
        loads.append(page.load_seconds)
        renders.append(float(page.evaluate("document.body.dataset.renderMs")))
        if len(loads) < 3:
            page.raw.close()
    colours = distinct_colours(page.screenshot(shot, full_page=True))
    page.raw.close()
    return statistics.median(loads), statistics.median(renders), colours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    print(f"{'tasks':>7} {'size':>10} {'write':>9} {'load':>9} {'render':>9}")
    with tempfile.TemporaryDirectory() as tmp, Browser() as browser:
        for tasks in ns.tasks:
            path = Path(tmp) / f"report-{tasks}.html"
            _ran, wrote = write_report(path, tasks)
            shot = ns.out / f"report-{tasks}.png"
            load, render, colours = measure(browser, path, shot)
            print(
                f"{tasks:>7} {path.stat().st_size / 1024:>7.0f} KiB "
                f"{wrote * 1e3:>6.0f} ms {load * 1e3:>6.0f} ms {render:>6.0f} ms"
                f"   {shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}"
                f" ({shot.stat().st_size // 1024} KiB, {colours} colours)"
            )


if __name__ == "__main__":
    main()
