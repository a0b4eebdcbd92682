"""The file raptor loads its worker class from (a ``raptor_file``).

radical.pilot loads a worker class from a source file by path, in the worker's
own interpreter on the pilot's nodes.  This one imports the class from the
installed package, which those nodes import ``call_remote`` from anyway, so the
path is valid wherever the pilot runs with the driver's environment.
"""

from asyncflow.adapters.radical.worker import AsyncflowWorker

__all__ = ["AsyncflowWorker"]
