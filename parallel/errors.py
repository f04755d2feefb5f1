"""The one error type a user's input can raise, at the bottom of the house.

`ConfigError(key, message)` is a configuration or usage mistake, reported as one line
`<key>: <message>`; every command prints it as `config error: ...` and exits 2
(launcher/errors.py has the exit codes). It lives here, below `launcher/`, because the pure
layout arithmetic in `parallel/` refuses bad degrees with it too, and `parallel/` imports
nothing from `launcher/`.
"""

from __future__ import annotations

import reprlib
from typing import Any


class ConfigError(Exception):
    """A configuration mistake, reported as one line: `<key>: <what was expected>`.

    Keys and values come from the user (a YAML key, an override as typed) and may hold line
    breaks or control characters: both parts are escaped so the report stays one line."""

    def __init__(self, key: str, message: str):
        self.key = one_line(str(key)) or "''"
        self.message = one_line(str(message))
        super().__init__(f"{self.key}: {self.message}")


def one_line(text: str) -> str:
    """`text` with every non-printable character (line breaks, tabs, controls, unassigned
    code points) written as its escape, e.g. a newline as \\n."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_SHOW_CHARS = 100


def show_value(value: Any) -> str:
    """A short repr for messages: bounded for long strings, deep or aliased ("billion laughs")
    YAML structures, and integers too long for str() (Python refuses more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {'negative ' if value < 0 else ''}{value.bit_length()}-bit integer"
    text = _REPR.repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."
