"""Each runtime's own API, behind the smallest common shape: ``submit(fn,
*args)`` where args may be earlier handles, ``map`` for independent tasks,
``executables`` for command-line tasks, and ``gather(handles)``.

Dask, Ray and Parsl resolve handles passed as arguments themselves; a
``concurrent.futures`` executor cannot, so its upstream results are waited for in
the driver, which is what a user of the raw executor would write.  radical.pilot
lives in :mod:`.rawrp`: it is big enough for a module of its own.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..hpc import Allocation

WORKERS = 2


class Raw:
    name = "raw"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> list[Any]:
        """Independent calls; a runtime with a bulk submission overrides this."""
        return [self.submit(fn, *args) for args in arglists]

    def executables(
        self, argv: list[str], n: int, as_function: Callable[[], Any]
    ) -> list[Any]:
        """``n`` runs of a command.  Runtimes without an executable-task API run
        it the way the asyncflow adapters do: from a function in a worker."""
        return self.map(as_function, [()] * n)

    def skip(self, workload: str) -> str | None:
        """Why this runtime's own API cannot run ``workload``, if it cannot."""
        return None

    def gather(self, handles: list[Any]) -> list[Any]:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    @classmethod
    def for_allocation(cls, alloc: Allocation, hpc: dict[str, Any]) -> Raw | None:
        """The runtime's own API on the batch cluster that ``hpc``, the page's
        allocation dict, describes; None where the bench has no such baseline."""
        return None


class ExecutorRaw(Raw):
    def __init__(self, processes: bool):
        self.ex = (
            ProcessPoolExecutor(WORKERS) if processes else ThreadPoolExecutor(WORKERS)
        )
        self.name = f"{type(self.ex).__name__}.submit"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        return self.ex.submit(fn, *args)

    def gather(self, handles: list[Any]) -> list[Any]:
        return [h.result() for h in handles]

    def shutdown(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class ThreadsRaw(ExecutorRaw):
    def __init__(self) -> None:
        super().__init__(processes=False)


class ProcessesRaw(ExecutorRaw):
    def __init__(self) -> None:
        super().__init__(processes=True)


class DaskRaw(Raw):
    name = "distributed.Client.submit"

    def __init__(self) -> None:
        from distributed import Client, LocalCluster

        self.cluster: Any = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        self.client = Client(self.cluster)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def gather(self, handles: list[Any]) -> list[Any]:
        return list(self.client.gather(handles))

    def shutdown(self) -> None:
        self.client.close()
        self.cluster.close()

    @classmethod
    def for_allocation(cls, alloc: Allocation, hpc: dict[str, Any]) -> Raw | None:
        from .rawslurm import DaskSlurmRaw

        return DaskSlurmRaw(alloc, hpc)


class RayRaw(Raw):
    name = "ray f.remote()"

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-ray-")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=WORKERS,
            include_dashboard=False,
            _temp_dir=self.tmp,
            log_to_driver=False,
        )
        self.remotes: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        remote = self.remotes.get(fn)
        if remote is None:
            remote = self.remotes[fn] = self.ray.remote(max_retries=0)(fn)
        return remote.remote(*args)

    def gather(self, handles: list[Any]) -> list[Any]:
        return list(self.ray.get(handles))

    def shutdown(self) -> None:
        self.ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ParslRaw(Raw):
    name = "parsl python_app"

    def __init__(self) -> None:
        import logging

        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        logging.getLogger("parsl").setLevel(logging.WARNING)
        self.parsl = parsl
        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-parsl-")
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label="htex",
                    address="127.0.0.1",
                    loopback_address="127.0.0.1",
                    max_workers_per_node=WORKERS,
                    provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                )
            ],
            run_dir=self.tmp,
            strategy_period=0.5,
            initialize_logging=False,
        )
        self.dfk = parsl.load(config)
        self.apps: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        app = self.apps.get(fn)
        if app is None:
            app = self.apps[fn] = self.parsl.python_app(fn, data_flow_kernel=self.dfk)
        return app(*args)

    def gather(self, handles: list[Any]) -> list[Any]:
        return [h.result() for h in handles]

    def shutdown(self) -> None:
        self.dfk.cleanup()
        self.parsl.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @classmethod
    def for_allocation(cls, alloc: Allocation, hpc: dict[str, Any]) -> Raw | None:
        from .rawslurm import ParslSlurmRaw

        return ParslSlurmRaw(alloc)


def make_raw(backend: str, hpc: dict[str, Any] | None = None) -> Raw | None:
    """The raw runtime an asyncflow backend is compared with (its ``baseline``
    in :data:`asyncflow.registry.ADAPTERS`), or None if there is no comparable
    raw API here.  With ``hpc`` (the page's allocation dict), the runtime's own
    Slurm API for the same allocation."""
    from ..hpc import Allocation
    from ..registry import ADAPTERS

    adapter = ADAPTERS.get(backend)
    if adapter is None:
        return None
    module, _, name = adapter.baseline.partition(":")
    cls: type[Raw] = getattr(importlib.import_module(module), name)
    if hpc is None:
        return cls()
    alloc, _ = Allocation.from_mapping(hpc, "asyncflow bench --hpc")
    return cls.for_allocation(alloc, hpc)
