"""The inference engine on real microscope images, with small real bundles."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch

from bcc_desk.bundle import BundleError, load_bundle
from bcc_desk.classifier import Classifier
from bcc_desk.devices import pick_device, pick_precision
from bcc_desk.images import discover_images, open_image
from bcc_desk.prediction import REVIEW_LOW_CONFIDENCE, REVIEW_UNFAMILIAR, REVIEW_UNREADABLE
from bcc_desk.preprocess import make_transform

from bundles import CLASSES, LABELS, make_bundle
from corpus import VANISH_NAME, build_corpus


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("m") / "atto", hidden=[32], review_threshold=0.7)


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory, real_images) -> Path:
    """Two slides of real images, one image directly in the root."""
    root = tmp_path_factory.mktemp("slides")
    for i, files in enumerate(real_images.values()):
        slide = root / ("patient-A" if i < 2 else "patient-B")
        slide.mkdir(exist_ok=True)
        for f in files[:3]:
            shutil.copy(f, slide / f.name)
    shutil.copy(real_images[CLASSES[0]][4], root / "loose.jpg")
    return root


def _reference_probs(bundle_dir: Path, path: Path, temperature: float, flips: bool = False) -> torch.Tensor:
    """fp32 probabilities computed directly from the model, for comparison."""
    b = load_bundle(bundle_dir)
    spec = b.meta.input
    x = make_transform(spec)(open_image(path)).float().unsqueeze(0)
    x = (x / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    # The dihedral group of the square, written out: rotations by 0/90/180/270 degrees, each mirrored.
    rotations = [x, x.transpose(-2, -1).flip(-1), x.flip(-2).flip(-1), x.transpose(-2, -1).flip(-2)]
    views = [v for r in rotations for v in (r, r.flip(-1))] if flips else [x]
    with torch.no_grad():
        return torch.stack([torch.softmax(b.model(v) / temperature, 1)[0] for v in views]).mean(0)


def test_every_image_gets_a_record_in_order(bundle_dir: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)
    clf = Classifier(load_bundle(bundle_dir), precision="fp32", batch_size=4)
    seen = []
    preds = list(clf.predict_paths(paths, slide_root, progress=lambda d, t: seen.append((d, t))))
    assert [p.path for p in preds] == paths and len(paths) == 13
    assert seen[-1] == (13, 13) and [d for d, _ in seen] == [4, 8, 12, 13]
    assert {p.slide for p in preds} == {"patient-A", "patient-B", slide_root.name}
    loose = next(p for p in preds if p.file == "loose.jpg")
    assert loose.slide == slide_root.name
    for p in preds:
        assert p.ok and p.label in LABELS
        assert list(p.probabilities) == LABELS
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == max(p.probabilities.values()) and p.label == max(p.probabilities, key=p.probabilities.get)
        ranked = sorted(p.probabilities.values(), reverse=True)
        assert p.margin == pytest.approx(ranked[0] - ranked[1])
        assert p.needs_review == (p.confidence < 0.7)
        assert p.review_reason == (REVIEW_LOW_CONFIDENCE if p.needs_review else "")
        assert p.model == "test-convnext_atto-0" and len(p.model_sha256) == 64
    ref = _reference_probs(bundle_dir, paths[0], 1.0)
    assert torch.allclose(torch.tensor(list(preds[0].probabilities.values())), ref, atol=1e-4)
    assert len({p.label for p in preds}) > 1, "a spread head should not give one label for every image"


def test_temperature_softens_and_keeps_labels(tmp_path: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)
    sharp = list(Classifier(load_bundle(make_bundle(tmp_path / "t1", seed=1)), precision="fp32").predict_paths(paths, slide_root))
    soft_bundle = load_bundle(make_bundle(tmp_path / "t4", seed=1, temperature=4.0))
    soft = list(Classifier(soft_bundle, precision="fp32").predict_paths(paths, slide_root))
    assert [p.label for p in sharp] == [p.label for p in soft]
    assert all(s.confidence < h.confidence for s, h in zip(soft, sharp))


def test_review_threshold_override(bundle_dir: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)
    assert all(p.needs_review for p in Classifier(load_bundle(bundle_dir), review_threshold=1.0).predict_paths(paths, slide_root))
    assert not any(p.needs_review for p in Classifier(load_bundle(bundle_dir), review_threshold=0.0).predict_paths(paths, slide_root))
    with pytest.raises(ValueError, match="within 0..1"):
        Classifier(load_bundle(bundle_dir), review_threshold=1.5)


def test_tta_averages_the_eight_rotations_and_mirrors(bundle_dir: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)[:3]
    preds = list(Classifier(load_bundle(bundle_dir), precision="fp32", tta=True).predict_paths(paths, slide_root))
    for p, path in zip(preds, paths):
        ref = _reference_probs(bundle_dir, path, 1.0, flips=True)
        assert torch.allclose(torch.tensor(list(p.probabilities.values())), ref, atol=1e-4)


def test_with_tta_a_field_photographed_rotated_gets_the_same_answer(bundle_dir: Path, slide_root: Path,
                                                                      tmp_path: Path) -> None:
    from PIL import Image

    source = discover_images(slide_root)[0]
    turned = tmp_path / "turned"
    turned.mkdir()
    with Image.open(source) as im:
        im.save(turned / "a.png")  # lossless copies: only the orientation differs
        im.transpose(Image.Transpose.ROTATE_90).save(turned / "b.png")
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(turned / "c.png")
    def spread(preds) -> float:
        return max(abs(p.probabilities[k] - preds[0].probabilities[k]) for p in preds[1:] for k in LABELS)

    images = discover_images(turned)
    with_tta = list(Classifier(load_bundle(bundle_dir), precision="fp32", tta=True).predict_paths(images, turned))
    plain = list(Classifier(load_bundle(bundle_dir), precision="fp32").predict_paths(images, turned))
    assert len({p.label for p in with_tta}) == 1
    # Not exactly 0: Pillow's two-pass resize rounds to 8 bits between passes, so a rotated
    # field is resized to slightly different pixels.  Without TTA the model sees the rotation.
    assert spread(with_tta) < 1e-3 and spread(plain) > 5 * spread(with_tta), (spread(with_tta), spread(plain))


def test_ensemble_averages_members_and_refuses_mixed_classes(tmp_path: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)[:4]
    a, b = make_bundle(tmp_path / "a", seed=1), make_bundle(tmp_path / "b", seed=2, size=96)
    pa = list(Classifier(load_bundle(a), precision="fp32").predict_paths(paths, slide_root))
    pb = list(Classifier(load_bundle(b), precision="fp32").predict_paths(paths, slide_root))
    ens = Classifier([load_bundle(a), load_bundle(b)], precision="fp32")
    pe = list(ens.predict_paths(paths, slide_root))
    assert ens.name == "test-convnext_atto-1+test-convnext_atto-2" and pe[0].model_sha256.count("+") == 1
    for x, y, e in zip(pa, pb, pe):
        for c in LABELS:
            assert e.probabilities[c] == pytest.approx((x.probabilities[c] + y.probabilities[c]) / 2, abs=1e-5)
    other = make_bundle(tmp_path / "c", classes=["x", "y"])
    with pytest.raises(BundleError, match="disagree on classes"):
        Classifier([load_bundle(a), load_bundle(other)])


def test_ood_check_flags_unfamiliar_images(tmp_path: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)[:4]
    strict = Classifier(load_bundle(make_bundle(tmp_path / "s", ood_threshold=1e-6)), review_threshold=0.0)
    loose = Classifier(load_bundle(make_bundle(tmp_path / "l", ood_threshold=1e9)), review_threshold=0.0)
    for p in strict.predict_paths(paths, slide_root):
        assert p.needs_review and p.review_reason == REVIEW_UNFAMILIAR and p.ood_score > 1
    for p in loose.predict_paths(paths, slide_root):
        assert not p.needs_review and 0 <= p.ood_score < 1


def test_bad_inputs_become_error_rows_and_the_rest_is_classified(bundle_dir: Path, tmp_path: Path, real_images) -> None:
    jpgs = [f for files in real_images.values() for f in files]
    expected = build_corpus(tmp_path, jpgs)
    paths = discover_images(tmp_path)
    (tmp_path / VANISH_NAME).unlink()  # deleted between discovery and reading
    preds = {p.file: p for p in Classifier(load_bundle(bundle_dir), batch_size=5).predict_paths(paths, tmp_path)}
    assert set(preds) == {p.relative_to(tmp_path).as_posix() for p in paths}
    assert "vanished" in preds[VANISH_NAME].error and preds[VANISH_NAME].label is None
    for name, err in expected.items():
        if name == VANISH_NAME or name not in preds:
            continue
        p = preds[name]
        if err is None:
            assert p.ok and p.label in LABELS, (name, p.error)
        else:
            assert not p.ok and err in p.error and p.label is None and "\n" not in p.error, (name, p.error)
            # A person must look at what the model could not read.
            assert p.needs_review and p.review_reason == REVIEW_UNREADABLE, name
    assert sum(p.ok for p in preds.values()) >= 8


def test_stopping_early_releases_the_decoders(bundle_dir: Path, slide_root: Path) -> None:
    clf = Classifier(load_bundle(bundle_dir), batch_size=2)
    gen = clf.predict_paths(discover_images(slide_root), slide_root)
    first = list(itertools.islice(gen, 3))
    gen.close()
    assert len(first) == 3 and all(p.ok for p in first)


def test_bf16_on_this_cpu_and_device_choice() -> None:
    cpu = pick_device("cpu")
    assert pick_precision(cpu, "fp32") is None and pick_precision(cpu, "bf16") is torch.bfloat16
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu7")
    with pytest.raises(ValueError, match="unknown precision"):
        pick_precision(cpu, "int3")


@pytest.mark.slow
def test_compiled_network_matches_eager_including_a_padded_last_batch(bundle_dir: Path, slide_root: Path) -> None:
    paths = discover_images(slide_root)[:7]  # batches of 4: the last one is padded to 4
    eager = list(Classifier(load_bundle(bundle_dir), precision="fp32", batch_size=4, compile=False).predict_paths(paths, slide_root))
    clf = Classifier(load_bundle(bundle_dir), precision="fp32", batch_size=4, compile=True)
    compiled = list(clf.predict_paths(paths, slide_root))
    assert clf.compiled, "the network was compiled"
    assert [p.label for p in compiled] == [p.label for p in eager] and len(compiled) == 7
    for a, b in zip(compiled, eager):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)


def test_a_symlinked_image_is_classified_where_its_link_sits(bundle_dir: Path, real_images, tmp_path: Path) -> None:
    """A link inside ROOT to an image outside it is a normal row, not a crash."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = shutil.copy(real_images[CLASSES[1]][0], outside / "cell.jpg")
    root = tmp_path / "root"
    (root / "slide-1").mkdir(parents=True)
    (root / "slide-1" / "linked.jpg").symlink_to(target)
    shutil.copy(real_images[CLASSES[2]][0], root / "slide-1" / "plain.jpg")
    preds = list(Classifier(load_bundle(bundle_dir), precision="fp32").predict_paths(discover_images(root), root))
    assert sorted((p.file, p.slide, p.ok) for p in preds) == [
        ("slide-1/linked.jpg", "slide-1", True), ("slide-1/plain.jpg", "slide-1", True)]


@pytest.mark.parametrize("crop_pct, interpolation", [(1.0, "bicubic"), (0.875, "bilinear"), (0.9, "lanczos")])
def test_the_input_transform_gives_torchvisions_pixels(real_images, crop_pct: float, interpolation: str) -> None:
    """make_transform uses Pillow directly (torchvision's import costs seconds of start-up);
    its pixels must be exactly those of torchvision's Resize + CenterCrop + PILToTensor, the
    transform the shipped model was trained and validated with."""
    from torchvision.transforms import InterpolationMode, v2 as T

    from bcc_desk.bundle import InputSpec

    spec = InputSpec(size=96, crop_pct=crop_pct, interpolation=interpolation)
    reference = T.Compose([T.Resize(round(spec.size / crop_pct), interpolation=InterpolationMode(interpolation),
                                    antialias=True), T.CenterCrop(spec.size), T.PILToTensor()])
    ours = make_transform(spec)
    image = open_image(real_images[CLASSES[1]][0])
    # The camera's own size, upscaled, portrait, landscape and odd sizes: each crop and rounding path.
    for size in [image.size, (250, 181), (181, 250), (96, 96), (1023, 767), (97, 300)]:
        variant = image.resize(size)
        a, b = ours(variant), reference(variant)
        assert a.dtype == torch.uint8 and a.shape == (3, 96, 96)
        assert torch.equal(a, b), size
