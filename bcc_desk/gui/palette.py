"""Class colours and names shared by the table, the image pane, the slide summary and the
review actions."""

from __future__ import annotations

from PySide6.QtGui import QColor

from bcc_desk.prediction import Prediction

# Colour-blind-safe (Okabe-Ito) so the chart reads for everyone; more classes cycle.
_COLOURS = ("#0072B2", "#E69F00", "#CC79A7", "#009E73", "#56B4E9", "#D55E00", "#F0E442", "#999999")

FLAGGED_BACKGROUND = QColor("#FFF2CC")  # the report's review fill
ERROR_BACKGROUND = QColor("#F8CBAD")  # the report's error fill
ERROR_TEXT = QColor("#9C0006")  # dark red: readable on the error fill


def class_colour(index: int) -> QColor:
    return QColor(_COLOURS[index % len(_COLOURS)])


def class_name(name: str | None) -> str:
    """How the window writes a class: exactly as the classifier names it (its `classes` and each
    prediction's `label`), so the table, image pane, slide summary, legends and review actions
    agree with each other and with the report.  Every one of them goes through here."""
    return name or ""


def label_text(p: Prediction) -> str:
    """What the window says the model found for an image: its class, or why it is unreadable
    (shown where the label would be, so an unreadable row never looks blank)."""
    if p.error is not None:
        return f"Unreadable: {p.error}"
    return class_name(p.label)
