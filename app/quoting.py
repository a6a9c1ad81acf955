"""Client values quoted in error messages and logs, cut short so a huge one cannot flood either."""

from __future__ import annotations


def excerpt(value: object, limit: int = 40) -> str:
    """A client's value quoted in an error message, cut so that a huge one cannot flood responses or logs."""
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, int) else _int_text(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # past Python's int -> str digit limit
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
