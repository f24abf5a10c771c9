"""Header values across the Latin-1 boundary: WSGI hands request headers over as Latin-1
strings, and a response header must encode as Latin-1 with no CR or LF. Text that came from a
client (an event id, say) goes through `header_value` before it becomes a response header."""

from __future__ import annotations

from urllib.parse import quote

# Printable ASCII but `%`: kept as is; everything else is percent-encoded as UTF-8 (so the
# encoding of a value that needed none is the value itself).
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_text(raw: str) -> str:
    """A request header's value as the client wrote it: UTF-8 bytes that WSGI decoded as
    Latin-1 are decoded again; anything else stays as it came."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


def header_value(text: str) -> str:
    """`text` as a response header value that always encodes: as is when it is printable
    ASCII, else percent-encoded UTF-8 (`price-€` becomes `price-%E2%82%AC`)."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe=_SAFE)
