"""Static int8 on the CPU: calibration stored in the bundle, verified, and close to fp32."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from bundles import CLASSES, make_bundle

from bcc_desk.bundle import (
    CALIBRATION_FILE,
    BundleError,
    load_bundle,
    load_int8_calibration,
    save_int8_calibration,
)
from bcc_desk.classifier import Classifier, make_transform
from bcc_desk.images import open_image


@pytest.fixture(scope="module")
def images(real_images) -> list[Path]:
    return [p for c in CLASSES for p in real_images[c]]


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, images: list[Path]) -> Path:
    folder = make_bundle(tmp_path_factory.mktemp("m") / "atto", hidden=[32], ood_threshold=1e9)
    transform = make_transform(load_bundle(folder).meta.input)
    calibration = torch.stack([transform(open_image(p)) for p in images[::2]])
    save_int8_calibration(folder, calibration, {"passed": True})
    return folder


def test_calibration_is_stored_hashed_and_verified(int8_bundle: Path, tmp_path: Path) -> None:
    calibration = load_int8_calibration(load_bundle(int8_bundle))
    assert calibration.dtype == torch.uint8 and tuple(calibration.shape) == (12, 3, 64, 64)
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    data = bytearray((tampered / CALIBRATION_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tampered / CALIBRATION_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its bundle"):
        load_int8_calibration(load_bundle(tampered))
    with pytest.raises(BundleError, match="uint8"):
        save_int8_calibration(tampered, torch.zeros(4, 3, 64, 64), {})


def test_int8_stays_close_to_fp32_on_real_images(int8_bundle: Path, images: list[Path]) -> None:
    root = images[0].parents[1]
    reference = list(Classifier(load_bundle(int8_bundle), precision="fp32", compile=False).predict_paths(images, root))
    clf = Classifier(load_bundle(int8_bundle), precision="int8")
    quantized = list(clf.predict_paths(images, root))
    assert clf.int8_active and "int8" in clf.device_label
    assert [q.file for q in quantized] == [r.file for r in reference]
    for r, q in zip(reference, quantized):
        assert q.ok and abs(q.confidence - r.confidence) < 0.1, (r.file, r.probabilities, q.probabilities)
        assert q.ood_score is not None
    agree = sum(r.label == q.label for r, q in zip(reference, quantized))
    assert agree >= 0.9 * len(images)


def test_int8_is_refused_without_a_calibration(tmp_path: Path) -> None:
    plain = make_bundle(tmp_path / "plain")
    with pytest.raises(BundleError, match="bcc-train int8"):
        Classifier(load_bundle(plain), precision="int8")
    with pytest.raises(ValueError, match="int8 runs on x86 CPUs"):
        Classifier(load_bundle(plain), precision="int8", device="meta")


def test_auto_stays_bf16_and_int8_needs_compilation(int8_bundle: Path, images: list[Path]) -> None:
    """int8 is opt-in: a calibrated bundle still runs bf16/fp32 under 'auto', compiled or not."""
    clf = Classifier(load_bundle(int8_bundle), compile=True)
    assert all(p.ok for p in clf.predict_paths(images[:4], images[0].parents[1]))
    assert not clf.int8_active and "int8" not in clf.device_label
    with pytest.raises(ValueError, match="no-compile"):
        Classifier(load_bundle(int8_bundle), precision="int8", compile=False)


def test_bcc_classify_int8_without_calibration_is_a_one_line_usage_error(tmp_path: Path, images: list[Path]) -> None:
    from typer.testing import CliRunner

    from bcc_desk.cli import app

    plain = make_bundle(tmp_path / "plain")
    r = CliRunner().invoke(app, ["classify", str(images[0].parent), "--model", str(plain), "--precision", "int8",
                                 "--out", str(tmp_path / "r.xlsx")])
    assert r.exit_code == 2 and "bcc-train int8" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r.xlsx").exists()
