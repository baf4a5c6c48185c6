"""Reading users' photos: any file, PIL image or array becomes an upright 8-bit RGB image.

The official code reads images with ``Image.open(path).convert("RGB")`` (official
``datasets/data_loader.py`` ``pull_item``). That is fine for the COCO JPEGs of the benchmarks, but
photos as people take them need more, and :func:`load_photo` does it (datasets keep the official
reader; this is for ``predict`` and the Python API):

- **EXIF orientation** is applied first (``PIL.ImageOps.exif_transpose``), so the image, its box
  and its mask are in the orientation every viewer shows. ``exif_orientation=False`` keeps the
  stored orientation (the official behaviour).
- **Modes**: grayscale ``1``/``L`` is replicated to three channels; 16-bit grayscale (``I;16*``,
  and ``I`` whose values must lie in 0..65535) is rescaled by its bit depth, ``round(v * 255 /
  65535)`` (65535 -> 255, 32768 -> 128: nothing is clipped); float ``F`` must lie in [0, 1];
  palette ``P`` is expanded; ``CMYK`` goes through Pillow's conversion (Pillow's JPEG reader
  already undoes Adobe's inverted CMYK); ``YCbCr`` is converted. 16-bit colour PNGs are read by
  Pillow itself, which keeps the high byte. Embedded ICC colour profiles are ignored, as in the
  official pipeline the model was trained with. Multi-frame files (GIF, TIFF) give their first
  frame.
- **Transparency** (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, premultiplied
  ``RGBa``/``La``) is composited on ``background``, by default the ImageNet mean colour
  (124, 116, 104): that is the colour the evaluation letterbox pads with (0 after normalisation),
  so transparent areas look to the model like the "no image here" border it was trained with,
  rather than a white or black region it might ground to. ``background=None`` drops the alpha
  channel and keeps whatever colour the transparent pixels hold (the official ``convert("RGB")``).
- **Size limits**: images over ``max_pixels`` are downscaled (aspect ratio kept) with one log
  message; JPEGs are then decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``draft``) when that still
  gives at least the target size, which saves memory and time. Images over ``hard_max_pixels``
  are refused before they are decoded. Pillow's own decompression-bomb guard
  (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top; its warning is replaced by these rules
  and its error by a message that says which setting to change.
- **Broken input** is a clear error naming the file: a missing path (``FileNotFoundError``), a
  directory, a file that is not an image, a truncated or corrupt file (``ImageError``, a
  ``ValueError``). Truncated files are never read in part: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
  left False.

:class:`Photo` keeps the size the user sees (``original_size``, after EXIF, before any
downscaling): boxes and masks predicted on ``Photo.image`` map back to it with
:meth:`Photo.box_to_original` and :meth:`Photo.mask_to_original`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

from oneref.data.transforms import IMAGENET_MEAN, nearest_indices

log = logging.getLogger(__name__)

# The letterbox pad colour: normalised ImageNet mean = 0 (see the module docstring).
DEFAULT_BACKGROUND: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
# Downscale above this (50 MP keeps 48 MP phone photos untouched) ...
DEFAULT_MAX_PIXELS = 50_000_000
# ... and refuse above this: Pillow's default decompression-bomb error threshold (2 x 89,478,485).
DEFAULT_HARD_MAX_PIXELS = 178_956_970

EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90
_HEIF_SUFFIXES = {".heic", ".heif", ".avif", ".hif"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P"}  # Pillow's convert("RGB") is the right map

ImageSource = str | Path | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Photo:
    """An image ready for the model, and the size the user sees.

    ``image``: upright 8-bit RGB, possibly downscaled. ``original_size``: (width, height) after the
    EXIF rotation and before any downscaling; predictions are reported in these pixels.
    """

    image: Image.Image
    original_size: tuple[int, int]
    name: str

    @property
    def downscaled(self) -> bool:
        return self.image.size != self.original_size

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) original pixels per ``image`` pixel (1, 1 unless downscaled)."""
        return self.original_size[0] / self.image.width, self.original_size[1] / self.image.height

    def box_to_original(self, box_xyxy: Sequence[float] | np.ndarray) -> np.ndarray:
        """x1, y1, x2, y2 (or a (..., 4) array of them) in ``image`` pixels -> original pixels."""
        sx, sy = self.scale
        return np.asarray(box_xyxy, dtype=np.float64) * np.array([sx, sy, sx, sy])

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """An (h, w) mask on ``image`` -> (H, W) on the original, nearest neighbour (torch's rule,
        as everywhere else masks are resized)."""
        mask = np.asarray(mask)
        if mask.shape != (self.image.height, self.image.width):
            raise ValueError(
                f"{self.name}: mask is {mask.shape}, expected (height, width) = "
                f"{(self.image.height, self.image.width)} of the loaded image"
            )
        if not self.downscaled:
            return mask
        w, h = self.original_size
        rows = nearest_indices(self.image.height, h)
        cols = nearest_indices(self.image.width, w)
        return mask[rows[:, None], cols[None, :]]


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    hard_max_pixels: int | None = DEFAULT_HARD_MAX_PIXELS,
    background: tuple[int, int, int] | str | None = DEFAULT_BACKGROUND,
    exif_orientation: bool = True,
) -> Image.Image:
    """:func:`load_photo`'s image only (upright 8-bit RGB). Use :func:`load_photo` when boxes must
    be mapped back to a downscaled image's original size."""
    return load_photo(
        source,
        name=name,
        max_pixels=max_pixels,
        hard_max_pixels=hard_max_pixels,
        background=background,
        exif_orientation=exif_orientation,
    ).image


def load_photo(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    hard_max_pixels: int | None = DEFAULT_HARD_MAX_PIXELS,
    background: tuple[int, int, int] | str | None = DEFAULT_BACKGROUND,
    exif_orientation: bool = True,
) -> Photo:
    """Read ``source`` as an upright 8-bit RGB :class:`Photo` (see the module docstring).

    ``source``: a path (str or Path), a PIL image (lazily opened or loaded) or a numpy array:
    (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, of dtype uint8, uint16 (rescaled
    by 65535) or float16/32/64 with values in [0, 1]. Anything else is refused.
    ``name`` labels the source in messages (default: the path, or ``<PIL image>``/``<array>``).
    ``max_pixels``: downscale larger images to at most this many pixels (None: never).
    ``hard_max_pixels``: refuse larger images (None: only Pillow's own guard).
    ``background``: RGB triple or colour name for transparent pixels; None drops the alpha.
    ``exif_orientation``: apply the EXIF orientation tag (False: stored orientation, official).
    """
    bg = _background(background)
    for value, key in ((max_pixels, "max_pixels"), (hard_max_pixels, "hard_max_pixels")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
    _warn_if_truncated_allowed()
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        label = name or str(path)
        _check_path(path, label)
        img = _open(path, label)
        with img:
            return _finish(img, label, max_pixels, hard_max_pixels, bg, exif_orientation, own=True)
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "<PIL image>"
        return _finish(source, label, max_pixels, hard_max_pixels, bg, exif_orientation)
    if isinstance(source, np.ndarray):
        label = name or "<array>"
        img = Image.fromarray(_array_to_uint8(source, label))
        return _finish(img, label, max_pixels, hard_max_pixels, bg, exif_orientation=False)
    hint = ""
    if type(source).__module__.startswith("torch"):
        hint = " (for a (3, H, W) tensor pass tensor.permute(1, 2, 0).cpu().numpy())"
    raise TypeError(
        f"{name or 'image'}: expected a path, a PIL image or a numpy array, got {type(source).__name__}{hint}"
    )


# -- sources ----------------------------------------------------------------------------------------
def _check_path(path: Path, label: str) -> None:
    if path.is_dir():
        raise ImageError(f"{label} is a directory, not an image file")
    if not path.exists():
        raise FileNotFoundError(f"image not found: {label}")


def _open(path: Path, label: str) -> Image.Image:
    """Image.open with Pillow's errors turned into ones that name the file and the fix."""
    try:
        with warnings.catch_warnings():
            # our own size rules (_check_size) replace Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        limit = Image.MAX_IMAGE_PIXELS
        raise ImageError(
            f"{label}: {e} This is Pillow's decompression-bomb guard (it refuses images over "
            f"2 x PIL.Image.MAX_IMAGE_PIXELS = {2 * limit:,} pixels). If you trust the file, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (and hard_max_pixels) before loading it, or downscale it first."
        ) from e
    except UnidentifiedImageError as e:
        hint = ""
        if path.suffix.lower() in _HEIF_SUFFIXES:
            hint = (
                f" Pillow cannot read {path.suffix} files without a plugin: convert the photo to JPEG or "
                "PNG, or install pillow-heif and call pillow_heif.register_heif_opener() first."
            )
        raise ImageError(f"{label}: not an image file Pillow can read.{hint}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: cannot open the image ({e})") from e


def _array_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    """Validate a numpy image and bring it to uint8 (H, W) / (H, W, 3) / (H, W, 4)."""
    shape = arr.shape
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        hint = ""
        if arr.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
            hint = f"; it looks channels-first: pass arr.transpose(1, 2, 0) (shape {shape[1:] + shape[:1]})"
        raise ImageError(
            f"{label}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {shape}{hint}"
        )
    if arr.size == 0:
        raise ImageError(f"{label}: the array is empty (shape {shape})")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return _rescale_16bit(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_uint8(arr, label)
    raise ImageError(
        f"{label}: arrays of dtype {arr.dtype} are not accepted; give uint8 (0..255), uint16 (0..65535) or "
        "float values in [0, 1] (e.g. arr.astype(np.uint8) if the values are 0..255)"
    )


def _rescale_16bit(arr: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) in exact integer arithmetic: 65535 -> 255, 32768 -> 128
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    a = arr.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ImageError(f"{label}: the image holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(
            f"{label}: float images must have values in [0, 1], got {lo:g}..{hi:g}"
            + (" (divide by 255 if they are 0..255)" if hi <= 255 and lo >= 0 else "")
        )
    return np.rint(a * 255.0).astype(np.uint8)


# -- the common path --------------------------------------------------------------------------------
def _finish(
    img: Image.Image,
    label: str,
    max_pixels: int | None,
    hard_max_pixels: int | None,
    background: tuple[int, int, int] | None,
    exif_orientation: bool,
    own: bool = False,
) -> Photo:
    """Orientation, limits, decoding, mode and size for an opened image. ``own``: we opened the file
    ourselves, so it may be drafted (a caller's lazily opened image is never changed)."""
    source = img
    orientation = _orientation(img, label) if exif_orientation else 1
    w, h = img.size
    upright = (h, w) if orientation in _SWAPS_AXES else (w, h)
    target = _check_size(upright, label, max_pixels, hard_max_pixels)
    if own and target is not None and img.format == "JPEG" and _is_lazy(img):
        stored_target = target[::-1] if orientation in _SWAPS_AXES else target
        img.draft(img.mode, stored_target)  # libjpeg DCT scaling; never below the target size
    try:
        img.load()
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        raise ImageError(
            f"{label}: cannot decode the image, the file is truncated or corrupt ({e}); re-export or "
            "re-download it"
        ) from e
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    rgb = _to_rgb(img, label, background)
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    elif rgb is source:  # never hand back the caller's object (or an open file's)
        rgb = rgb.copy()
    return Photo(image=rgb, original_size=upright, name=label)


def _orientation(img: Image.Image, label: str) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("%s: unreadable EXIF data (%s); using the stored orientation", label, e)
        return 1
    return int(value) if value in range(1, 9) else 1


def _check_size(
    size: tuple[int, int], label: str, max_pixels: int | None, hard_max_pixels: int | None
) -> tuple[int, int] | None:
    """The size to downscale to, or None to keep the image; refuses images over the hard limit."""
    w, h = size
    pixels = w * h
    if hard_max_pixels is not None and pixels > hard_max_pixels:
        raise ImageError(
            f"{label}: {w}x{h} = {pixels:,} pixels is over hard_max_pixels = {hard_max_pixels:,}; if you "
            "trust the file, raise hard_max_pixels (or set it to None), or downscale the image first"
        )
    if max_pixels is None or pixels <= max_pixels:
        if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
            log.info(
                "%s: %dx%d = %s pixels is over Pillow's decompression-bomb warning threshold "
                "(PIL.Image.MAX_IMAGE_PIXELS = %s); loading it in full since it is under max_pixels",
                label,
                w,
                h,
                f"{pixels:,}",
                f"{Image.MAX_IMAGE_PIXELS:,}",
            )
        return None
    f = math.sqrt(max_pixels / pixels)
    tw, th = max(1, math.floor(w * f)), max(1, math.floor(h * f))
    log.info(
        "%s: %dx%d = %s pixels is over max_pixels = %s; downscaled to %dx%d (boxes and masks are still "
        "reported in the original %dx%d pixels)",
        label,
        w,
        h,
        f"{pixels:,}",
        f"{max_pixels:,}",
        tw,
        th,
        w,
        h,
    )
    return tw, th


def _to_rgb(img: Image.Image, label: str, background: tuple[int, int, int] | None) -> Image.Image:
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        mode = "PA"  # a palette entry (or several) is transparent
        img = img.convert("RGBA")
    if mode in _ALPHA_MODES:
        if img.mode == "La":  # Pillow converts premultiplied La only to LA
            img = img.convert("LA")
        if background is None:  # the official convert("RGB"): alpha dropped
            return img.convert("RGB")
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if mode == "I":
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise ImageError(
                    f"{label}: 32-bit integer image with values {lo}..{hi}; only 0..65535 (16-bit) can be "
                    "rescaled to 8 bits without guessing: rescale it yourself to uint8"
                )
        return Image.fromarray(_rescale_16bit(arr.astype(np.uint16))).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img), label)).convert("RGB")
    raise ImageError(
        f"{label}: image mode {mode!r} is not supported; convert it to RGB first (e.g. with "
        "PIL.ImageCms for LAB images)"
    )


def _background(value: tuple[int, int, int] | str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError as e:
            raise ValueError(f"background: unknown colour {value!r} ({e})") from e
        return tuple(rgb[:3])
    rgb = tuple(value)
    if len(rgb) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in rgb):
        raise ValueError(
            f"background must be an (r, g, b) triple of ints in 0..255, a colour name or None, got {value!r}"
        )
    return tuple(int(c) for c in rgb)


def _is_lazy(img: Image.Image) -> bool:
    # an opened file still has its decoder tiles until load()
    return bool(getattr(img, "tile", None))


_warned_truncated = False


def _warn_if_truncated_allowed() -> None:
    """Once per process: we cannot catch truncated files if other code told Pillow to fill them in."""
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by other code): truncated "
            "image files will load with missing pixels instead of raising an error"
        )


@dataclass(frozen=True)
class PhotoOptions:
    """How photos are read: the keyword arguments of :func:`load_photo`, held in one value (the
    Predictor, ``oneref.load`` and the ``photo:`` group of conf/predict.yaml pass this)."""

    exif_orientation: bool = True
    background: tuple[int, int, int] | str | None = DEFAULT_BACKGROUND
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    hard_max_pixels: int | None = DEFAULT_HARD_MAX_PIXELS

    @classmethod
    def from_any(cls, value: PhotoOptions | dict | None) -> PhotoOptions:
        """``value`` as options: None (the defaults), a mapping of the fields (a list background,
        as YAML gives it, becomes a tuple), or options; checked at once (a bad value raises)."""
        if isinstance(value, cls):
            options = value
        elif value is None:
            options = cls()
        elif isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown photo options {unknown}; valid: {sorted(known)}")
            given = dict(value)
            if isinstance(given.get("background"), list):
                given["background"] = tuple(given["background"])
            options = cls(**given)
        else:
            raise TypeError(f"photo options must be a PhotoOptions or a dict, got {type(value).__name__}")
        options.load(np.zeros((1, 1, 3), np.uint8))  # the settings, checked now
        return options

    def load(self, source: ImageSource, *, name: str | None = None) -> Photo:
        """``source`` read with these options (:func:`load_photo`)."""
        return load_photo(source, name=name, **asdict(self))
