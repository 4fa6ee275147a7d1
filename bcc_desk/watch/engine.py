"""What the watch needs of a classifier (`WatchEngine`): a `Classifier`, or the app's
`ChildClassifier` (the same network in the app's classifier process)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Protocol

from bcc_desk.prediction import Prediction
from bcc_desk.review_policy import ReviewPolicy


class WatchEngine(Protocol):
    """What the watch needs of a classifier: a `Classifier`, or the app's `ChildClassifier` (the
    same network in the app's classifier process)."""

    @property
    def device_label(self) -> str: ...

    @property
    def compile(self) -> bool | None: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def review_policy(self) -> ReviewPolicy: ...

    def predict_paths(self, paths: Sequence[Path], root: Path) -> Generator[Prediction, None, None]: ...
