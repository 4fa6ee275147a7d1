"""Loaded model bundles and the classifier built from them, for the app's watch and Grad-CAM.

Loading a bundle (hashing ~60 MB of weights, building the timm network) takes a second or two,
so it happens off the UI thread and only once per bundle: a second folder, or a Grad-CAM request,
reuses what is loaded.  No Qt in here; the threads that call it are Qt's.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bcc_desk.bundle_meta import BundleError, BundleMeta, InputSpec, bundle_fingerprint, read_meta
from bcc_desk.options import ClassifierOptions

if TYPE_CHECKING:
    from bcc_desk.bundle import Bundle, BundleNet
    from bcc_desk.classifier import Classifier


@dataclass(frozen=True)
class ModelChoice:
    """What the user picked: one bundle, or several (an ensemble), and how to run them."""

    model_dirs: tuple[Path, ...]
    device: str = "auto"
    tta: bool = False
    review_threshold: float | None = None
    """Overrides the bundles' own threshold when set."""
    slide_consensus: bool = True
    """Flag an image that disagrees with most of its slide (off where a folder mixes patients)."""
    compile: bool | None = None
    """None: the classifier decides by the size of the folder."""
    batch_size: int | None = None
    workers: int = 2
    allow_unvalidated: bool = False
    """The user confirmed, this session, running these bundles although their trainer did not find
    them fit for use (`not_validated`).  Never remembered between sessions; a choice of other
    bundles starts without it (`same_bundles`)."""

    def same_bundles(self, other: ModelChoice) -> bool:
        """Whether `other` runs the same bundle folders (in any order): a confirmation carries over."""
        return {Path(d).resolve() for d in self.model_dirs} == {Path(d).resolve() for d in other.model_dirs}

    def unconfirmed(self) -> list[BundleMeta]:
        """Its bundles that their trainer did not find fit for use and that the user has not
        confirmed running; empty when it may run as it is (or is no usable model: the run says why)."""
        if self.allow_unvalidated:
            return []
        try:
            return not_validated([read_meta(d) for d in self.model_dirs])
        except BundleError:
            return []

    def options(self) -> ClassifierOptions:
        """The engine's options for this choice (the same names `bcc classify` uses)."""
        # Static int8 where `bcc classify` takes it: the network runs in the classifier process,
        # whose hold on its own GIL cannot freeze the window.
        return ClassifierOptions(device=self.device, tta=self.tta, review_threshold=self.review_threshold,
                                 slide_consensus=self.slide_consensus,
                                 batch_size=self.batch_size, workers=self.workers, compile=self.compile,
                                 allow_unvalidated=self.allow_unvalidated)


def not_validated(metas: list[BundleMeta]) -> list[BundleMeta]:
    """The bundles whose trainer found them not fit for use (a bundle from before verdicts is not one)."""
    return [m for m in metas if m.verdict is not None and not m.verdict.fit_for_use]


def unvalidated_question(metas: list[BundleMeta]) -> str:
    """What the app asks before it runs `metas` (from `not_validated`)."""
    said = " ".join(f"Model {m.name} is not validated: {'; '.join(m.verdict.reasons) or 'no reason recorded'}."
                    for m in metas if m.verdict is not None)
    whose = "Its" if len(metas) == 1 else "Their"
    return f"{said} {whose} labels cannot be trusted. Run it anyway? Every page of its reports will say so."


class ModelStore:
    """Thread-safe cache: bundles by folder, the current classifier, Grad-CAM copies."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._bundles: dict[Path, tuple[tuple, Bundle]] = {}
        self._classifier: Classifier | None = None
        self._classifier_key: tuple | None = None
        self._cam: dict[Path, tuple[tuple, BundleNet]] = {}

    def bundle(self, folder: Path) -> Bundle:
        """The loaded bundle in `folder` (raises BundleError with a one-line reason)."""
        folder = Path(folder).resolve()
        with self._lock:
            stamp = bundle_fingerprint(folder)
            cached = self._bundles.get(folder)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            from bcc_desk.bundle import load_bundle  # torch: only the watch and Grad-CAM get here

            bundle = load_bundle(folder)
            self._bundles[folder] = (stamp, bundle)
            return bundle

    def classifier(self, choice: ModelChoice):
        """A `Classifier` for `choice`, reused while the choice (and the bundles) stay the same."""
        # torch-heavy; only worker threads get here
        with self._lock:
            bundles = [self.bundle(d) for d in choice.model_dirs]
            key = (choice, tuple(id(b) for b in bundles))
            if self._classifier is None or self._classifier_key != key:
                self._classifier = choice.options().build(bundles)
                self._classifier_key = key
            return self._classifier

    def cam_model(self, folder: Path) -> tuple[BundleNet, InputSpec, list[str]]:
        """A private copy of a bundle's network for Grad-CAM.

        Grad-CAM hooks the network and runs a backward pass; on the classifier's own copy the
        hooks would also fire inside a running classification on another thread."""
        folder = Path(folder).resolve()
        with self._lock:
            bundle = self.bundle(folder)
            stamp = bundle_fingerprint(folder)
            cached = self._cam.get(folder)
            if cached is None or cached[0] != stamp:
                net = copy.deepcopy(bundle.model).float().eval()
                for p in net.parameters():
                    p.requires_grad_(True)
                self._cam[folder] = (stamp, net)
            return self._cam[folder][1], bundle.meta.input, list(bundle.labels)
