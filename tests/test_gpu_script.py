"""tools/gpu/gpu.py on a CPU, as a GPU session uses it: pack -> run --dry-run -> join, and join's refusals.

About a minute of CPU: a tiny real fit (convnext_atto at 64 px, one epoch), its evaluation and
`bcc classify`, each as the subprocess the GPU machine runs."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bcc_desk.bundle import load_bundle

from conftest import CLASSES, OOD_DEV, REPO
from folders import class_subset

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m 'not slow'` leaves this module out

GPU = REPO / "tools" / "gpu" / "gpu.py"
MiB = 1 << 20


def script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=500)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def session(tmp_path_factory, all4: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    data = class_subset(root / "all4-small", all4, CLASSES, slice(0, 72, 6))
    pack, out, joined = root / "pack", root / "out", root / "joined"
    r = script("pack", "--data", data, "--ood", OOD_DEV, "--dest", pack)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = script("run", "--dry-run", "--pack", pack, "--out", out, "--work", root / "work",
               "--fit-args=--channels hue-free")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "| fit | ok (the bundle is not validated) |" in r.stdout  # figures.md is printed at the end
    r = script("join", out, "--dest", joined)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "verified" in r.stdout
    return {"data": data, "pack": pack, "out": out, "joined": joined}


def test_pack_ships_train_and_val_but_no_test_image(session: dict[str, Path]) -> None:
    pack = session["pack"]
    full = split_rows(pack / "split-full.csv")
    packed = split_rows(pack / "split.csv")
    assert {r["split"] for r in full} == {"train", "val", "test"} and len(full) == 4 * 12
    assert packed == [r for r in full if r["split"] != "test"]
    shipped = sorted(p.relative_to(pack / "data").as_posix() for p in (pack / "data").rglob("*") if p.is_file())
    assert shipped == sorted(r["path"] for r in packed)
    for rel in shipped:  # byte for byte
        assert (pack / "data" / rel).read_bytes() == (session["data"] / rel).read_bytes()
    assert len(list((pack / "ood").iterdir())) == len(list(OOD_DEV.iterdir()))
    info = json.loads((pack / "pack.json").read_text())
    assert info["images"] == len(packed) and len(info["split_full_sha256"]) == 64


def test_outputs_fit_what_the_device_sends_back(session: dict[str, Path]) -> None:
    out = session["out"]
    files = sorted(out.rglob("*"))
    assert all(p.is_file() for p in files), "no sub-folders"
    assert len(files) <= 8 and sum(p.stat().st_size for p in files) <= 64 * MiB
    assert all(p.stat().st_size <= 16 * MiB for p in files)
    parts = sorted(out.glob("model.safetensors.part*"))
    assert len(parts) >= 2, "the dry run splits the weights into several parts"
    assert [p.name for p in parts] == [f"model.safetensors.part{i:02d}" for i in range(len(parts))]
    assert all(p.stat().st_size <= 3 * MiB for p in parts)
    assert {p.name for p in files} - {p.name for p in parts} == {
        "manifest.json", "bundle.json", "results.tar.gz", "figures.md"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["parts"]] == [p.name for p in parts]
    assert all(sha256(out / p["name"]) == p["sha256"] for p in manifest["parts"])


def test_join_rebuilds_a_bundle_that_load_bundle_accepts(session: dict[str, Path]) -> None:
    joined = session["joined"]
    weights = joined / "bundle" / "model.safetensors"
    meta = json.loads((joined / "bundle" / "bundle.json").read_text())
    assert sha256(weights) == meta["weights_sha256"]
    bundle = load_bundle(joined / "bundle")
    assert bundle.meta.arch == "convnext_atto" and bundle.meta.classes == CLASSES
    assert bundle.meta.provenance["recipe"]["recipe"] == "gpu"
    assert bundle.meta.input.channels == "hue-free"  # --fit-args reached bcc-train fit
    # The small files came back in results.tar.gz and are unpacked beside the bundle.
    assert len(split_rows(joined / "history.csv")) == 1
    metrics = json.loads((joined / "metrics.json").read_text())
    assert metrics["part"] == "val" and metrics["n"] == sum(1 for r in split_rows(session["pack"] / "split.csv")
                                                              if r["split"] == "val")
    assert (joined / "fit.log").is_file() and (joined / "gpu.log").is_file()


def test_figures_name_every_steps_outcome(session: dict[str, Path]) -> None:
    text = (session["out"] / "figures.md").read_text()
    assert (session["joined"] / "figures.md").read_text() == text
    # The dry run's model (a few images, one epoch) is written and judged not fit for use (#37).
    expected = {"install": "skipped (dry run)", "environment": "ok", "tests": "ok", "fit": "ok (the bundle is not validated)",
                "evaluate": "ok",
                "classify-w2": "ok", "export": "ok", "results": "ok", "outputs": "ok"}
    for step, outcome in expected.items():
        assert f"| {step} | {outcome} |" in text, step
    assert "images/s" in text and "macro-F1" in text and "dry run" in text


@pytest.mark.parametrize("damage", ["corrupt part", "missing part", "foreign bundle.json"])
def test_join_refuses_a_damaged_output_in_one_line(session: dict[str, Path], tmp_path: Path, damage: str) -> None:
    out = tmp_path / "out"
    shutil.copytree(session["out"], out)
    if damage == "corrupt part":
        part = out / "model.safetensors.part01"
        data = bytearray(part.read_bytes())
        data[1000] ^= 0xFF
        part.write_bytes(bytes(data))
    elif damage == "missing part":
        (out / "model.safetensors.part01").unlink()
    else:
        meta = json.loads((out / "bundle.json").read_text())
        meta["weights_sha256"] = "0" * 64
        (out / "bundle.json").write_text(json.dumps(meta))
    r = script("join", out, "--dest", tmp_path / "joined")
    message = r.stderr.strip()
    assert r.returncode == 1 and "\n" not in message and message.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "joined" / "bundle").exists()
    if damage != "foreign bundle.json":
        assert "model.safetensors.part01" in message
        assert ("sha256" if damage == "corrupt part" else "missing") in message


def test_parts_rejoin_for_any_size_against_the_part_size(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU)
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # dataclasses look their module up there
    try:
        spec.loader.exec_module(gpu)
    finally:
        del sys.modules[spec.name]
    for size in (1, 4096, 4097, 10_000):
        src = tmp_path / str(size) / "model.safetensors"
        src.parent.mkdir()
        src.write_bytes(bytes(i % 251 for i in range(size)))
        out = tmp_path / str(size) / "out"
        out.mkdir()
        manifest = gpu.split_file(src, out, 4096)
        assert len(manifest["parts"]) == -(-size // 4096) and manifest["sha256"] == sha256(src)
        gpu.join_parts(out, manifest, tmp_path / str(size) / "joined")
        assert (tmp_path / str(size) / "joined").read_bytes() == src.read_bytes()
