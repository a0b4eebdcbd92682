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

The adapter is a few collaborators sharing one state object, by job:

``backend``
    :class:`RayExecutionBackend`: the protocol, handed to the parts below in the
    order they start and shut down;
``state``
    the settings and bookkeeping they share, and what the backend declares;
``process``
    the thread that owns ``ray.init`` and ``ray.shutdown``, a local Ray kept on
    loopback, and finding and killing its processes and marked commands;
``attach``
    attaching to a running Ray: probes that fail fast, and hints at the fix;
``submit``
    specs turned into ``.remote()`` calls, with resources, options and nested
    refs;
``results``
    readiness callbacks batched onto the loop, inline values, and
    :class:`RayValue` fetches;
``cancel``
    Ray's cancel for functions, the marker sweep for commands;
``watch``
    the head's processes watched, so that its death fails the tasks at once;
``worker``
    what runs in Ray workers, imported there by this path;
``errors``
    Ray's failures translated into asyncflow's errors.
"""

from __future__ import annotations

from .backend import RayExecutionBackend
from .results import RayValue

__all__ = ["RayExecutionBackend", "RayValue"]
