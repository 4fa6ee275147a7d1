"""The model bundle: round trips, and a clear refusal for every kind of broken bundle."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bcc_desk.bundle import BundleError, load_bundle, read_meta
from bcc_desk.files import file_sha256

from bundles import CLASSES, make_bundle


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "tiny", hidden=[32], ood_threshold=5.0, temperature=1.7,
                       review_threshold=0.6)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_round_trip_keeps_metadata_and_outputs(saved: Path) -> None:
    bundle = load_bundle(saved)
    meta = bundle.meta
    assert meta.arch == "convnext_atto" and meta.classes == CLASSES
    assert meta.temperature == pytest.approx(1.7) and meta.review_threshold == pytest.approx(0.6)
    assert meta.head.hidden == [32] and meta.ood is not None and meta.ood.threshold == 5.0
    assert meta.weights_sha256 == file_sha256(saved / "model.safetensors")
    assert bundle.model.has_ood and torch.equal(bundle.model.ood_precision, torch.eye(bundle.model.num_features))
    x = torch.randn(2, 3, 64, 64)
    again = load_bundle(saved)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), again.model(x))
        assert bundle.model(x).shape == (2, 4)


def test_fp16_weights_halve_the_file_and_keep_the_outputs(tmp_path: Path) -> None:
    full = make_bundle(tmp_path / "fp32", seed=3)
    half = make_bundle(tmp_path / "fp16", seed=3, dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    assert read_meta(half).weights_dtype == "float16"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b = load_bundle(full).model(x), load_bundle(half).model(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert torch.allclose(a.softmax(1), b.softmax(1), atol=2e-2)


def test_changed_weights_are_refused_by_sha256(saved: Path, tmp_path: Path) -> None:
    b = _copy(saved, tmp_path)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (b / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 .* bundle.json says"):
        load_bundle(b)


def test_missing_parts_are_named(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    b = _copy(saved, tmp_path)
    (b / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="has no model.safetensors"):
        load_bundle(b)
    (b / "bundle.json").unlink()
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(b)


def test_corrupt_or_foreign_metadata(saved: Path, tmp_path: Path) -> None:
    b = _copy(saved, tmp_path)
    (b / "bundle.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    with pytest.raises(BundleError, match="not a bcc model bundle"):
        load_bundle(b)
    meta = json.loads((saved / "bundle.json").read_text())
    (b / "bundle.json").write_text(json.dumps({**meta, "format_version": 99}), encoding="utf-8")
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "temperature": -1}), encoding="utf-8")
    with pytest.raises(BundleError, match="temperature must be positive"):
        load_bundle(b)
    size = meta["input"]["size"]  # a member may be smaller than the ensemble's input, never larger
    members = [{"name": "a", "weights_sha256": "0", "temperature": 1.0}, {"name": "b", "temperature": 1.0,
                                                                          "size": size + 1}]
    (b / "bundle.json").write_text(json.dumps({**meta, "members": members}), encoding="utf-8")
    with pytest.raises(BundleError, match=f"member's input size must be within 16..{size}"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "arch": "no_such_net"}), encoding="utf-8")
    with pytest.raises(BundleError, match="unknown timm architecture 'no_such_net'"):
        load_bundle(b)


def _rewrite_weights(b: Path, payload: bytes) -> None:
    (b / "model.safetensors").write_bytes(payload)
    meta = json.loads((b / "bundle.json").read_text())
    meta["weights_sha256"] = file_sha256(b / "model.safetensors")
    (b / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")


class _Boom:
    def __reduce__(self):  # would run code if anything ever unpickled it
        return (exec, ("raise SystemExit('unpickled!')",))


def test_a_pickle_posing_as_weights_is_never_unpickled(saved: Path, tmp_path: Path) -> None:
    b = _copy(saved, tmp_path)
    _rewrite_weights(b, pickle.dumps({"state": _Boom()}))
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(b)


def test_weights_of_another_shape_are_refused(saved: Path, tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "five", classes=[*CLASSES, "Other"])
    b = _copy(saved, tmp_path)
    _rewrite_weights(b, (other / "model.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"does not fit the declared convnext_atto: .*wrong shape .*head"):
        load_bundle(b)
    state = {"fc.weight": torch.zeros(4, 4)}
    save_file(state, str(tmp_path / "foreign.safetensors"))
    _rewrite_weights(b, (tmp_path / "foreign.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"missing .*unexpected \(first: fc.weight\)"):
        load_bundle(b)


def test_real_convnext_tiny_round_trip(tmp_path: Path) -> None:
    """The mission's architecture, at its real input size, through save and verified load."""
    b = make_bundle(tmp_path / "tiny", arch="convnext_tiny", size=224, hidden=[256], dtype=torch.float16)
    bundle = load_bundle(b)
    assert bundle.model.num_features == 768
    assert sum(p.numel() for p in bundle.model.parameters()) > 27_000_000
    with torch.no_grad():
        assert bundle.model(torch.rand(1, 3, 224, 224)).shape == (1, 4)


def test_ood_features_are_the_pooled_ones_or_the_last_stage_mean_as_the_bundle_says(tmp_path: Path,
                                                                                     real_images) -> None:
    """v1 bundles (no `features`) keep the pooled, normalised features; v2 bundles read the last
    stage's map before the final norm, through every path that classifies (eager, int8, GUI)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from bcc_desk.preprocess import normalise

    files = [f for fs in real_images.values() for f in fs[:1]]
    pooled = load_bundle(make_bundle(tmp_path / "p", ood_threshold=10.0))
    stage = load_bundle(make_bundle(tmp_path / "s", ood_threshold=10.0, ood_features="stage"))
    old = json.loads((tmp_path / "p" / "bundle.json").read_text())
    assert old["ood"].get("features", "pooled") == "pooled" and stage.meta.ood.features == "stage"
    x = torch.stack([pil_to_tensor(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    x = normalise(x, stage.meta.input)
    with torch.no_grad():
        for bundle in (pooled, stage):
            logits, feats = bundle.model.forward_with_features(x)
            assert torch.allclose(logits, bundle.model(x), atol=1e-5)  # the head still reads the pooled features
        _, feats = stage.model.forward_with_features(x)
        assert torch.allclose(feats, stage.model.trunk.forward_features(x).mean(dim=(2, 3)), atol=1e-5)
        _, feats = pooled.model.forward_with_features(x)
        assert torch.allclose(feats, pooled.model.trunk(x), atol=1e-5)
    # A bundle that names an unknown kind of features is refused in one line.
    meta = json.loads((tmp_path / "s" / "bundle.json").read_text())
    meta["ood"]["features"] = "logits"
    (tmp_path / "s" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="ood.features must be one of pooled, stage, not 'logits'"):
        load_bundle(tmp_path / "s")
