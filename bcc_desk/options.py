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
    allow_unvalidated: bool = False
    """Run a bundle its trainer did not find fit for use (`BundleMeta.verdict`); its reports say so."""

    def build(self, bundles: Bundle | Sequence[Bundle]) -> Classifier:
        """The Classifier of `bundles`.  Raises BundleError for a bundle that is not validated,
        unless `allow_unvalidated`; ValueError for options the bundles or the machine refuse."""
        from bcc_desk.classifier import Classifier  # torch: only where a network runs

        refuse_unvalidated(list(bundles) if isinstance(bundles, Sequence) else [bundles], self.allow_unvalidated)
        settings = asdict(self)
        del settings["allow_unvalidated"]
        return Classifier(bundles, **settings)

    def for_single_images(self) -> ClassifierOptions:
        """The same numerics uncompiled, for calls of one or two images (a daemon's trickle):
        a compiled network costs a whole batch per call, and int8 runs compiled only."""
        return replace(self, compile=False, precision="auto" if self.precision == "int8" else self.precision)


def refuse_unvalidated(bundles: Sequence[Bundle], allow: bool) -> None:
    """BundleError naming the first bundle whose trainer found it not fit for use, and why,
    unless `allow` (a bundle from before verdicts runs, its reports saying so)."""
    from bcc_desk.bundle_meta import BundleError

    for bundle in bundles:
        verdict = bundle.meta.verdict
        if verdict is not None and not verdict.fit_for_use and not allow:
            raise BundleError(f"model {bundle.meta.name} is not validated ({'; '.join(verdict.reasons)}): its labels cannot "
                              "be trusted; run it only knowingly, with --allow-unvalidated")
