"""Ray: tasks become Ray tasks, and big results stay in Ray's object store.

Ray already returns a small result inline to the driver and keeps a big one (over
100 KiB) in its shared-memory store.  We follow that split: when a task is ready,
its small value or error is read from the driver's own memory in one ``ray.get``
per batch, and a big value becomes a RayValue, so a 200 MB result never enters
the driver unless someone awaits it.  (Objects between 100 KiB and 1 MiB are read
once anyway, because an error with a long message is stored that way too.)  Its
ObjectRef goes straight into dependent ``.remote()`` calls, where Ray resolves it
on the worker.  Ray resolves only top-level ObjectRef arguments, so refs nested in
lists or dicts travel as extra top-level arguments and are put back in place on
the worker.

Readiness arrives through Ray's ObjectRef callback (the one behind ``await
ref``), registered without fetching the value; callbacks from Ray's thread are
batched onto the event loop.  No thread and no polling per task.  Measured on 2
cores, a per-task fetching callback (``ref.future()``, ``_on_completed``) costs
the driver about as much CPU as submitting the task, which on a small machine
shows up directly as lost throughput.

A local Ray started here is confined to loopback.  Ray treats any requested
``127.0.0.1`` node address as "localhost" and swaps in the machine's external
address unless it runs in its local-only mode (the mode it uses on macOS and
Windows, switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` and read once at
``import ray``).  In that mode the node address is 127.0.0.1, and Ray's GCS,
raylet, core-worker and runtime-env-agent servers bind only to it.  We apply that
mode around our own ``ray.init`` only, so a cluster the user attaches to later in
the process is unaffected.

Cancelling a running function kills its worker (``force=True``): Ray's
non-forced cancel only raises KeyboardInterrupt at the next bytecode, which
neither interrupts a blocking call nor survives ``except BaseException``.  A
running executable's command lives in a session of its own, so killing the
worker would orphan it; instead the command carries a marker in its environment
and the command's process group is killed wherever the marker is found.

The adapter is split by job:

``backend``
    :class:`RayExecutionBackend`: construction, start, cancel and shutdown;
``process``
    the thread that owns ``ray.init`` and ``ray.shutdown``, a local Ray kept on
    loopback, and finding and killing its processes and cancelled commands;
``submit``
    specs turned into ``.remote()`` calls, with resources, options and nested
    refs;
``results``
    readiness callbacks batched onto the loop, inline values, and
    :class:`RayValue` fetches;
``worker``
    what runs in Ray workers, imported there by this path;
``errors``
    Ray's failures translated into asyncflow's errors;
``base``
    the state the parts above share.
"""

from __future__ import annotations

from .backend import RayExecutionBackend
from .results import RayValue

# The old single module's names stay importable from here.  Each is defined once,
# in the module named; patch it there, not here.
from .worker import _EXEC as _EXEC
from .worker import MARKER as MARKER
from .worker import _function_runner as _function_runner
from .worker import _run_command as _run_command
from .worker import _sweep as _sweep

__all__ = ["RayExecutionBackend", "RayValue"]
