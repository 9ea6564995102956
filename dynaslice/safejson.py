"""JSON from files users hand to dynaslice, nested no deeper than :data:`MAX_DEPTH`.

``json.loads`` recurses once per level: ``"[" * 100000`` raises ``RecursionError``, which no
caller expects (it is not a ``ValueError``), and a document a few hundred levels deep parses
but then overflows the stack of whatever walks it next (``yaml.safe_dump``, a recursive check).
No file dynaslice reads (budget and latency tables, manifests, archs, model-file metadata, run
results) nests more than a handful of levels, so :func:`loads` counts the depth before parsing
and refuses a deeper document with a ``json.JSONDecodeError`` at the bracket that goes too deep:
every caller's existing handler of bad JSON then reports it in one line, naming the file.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
"""Deeper than any file dynaslice writes or reads (a config inside model metadata is ~5 levels)."""

# a whole string (escapes included: a bracket inside a string is no nesting), or one bracket
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def loads(text: str) -> Any:
    """``json.loads(text)``, refusing a document nested deeper than :data:`MAX_DEPTH`."""
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, match.start())
        elif token in ("]", "}"):
            depth -= 1
    return json.loads(text)
