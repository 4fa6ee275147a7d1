"""The colour check: are an image's colours like those the model was trained on?

This data set's classes were photographed under their own conditions (a field's background
colour alone names 92.7% of validation images: `bench/colour_baseline.py`), and a network trained
from scratch learns some of that.  Another lab's stain batch, lamp or white balance then moves
every field of a slide at once, and the feature-space check (`OODSpec`) can miss it: a network
that reads colour on few directions sees a colour shift as just another class.  So every image is
also compared, by a handful of explainable colour statistics, with the training set's: the
balance of optical density between the channels (the stain), the colour shares of the brightest
quarter (the background: lamp and white balance) and of the darkest tenth (the nuclei: the
stain's hue), and the mean saturation (a greyscale or washed-out camera).

Each class's training images form one cluster (its own acquisition), so an image's distance is
the Mahalanobis distance to the nearest class's cluster, in statistics standardised over the whole
training set.  The bundle stores the clusters and the cut-off (`ColourSpec`); `bcc-train` fits
them on the training images and chooses the cut-off on validation (`trainer/colour_check.py`).
Plain numpy, no torch: the desktop app's window shows a bundle's profile without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bcc_desk.prediction import Prediction

FEATURES = (
    "red share of OD", "green share of OD",
    "background red share", "background green share",
    "nuclei red share", "nuclei green share", "saturation",
)
"""What `colour_features` measures, in order (shares of a colour's sum, saturation 0..1)."""


def colour_features(image: np.ndarray) -> np.ndarray:
    """uint8 image, (3, h, w) as the network's input or (h, w, 3) as Pillow gives -> FEATURES.

    Mostly shares of a colour, not its level: a dimmer lamp or a shorter exposure (which the
    network handles) hardly moves the background's and nuclei's shares (the stain's balance in
    optical density does move: dimming adds the same density to every channel); another stain,
    white balance or hue moves them all."""
    rgb = np.asarray(image)
    if rgb.ndim != 3:
        raise ValueError(f"a colour image has three dimensions, not {rgb.ndim}")
    if rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    # float64: the sums must not depend on how the caller's array lies in memory (the trainer's
    # and the classifier's tensors are laid out differently and must give the same statistics).
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    od = -np.log((pixels + 1) / 256).mean(0)  # optical density per channel: what the stains absorb
    grey = pixels.sum(1)
    order = np.argsort(grey)
    tenth, quarter = max(1, len(order) // 10), max(1, len(order) // 4)
    nuclei = pixels[order[:tenth]].mean(0)
    background = pixels[order[-quarter:]].mean(0)
    top = pixels.max(1)
    saturation = float(((top - pixels.min(1)) / np.maximum(top, 1.0)).mean())
    return np.array([*_shares(od)[:2], *_shares(background)[:2], *_shares(nuclei)[:2], saturation], dtype=np.float64)


def _shares(rgb: np.ndarray) -> np.ndarray:
    total = float(rgb.sum())
    return rgb / total if total > 1e-6 else np.full(3, 1 / 3)


@dataclass
class ColourSpec:
    """The training set's colour profile and the check's cut-off, as `bundle.json` holds it.

    `centre`/`scale`: each statistic's mean and spread over the training images (what `bcc info`
    shows); `means`/`precisions`: each class's cluster in those standardised units; `threshold`:
    the distance above which an image is flagged."""

    threshold: float
    centre: list[float]
    scale: list[float]
    means: list[list[float]]
    precisions: list[list[list[float]]]
    features: list[str] = field(default_factory=lambda: list(FEATURES))

    def __post_init__(self) -> None:
        d = len(self.features)
        if list(self.features) != list(FEATURES):
            raise ValueError(f"colour.features must be {list(FEATURES)}")
        # A NaN anywhere would make every distance NaN, and NaN > 1 never flags: refused here.
        if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in (self.centre, self.scale, self.means,
                                                                             self.precisions)):
            raise ValueError("colour: every number of the profile must be finite")
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"colour.threshold must be a positive number, got {self.threshold}")
        if len(self.centre) != d or len(self.scale) != d or not all(s > 0 for s in self.scale):
            raise ValueError(f"colour.centre and colour.scale must hold {d} numbers, the scales positive")
        if not self.means or any(len(m) != d for m in self.means) or len(self.precisions) != len(self.means) \
                or any(np.shape(p) != (d, d) for p in self.precisions):
            raise ValueError(f"colour.means and colour.precisions must hold one {d}-vector and one {d}x{d} matrix per class")

    @classmethod
    def from_json(cls, data: Any) -> ColourSpec:
        if not isinstance(data, dict):
            raise ValueError("colour must be an object")
        return cls(threshold=float(data["threshold"]), centre=[float(v) for v in data["centre"]],
                   scale=[float(v) for v in data["scale"]], means=[[float(v) for v in m] for m in data["means"]],
                   precisions=[[[float(v) for v in row] for row in p] for p in data["precisions"]],
                   features=[str(f) for f in data.get("features", FEATURES)])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(n, d) statistics -> (n,) distance to the nearest class's cluster (in its spreads)."""
        z = (np.atleast_2d(features) - np.asarray(self.centre)) / np.asarray(self.scale)
        per_class = [np.einsum("nd,de,ne->n", z - m, p, z - m) for m, p in
                     zip(np.asarray(self.means), np.asarray(self.precisions))]
        return np.sqrt(np.maximum(np.min(per_class, axis=0), 0.0))

    def ratio(self, features: np.ndarray) -> float:
        """One image's distance over the cut-off: above 1, its colours are unlike training."""
        return float(self.distances(features)[0] / self.threshold)

    def describe(self) -> str:
        """The training colour profile in words (`bcc info`, the model dialog)."""
        c, s = self.centre, self.scale
        rgb = lambda i: f"R/G/B {c[i]:.3f}/{c[i + 1]:.3f}/{1 - c[i] - c[i + 1]:.3f}"  # noqa: E731
        return (f"stain (OD shares) {rgb(0)}, background {rgb(2)}, nuclei {rgb(4)}, saturation {c[6]:.2f} "
                f"\u00b1 {s[6]:.2f}; an image is flagged beyond {self.threshold:.2f} of its class's spreads")


def fit_colour_profile(features: np.ndarray, labels: np.ndarray, n_classes: int, threshold: float = 1.0) -> ColourSpec:
    """Each class's cluster of training statistics (a little shrinkage keeps a class whose images
    all share one setting from flagging any change in it); the cut-off is set afterwards."""
    features = np.asarray(features, dtype=np.float64)
    centre = features.mean(0)
    scale = features.std(0) + 1e-6
    z = (features - centre) / scale
    means, precisions = [], []
    for k in range(n_classes):
        zk = z[np.asarray(labels) == k]
        if len(zk) < 2:
            raise ValueError(f"class {k} has {len(zk)} training image(s): too few for a colour profile")
        cov = np.cov(zk, rowvar=False) + 0.05 * np.eye(z.shape[1])
        means.append(zk.mean(0).tolist())
        precisions.append(np.linalg.inv(cov).tolist())
    return ColourSpec(threshold=threshold, centre=centre.tolist(), scale=scale.tolist(), means=means, precisions=precisions)


SITE_SHARE = 0.25
"""When at least this share of a run's classified images fail the colour check, the run (not
just its images) is unlike the training set: `bcc classify` and the app say what to do."""


def colour_advice(predictions: Sequence[Prediction]) -> str | None:
    """What a lab must read after a run whose colours are unlike the training set's (the site's
    first run on another stain or camera), or None.  One text for `bcc classify` and the app."""
    classified = [p for p in predictions if p.error is None]
    unlike = sum(p.colour_score is not None and p.colour_score > 1.0 for p in classified)
    if not classified or unlike < SITE_SHARE * len(classified):
        return None
    return (
        f"{unlike} of {len(classified)} images have colours unlike the slides this model was trained on "
        "(another stain batch or staining time, lamp, or camera white balance). They are flagged for review: do not "
        "take their labels as they are. What to do: check the staining and the camera's white balance against your "
        "protocol; or review these slides in bcc-desk, export the reviews, and fine-tune the model on your own slides "
        "(README, \"Learning from your lab's reviews\")."
    )
