"""Find the images under a folder and open them safely.

Everything that reads pixels goes through `open_image`, so one bad file (empty, cut short by a
copy that is still running, not an image at all, a decompression bomb) becomes one
`ImageReadError` whose one-line text a technician can act on, instead of a traceback that
stops a run of thousands of images. `is_candidate` is the single rule for which file names are
images at all; discovery and the folder-watching daemon share it so they agree.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bcc_desk.messages import one_line

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageReadError",
    "discover_images",
    "is_candidate",
    "open_image",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
"""Suffixes (lower case; matched case-insensitively) that microscope and camera software export."""

MAX_PIXELS: int = 100_000_000
"""Default pixel limit: far above any smear photograph, far below what exhausts memory."""

# Names that copy tools, browsers and Office give a file while it is still being written.
_TEMP_PREFIXES = ("~$", ".")
_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", "~")

# Formats a file may really be in, whatever its suffix says.  A mislabelled PNG/GIF/WebP still
# reads; the many exotic decoders Pillow also ships are never handed a user's file.  (Camera
# multi-picture JPEGs open through "JPEG"; "MPO" is not an opener name.)
_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "DIB", "GIF", "WEBP")

_VANISHED = "file vanished before it could be read"
_PERMISSION = "permission denied"
_TRUNCATED = "truncated image data"
_NOT_IMAGE = "not an image (unrecognised format)"
_EMPTY = "empty file (0 bytes)"


class ImageReadError(Exception):
    """An image that cannot be used; `str()` is a one-line reason fit for a report cell."""

    def __init__(self, reason: str) -> None:
        super().__init__(one_line(reason, limit=None))


def is_candidate(path: PurePath) -> bool:
    """Whether a file *name* is an image worth reading.

    Hidden files and the temporary names of unfinished copies/downloads are refused so that
    nothing half-written is classified; the daemon waits for the rename to the final name.
    Only the name is looked at (no disk access), so it is cheap to call on every file event.
    """
    name = Path(path).name
    if not name or name.startswith(_TEMP_PREFIXES):
        return False
    lower = name.lower()
    if lower.endswith(_TEMP_SUFFIXES):
        return False
    return Path(lower).suffix in IMAGE_SUFFIXES


def discover_images(root: Path) -> list[Path]:
    """Every candidate image under `root`, absolute, sorted by relative path.

    The order is by folder, then by name (a folder's own images before its subfolders'), so
    each slide's images come out together and a run over the same folder always lists the
    same files in the same order.  Hidden folders (`.thumbnails`, `.git`, ...) are not entered
    and symlinked folders are not followed, so a link loop cannot make discovery run forever
    or count images twice.  The paths are `root.absolute()` joined with the relative path
    (symlinks in `root` kept, so they read as the user typed them); compute slide names
    against `root.absolute()`.  A `root` that is itself an image file gives `[root]`.
    """
    root = Path(root)
    if not root.exists():
        kind = "broken link" if root.is_symlink() else "no such file or folder"
        raise FileNotFoundError(f"{kind}: {root}")
    root = root.absolute()
    if root.is_file():
        return [root] if is_candidate(root) else []
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder or an image file: {root}")

    found: list[tuple[tuple[tuple[str, ...], str], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Prune in place: os.walk then never descends into hidden folders.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        rel_dir = here.relative_to(root).parts
        for name in filenames:
            if is_candidate(Path(name)):
                found.append(((rel_dir, name), here / name))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def open_image(path: Path, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Open `path` as a fully decoded RGB image, upright per its EXIF orientation.

    Raises `ImageReadError` (and nothing else) for any file that cannot be used.  The pixel
    count is checked from the header before any pixel is decoded, so a small file that claims
    to be gigapixels is refused without allocating memory.  Transparency is composited on
    white (smear backgrounds are bright; dropping alpha would give black), and 16-bit and float
    images are scaled to 8 bits rather than clipped.

    With `reduce_to`, a large JPEG is decoded straight at the smallest scale (1/2, 1/4, 1/8)
    whose shorter side is still at least twice `reduce_to` pixels: a camera's multi-megapixel field
    then decodes several times faster, and the model only sees `reduce_to` pixels anyway.

    Pillow's own decompression-bomb warning is silenced for the duration of the call: our
    limit replaces it, and a warning on stderr would only alarm.  (`warnings.catch_warnings`
    is process-wide state; calls from several threads at once can, rarely, let that warning
    through, never change a result.)
    """
    path = Path(path)
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError("not a file (it is a folder)")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device named *.jpg would block or never end when read.
        raise ImageReadError("not a regular file")
    if st.st_size == 0:
        raise ImageReadError(_EMPTY)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(path, max_pixels)
        try:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"too large: {width}x{height} pixels exceeds the "
                    f"{_megapixels(max_pixels)} megapixel limit"
                )
            # Keep at least 2x the target after the DCT downscale, so the antialiased resize
            # that follows sees the same detail as from a full decode.
            if reduce_to and im.format == "JPEG" and min(width, height) >= 4 * reduce_to:
                scale = 2 * reduce_to / min(width, height)
                im.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            _load(im, max_pixels)
            try:
                return _to_rgb(_upright(im))
            except ImageReadError:
                raise
            except MemoryError:
                raise ImageReadError("not enough memory to convert the image") from None
            except Exception as exc:  # noqa: BLE001 - any failure is one bad file, not a crash
                raise ImageReadError(f"corrupt image data: {_detail(exc)}") from None
        finally:
            im.close()


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageReadError("broken link (its target does not exist)") from None
        raise ImageReadError(_VANISHED) from None
    except PermissionError:
        raise ImageReadError(_PERMISSION) from None
    except OSError as exc:
        raise ImageReadError(f"cannot read file: {_detail(exc)}") from None


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Read the header only (Pillow decodes lazily)."""
    try:
        return Image.open(path, formats=_available_formats())
    except FileNotFoundError:
        raise ImageReadError(_VANISHED) from None
    except PermissionError:
        raise ImageReadError(_PERMISSION) from None
    except IsADirectoryError:
        raise ImageReadError("not a file (it is a folder)") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(_bomb_reason(exc, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageReadError(_NOT_IMAGE) from None
    except MemoryError:
        raise ImageReadError("not enough memory to read the image header") from None
    except EOFError:
        raise ImageReadError(_TRUNCATED) from None
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, OSError) and "truncated" in str(exc).lower():
            raise ImageReadError(_TRUNCATED) from None
        raise ImageReadError(f"corrupt image data: {_detail(exc)}") from None


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """`_FORMATS` this Pillow build can open (an unknown name would raise KeyError)."""
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _load(im: Image.Image, max_pixels: int) -> None:
    """Decode the pixels; this is where truncation and corruption show."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:  # e.g. a TIFF tile larger than its image
        raise ImageReadError(_bomb_reason(exc, max_pixels)) from None
    except MemoryError:
        raise ImageReadError("not enough memory to decode the image") from None
    except EOFError:
        raise ImageReadError(_TRUNCATED) from None
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SyntaxError, zlib.error, ...
        if isinstance(exc, OSError) and "truncated" in str(exc).lower():
            raise ImageReadError(_TRUNCATED) from None
        raise ImageReadError(f"corrupt image data: {_detail(exc)}") from None


def _upright(im: Image.Image) -> Image.Image:
    """A new, upright image; the file-backed `im` is closed by the caller."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        # A damaged EXIF block must not cost a readable image: orientation only rotates a
        # whole-field smear, which the classifier does not depend on.
        return im.copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        grey = _scale_to_uint8(np.asarray(im), is_float=mode == "F")
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        if mode == "La":  # Pillow converts premultiplied La only to LA
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _scale_to_uint8(values: np.ndarray, *, is_float: bool) -> np.ndarray:
    """Map high-bit-depth grey values to 0..255 by their full scale, never by clipping.

    The full scale is the smallest usual sensor depth (8, 10, 12, 14 or 16 bits) that holds
    the brightest pixel: a 12-bit camera's data stored in a 16-bit container then fills the
    range instead of looking 16 times too dark.  Floats in 0..1 are taken as normalised.
    Anything else (negative or beyond 16 bits) is stretched from its minimum to its maximum.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo >= 0 and is_float and hi <= 1.0:
        low, full = 0.0, 1.0
    elif lo >= 0 and hi <= 65535:
        bits = next(b for b in (8, 10, 12, 14, 16) if hi < 2**b)
        low, full = 0.0, float(2**bits - 1)
    elif hi > lo:
        low, full = lo, hi - lo
    else:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (data - low) * (255.0 / full)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Pillow refused the header before we saw a size; its message carries the pixel count."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match is None:
        return f"too large: exceeds the {_megapixels(max_pixels)} megapixel limit"
    pixels = int(match.group(1))
    if pixels > max_pixels:
        return (
            f"too large: {_megapixels(pixels)} megapixels exceeds the "
            f"{_megapixels(max_pixels)} megapixel limit"
        )
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"too large: {_megapixels(pixels)} megapixels exceeds the image library's "
        f"{_megapixels(pil_limit)} megapixel limit"
    )


def _megapixels(pixels: int) -> str:
    mp = pixels / 1_000_000
    return f"{mp:.0f}" if mp >= 10 else f"{mp:.3g}"


def _detail(exc: BaseException) -> str:
    text = one_line(exc, limit=None)
    return text if len(text) <= 120 else text[:117] + "..."
