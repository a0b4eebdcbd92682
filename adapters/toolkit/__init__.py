"""What every adapter needs, written once.

An adapter is a few collaborators sharing one explicit state object (see the
radical.pilot adapter).  The parts below are the collaborators every runtime
needs in the same shape, so that a fix to one of them (a shutdown that must be
idempotent, a fetch that must fail rather than hang when the backend closes,
an exception that must survive the trip back from a worker) lands once:

* :class:`Lifecycle`: the started/closed guards the protocol promises, and the
  background asyncio tasks an adapter owns until shutdown;
* :class:`FunctionCache` and :func:`pack`: a function pickled once per backend,
  arguments pickled with the C pickler first, and the error that names the task;
* :func:`portable`, :func:`is_pickling_error`, :func:`lost_error`: exceptions
  made fit for the trip back, and the errors for what a runtime loses;
* :class:`BatchedFetch`: one runtime round trip for every remote value asked
  for in one loop turn;
* :class:`Scratch`: a temp dir a backend owns, with the list of running
  commands its workers keep there, so that shutdown kills what a dead worker
  left behind;
* :mod:`.chunks` and :mod:`.routing`: short function tasks sent several to a
  runtime call, sized from measured run times, each still reported on its own,
  and the rule for which tasks of a batch go that way.

The command-killing primitives themselves run in workers and live in
:mod:`asyncflow.commands` (``kill_command``, ``COMMAND_PIDS_ENV``).
"""

from __future__ import annotations

from .envelopes import is_pickling_error, lost_error, portable
from .fetch import BatchedFetch, Failed
from .lifecycle import Lifecycle
from .pickles import FunctionCache, pack
from .scratch import Scratch

__all__ = [
    "BatchedFetch",
    "Failed",
    "FunctionCache",
    "Lifecycle",
    "Scratch",
    "is_pickling_error",
    "lost_error",
    "pack",
    "portable",
]
