"""Event positions as clients see them: short decimal ASCII strings.

A position is the event's id in the store; it increases in commit order across all streams, so
one position resumes any set of streams. SSE ids add a connection id in front (`sid.position`);
every API that takes a position also accepts that form.
"""

from __future__ import annotations

MAX_POSITION = 2**63 - 1


def format_position(position: int) -> str:
    return str(position)


def parse_position(text: str) -> int:
    """Parse `123` or `sid.123`; raise ValueError for anything else."""
    if not text or len(text) > 64 or not text.isascii():
        raise ValueError("not a position")
    digits = text.rpartition(".")[2]
    if not digits.isdigit():
        raise ValueError("not a position")
    value = int(digits)
    if value > MAX_POSITION:
        raise ValueError("position out of range")
    return value
