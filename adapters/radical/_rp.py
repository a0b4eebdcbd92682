"""radical.pilot and radical.utils, imported in one place.

radical.pilot's helper package rc.process leaks a file handle at import
(``open(VERSION).read()``), which test suites that turn warnings into errors
would trip over; nothing a user of this adapter can act on, so it is silenced
here, once, for every module of the adapter.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    import radical.pilot as rp
    import radical.utils as ru

__all__ = ["FINAL", "rp", "ru"]

FINAL = frozenset(rp.FINAL)
