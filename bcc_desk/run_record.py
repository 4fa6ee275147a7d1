"""What produced a report (`RunInfo`, the Run sheet's record), taken from the classifier that
ran: the one record every front end (classify, watch, the app's export) writes."""

from __future__ import annotations

import getpass
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bcc_desk.bundle_meta import verdict_text
from bcc_desk.review_policy import ReviewPolicy

if TYPE_CHECKING:
    from bcc_desk.classifier import Classifier


@dataclass
class RunInfo:
    """What produced a report, so a reader months later can tell how to trust it."""

    software_version: str
    models: list[tuple[str, str]]
    """(name, sha256) of every model that contributed."""
    classes: list[str]
    """Class names in the model's output order: the order of the `p:` and `n:` columns."""
    review_threshold: float
    ood_check: str
    """"on", "off" or "partly" (some models carry no out-of-distribution statistics)."""
    tta: bool
    device: str
    started: datetime
    finished: datetime | None
    """None while the run is still going (the daemon rewrites its report as it goes)."""
    root: str
    host: str
    user: str
    command: str
    extra: dict[str, str] = field(default_factory=dict)
    """Front-end specific facts (daemon settings, GUI session...), listed last on the Run sheet."""
    slide_review_threshold: float | None = None
    """The cut-off for an image that agrees with its slide; None: the slide's consensus was off."""
    colour_check: str = "off"
    """"on", "off" or "partly", as `ood_check`, for the colour check (`bcc_desk.colour`)."""
    not_classified: list[str] = field(default_factory=list)
    """Images of the run that were never classified (an interrupted run), as the file column
    would spell them: the report lists them so that none is taken for done."""
    model_verdict: str = "not recorded"
    """The trainer's verdict on the model(s) (`bundle_meta.verdict_text`), one per model joined."""
    unvalidated: bool = False
    """A model its trainer did not find fit for use ran (`--allow-unvalidated`): every page says so."""

    @property
    def review_policy(self) -> ReviewPolicy:
        """The rule the run's images were flagged by, as recorded (the app's review session
        applies it again as slides grow)."""
        return ReviewPolicy(self.review_threshold, self.slide_review_threshold)

    @property
    def outcome(self) -> str:
        """The Run sheet's "run": complete, still running, or interrupted after N of M images."""
        if self.not_classified:
            return "interrupted"
        return "still running" if self.finished is None else "complete"

    @classmethod
    def collect(
        cls,
        *,
        models: list[tuple[str, str]],
        classes: list[str],
        review_threshold: float,
        ood_check: str,
        tta: bool,
        device: str,
        root: str | Path,
        command: str | None = None,
        started: datetime | None = None,
        finished: datetime | None = None,
        extra: dict[str, str] | None = None,
        slide_review_threshold: float | None = None,
        colour_check: str = "off",
        not_classified: Sequence[str] = (),
        model_verdict: str = "not recorded",
        unvalidated: bool = False,
    ) -> RunInfo:
        """Fill in what the machine knows (host, user, version, command line, start time)."""
        from bcc_desk import __version__

        return cls(
            software_version=__version__,
            models=list(models),
            classes=list(classes),
            review_threshold=review_threshold,
            ood_check=ood_check,
            tta=tta,
            device=device,
            started=started or datetime.now().astimezone(),
            finished=finished,
            root=str(root),
            host=_safe(socket.gethostname),
            user=_safe(getpass.getuser),
            command=command if command is not None else shlex.join(sys.argv),
            extra=dict(extra or {}),
            slide_review_threshold=slide_review_threshold,
            colour_check=colour_check,
            not_classified=list(not_classified),
            model_verdict=model_verdict,
            unvalidated=unvalidated,
        )


def run_info(
    classifier: Classifier,
    *,
    root: str | Path,
    command: str,
    started: datetime | None = None,
    finished: datetime | None = None,
    extra: dict[str, str] | None = None,
    not_classified: Sequence[str] = (),
) -> RunInfo:
    """The Run sheet's record, taken from the classifier that made the predictions: its models
    (names, sha256s), classes in output order, review threshold, out-of-distribution check, TTA
    and numerics.  The one place every front end (classify, watch, the app's export) gets it."""
    return RunInfo.collect(
        models=[(b.name, b.sha256) for b in classifier.bundles], classes=list(classifier.classes),
        review_threshold=classifier.review_threshold, ood_check=ood_check(classifier.bundles),
        tta=classifier.tta, device=classifier.device_label, root=root, command=command,
        started=started, finished=finished, extra=extra,
        slide_review_threshold=classifier.review_policy.in_slide,
        colour_check=_on_off(sum(b.meta.colour is not None for b in classifier.bundles), len(classifier.bundles)),
        not_classified=not_classified,
        model_verdict="; ".join(verdict_text(b.meta) for b in classifier.bundles),
        unvalidated=any(b.meta.verdict is not None and not b.meta.verdict.fit_for_use for b in classifier.bundles),
    )


def ood_check(bundles: Sequence) -> str:
    """The Run sheet's "out-of-distribution check" for these bundles: "on" when every one
    carries the check, "off" when none does, "partly" in between."""
    return _on_off(sum(b.meta.ood is not None for b in bundles), len(bundles))


def _on_off(having: int, of: int) -> str:
    return "on" if having == of else ("off" if having == 0 else "partly")


def _safe(get: Callable[[], str]) -> str:
    # getpass.getuser raises in containers without a passwd entry: a report is still wanted.
    try:
        return get() or "unknown"
    except (OSError, KeyError, ImportError):  # getpass's failures: no passwd entry, no pwd module
        return "unknown"
