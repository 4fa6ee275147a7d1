"""Reasons shown to a person on one line: a status bar, a report's error cell, a log line."""

from __future__ import annotations


def one_line(what: BaseException | str, limit: int | None = 300) -> str:
    """`what` on one line (whitespace runs become one space), at most `limit` characters; an
    exception with no text is named by its type."""
    text = " ".join(str(what).split())
    if limit is not None:
        text = text[:limit]
    if not text and isinstance(what, BaseException):
        return type(what).__name__
    return text
