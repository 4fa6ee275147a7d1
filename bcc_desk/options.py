"""What a run classifies with, as every front end states it: `RunSpec` (the bundle folders and
`ClassifierOptions`), from `bcc classify`'s and `bcc watch`'s options, the app's settings and its
model dialog.  No torch here: the desktop app builds these in a process that never loads a
network, and its classifier process builds the `Classifier` from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bcc_desk.bundle_meta import BundleError, BundleMeta, not_validated, read_meta

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


@dataclass(frozen=True)
class RunSpec:
    """The bundle folders (several: an ensemble) and how to run them: the one object the CLI, the
    app's settings, its model dialog, window, Desk and classifier process pass whole.  A new
    option is a `ClassifierOptions` field, its flag and its widget, nothing else."""

    model_dirs: tuple[Path, ...]
    options: ClassifierOptions = field(default_factory=ClassifierOptions)

    def build(self) -> Classifier:
        """Load the bundles and build their Classifier (`ClassifierOptions.build`).  As `bcc
        classify` does: the network is built only if it runs (not for a kept int8 package)."""
        from bcc_desk.bundle import load_bundle  # torch: only where a network runs

        return self.options.build([load_bundle(d, build=False) for d in self.model_dirs])

    def with_options(self, **changes: Any) -> RunSpec:
        return replace(self, options=replace(self.options, **changes))

    def same_bundles(self, other: RunSpec) -> bool:
        """Whether `other` runs the same bundle folders (in any order): a confirmation carries over."""
        return {Path(d).resolve() for d in self.model_dirs} == {Path(d).resolve() for d in other.model_dirs}

    def unconfirmed(self) -> list[BundleMeta]:
        """Its bundles that their trainer did not find fit for use and that the user has not
        confirmed running (`options.allow_unvalidated`); empty when it may run as it is (or is no
        usable model: the run says why)."""
        if self.options.allow_unvalidated:
            return []
        try:
            return not_validated([read_meta(d) for d in self.model_dirs])
        except BundleError:
            return []


def refuse_unvalidated(bundles: Sequence[Bundle], allow: bool) -> None:
    """BundleError naming the first bundle whose trainer found it not fit for use, and why,
    unless `allow` (a bundle from before verdicts runs, its reports saying so)."""
    for bundle in bundles:
        verdict = bundle.meta.verdict
        if verdict is not None and not verdict.fit_for_use and not allow:
            raise BundleError(f"model {bundle.meta.name} is not validated ({'; '.join(verdict.reasons)}): its labels cannot "
                              "be trusted; run it only knowingly, with --allow-unvalidated")
