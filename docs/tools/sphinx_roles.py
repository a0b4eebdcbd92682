"""A griffe extension for the API reference: asyncflow's docstrings are written
for Sphinx-style reading in an editor (``:class:`~asyncflow.x.Y```, ``::`` before
a literal block), which Markdown would show verbatim.  Each role becomes a code
span of the name a reader would see, and ``::`` a colon (the indented block
after it is already code in Markdown).  Loaded by mkdocs.yml's mkdocstrings
options; the site excludes this folder from its pages.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
LITERAL = re.compile(r"::\n(?=\s*\n)")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def plain(text: str) -> str:
    """``text`` with Sphinx roles as code spans and ``::`` as ``:``."""
    return LITERAL.sub(":\n", ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
