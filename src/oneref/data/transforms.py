"""Image, box and mask transforms of the official OneRef pipeline (official ``datasets/__init__.py``
``make_transforms`` and ``datasets/transforms.py``), fast.

Evaluation (`eval_transform`) reproduces the official numbers exactly: long side -> `img_size` with
PIL bilinear and Python's banker's `round`, `(uint8/255 - mean)/std` in float32, a centred zero
letterbox at `round(d/2 - 0.1)`, nearest-neighbour masks with torch's index rule.

Training (`TrainTransform`) draws the official augmentations (RandomSelect with the spatial-word
rule, long-side RandomResize, short-side resize + RandomSizeCrop with its axis quirk, ColorJitter,
optional blur, translated letterbox) from a per-sample `numpy.random.Generator`, so a sample's
augmentation depends only on (seed, epoch, index). Geometry (sizes, crops, boxes, masks) follows the
official op sequence exactly. Two deliberate speed-ups change pixels slightly, both on by default
and both switchable (`resize_backend="pil"`, `jpeg_draft=False` give the official pixels):
- `resize_backend="torch"`: torch's uint8 antialiased bilinear kernel, which reproduces Pillow's
  filter to within one grey level at about a third of the cost;
- `jpeg_draft`: JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the output is
  that much smaller.
Masks never materialise at full resolution when they are box rectangles: they travel as row and
column vectors and every geometric step is an index lookup. Normalisation and letterboxing write
straight into the batch tensors (`TransformResult.write`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageStat
from pycocotools import mask as coco_mask

from oneref.config import options_from

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Official RandomSelect: phrases with these substrings never take the crop branch.
SPATIAL_WORDS = ("left", "right", "top", "bottom", "middle")


def _normalisation_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # Same float32 operations as to_tensor().div(255) then normalize(): exact, and a gather is
    # faster than three passes of float arithmetic.
    u = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((u[None, :] - m) / s).astype(np.float32)  # (3, 256)


_LUT = _normalisation_lut(IMAGENET_MEAN, IMAGENET_STD)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output pixel for torch's `interpolate(mode='nearest')`."""
    if in_size == out_size:
        return np.arange(out_size)
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def long_side_size(w: int, h: int, size: int) -> tuple[float, int, int]:
    """Official RandomResize (long side): ratio and the rounded new (w, h)."""
    ratio = float(size / float(max(w, h)))
    return ratio, round(w * ratio), round(h * ratio)


def short_side_size(w: int, h: int, size: int) -> tuple[float, int, int]:
    ratio = float(size / float(min(w, h)))
    return ratio, round(w * ratio), round(h * ratio)


def centre_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """Official centred letterbox offsets (top, left): odd padding puts the extra pixel bottom/right."""
    return round((size - h) / 2.0 - 0.1), round((size - w) / 2.0 - 0.1)


def letterbox_box(box_xyxy: Sequence[float], h: int, w: int, size: int) -> np.ndarray:
    """Normalised (cx, cy, w, h) of an original-pixel box after the evaluation letterbox."""
    ratio, ow, oh = long_side_size(w, h, size)
    top, left = centre_offsets(oh, ow, size)
    return _finish_box(np.asarray(box_xyxy, dtype=np.float32) * np.float32(ratio), top, left, size)


def letterbox_to_original(
    boxes_xyxy: torch.Tensor, letterbox: torch.Tensor, orig_size: torch.Tensor
) -> torch.Tensor:
    """Map xyxy pixel boxes of the padded square back to original-image pixels.

    ``letterbox`` (B,3) = (ratio, left, top) with ``padded = orig * ratio + (left, top)``;
    ``orig_size`` (B,2) = (h, w). The result is clamped to the image.
    """
    ratio, left, top = letterbox.unbind(-1)
    shift = torch.stack((left, top, left, top), dim=-1)
    out = (boxes_xyxy - shift) / ratio.unsqueeze(-1)
    h, w = orig_size.to(out.dtype).unbind(-1)
    upper = torch.stack((w, h, w, h), dim=-1)
    return torch.minimum(out.clamp(min=0), upper)


def _finish_box(box: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    b = box + np.array([left, top, left, top], dtype=np.float32)
    cxcywh = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]], dtype=np.float32)
    return cxcywh / np.float32(size)


class ObjMask:
    """A binary object mask at original resolution plus pending geometric steps.

    Either a full (H, W) array or, for box rectangles, a row vector and a column vector (the mask is
    their outer product). `resize`, `crop` only compose index arrays; `materialize` gathers once.
    """

    __slots__ = ("_full", "_rows", "_cols", "_ri", "_ci")

    def __init__(
        self,
        full: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        cols: np.ndarray | None = None,
    ) -> None:
        if (full is None) == (rows is None or cols is None):
            raise ValueError("ObjMask needs either a full mask or both rows and cols")
        self._full = None if full is None else np.asarray(full, dtype=bool)
        self._rows = None if rows is None else np.asarray(rows, dtype=bool)
        self._cols = None if cols is None else np.asarray(cols, dtype=bool)
        h, w = self._full.shape if self._full is not None else (len(self._rows), len(self._cols))
        self._ri = np.arange(h)
        self._ci = np.arange(w)

    @classmethod
    def from_box_xywh(cls, x: float, y: float, w: float, h: float, height: int, width: int) -> ObjMask:
        """The box rectangle exactly as pycocotools rasterises `frPyObjects(array([[x,y,w,h]]))`.

        The rectangle is separable, so two 1-D rasterisations give the same pixels (checked in tests).
        """
        cols = _coco_decode(coco_mask.frPyObjects(np.array([[x, 0.0, w, 1.0]]), 1, int(width)))
        rows = _coco_decode(coco_mask.frPyObjects(np.array([[0.0, y, 1.0, h]]), int(height), 1))
        return cls(rows=rows[:, 0, 0].astype(bool), cols=cols[0, :, 0].astype(bool))

    @classmethod
    def from_segmentation(cls, segmentation: Any, height: int, width: int) -> ObjMask:
        """COCO polygons (list of flat x,y lists) or RLE, decoded at (height, width) as the official code."""
        if isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), (str, bytes)):
            rle = dict(segmentation)
        else:
            if not segmentation:
                raise ValueError("empty segmentation")
            rles = coco_mask.frPyObjects(segmentation, int(height), int(width))
            rle = coco_mask.merge(rles) if isinstance(rles, list) else rles
        m = _coco_decode(rle)
        if m.ndim == 3:
            m = m.any(axis=2)
        return cls(full=m.astype(bool, copy=False))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self._ri), len(self._ci)

    def resize(self, out_h: int, out_w: int) -> None:
        h, w = self.shape
        self._ri = self._ri[nearest_indices(h, out_h)]
        self._ci = self._ci[nearest_indices(w, out_w)]

    def crop(self, top: int, left: int, h: int, w: int) -> None:
        self._ri = self._ri[top : top + h]
        self._ci = self._ci[left : left + w]

    def paste(self, out: np.ndarray, top: int, left: int) -> None:
        """Write the current mask into the square `out` (S, S) at (top, left), zeros elsewhere."""
        h, w = self.shape
        out[...] = False
        if self._full is None:
            rows = self._rows[self._ri]
            cols = self._cols[self._ci]
            np.logical_and(rows[:, None], cols[None, :], out=out[top : top + h, left : left + w])
        else:
            out[top : top + h, left : left + w] = self._full[np.ix_(self._ri, self._ci)]

    def padded(self, size: int, top: int, left: int) -> np.ndarray:
        """(size, size) bool mask with the current mask placed at (top, left)."""
        out = np.empty((size, size), dtype=bool)
        self.paste(out, top, left)
        return out


def _coco_decode(rles: Any) -> np.ndarray:
    # pycocotools' Cython objects trip numpy 2's __array__(copy=...) deprecation on every call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rles)


@dataclass
class TransformResult:
    """A transformed sample before normalisation: the resized uint8 image and where it goes.

    `write` normalises and letterboxes straight into a batch buffer (no per-sample float tensor);
    `image()`, `image_mask()`, `obj_mask()` build single tensors.
    """

    pixels: np.ndarray  # uint8 (h, w, 3), the resized (and photometrically augmented) image
    size: int  # S, side of the letterbox square
    top: int
    left: int
    box: np.ndarray  # float32 (4,), normalised cx, cy, w, h in the padded square
    mask: ObjMask  # object mask in the resized frame (h, w)
    letterbox: tuple[float, int, int]  # (ratio, left, top): padded = frame * ratio + (left, top)
    # the batch's orig_size/orig_box: the frame the final resize starts from (the image itself at
    # evaluation, the crop of a cropping augmentation)
    orig_size: tuple[int, int]  # (h, w)
    orig_box: np.ndarray  # float32 x1y1x2y2 in that frame
    value_lut: np.ndarray | None = None  # uint8 (256,) still to apply to every value (colour jitter)

    def write(self, image: np.ndarray, image_mask: np.ndarray, obj_mask: np.ndarray) -> None:
        """Fill float32 image (3, S, S), bool padding mask (S, S) and bool object mask (S, S)."""
        normalize_and_pad(self.pixels, self.top, self.left, image, image_mask, self.value_lut)
        self.mask.paste(obj_mask, self.top, self.left)

    def write_uint8(self, image: np.ndarray) -> None:
        """Fill uint8 (3, S, S) with the same letterbox before normalisation, black padding: the
        VQ-KD input of MRefM (official ``NormalizeAndPad_FOR_MIM``, its un-normalised copy).
        ``image / 255`` in float32 equals the official ``to_tensor`` values bit for bit."""
        pixels = _apply(self.pixels, self.value_lut)
        h, w = pixels.shape[:2]
        image[...] = 0
        image[:, self.top : self.top + h, self.left : self.left + w] = pixels.transpose(2, 0, 1)

    def image(self) -> torch.Tensor:
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        pad = np.empty((self.size, self.size), dtype=bool)
        normalize_and_pad(self.pixels, self.top, self.left, out, pad, self.value_lut)
        return torch.from_numpy(out)

    def image_mask(self) -> torch.Tensor:
        pad = np.ones((self.size, self.size), dtype=bool)
        h, w = self.pixels.shape[:2]
        pad[self.top : self.top + h, self.left : self.left + w] = False
        return torch.from_numpy(pad)

    def obj_mask(self) -> torch.Tensor:
        return torch.from_numpy(self.mask.padded(self.size, self.top, self.left)[None])


def normalize_and_pad(
    pixels: np.ndarray,
    top: int,
    left: int,
    out: np.ndarray,
    pad: np.ndarray,
    value_lut: np.ndarray | None = None,
) -> None:
    """Official NormalizeAndPad into preallocated arrays: ImageNet-normalised pixels at (top, left)
    and zeros around them in `out` (3, S, S); `pad` (S, S) is True on the padding. `value_lut`
    (uint8 -> uint8) is applied first, folded into the normalisation table."""
    lut = _LUT if value_lut is None else _LUT[:, value_lut]
    h, w = pixels.shape[:2]
    b, r = top + h, left + w
    out[:, :top] = 0
    out[:, b:] = 0
    out[:, top:b, :left] = 0
    out[:, top:b, r:] = 0
    for c in range(3):
        np.take(lut[c], pixels[..., c], out=out[c, top:b, left:r], mode="clip")
    pad[...] = True
    pad[top:b, left:r] = False


def _check_fits(h: int, w: int, size: int) -> None:
    if h > size or w > size:
        raise ValueError(f"resized image {w}x{h} does not fit the {size}x{size} letterbox")


def _pixels(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit RGB image, got array {arr.dtype} {arr.shape}")
    return arr


def eval_transform(img: Image.Image, box_xyxy: np.ndarray, mask: ObjMask, img_size: int) -> TransformResult:
    """Official evaluation transform: RandomResize([S]) -> ToTensor -> NormalizeAndPad(S), exact."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    ratio, ow, oh = long_side_size(w, h, img_size)
    if (ow, oh) != (w, h):
        img = img.resize((ow, oh), Image.BILINEAR)
    box = np.asarray(box_xyxy, dtype=np.float32)
    mask.resize(oh, ow)
    _check_fits(oh, ow, img_size)
    top, left = centre_offsets(oh, ow, img_size)
    return TransformResult(
        pixels=_pixels(img),
        size=img_size,
        top=top,
        left=left,
        box=_finish_box(box * np.float32(ratio), top, left, img_size),
        mask=mask,
        letterbox=(ratio, left, top),
        orig_size=(h, w),
        orig_box=box,
    )


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation switches (official scripts: crop, scale and translate on, blur off)."""

    enabled: bool = True
    aug_crop: bool = True
    aug_scale: bool = True
    aug_translate: bool = True
    aug_blur: bool = False
    color_jitter: float = 0.4  # brightness = contrast = saturation strength; 0/false off, true = 0.4
    color_jitter_p: float = 0.8
    crop_prob: float = 0.5
    # "official": scales S - 32 i (i < 7), short side 400/500/600, crop 384..600 (valid for S >= 384);
    # "relative": S k/12 (k = 12..6) and 400/500/600, 384/600 scaled by S/384; "auto": official for
    # S >= 384, relative below.
    scale_mode: str = "auto"
    crop_quirk: bool = True  # official RandomSizeCrop compares the box centre with the wrong axes
    # "torch": antialiased bilinear on uint8 (torch's SIMD kernel: Pillow's filter within one grey
    # level, about 3x faster when downscaling); "pil": Pillow, as the official code.
    resize_backend: str = "torch"
    jpeg_draft: bool = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when the output is that small

    def __post_init__(self) -> None:
        cj = self.color_jitter
        if isinstance(cj, bool):  # a switch in configs: on = the official strength
            object.__setattr__(self, "color_jitter", 0.4 if cj else 0.0)
        elif not 0 <= float(cj) <= 1:
            raise ValueError(f"color_jitter must be a switch or a strength in [0, 1], got {cj!r}")

    @classmethod
    def from_any(cls, value: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
        return options_from(cls, value, "augment")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainTransform:
    """Official training augmentations, drawn from a per-sample generator.

    Call with a lazily opened PIL image (so JPEG draft decoding can be chosen before decoding), the
    x1y1x2y2 box in its pixels, its `ObjMask`, the lowercased phrase and a `numpy.random.Generator`.
    """

    MAX_CROP_TRIES = 20

    def __init__(
        self, img_size: int, cfg: AugmentConfig | Mapping[str, Any] | None = None, num_scales: int = 7
    ) -> None:
        self.img_size = int(img_size)
        self.cfg = AugmentConfig.from_any(cfg)
        s = self.img_size
        mode = self.cfg.scale_mode
        if mode == "auto":
            mode = "official" if s >= 384 else "relative"
        if mode not in ("official", "relative"):
            raise ValueError(f"scale_mode must be official, relative or auto, got {self.cfg.scale_mode!r}")
        # 7 long-side scales in the official grounding transform, 6 in DataAugmentationForMIM (MRefM)
        if not 1 <= num_scales <= 7:
            raise ValueError(f"num_scales must be in 1..7, got {num_scales}")
        if mode == "official":
            self.scales = [s - 32 * i for i in range(num_scales)] if self.cfg.aug_scale else [s]
            self.short_sizes = [400, 500, 600]
            self.crop_min, self.crop_max = 384, 600
            self.blur_scale = 1.0
        else:
            f = s / 384.0
            self.scales = (
                [round(s * k / 12) for k in range(12, 12 - num_scales, -1)] if self.cfg.aug_scale else [s]
            )
            self.short_sizes = [round(400 * f), round(500 * f), round(600 * f)]
            self.crop_min, self.crop_max = round(384 * f), round(600 * f)
            self.blur_scale = f
        self.scale_mode = mode
        if self.cfg.resize_backend not in ("torch", "pil"):
            raise ValueError(f"resize_backend must be torch or pil, got {self.cfg.resize_backend!r}")
        if min(self.scales) < 1:
            raise ValueError(f"img_size {s} too small for the scale list {self.scales}")

    def __repr__(self) -> str:
        return f"TrainTransform(img_size={self.img_size}, scales={self.scales}, cfg={self.cfg})"

    def use_crop_branch(self, phrase: str, rng: np.random.Generator) -> bool:
        if not self.cfg.aug_crop or self.cfg.crop_prob <= 0:
            return False
        if any(word in phrase for word in SPATIAL_WORDS):
            return False
        return bool(rng.random() < self.cfg.crop_prob)

    def __call__(
        self,
        img: Image.Image,
        box_xyxy: np.ndarray,
        mask: ObjMask,
        phrase: str,
        rng: np.random.Generator,
    ) -> TransformResult:
        if not self.cfg.enabled:
            return eval_transform(img, box_xyxy, mask, self.img_size)
        cfg = self.cfg
        w0, h0 = img.size
        box = np.asarray(box_xyxy, dtype=np.float32)
        # --- geometry: the official op sequence on sizes, box and mask ---
        crop = None  # (top, left, h, w) in the short-side-resized frame
        w1, h1 = w0, h0
        branch2 = self.use_crop_branch(phrase, rng)
        if branch2:
            r1, w1, h1 = short_side_size(w0, h0, self.short_sizes[rng.integers(len(self.short_sizes))])
            box = box * np.float32(r1)
            mask.resize(h1, w1)
            crop = self._draw_crop(box, w1, h1, rng)
            if crop is not None:
                i, j, ch, cw = crop
                box = box - np.array([j, i, j, i], dtype=np.float32)
                box = np.minimum(box.reshape(2, 2), np.array([cw, ch], dtype=np.float32)).reshape(-1)
                box = np.maximum(box, np.float32(0))
                mask.crop(i, j, ch, cw)
        fh, fw = (crop[2], crop[3]) if crop is not None else (h1, w1)
        orig_box = box.copy()
        r2, ow, oh = long_side_size(fw, fh, self.scales[rng.integers(len(self.scales))])
        box = box * np.float32(r2)
        mask.resize(oh, ow)
        _check_fits(oh, ow, self.img_size)
        # --- pixels ---
        pixels = self._resample(img, (w0, h0), (w1, h1) if branch2 else None, crop, (ow, oh))
        pixels, value_lut = self._photometric(pixels, rng)
        # --- letterbox ---
        dh, dw = self.img_size - oh, self.img_size - ow
        if cfg.aug_translate:
            top, left = int(rng.integers(dh + 1)), int(rng.integers(dw + 1))
        else:
            top, left = centre_offsets(oh, ow, self.img_size)
        return TransformResult(
            pixels=pixels,
            size=self.img_size,
            top=top,
            left=left,
            box=_finish_box(box, top, left, self.img_size),
            mask=mask,
            letterbox=(r2, left, top),
            orig_size=(fh, fw),
            orig_box=orig_box,
            value_lut=value_lut,
        )

    def _draw_crop(
        self, box: np.ndarray, w: int, h: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int] | None:
        """Official RandomSizeCrop: (top, left, h, w) or None when no try is accepted."""
        lo = min(self.crop_min, w, h)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        for _ in range(self.MAX_CROP_TRIES):
            cw = int(rng.integers(lo, min(w, self.crop_max) + 1))
            ch = int(rng.integers(lo, min(h, self.crop_max) + 1))
            i = int(rng.integers(h - ch + 1))
            j = int(rng.integers(w - cw + 1))
            if self.cfg.crop_quirk:
                ok = cx > i and cy > j  # sic: x against the top, y against the left
            else:
                ok = j < cx < j + cw and i < cy < i + ch
            if ok:
                return i, j, ch, cw
        return None

    def _resample(
        self,
        img: Image.Image,
        size0: tuple[int, int],
        size1: tuple[int, int] | None,
        crop: tuple[int, int, int, int] | None,
        out: tuple[int, int],
    ) -> np.ndarray:
        """Pixels after [short-side resize to size1 -> crop] -> resize to out, as uint8 (h, w, 3)."""
        w0, h0 = size0
        if self.cfg.jpeg_draft and img.format == "JPEG" and not _is_loaded(img):
            # output pixels per original pixel, through the whole chain
            per = out[0] / (crop[3] if crop is not None else (size1 or size0)[0]) * ((size1 or size0)[0] / w0)
            img.draft("RGB", (max(1, math.ceil(w0 * per)), max(1, math.ceil(h0 * per))))
        arr = _pixels(_rgb(img))
        if size1 is not None:
            arr = self._resize(arr, *size1)
            if crop is not None:
                i, j, ch, cw = crop
                arr = arr[i : i + ch, j : j + cw]  # a view; the next resize reads it strided
        return self._resize(arr, *out)

    def _resize(self, arr: np.ndarray, w: int, h: int) -> np.ndarray:
        if arr.shape[:2] == (h, w):
            return arr
        if self.cfg.resize_backend == "pil":
            return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.BILINEAR))
        with warnings.catch_warnings():  # read-only PIL buffer; torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # channels-last: the fast uint8 path
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return y[0].permute(1, 2, 0).numpy()

    def _photometric(
        self, pixels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """ColorJitter (p 0.8, random order) and optional blur. Returns pixels and a value LUT still to
        apply: brightness and contrast are per-value maps, so they become a lookup table folded into
        the normalisation; saturation mixes channels and runs in Pillow."""
        cfg = self.cfg
        jitter = cfg.color_jitter > 0 and rng.random() < cfg.color_jitter_p
        blur = cfg.aug_blur and rng.random() < 0.5
        lut: np.ndarray | None = None
        if jitter:  # torchvision ColorJitter(b, c, s) on PIL images = ImageEnhance in random order
            lo, hi = max(0.0, 1 - cfg.color_jitter), 1 + cfg.color_jitter
            factors = rng.uniform(lo, hi, size=3)
            for k in rng.permutation(3):
                f = float(factors[k])
                if k == 0:  # ImageEnhance.Brightness: blend(black, img, f)
                    lut = _compose(lut, _blend_lut(0, f))
                elif k == 1:  # ImageEnhance.Contrast: blend(mean grey level, img, f)
                    pixels, lut = _apply(pixels, lut), None
                    grey = Image.fromarray(pixels).convert("L")
                    mean = int(ImageStat.Stat(grey).mean[0] + 0.5)
                    lut = _blend_lut(mean, f)
                else:  # ImageEnhance.Color: blend(grey image, img, f)
                    pixels, lut = _apply(pixels, lut), None
                    pixels = np.asarray(ImageEnhance.Color(Image.fromarray(pixels)).enhance(f))
        if blur:
            pixels, lut = _apply(pixels, lut), None
            radius = float(rng.uniform(0.1, 2.0)) * self.blur_scale
            pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=radius)))
        return pixels, lut


def _blend_lut(base: int, alpha: float) -> np.ndarray:
    """Pillow's ImagingBlend(base, x, alpha) for every value x: float32 arithmetic, clip, truncate."""
    x = np.arange(256, dtype=np.float32)
    temp = np.float32(base) + np.float32(alpha) * (x - np.float32(base))
    return np.clip(temp, 0, 255).astype(np.uint8)


def _compose(first: np.ndarray | None, then: np.ndarray) -> np.ndarray:
    return then if first is None else then[first]


def _apply(pixels: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    return pixels if lut is None else lut[pixels]


def _rgb(img: Image.Image) -> Image.Image:
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _is_loaded(img: Image.Image) -> bool:
    # A lazily opened file still has its decoder tiles; after load() they are gone.
    return not getattr(img, "tile", None)
