"""Text from the outside world (file, folder and patient names, a reviewer's words) made safe
for where it goes: a spreadsheet must never read it as a formula, a PDF never as markup."""

from __future__ import annotations

from xml.sax.saxutils import escape

_CSV_RISKY = ("=", "+", "-", "@", "\t", "\r")


def csv_text(s: str) -> str:
    """OWASP CSV-injection advice: a leading apostrophe keeps spreadsheet apps from evaluating."""
    return "'" + s if s.startswith(_CSV_RISKY) else s


def csv_plain(s: str) -> str:
    """The text `csv_text` was given (for CSV files this package reads back)."""
    return s[1:] if s.startswith("'") and s[1:].startswith(_CSV_RISKY) else s


def pdf_text(s: object) -> str:
    """`s` for a reportlab Paragraph, which reads its text as markup: '<b>' stays literal text."""
    return escape(str(s))


def name_text(s: str) -> str:
    """A file or folder name as text every writer takes (xlsx, CSV, PDF, SQLite, the console).

    Linux allows any bytes in a name; Python hands the ones that are not UTF-8 over as lone
    surrogates, which no encoder accepts (one such file ended `bcc classify` with a traceback and
    no report).  They become `\\xNN`: visible, and a way back to the file's real bytes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
