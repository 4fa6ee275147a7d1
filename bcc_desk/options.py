"""How to run the bundles, as every front end states it: `bcc classify`'s and `bcc watch`'s
options, the app's model choice.  No torch here: the desktop app builds these in a process that
never loads a network, and its classifier process builds the `Classifier` from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bcc_desk.bundle import Bundle
    from bcc_desk.classifier import Classifier


@dataclass(frozen=True)
class ClassifierOptions:
    """How to run the bundles, as every front end states it (`bcc classify`'s and `bcc watch`'s
    options, the app's model choice): one set of names, one `build`."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    tta: bool = False
    review_threshold: float | None = None
    slide_consensus: bool = True
    """Flag an image whose label differs from most of its slide's (a folder is one slide)."""
    workers: int = 2
    compile: bool | None = None
    """None: by the size of each call (COMPILE_MIN_IMAGES)."""

    def build(self, bundles: Bundle | Sequence[Bundle]) -> Classifier:
        from bcc_desk.classifier import Classifier  # torch: only where a network runs

        return Classifier(bundles, **asdict(self))

    def for_single_images(self) -> ClassifierOptions:
        """The same numerics uncompiled, for calls of one or two images (a daemon's trickle):
        a compiled network costs a whole batch per call, and int8 runs compiled only."""
        return replace(self, compile=False, precision="auto" if self.precision == "int8" else self.precision)
