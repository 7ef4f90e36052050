"""Handles: the unguessable 64-bit ids the broker gives resources, and their printable form (``tb:`` + 16 hex)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ._errors import InvalidArgument

HANDLE_PREFIX = "tb:"
_HANDLE_RE = re.compile(r"^tb:([0-9a-f]{16})$")


@dataclass(frozen=True, slots=True, order=True)
class Handle:
    """An unguessable 64-bit resource id. Printable form: ``tb:`` + 16 lowercase hex digits."""

    value: int

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or isinstance(self.value, bool) or not 0 < self.value < 1 << 64:
            raise InvalidArgument(f"a handle is a non-zero 64-bit integer, not {self.value!r}")

    @classmethod
    def new(cls) -> "Handle":
        return cls(secrets.randbits(64) or 1)

    @classmethod
    def parse(cls, text: "str | Handle | int") -> "Handle":
        """Accept a Handle, its int value, or its printable form; anything else is InvalidArgument (a ValueError)."""
        if isinstance(text, Handle):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text)
        m = _HANDLE_RE.match(text.strip().lower()) if isinstance(text, str) else None
        if not m:
            raise InvalidArgument(f"not a texbridge handle: {text!r} (expected 'tb:' + 16 hex digits, as "
                                  "`texbridge ls` prints them)")
        return cls(int(m.group(1), 16))

    @staticmethod
    def looks_like(text: str) -> bool:
        return bool(_HANDLE_RE.match(text.strip().lower()))

    @staticmethod
    def claims_to_be(text: str) -> bool:
        """Whether `text` is meant as a handle (it has the ``tb:`` prefix), valid or not: such text is never a name."""
        return text.strip().lower().startswith(HANDLE_PREFIX)

    def __str__(self) -> str:
        return f"tb:{self.value:016x}"

    def __repr__(self) -> str:
        return f"Handle('{self}')"
