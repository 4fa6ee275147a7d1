"""Build a folder of awkward and broken inputs from real microscope images.

Not a test module: `build_corpus` is shared by the image, classifier and CLI tests so that all
of them face the same bad inputs a lab folder really produces.

Layout under `dest` (names relative to `dest`):

Good, must classify (expected error None):
    loose.jpg                      real image directly in the root (slide = root's own name)
    slide-A/good-1.jpg, good-2.jpg real images
    slide-A/CAPS-SUFFIX.JPEG       upper-case suffix
    slide-A/Zelle-ü-細胞.jpg        unicode name
    slide-A/=cmd.jpg, +1.jpg, -2.jpg, @SUM.jpg
                                   names a spreadsheet would take for formulas
    slide-A/field-2/nested.jpg     a deeper folder (its own slide "slide-A/field-2")
    slide-B/cmyk.jpg               CMYK JPEG
    slide-B/gray16.png             16-bit greyscale, values spanning 0..65535
    slide-B/rgba-transparent.png   RGBA; the left quarter fully transparent, a band half
    slide-B/palette.png            palette (P) image
    slide-B/palette-transparent.png  palette image, top-left 20x20 block transparent
    slide-B/exif-rotated.jpg       224x150 pixels stored, EXIF orientation 6 (shows 150x224)
    slide-B/tiny-1x1.png           one pixel
    slide-B/grey.tif, real.bmp     the other accepted suffixes
    slide-B/vanish.jpg (VANISH_NAME)  good as built; a test deletes it after discovery and
                                   then expects "vanished"

Error, discovered but unreadable (expected substring of the error text):
    bad/empty.jpg         "empty file"
    bad/truncated.jpg     "truncated"        first 40% of a real JPEG
    bad/random-bytes.jpg  "not an image"
    bad/web-page.jpg      "not an image"     an HTML error page saved under an image name
    bad/corrupt.png       "corrupt image data"  sound header, compressed pixels are noise
    bad/bomb.png          "too large"        header says 30000x30000; ~110 KB on disk

Skipped by discovery (never a row; listed in SKIPPED, absent from the mapping):
    notes.txt, .hidden.jpg, ~$temp.jpg, x.jpg.part, .thumbnails/hidden-folder.jpg
"""

from __future__ import annotations

import random
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

VANISH_NAME = "slide-B/vanish.jpg"
"""A good image that a test deletes between discovery and reading."""

SKIPPED: tuple[str, ...] = (
    "notes.txt",
    ".hidden.jpg",
    "~$temp.jpg",
    "x.jpg.part",
    ".thumbnails/hidden-folder.jpg",
)
"""Files `build_corpus` creates that discovery must not return."""

BOMB_SIZE = (30000, 30000)

EXIF_ORIENTATION = 0x0112
TRANSPARENT_INDEX = 255


def build_corpus(dest: Path, real_jpgs: list[Path]) -> dict[str, str | None]:
    """Create the corpus in `dest`; return relative name -> expected error substring or None.

    Only files discovery must return are in the mapping (see the module docstring for the
    layout).  `real_jpgs` are real all4 JPEGs; at least one, used in turn.
    """
    if not real_jpgs:
        raise ValueError("build_corpus needs at least one real JPEG")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reals = [Path(p) for p in real_jpgs]
    pick = _cycle(reals)
    expected: dict[str, str | None] = {}

    def target(rel: str) -> Path:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def copy(rel: str) -> None:
        shutil.copyfile(next(pick), target(rel))
        expected[rel] = None

    # --- good: copies of real images under awkward names and places -----------------------
    for rel in (
        "loose.jpg",
        "slide-A/good-1.jpg",
        "slide-A/good-2.jpg",
        "slide-A/CAPS-SUFFIX.JPEG",
        "slide-A/Zelle-ü-細胞.jpg",
        "slide-A/=cmd.jpg",
        "slide-A/+1.jpg",
        "slide-A/-2.jpg",
        "slide-A/@SUM.jpg",
        "slide-A/field-2/nested.jpg",
        VANISH_NAME,
    ):
        copy(rel)

    # --- good: other pixel formats made from a real image ---------------------------------
    with Image.open(next(pick)) as src:
        rgb = src.convert("RGB")

    rgb.convert("CMYK").save(target("slide-B/cmyk.jpg"), quality=95)
    expected["slide-B/cmyk.jpg"] = None

    gray16_from_8bit(rgb).save(target("slide-B/gray16.png"))
    expected["slide-B/gray16.png"] = None

    rgba_with_transparency(rgb).save(target("slide-B/rgba-transparent.png"))
    expected["slide-B/rgba-transparent.png"] = None

    rgb.quantize(colors=64).save(target("slide-B/palette.png"))
    expected["slide-B/palette.png"] = None

    palette_with_transparent_corner(rgb).save(
        target("slide-B/palette-transparent.png"), transparency=TRANSPARENT_INDEX
    )
    expected["slide-B/palette-transparent.png"] = None

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    rgb.crop((0, 0, rgb.width, min(150, rgb.height))).save(
        target("slide-B/exif-rotated.jpg"), exif=exif.tobytes(), quality=95
    )
    expected["slide-B/exif-rotated.jpg"] = None

    rgb.crop((100, 100, 101, 101)).save(target("slide-B/tiny-1x1.png"))
    expected["slide-B/tiny-1x1.png"] = None

    rgb.convert("L").save(target("slide-B/grey.tif"))
    expected["slide-B/grey.tif"] = None
    rgb.save(target("slide-B/real.bmp"))
    expected["slide-B/real.bmp"] = None

    # --- errors ---------------------------------------------------------------------------
    target("bad/empty.jpg").write_bytes(b"")
    expected["bad/empty.jpg"] = "empty file"

    data = next(pick).read_bytes()
    target("bad/truncated.jpg").write_bytes(data[: int(len(data) * 0.4)])
    expected["bad/truncated.jpg"] = "truncated"

    target("bad/random-bytes.jpg").write_bytes(random.Random(1234).randbytes(20_000))
    expected["bad/random-bytes.jpg"] = "not an image"

    write_corrupt_png(target("bad/corrupt.png"), rgb.width, rgb.height)
    expected["bad/corrupt.png"] = "corrupt image data"

    target("bad/web-page.jpg").write_text(
        "<!DOCTYPE html><html><body>404 Not Found</body></html>\n", encoding="utf-8"
    )
    expected["bad/web-page.jpg"] = "not an image"

    write_bomb_png(target("bad/bomb.png"), *BOMB_SIZE)
    expected["bad/bomb.png"] = "too large"

    # --- skipped by discovery -------------------------------------------------------------
    target("notes.txt").write_text("slide notes, not an image\n", encoding="utf-8")
    for rel in SKIPPED:
        if rel.endswith(".jpg") or rel.endswith(".part"):
            shutil.copyfile(next(pick), target(rel))

    return expected


def gray16_from_8bit(rgb: Image.Image) -> Image.Image:
    """A 16-bit greyscale image whose values stretch from 0 to exactly 65535."""
    grey = np.asarray(rgb.convert("L"), dtype=np.float64)
    lo, hi = grey.min(), grey.max()
    stretched = (grey - lo) * (65535.0 / max(hi - lo, 1.0))
    return Image.fromarray(np.rint(stretched).astype(np.uint16))


def rgba_with_transparency(rgb: Image.Image) -> Image.Image:
    """Left quarter fully transparent, a horizontal band half transparent, the rest opaque."""
    alpha = np.full((rgb.height, rgb.width), 255, dtype=np.uint8)
    alpha[:, : rgb.width // 4] = 0
    alpha[rgb.height // 2 : rgb.height // 2 + 10, rgb.width // 4 :] = 128
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def palette_with_transparent_corner(rgb: Image.Image) -> Image.Image:
    """A palette image whose top-left 20x20 block uses TRANSPARENT_INDEX (black, unused
    elsewhere); saved with `transparency=TRANSPARENT_INDEX` that block is see-through."""
    pal = rgb.quantize(colors=TRANSPARENT_INDEX)  # indices 0..254 only
    colours = pal.getpalette() or []
    pal.putpalette(colours + [0] * (768 - len(colours)))
    pal.paste(TRANSPARENT_INDEX, (0, 0, 20, 20))
    return pal


def write_bomb_png(path: Path, width: int, height: int) -> None:
    """A valid, tiny-on-disk PNG of a huge black 1-bit image (a decompression bomb).

    Rows are compressed one at a time, so writing it never holds the image in memory.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    chunks = [packer.compress(row) for _ in range(height)]
    chunks.append(packer.flush())
    _write_png(path, struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0), b"".join(chunks))


def write_corrupt_png(path: Path, width: int, height: int) -> None:
    """An RGB PNG with a sound header and chunk checksums whose compressed pixels are noise,
    as a failing disk or a bad transfer leaves it: it opens, then fails to decode."""
    zlib_header = zlib.compress(b"")[:2]
    noise = random.Random(99).randbytes(4000)
    _write_png(path, struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), zlib_header + noise)


def _write_png(path: Path, ihdr: bytes, idat: bytes) -> None:
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        for kind, body in ((b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")):
            out.write(struct.pack(">I", len(body)))
            out.write(kind + body)
            out.write(struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _cycle(paths: list[Path]) -> Iterator[Path]:
    while True:
        yield from paths
