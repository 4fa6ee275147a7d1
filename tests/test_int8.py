"""Static int8 on the CPU: calibration stored in the bundle, verified, and close to fp32."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openpyxl
import pytest
import torch

from bcc_desk.bundle import (
    CALIBRATION_FILE,
    BundleError,
    load_bundle,
    load_int8_calibration,
    save_int8_calibration,
)
from bcc_desk.classifier import COMPILE_MIN_IMAGES, Classifier
from bcc_desk.images import open_image
from bcc_desk.options import ClassifierOptions
from bcc_desk.preprocess import make_transform

from bundles import CLASSES, make_bundle


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


@pytest.fixture(scope="module")
def kept_cache(int8_bundle: Path, images: list[Path], tmp_path_factory) -> Path:
    """An int8 cache holding `int8_bundle`'s package, built once (half a minute on 2 cores): the
    tests that damage it copy it."""
    cache = tmp_path_factory.mktemp("kept") / "int8"
    clf = Classifier(load_bundle(int8_bundle), precision="int8", int8_cache=cache)
    assert all(p.ok for p in clf.predict_paths(images[:2], images[0].parents[1])) and clf.int8_active
    return cache


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


@pytest.mark.slow
def test_int8_stays_close_to_fp32_on_real_images(int8_bundle: Path, images: list[Path], kept_cache: Path) -> None:
    root = images[0].parents[1]
    reference = list(Classifier(load_bundle(int8_bundle), precision="fp32", compile=False).predict_paths(images, root))
    clf = Classifier(load_bundle(int8_bundle), precision="int8", int8_cache=kept_cache)
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


@pytest.mark.slow
def test_auto_takes_int8_only_when_compiling_a_calibrated_bundle(int8_bundle: Path, images: list[Path],
                                                                 kept_cache: Path, tmp_path: Path) -> None:
    root = images[0].parents[1]
    compiled = Classifier(load_bundle(int8_bundle), compile=True, int8_cache=kept_cache)
    assert all(p.ok for p in compiled.predict_paths(images[:4], root))
    assert compiled.int8_active and "int8" in compiled.device_label
    eager = Classifier(load_bundle(int8_bundle), compile=False)
    assert all(p.ok for p in eager.predict_paths(images[:4], root))
    assert not eager.int8_active and "int8" not in eager.device_label
    plain = Classifier(load_bundle(make_bundle(tmp_path / "plain")), compile=True)  # no trainer check: no int8
    assert all(p.ok for p in plain.predict_paths(images[:4], root)) and not plain.int8_active
    with pytest.raises(ValueError, match="no-compile"):
        Classifier(load_bundle(int8_bundle), precision="int8", compile=False)


@pytest.mark.slow
def test_auto_never_takes_int8_whose_check_did_not_pass(int8_bundle: Path, images: list[Path], tmp_path: Path) -> None:
    """A check killed midway (or one that failed) leaves `passed: false`: 'auto' must not use it;
    `--precision int8` still may (the trainer's own check runs that way)."""
    unchecked = shutil.copytree(int8_bundle, tmp_path / "unchecked")
    calibration = load_int8_calibration(load_bundle(unchecked))
    save_int8_calibration(unchecked, calibration, {"passed": False})
    root = images[0].parents[1]
    auto = Classifier(load_bundle(unchecked), compile=True, int8_cache=tmp_path / "cache")
    assert all(p.ok for p in auto.predict_paths(images[:4], root))
    assert not auto.int8_active and "int8" not in auto.device_label
    assert Classifier(load_bundle(unchecked), precision="int8", int8_cache=tmp_path / "cache").int8


@pytest.mark.slow
def test_the_compiled_package_is_kept_verified_and_rebuilt_when_damaged(
    int8_bundle: Path, images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The slow build happens once per model and computer; a damaged package is never loaded."""
    root, cache = images[0].parents[1], tmp_path / "cache"

    def run() -> list[tuple[dict[str, float], float | None]]:
        bundle = load_bundle(int8_bundle, build=False)  # as `bcc classify` loads it
        clf = Classifier(bundle, precision="int8", int8_cache=cache)
        preds = list(clf.predict_paths(images, root))
        assert clf.int8_active
        runs.append(bundle.model_built)
        return [(p.probabilities, p.ood_score) for p in preds]

    runs: list[bool] = []
    with caplog.at_level(logging.INFO, logger="bcc_desk.quantize"):
        built = run()
        assert "preparing int8" in caplog.text
        [package] = cache.glob("*.pt2")
        caplog.clear()
        assert run() == built and "preparing int8" not in caplog.text  # loaded, not rebuilt
        # The kept package holds the whole network: the eager one (timm, seconds) is never built.
        assert runs == [True, False]
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))
        caplog.clear()
        assert run() == built
    assert "unusable" in caplog.text and "preparing int8" in caplog.text
    assert list(cache.glob("*.pt2")) == [package] and not list(cache.glob(".building-*"))


def test_bcc_classify_int8_without_calibration_is_a_one_line_usage_error(tmp_path: Path, images: list[Path]) -> None:
    from typer.testing import CliRunner

    from bcc_desk.cli import app

    plain = make_bundle(tmp_path / "plain")
    r = CliRunner().invoke(app, ["classify", str(images[0].parent), "--model", str(plain), "--precision", "int8",
                                 "--out", str(tmp_path / "r.xlsx")])
    assert r.exit_code == 2 and "bcc-train int8" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r.xlsx").exists()


@pytest.mark.slow
def test_a_failed_int8_build_falls_back_to_bf16_with_its_reason(
    int8_bundle: Path, images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The package is built in a child process; what stops it reaches the user in one line."""
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    data = bytearray((tampered / CALIBRATION_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tampered / CALIBRATION_FILE).write_bytes(bytes(data))
    clf = Classifier(load_bundle(tampered), precision="int8", int8_cache=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="bcc_desk.classifier"):
        preds = list(clf.predict_paths(images[:3], images[0].parents[1]))
    assert all(p.ok for p in preds) and not clf.int8_active and "int8" not in clf.device_label
    assert "does not match its bundle" in caplog.text and "Traceback" not in caplog.text
    assert not list((tmp_path / "cache").glob("*.pt2"))


def test_the_desktop_app_takes_int8_where_bcc_classify_does(int8_bundle: Path, tmp_path: Path) -> None:
    """The app classifies in its own process (bcc_desk.classify_process), where the int8
    package's hold on the GIL cannot freeze the window: its remembered model and options ask
    for what `bcc classify` would run."""
    from PySide6.QtCore import QSettings

    from bcc_desk.gui.settings import AppSettings

    remembered = AppSettings(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)).run_spec([int8_bundle])
    app = remembered.with_options(compile=True).build()
    cli = ClassifierOptions(compile=True).build(load_bundle(int8_bundle))
    assert app.int8 and cli.int8 and app.autocast_dtype == cli.autocast_dtype


@pytest.mark.slow
def test_a_kept_package_that_fails_and_cannot_be_rebuilt_still_classifies(
    int8_bundle: Path, kept_cache: Path, images: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that planned on the kept package (and did not build the eager network) falls back
    to bf16 when the package turns out damaged and the rebuild fails."""
    copy, cache, root = tmp_path / "copy", tmp_path / "cache", images[0].parents[1]
    shutil.copytree(int8_bundle, copy)
    reference = list(Classifier(load_bundle(copy), compile=False).predict_paths(images, root))
    shutil.copytree(kept_cache, cache)  # the same files, so the same package
    [package] = cache.glob("*.pt2")
    package.write_bytes(package.read_bytes()[:-100])  # damaged ...
    data = bytearray((copy / CALIBRATION_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / CALIBRATION_FILE).write_bytes(bytes(data))  # ... and no rebuild possible
    bundle = load_bundle(copy, build=False)
    clf = Classifier(bundle, int8_cache=cache, compile=True)
    assert not bundle.model_built
    with caplog.at_level(logging.INFO):
        preds = list(clf.predict_paths(images, root))
    assert not clf.int8_active and bundle.model_built and "does not match its bundle" in caplog.text
    assert all(p.ok and p.ood_score is not None for p in preds)
    assert sum(p.label == r.label for p, r in zip(preds, reference)) >= 0.9 * len(images)  # bf16, compiled


@pytest.mark.slow
def test_bcc_classify_on_a_kept_package_ends_with_its_report_summary_and_exit_code(
    int8_bundle: Path, kept_cache: Path, images: list[Path], tmp_path: Path
) -> None:
    """The lab's usual run, in a fresh process: the kept package is loaded (no compiler at all),
    and once the report is written the process skips Python's teardown (a second on 2 cores).
    The exit code, the closing lines and the report must all still come out."""
    home = tmp_path / "data"
    shutil.copytree(kept_cache, home / "bcc-desk" / "int8")
    env = {**os.environ, "XDG_DATA_HOME": str(home)}
    slide = tmp_path / "root" / "slide-1"
    slide.mkdir(parents=True)
    for p in images[:6]:
        shutil.copy(p, slide / p.name)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"")

    def classify(folder: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bcc_desk", "classify", str(folder), "-m", str(int8_bundle),
             "--precision", "int8", "-o", str(out)],
            capture_output=True, text=True, timeout=300, env=env,
        )

    proc = classify(slide.parent, tmp_path / "r.xlsx")
    assert proc.returncode == 0, proc.stderr
    assert "slide-1" in proc.stdout and "6 of 6 images classified" in proc.stdout
    assert "preparing int8" not in proc.stderr  # the kept package, not a rebuild
    wb = openpyxl.load_workbook(tmp_path / "r.xlsx")
    assert wb["Images"].max_row == 7 and "int8" in str([c.value for row in wb["Run"].iter_rows() for c in row])
    proc = classify(junk, tmp_path / "j.xlsx")
    assert proc.returncode == 1 and "no image could be classified" in proc.stderr
    assert "0 of 1 images classified" in proc.stdout and (tmp_path / "j.xlsx").is_file()


@pytest.mark.slow
def test_a_small_run_never_builds_int8_but_takes_a_kept_package(
    int8_bundle: Path, images: list[Path], kept_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A first run on 12 images must take seconds: building int8 (half a minute) is for large runs."""
    root, empty = images[0].parents[1], tmp_path / "empty"
    with caplog.at_level(logging.INFO, logger="bcc_desk"):
        small = Classifier(load_bundle(int8_bundle), int8_cache=empty)  # precision and compile: auto
        assert small.preparation(len(images)) is None
        assert all(p.ok for p in small.predict_paths(images, root))
    assert not small.compiled and not small.int8_active and "int8" not in small.device_label
    assert "preparing int8" not in caplog.text and not (empty.exists() and any(empty.iterdir()))
    # A large run says what it prepares before its first batch.
    assert "preparing int8" in Classifier(load_bundle(int8_bundle), int8_cache=empty).preparation(COMPILE_MIN_IMAGES)
    # Once a package is kept on this computer, even a small run loads it.
    kept = shutil.copytree(kept_cache, tmp_path / "kept")
    fast = Classifier(load_bundle(int8_bundle, build=False), int8_cache=kept)
    assert fast.preparation(3) is None
    assert all(p.ok for p in fast.predict_paths(images[:3], root)) and fast.int8_active


@pytest.mark.slow
def test_without_a_compiler_runs_go_eager_at_once_with_one_complete_warning(
    int8_bundle: Path, images: list[Path], tmp_path: Path
) -> None:
    """A lab PC without a C++ compiler (here: hidden from PATH): `bcc classify --compile` runs
    eager at once, says why and how to get the faster path in one warning, and never tries."""
    folder = tmp_path / "slide"
    folder.mkdir()
    for p in images[:4]:
        shutil.copy(p, folder / p.name)
    (tmp_path / "bin").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    # A computer of its own: no int8 package kept from other tests (one would run without a compiler).
    env.update(PATH=str(tmp_path / "bin"), COLUMNS="300", XDG_DATA_HOME=str(tmp_path / "home"))
    for _ in range(2):  # the second run is the same: nothing tried, nothing built
        proc = subprocess.run([sys.executable, "-m", "bcc_desk", "classify", str(folder), "-m", str(int8_bundle),
                               "--compile", "--precision", "auto"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        warnings = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln]
        assert len(warnings) == 1, proc.stderr
        assert "running uncompiled and without int8: no C++ compiler was found (g++)" in warnings[0]
        assert "apt install g++" in warnings[0] and "Visual Studio Build Tools" in warnings[0], warnings[0]
        assert "Traceback" not in proc.stderr and "preparing int8" not in proc.stderr
        assert "4 of 4 images classified" in proc.stdout


@pytest.mark.slow
def test_a_kept_package_is_never_run_for_a_bundle_json_that_declares_another_network(
    int8_bundle: Path, kept_cache: Path, images: list[Path], tmp_path: Path
) -> None:
    """Hostile input (issue #39): bundle.json edited to declare 3 classes against the weights' 4
    outputs once ran the kept package (labels under wrong names, a class's probability dropped).
    Now the package's key covers what bundle.json declares: the edit misses the cache, and the
    network built from the weights refuses the bundle."""
    import json

    edited = shutil.copytree(int8_bundle, tmp_path / "three")
    data = json.loads((edited / "bundle.json").read_text())
    data["classes"] = data["classes"][:3]
    data["display_names"] = data.get("display_names", [])[:3] if data.get("display_names") else []
    (edited / "bundle.json").write_text(json.dumps(data))
    cache = shutil.copytree(kept_cache, tmp_path / "cache")
    root = images[0].parents[1]
    with pytest.raises(BundleError, match="does not fit the declared"):
        list(Classifier(load_bundle(edited, build=False), compile=True, int8_cache=cache).predict_paths(images, root))


@pytest.mark.slow
def test_a_package_planted_under_another_bundles_key_is_refused_by_its_outputs(
    int8_bundle: Path, kept_cache: Path, images: list[Path], tmp_path: Path
) -> None:
    """The cache's file names are hashes anyone can copy a package under: one planted under the
    key of a bundle.json that declares 3 classes still labels nothing.  Its outputs are checked
    against what the bundle declares (4 against 3), and the run stops with one line."""
    import json

    from bcc_desk.quantize import _package_path, _sidecar

    edited = shutil.copytree(int8_bundle, tmp_path / "three")
    data = json.loads((edited / "bundle.json").read_text())
    data["classes"] = data["classes"][:3]
    data["display_names"] = data.get("display_names", [])[:3] if data.get("display_names") else []
    data["ood"] = None  # no statistics to read from the weights: nothing but the package would run
    (edited / "bundle.json").write_text(json.dumps(data))
    bundle, cache = load_bundle(edited, build=False), tmp_path / "cache"
    cache.mkdir()
    usual = Classifier(load_bundle(int8_bundle, build=False), compile=True, int8_cache=kept_cache)  # its batch, numerics
    [package] = kept_cache.glob("*.pt2")
    planted = _package_path(bundle, usual.batch_size, usual.autocast_dtype, cache)
    shutil.copy(package, planted)
    shutil.copy(_sidecar(package), _sidecar(planted))
    clf = Classifier(bundle, compile=True, int8_cache=cache)  # finds the planted package: builds nothing
    assert not bundle.model_built
    with pytest.raises(BundleError, match="its network gives 4 outputs for the 3 classes bundle.json declares"):
        list(clf.predict_paths(images, images[0].parents[1]))
