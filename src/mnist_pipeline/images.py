"""Read user image files and turn them into MNIST-style digits for prediction.

`load_image` opens one file of any format and mode Pillow reads (PNG, JPEG, GIF, BMP, TIFF,
WebP, ...; 1-bit, grayscale, palette, RGB, alpha, 16-bit, float, CMYK; first frame of an
animation) and returns its grayscale pixels as a float32 (H, W) array in [0, 1]. Every problem
with the file (missing, empty, too large, not an image, corrupt, a decompression bomb) is
raised as ImageError naming the file, never as another exception type.

`to_mnist` turns such an array into the (28, 28) float32 input the MNIST CNN was trained on,
following how MNIST itself was built: a light digit on a black background, fitted into a
20x20 box with its aspect ratio kept, placed so its centre of mass is at the centre of the
28x28 field, scaled so its brightest pixel is 1.0.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PipelineError

MNIST_SIZE = 28
BOX_SIZE = 20  # MNIST digits were fitted into a 20x20 box inside the 28x28 field
INK_FRACTION = 0.1  # a pixel is ink when brighter than this fraction of the brightest one
# Below this contrast (after removing the background) the image is taken as blank: scaling
# such a faint signal up to 1.0 would turn noise or JPEG artefacts into a "digit".
MIN_CONTRAST = 0.04
# Colour channels whose visible pixels vary less than this carry no picture, only alpha does.
UNIFORM_COLOUR = 0.05

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(PipelineError):
    """A problem with one input image file; the message names the file and the fault."""


def load_image(
    path: str | os.PathLike[str], *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000
) -> np.ndarray:
    """Read an image file as float32 grayscale in [0, 1], shape (H, W).

    Raise ImageError for any file that cannot be used, before reading or decoding more than
    the limits allow.
    """
    name = os.fspath(path)
    data = _read_bounded(name, max_bytes)
    try:
        # Our own pixel check below is the limit that matters; Pillow's warning above its
        # global limit would only be noise (its hard error at twice that is still caught).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width <= 0 or height <= 0:
                    raise ImageError(f"{name}: the image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageError(
                        f"{name}: the image is {width}x{height} = {width * height:,} pixels, "
                        f"more than the limit of {max_pixels:,} (refused as a possible "
                        "decompression bomb)"
                    )
                if im.format == "EPS":
                    # Pillow decodes PostScript by running Ghostscript on it: not for user files.
                    raise ImageError(f"{name}: EPS/PostScript files are not accepted")
                im.load()  # first frame only: Image.open starts at frame 0
                upright = ImageOps.exif_transpose(im)  # photos are often stored rotated
                try:
                    return _to_gray(upright)
                except (ValueError, OSError) as exc:  # a mode Pillow reads but cannot convert
                    raise ImageError(
                        f"{name}: unsupported colour mode {upright.mode!r}: {exc}"
                    ) from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a possible decompression bomb: {exc}") from None
    except Exception as exc:  # any decoder failure at all means a bad file
        raise ImageError(
            f"{name}: the image is corrupt or truncated and cannot be decoded "
            f"({type(exc).__name__}: {exc})"
        ) from None


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Centre and scale a grayscale [0, 1] image into a (28, 28) float32 MNIST-style digit.

    A blank image (no ink) gives all zeros.
    """
    img = np.asarray(gray, dtype=np.float32)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"to_mnist needs a non-empty 2-D array, got shape {img.shape}")
    img = np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0)  # a fresh copy we may modify
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)

    # The border is almost always background; MNIST digits are light on dark.
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    if np.median(border) > 0.5:
        np.subtract(1.0, img, out=img)
        border = 1.0 - border
    img -= np.median(border)
    np.clip(img, 0.0, None, out=img)
    peak = float(img.max())
    if peak < MIN_CONTRAST:
        return out

    ink = img > INK_FRACTION * peak
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    patch = _fit_box(crop, BOX_SIZE)
    mass = float(patch.sum())
    if mass <= 0.0:
        return out
    ph, pw = patch.shape
    cy = float(patch.sum(axis=1) @ np.arange(ph)) / mass
    cx = float(patch.sum(axis=0) @ np.arange(pw)) / mass
    # Pixel-index coordinates: real MNIST digits have their mass centre at (14.0, 14.0).
    centre = MNIST_SIZE / 2
    top = min(max(round(centre - cy), 0), MNIST_SIZE - ph)
    left = min(max(round(centre - cx), 0), MNIST_SIZE - pw)
    out[top : top + ph, left : left + pw] = patch
    out /= out.max()
    return out


def _fit_box(crop: np.ndarray, box: int) -> np.ndarray:
    """Resize so the longer side is `box` pixels, keeping the aspect ratio."""
    h, w = crop.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # Pillow wants (w, h)
    if size != (w, h):
        # Lanczos on a float image antialiases like MNIST's own resizing and keeps grey
        # levels; a 1-pixel stroke shrinks to a faint one, which the final rescale restores.
        im = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))
        crop = np.asarray(im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
    return np.clip(crop, 0.0, None)  # Lanczos overshoots below zero next to strokes


def _read_bounded(name: str, max_bytes: int) -> bytes:
    """Return the file's bytes, refusing non-files, empty files and files over max_bytes."""
    try:
        # stat first: opening a FIFO or device could block or never end.
        st = os.stat(name)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name}: is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{name}: not a regular file")
        _check_size(name, st.st_size, max_bytes)
        with open(name, "rb") as f:
            # The file may have changed since stat: never read more than the limit allows.
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read the file: {exc.strerror or exc}") from None
    _check_size(name, len(data), max_bytes)
    return data


def _check_size(name: str, size: int, max_bytes: int) -> None:
    """Refuse an empty file or one larger than max_bytes."""
    if size == 0:
        raise ImageError(f"{name}: the file is empty")
    if size > max_bytes:
        raise ImageError(
            f"{name}: the file is {size:,} bytes, more than the limit of {max_bytes:,}"
        )


def _to_gray(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to float32 grayscale in [0, 1]."""
    mode = im.mode
    if mode in _16BIT_MODES:
        # Scale by the 16-bit range: converting to "L" would clip everything above 255.
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode in ("I", "F"):
        return _scale_wide(np.asarray(im).astype(np.float32))
    if mode in _ALPHA_MODES or (mode in ("1", "L", "P", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        gray = _as_unit(rgba.convert("L"))  # Pillow's L ignores alpha: colour only
        alpha = _as_unit(rgba.getchannel("A"))
        return _composite(gray, alpha)
    if mode in ("1", "RGB"):
        im = im.convert("L")
    elif mode != "L":
        # P, CMYK, YCbCr, ...: through RGB, the one conversion every mode has to match its look.
        im = im.convert("RGB").convert("L")
    return _as_unit(im)


def _as_unit(im: Image.Image) -> np.ndarray:
    """8-bit Pillow image -> float32 array in [0, 1]."""
    arr = np.asarray(im, dtype=np.uint8).astype(np.float32)
    arr *= 1.0 / 255.0
    return arr


def _scale_wide(arr: np.ndarray) -> np.ndarray:
    """Map 32-bit integer or float pixels, which state no white level, to [0, 1].

    Non-negative values are scaled by the smallest usual full scale that holds them (1, 255
    or 65535); anything else is stretched from its own minimum to its maximum.
    """
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 65535.0:
        arr /= next(full for full in (1.0, 255.0, 65535.0) if hi <= full)
    elif hi > lo:
        arr = (arr - lo) / (hi - lo)
    else:
        arr = np.zeros_like(arr)
    return arr


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten gray-with-alpha onto a background, so transparent areas read as background."""
    opaque = alpha > 0.5
    if not opaque.any():
        opaque = alpha > 0.0
        if not opaque.any():
            return np.zeros_like(gray)  # fully transparent: nothing drawn
    shown = gray[opaque]
    level = float(np.median(shown))
    if float(shown.max() - shown.min()) < UNIFORM_COLOUR or shown.size < 0.5 * gray.size:
        # One ink colour (the shape is in the alpha channel, e.g. a black digit on transparent)
        # or sparse strokes: put them on the contrasting background so they stay visible.
        background = 1.0 if level < 0.5 else 0.0
    else:
        # Mostly opaque with varied colours: a picture with transparent padding or corners;
        # continue its own background (the typical opaque colour) into the transparent parts.
        background = level
    return alpha * gray + (1.0 - alpha) * background
