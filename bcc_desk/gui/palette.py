"""Class colours and short names shared by the table, the image pane and the slide chart."""

from __future__ import annotations

import re

from PySide6.QtGui import QColor

# Colour-blind-safe (Okabe-Ito) so the chart reads for everyone; more classes cycle.
_COLOURS = ("#0072B2", "#E69F00", "#CC79A7", "#009E73", "#56B4E9", "#D55E00", "#F0E442", "#999999")

FLAGGED_BACKGROUND = QColor("#FFF2CC")  # the report's review fill
ERROR_BACKGROUND = QColor("#F8CBAD")  # the report's error fill


def class_colour(index: int) -> QColor:
    return QColor(_COLOURS[index % len(_COLOURS)])


def short_name(name: str) -> str:
    """'[Malignant] Pre-B' -> 'Pre-B': the data set's bracketed group tag adds nothing in a legend."""
    return re.sub(r"^\[[^\]]*\]\s*", "", name) or name
