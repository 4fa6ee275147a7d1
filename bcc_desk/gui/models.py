"""Loaded model bundles for the app's Grad-CAM (the runs and the watch classify in the classifier process).

Loading a bundle (hashing ~60 MB of weights, building the timm network) takes a second or two,
so it happens off the UI thread and only once per bundle: a second Grad-CAM request reuses what
is loaded.  No Qt in here; the threads that call it are Qt's.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from bcc_desk.bundle_meta import BundleMeta, InputSpec, bundle_fingerprint

if TYPE_CHECKING:
    from bcc_desk.bundle import Bundle, BundleNet


def unvalidated_question(metas: list[BundleMeta]) -> str:
    """What the app asks before it runs `metas` (from `not_validated`)."""
    said = " ".join(f"Model {m.name} is not validated: {'; '.join(m.verdict.reasons) or 'no reason recorded'}."
                    for m in metas if m.verdict is not None)
    whose = "Its" if len(metas) == 1 else "Their"
    return f"{said} {whose} labels cannot be trusted. Run it anyway? Every page of its reports will say so."


class ModelStore:
    """Thread-safe cache: bundles by folder, Grad-CAM copies."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._bundles: dict[Path, tuple[tuple, Bundle]] = {}
        self._cam: dict[Path, tuple[tuple, BundleNet]] = {}

    def bundle(self, folder: Path) -> Bundle:
        """The loaded bundle in `folder` (raises BundleError with a one-line reason)."""
        folder = Path(folder).resolve()
        with self._lock:
            stamp = bundle_fingerprint(folder)
            cached = self._bundles.get(folder)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            from bcc_desk.bundle import load_bundle  # torch: only Grad-CAM gets here

            bundle = load_bundle(folder)
            self._bundles[folder] = (stamp, bundle)
            return bundle

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
