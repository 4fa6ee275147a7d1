"""Finding images and opening them safely, on the real all4 images and a corpus of bad inputs."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcc_desk.images import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageReadError,
    discover_images,
    is_candidate,
    open_image,
)

from conftest import ALL4_COUNTS, CLASSES
from corpus import (
    SKIPPED,
    VANISH_NAME,
    build_corpus,
    gray16_from_8bit,
    palette_with_transparent_corner,
    rgba_with_transparency,
    write_bomb_png,
)


@pytest.fixture(scope="module")
def real_jpgs(real_images: dict[str, list[Path]]) -> list[Path]:
    return [f for c in CLASSES for f in real_images[c][:2]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, real_jpgs: list[Path]) -> tuple[Path, dict]:
    """One corpus for the tests that only read it (the vanish test builds its own)."""
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root, real_jpgs)


def _rgb(path: Path) -> np.ndarray:
    """The file as Pillow decodes it, with no orientation or alpha handling."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        open_image(path, **kwargs)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text and 0 < len(text) <= 140, text
    return text


# --- discovery -------------------------------------------------------------------------------


def test_discovers_every_real_image_in_a_stable_order(all4: Path) -> None:
    found = discover_images(all4)
    assert len(found) == sum(ALL4_COUNTS.values()) == 315
    assert all(p.is_absolute() and p.suffix == ".jpg" for p in found)
    per_class = {c: sum(1 for p in found if p.parent.name == c) for c in ALL4_COUNTS}
    assert per_class == ALL4_COUNTS
    rel = [p.relative_to(all4).parts for p in found]
    assert rel == sorted(rel), "sorted by folder then name, so each class folder stays together"
    assert discover_images(all4) == found


def test_discovery_walks_slides_and_skips_hidden_temp_and_non_images(corpus) -> None:
    root, expected = corpus
    found = discover_images(root)
    rel = [p.relative_to(root).as_posix() for p in found]
    assert set(rel) == set(expected)
    assert not set(rel) & set(SKIPPED)
    assert (root / "notes.txt").is_file() and (root / ".thumbnails/hidden-folder.jpg").is_file()
    assert "slide-A/CAPS-SUFFIX.JPEG" in rel and "slide-A/field-2/nested.jpg" in rel
    # By folder, then name: each slide's images are contiguous, the root's own come first.
    folders = [tuple(r.split("/")[:-1]) for r in rel]
    assert rel == sorted(rel, key=lambda r: (tuple(r.split("/")[:-1]), r.split("/")[-1]))
    assert rel[0] == "loose.jpg" and folders == sorted(folders)
    assert rel.index("slide-A/field-2/nested.jpg") > max(
        i for i, r in enumerate(rel) if r.startswith("slide-A/") and r.count("/") == 1
    )


def test_discovery_of_a_single_file_and_of_a_missing_path(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    image = root / "slide-A" / "good-1.jpg"
    assert discover_images(image) == [image]
    assert discover_images(root / "notes.txt") == []
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        discover_images(tmp_path / "no-such-folder")


def test_discovery_returns_absolute_paths_for_a_relative_root(corpus, monkeypatch) -> None:
    root, expected = corpus
    monkeypatch.chdir(root.parent)
    found = discover_images(Path(root.name))
    assert len(found) == len(expected) and all(p.is_absolute() and p.is_file() for p in found)


def test_discovery_does_not_follow_linked_folders_or_loop(tmp_path: Path, real_jpgs) -> None:
    (tmp_path / "slide").mkdir()
    shutil.copyfile(real_jpgs[0], tmp_path / "slide" / "a.jpg")
    (tmp_path / "slide" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "elsewhere").symlink_to(tmp_path / "slide", target_is_directory=True)
    assert discover_images(tmp_path) == [tmp_path / "slide" / "a.jpg"]


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("a.jpg", True),
        ("a.JPG", True),
        ("a.jpeg", True),
        ("a.Png", True),
        ("a.tif", True),
        ("a.TIFF", True),
        ("a.bmp", True),
        ("=cmd.jpg", True),
        ("Zelle-ü-細胞.jpg", True),
        ("a.gif", False),
        ("a.txt", False),
        ("jpg", False),
        (".a.jpg", False),
        ("._a.jpg", False),
        ("~$a.jpg", False),
        ("a.jpg.part", False),
        ("a.jpg.tmp", False),
        ("a.jpg.crdownload", False),
        ("a.jpg.partial", False),
        ("a.jpg.download", False),
        ("a.jpg~", False),
        ("a.JPG.PART", False),
    ],
)
def test_candidate_names(name: str, wanted: bool) -> None:
    # The watch daemon relies on this to leave half-copied files alone until they are renamed.
    assert is_candidate(Path("some/folder") / name) is wanted


def test_suffix_set_is_lower_case() -> None:
    assert IMAGE_SUFFIXES == {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


# --- opening ---------------------------------------------------------------------------------


def test_real_images_open_as_unaltered_224_rgb(real_images) -> None:
    for files in real_images.values():
        for path in files:
            im = open_image(path)
            assert im.mode == "RGB" and im.size == (224, 224)
            assert np.array_equal(np.asarray(im, dtype=np.int16), _rgb(path))


def test_every_corpus_entry_reads_or_says_why(corpus) -> None:
    root, expected = corpus
    assert sum(e is None for e in expected.values()) >= 15
    assert sum(e is not None for e in expected.values()) >= 5
    for name, error in expected.items():
        path = root / name
        if error is None:
            im = open_image(path)
            assert im.mode == "RGB" and im.width >= 1 and im.height >= 1, name
            im.load()  # fully decoded: usable after the file is gone
        else:
            assert error in _reason(path), name


def test_error_texts_are_the_documented_ones(corpus) -> None:
    root, _ = corpus
    assert _reason(root / "bad/empty.jpg") == "empty file (0 bytes)"
    assert _reason(root / "bad/truncated.jpg") == "truncated image data"
    assert _reason(root / "bad/random-bytes.jpg") == "not an image (unrecognised format)"
    assert _reason(root / "bad/web-page.jpg") == "not an image (unrecognised format)"
    assert _reason(root / "bad/corrupt.png").startswith("corrupt image data: ")
    assert _reason(root / "bad/bomb.png") == (
        "too large: 900 megapixels exceeds the 100 megapixel limit"
    )
    assert _reason(root / "slide-A") == "not a file (it is a folder)"


def test_exif_orientation_turns_the_image_upright(corpus) -> None:
    root, _ = corpus
    path = root / "slide-B/exif-rotated.jpg"
    stored = _rgb(path)
    assert stored.shape[:2] == (150, 224)
    im = open_image(path)
    assert im.size == (150, 224)  # width and height swapped
    # Orientation 6 means "rotate 90 degrees clockwise to display".
    assert np.array_equal(np.asarray(im, dtype=np.int16), np.rot90(stored, k=-1))


def test_transparency_is_composited_on_white(tmp_path: Path, real_jpgs) -> None:
    with Image.open(real_jpgs[0]) as src:
        rgb = src.convert("RGB")
    source = np.asarray(rgb, dtype=np.float64)
    rgba_with_transparency(rgb).save(tmp_path / "rgba.png")
    out = np.asarray(open_image(tmp_path / "rgba.png"), dtype=np.float64)
    q, mid = rgb.width // 4, rgb.height // 2
    assert (out[:, :q] == 255).all(), "fully transparent pixels become white, not black"
    assert np.array_equal(out[:mid, q:], source[:mid, q:]), "opaque pixels are untouched"
    half = out[mid : mid + 10, q:]
    assert np.abs(half - (source[mid : mid + 10, q:] * 128 + 255 * 127) / 255).max() <= 1.5

    palette_with_transparent_corner(rgb).save(tmp_path / "p.png", transparency=255)
    pal = np.asarray(open_image(tmp_path / "p.png"), dtype=np.float64)
    assert (pal[:20, :20] == 255).all()
    assert np.abs(pal[20:, 20:] - source[20:, 20:]).mean() < 8, "the palette keeps the colours"


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path, real_jpgs) -> None:
    with Image.open(real_jpgs[1]) as src:
        grey8 = np.asarray(src.convert("L"), dtype=np.float64)
    gray16_from_8bit(Image.fromarray(grey8.astype(np.uint8))).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode == "I;16" and np.asarray(raw).max() == 65535
    out = np.asarray(open_image(tmp_path / "g16.png"), dtype=np.float64)
    assert out.min() == 0 and out.max() == 255
    assert 40 < out.mean() < 235, "clipping at 255 would make it nearly all white"
    assert np.corrcoef(out[..., 0].ravel(), grey8.ravel())[0, 1] > 0.99

    # A 12-bit camera's data in a 16-bit container fills the 8-bit range, not 1/16 of it.
    Image.fromarray((grey8 * 16).astype(np.uint16)).save(tmp_path / "g12.png")
    out12 = np.asarray(open_image(tmp_path / "g12.png"), dtype=np.float64)
    assert np.abs(out12[..., 0] - grey8).max() <= 1.5


@pytest.mark.parametrize(
    ("mode", "make", "tolerance"),
    [
        ("L", lambda g: Image.fromarray(g.astype(np.uint8)), 0),
        ("LA", lambda g: Image.fromarray(g.astype(np.uint8)).convert("LA"), 0),
        ("I", lambda g: Image.fromarray((g * 257).astype(np.int32)), 1),
        # (Pillow's own convert("I;16B") clips to 255, so build the big-endian image from bytes.)
        (
            "I;16B",
            lambda g: Image.frombytes("I;16B", g.shape[::-1], (g * 257).astype(">u2").tobytes()),
            1,
        ),
        ("F", lambda g: Image.fromarray((g / 255).astype(np.float32)), 1),
        ("YCbCr", lambda g: Image.fromarray(g.astype(np.uint8)).convert("RGB").convert("YCbCr"), 2),
    ],
)
def test_other_pixel_modes_become_the_same_grey_picture(
    tmp_path: Path, real_jpgs, mode: str, make, tolerance: int
) -> None:
    with Image.open(real_jpgs[2]) as src:
        grey = np.asarray(src.convert("L"), dtype=np.float64)
    im = make(grey)
    assert im.mode == mode
    path = tmp_path / ("x.tif" if mode in ("I", "I;16B", "F", "YCbCr") else "x.png")
    im.save(path)
    out = np.asarray(open_image(path), dtype=np.float64)
    assert out.shape == (*grey.shape, 3)
    assert np.abs(out - grey[..., None]).max() <= tolerance


def test_cmyk_jpeg_keeps_its_colours(real_jpgs, tmp_path: Path) -> None:
    with Image.open(real_jpgs[3]) as src:
        rgb = src.convert("RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = np.asarray(open_image(tmp_path / "cmyk.jpg"), dtype=np.float64)
    assert np.abs(out - np.asarray(rgb, dtype=np.float64)).mean() < 5


def test_pixel_limit_is_checked_before_decoding(real_jpgs) -> None:
    assert MAX_PIXELS == 100_000_000
    assert _reason(real_jpgs[0], max_pixels=40_000) == (
        "too large: 224x224 pixels exceeds the 0.04 megapixel limit"
    )
    assert open_image(real_jpgs[0], max_pixels=224 * 224).size == (224, 224)


def test_pillows_bomb_warning_never_reaches_the_user(real_jpgs, monkeypatch) -> None:
    # Lower Pillow's own (documented, global) limits so a real image trips them.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # warns above 30k, refuses above 60k
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(real_jpgs[0]).size == (224, 224)  # our limit is the one that counts
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    reason = _reason(real_jpgs[0])
    assert reason.startswith("too large:") and "image library" in reason


_BOMB_PROBE = """
import json, sys, time
from pathlib import Path
from bcc_desk.images import ImageReadError, open_image
out = []
for name in sys.argv[1:]:
    t = time.perf_counter()
    try:
        open_image(Path(name)); reason = None
    except ImageReadError as exc:
        reason = str(exc)
    out.append([reason, time.perf_counter() - t])
# VmHWM belongs to this exec'd image alone (ru_maxrss would carry over the forking parent's peak).
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
peak_mb = int(hwm.split()[1]) / 1024
print(json.dumps({"results": out, "max_rss_mb": peak_mb}))
"""


def test_decompression_bombs_are_refused_fast_and_without_memory(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    # 169 megapixels: above our limit, below Pillow's own refusal, so only our check stops it.
    write_bomb_png(tmp_path / "own-check.png", 13000, 13000)
    bombs = [root / "bad/bomb.png", tmp_path / "own-check.png"]
    assert all(b.stat().st_size < 200_000 for b in bombs)
    # A fresh process, so its peak memory is the bombs' alone (decoding either takes >169 MB).
    probe = subprocess.run(
        [sys.executable, "-c", _BOMB_PROBE, *map(str, bombs)],
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path,
    )
    report = json.loads(probe.stdout)
    assert probe.stderr == "", "no warning on stderr"
    (big, t_big), (own, t_own) = report["results"]
    assert big.startswith("too large:") and own == (
        "too large: 13000x13000 pixels exceeds the 100 megapixel limit"
    )
    assert t_big < 1.0 and t_own < 1.0
    assert report["max_rss_mb"] < 150


def test_a_file_deleted_after_discovery_is_reported_as_vanished(tmp_path: Path, real_jpgs) -> None:
    build_corpus(tmp_path, real_jpgs)
    found = discover_images(tmp_path)
    victim = tmp_path / VANISH_NAME
    assert victim in found
    victim.unlink()
    assert _reason(victim) == "file vanished before it could be read"
    others = [p for p in found if p != victim and p.parent == victim.parent]
    assert all(open_image(p).mode == "RGB" for p in others)


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    assert _reason(fifo) == "not a regular file"


def test_a_broken_link_is_named_as_such(tmp_path: Path) -> None:
    link = tmp_path / "moved.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    assert discover_images(tmp_path) == [link]
    assert _reason(link) == "broken link (its target does not exist)"


@contextlib.contextmanager
def _as_ordinary_user() -> Iterator[None]:
    """Root reads any file whatever its mode, so as root act as `nobody` for a moment."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_files_say_permission_denied(real_jpgs) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # under /tmp: an ordinary user can reach it
        base = Path(tmp)
        base.chmod(0o755)
        readable, locked_file, locked_dir = base / "ok.jpg", base / "locked.jpg", base / "locked"
        for target in (readable, locked_file):
            shutil.copyfile(real_jpgs[0], target)
        readable.chmod(0o644)
        locked_file.chmod(0o000)
        locked_dir.mkdir()
        shutil.copyfile(real_jpgs[0], locked_dir / "inside.jpg")
        locked_dir.chmod(0o000)
        open_image(readable)  # import everything the read path needs while we still may
        try:
            with _as_ordinary_user():
                assert open_image(readable).size == (224, 224)
                assert _reason(locked_file) == "permission denied"
                assert _reason(locked_dir / "inside.jpg") == "permission denied"
        finally:
            locked_dir.chmod(0o755)


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_model_input(real_jpgs, tmp_path: Path) -> None:
    """A camera-sized field is decoded at 1/8..1/2 scale, never below what the model needs."""
    big = tmp_path / "camera.jpg"
    with Image.open(real_jpgs[0]) as im:
        im.convert("RGB").resize((2400, 1800)).save(big, quality=90)
    full = open_image(big)
    reduced = open_image(big, reduce_to=224)
    assert full.size == (2400, 1800)
    assert min(reduced.size) >= 2 * 224 and reduced.size[0] <= 1200
    assert reduced.size[0] / reduced.size[1] == pytest.approx(2400 / 1800, rel=0.02)
    small = open_image(real_jpgs[0], reduce_to=224)
    assert small.size == (224, 224)
