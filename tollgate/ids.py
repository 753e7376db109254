"""Identifiers and user text: what may cross an edge, and in what form.

**Identifiers** (order, customer, message, sender, recipient, device) use one safe
alphabet: ASCII letters and digits first, then letters, digits, ``_``, ``.`` and ``-``,
at most 64 characters. Tollgate builds ids from them (``order-<id>``,
``order-<id>:charge``, ``message-<id>:read-sync:2``, ``<workflow id>:v3:CHARGING``), and
the separator of those derived ids, ``:``, is outside the alphabet: no entity id can
spell another entity's derived id, so order ``foo:recovery`` cannot borrow the recovery
workflow of order ``foo``. Nor can an id carry a control character, a space, a slash
(it is a URL path segment in the API) or markup. The same pattern is a CHECK constraint
on every id column (``schema/005_safe_input.sql``), so a writer at psql is held to it too.

**Free text** (a cancel or recall reason) is any printable text: no control characters
and no bidirectional overrides, which can make a terminal or a log line show something
other than what is stored. A message **body** may also hold newlines.

Text that reaches a header, a subject line or a single log line goes through
:func:`one_line` first, whatever was validated before: defence in depth for the one
place where a newline turns data into structure.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator, Field

from tollgate.errors import InputError

#: The safe alphabet, anchored. Also in SQL (schema/005_safe_input.sql): keep in step.
SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Separates the parts of every id Tollgate derives; never inside an entity id.
DERIVED_ID_SEPARATOR = ":"

_SAFE_ID = re.compile(SAFE_ID_PATTERN)
#: The rule in words, for error messages.
SAFE_ID_RULE = "1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"

#: Characters that reorder or hide text when displayed (Unicode bidi controls).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Line and paragraph separators: newlines that are not ``\n``.
_LINE_SEPARATORS = frozenset("\u2028\u2029\x85")

#: Longest reason (cancel, recall) a person may give; a CHECK bounds the columns.
REASON_MAX = 500
#: Longest message body.
BODY_MAX = 10_000
#: Longest text Tollgate itself writes into a free-text column (failure reasons).
NOTE_MAX = 1_000


def is_safe_id(value: str) -> bool:
    """Whether ``value`` is in the safe identifier alphabet."""
    return bool(_SAFE_ID.fullmatch(value))


def require_safe_id(what: str, value: str) -> str:
    """``value`` if it is a safe id, else ``InputError`` naming ``what`` and the rule."""
    if not is_safe_id(value):
        raise InputError(f"{what} {value!r} is not a valid id: {SAFE_ID_RULE}")
    return value


def _offending(value: str, *, allow_newline: bool) -> str | None:
    for ch in value:
        if ch == "\n" and allow_newline:
            continue
        if (
            unicodedata.category(ch) == "Cc"
            or ch in _BIDI_CONTROLS
            or ch in _LINE_SEPARATORS
            or ch in "\ufeff"
        ):
            return f"U+{ord(ch):04X}"
    return None


def _printable(value: str) -> str:
    bad = _offending(value, allow_newline=False)
    if bad is not None:
        raise ValueError(f"must be printable text without control characters (found {bad})")
    return value


def _printable_lines(value: str) -> str:
    bad = _offending(value, allow_newline=True)
    if bad is not None:
        raise ValueError(
            f"must be printable text; newlines are the only control characters allowed "
            f"(found {bad})"
        )
    return value


#: An identifier in the safe alphabet.
SafeId = Annotated[
    str,
    Field(
        pattern=SAFE_ID_PATTERN,
        description="1-64 characters: letters, digits, '_', '.', '-'; starts with a letter or digit",
    ),
]
#: A reason a person gives: printable, one line.
Reason = Annotated[str, Field(min_length=1, max_length=REASON_MAX), AfterValidator(_printable)]
#: A message body: printable, newlines allowed.
Body = Annotated[str, Field(min_length=1, max_length=BODY_MAX), AfterValidator(_printable_lines)]
#: Who asked (an OS user name, a client name): printable, short.
Requester = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]


def one_line(value: str, *, limit: int = 200) -> str:
    """``value`` safe for a header, a subject or one log line: every control, bidi and
    line-separator character becomes a space, and the result is cut at ``limit``."""
    cleaned = "".join(
        " " if _offending(ch, allow_newline=False) is not None else ch for ch in value
    )
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def clip(value: str | None, limit: int = NOTE_MAX) -> str | None:
    """``value`` cut to ``limit`` characters (for text Tollgate writes into a column)."""
    if value is None or len(value) <= limit:
        return value
    return value[: limit - 1] + "…"
