"""REC and RES evaluation metrics (official ``engine.py`` ``evaluate`` and ``utils/eval_utils.py``).

Both are torchmetrics ``Metric``s whose states are sums (counts, integer pixel counts, IoU sums),
so a DDP all-reduce gives exactly the single-process result. That also fixes the official oIoU,
which is computed from rank-local sums and so reports rank 0's shard on several GPUs.

Protocols
---------
Default, ``original_resolution=False`` (official, what the paper reports): everything is measured in
the S x S letterbox the model sees (S = 384 for the released models).

- REC: the predicted (cx,cy,w,h) -> xyxy, clamped to [0, 1] (the gt is not clamped), IoU with
  ``+1e-16`` in the denominator computed in the official float32 operation order, correct when
  ``IoU >= t``. Keys ``acc@0.5``, ``acc@0.25``, ``acc@0.75``, ``miou``.
- RES: ``relu(sigmoid(logits) - 0.5)`` at the seg-head resolution, bilinearly upsampled
  (align_corners=False) to the gt size, any value > 0 is foreground (a slight dilation compared
  with thresholding upsampled logits). Per sample I and U as exact integer pixel counts and
  IoU = I / U without epsilon. Keys ``miou`` (mean per-sample IoU), ``oiou`` (sum I / sum U over
  all samples of all ranks) and ``prec@0.5`` ... ``prec@0.9`` (fraction with ``IoU >= t``; the
  official code reports no precision, ``>=`` is the LAVT convention). The padding of the letterbox
  counts as background pixels for both masks.

``original_resolution=True`` (not official; the convention of most RES papers outside the
TransVG family): predictions are mapped back through the letterbox (``letterbox`` = (ratio, left,
top) with ``padded = orig * ratio + (left, top)``, ``orig_size`` = (h, w)) and compared with the
original annotations, so padding no longer counts and large images weigh by their true pixel count
in oIoU. Numbers differ from the official ones (typically by a fraction of a point).

- REC: the predicted box in padded-square pixels (``xyxy * img_size``) minus (left, top), divided by
  ratio, clamped to the image, IoU with ``orig_box`` (xyxy pixels) in float64.
- RES: the official S x S prediction (above) is cropped to the resized image region
  ``[top, top + round(h * ratio)) x [left, left + round(w * ratio))`` and resized bilinearly
  (align_corners=False) to (h, w); any value > 0 is foreground; compared with the
  original-resolution gt mask. This is computed for the whole batch at once by index arithmetic on
  a (B, max h, max w) canvas, with the same source-pixel rule as ``F.interpolate``.

Empty masks: with ``nan_policy="official"`` a sample whose predicted and gt masks are both empty has
IoU 0/0 = NaN, which makes ``miou`` NaN (as in the official code). ``nan_policy="one"`` counts such
a sample as IoU 1 (a correct empty prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_convert

from oneref.data.transforms import letterbox_to_original

NanPolicy = Literal["official", "one"]


def _threshold_name(prefix: str, t: float) -> str:
    return f"{prefix}@{t:g}"


def box_iou_eval(pred_xyxy: Tensor, gt_xyxy: Tensor) -> Tensor:
    """Per-pair IoU exactly as the official ``bbox_iou`` (``+1e-16`` in the denominator).

    The operation order follows the official code so that float32 results, and hence
    ``>= threshold`` decisions, are bit-identical.
    """
    p_x1, p_y1, p_x2, p_y2 = pred_xyxy.unbind(-1)
    g_x1, g_y1, g_x2, g_y2 = gt_xyxy.unbind(-1)
    iw = (torch.minimum(p_x2, g_x2) - torch.maximum(p_x1, g_x1)).clamp(min=0)
    ih = (torch.minimum(p_y2, g_y2) - torch.maximum(p_y1, g_y1)).clamp(min=0)
    inter = iw * ih
    area_p = (p_x2 - p_x1) * (p_y2 - p_y1)
    area_g = (g_x2 - g_x1) * (g_y2 - g_y1)
    return inter / (area_p + area_g - inter + 1e-16)


def rec_box_iou(pred_cxcywh: Tensor, gt_cxcywh: Tensor) -> Tensor:
    """Per-sample official REC IoU in the letterbox (pred clamped to [0,1], gt not), float32."""
    pred = box_convert(pred_cxcywh.float(), "cxcywh", "xyxy").clamp(0, 1)
    return box_iou_eval(pred, box_convert(gt_cxcywh.float(), "cxcywh", "xyxy"))


def rec_box_iou_original(
    pred_cxcywh: Tensor, letterbox: Tensor, orig_size: Tensor, orig_box: Tensor, img_size: int
) -> Tensor:
    """Per-sample IoU in original-image pixels (float64), see the module docstring."""
    pred = box_convert(pred_cxcywh.double(), "cxcywh", "xyxy") * img_size
    pred = letterbox_to_original(pred, letterbox.double(), orig_size)
    return box_iou_eval(pred, orig_box.double())


def res_pred_mask(seg_logits: Tensor, size: Sequence[int]) -> Tensor:
    """Official binary prediction (B,H,W) bool: bilinear-upsampled relu(sigmoid - 0.5) > 0."""
    if seg_logits.dim() == 3:
        seg_logits = seg_logits.unsqueeze(1)
    prob = (seg_logits.float().sigmoid() - 0.5).relu()
    up = F.interpolate(prob, size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0] > 0


def _as_bhw(mask: Tensor, name: str) -> Tensor:
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"{name} must be (B,H,W) or (B,1,H,W), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask > 0.5


def _linear_taps(out_size: Tensor, in_size: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source taps of a bilinear resize (align_corners=False) from in_size to out_size, per sample.

    Returns i0, i1 (B, length) int64 and whether i1 has a nonzero weight, with PyTorch's float32
    rule ``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``scale = in / out``.
    """
    scale = in_size.float() / out_size.float()  # (B,) float32, as PyTorch
    dst = torch.arange(length, device=in_size.device, dtype=torch.float64)
    # PyTorch's kernels evaluate scale * (dst + 0.5) - 0.5 as a fused multiply-add (one rounding);
    # float64 is exact here, so rounding once to float32 reproduces it. This decides whether a
    # source position falling (almost) exactly on a pixel also touches its neighbour.
    src = (scale[:, None].double() * (dst + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.floor().long()
    last = (in_size[:, None] - 1).long()
    i0 = torch.minimum(i0, last)
    i1 = torch.minimum(i0 + 1, last)
    return i0, i1, src > i0


def res_pred_mask_original(
    seg_logits: Tensor, letterbox: Tensor, orig_size: Tensor, img_size: int, canvas: Sequence[int]
) -> Tensor:
    """Prediction at the original resolution on a (B, *canvas) top-left canvas (bool).

    The official S x S prediction is cropped to the resized-image region and resized bilinearly to
    (h, w); values outside each sample's (h, w) are False. Since the S x S values are >= 0, a
    resized pixel is > 0 exactly when one of its bilinear taps with nonzero weight is > 0, which is
    what is computed here (no float resampling, so no rounding can flip a pixel).
    """
    pred_s = res_pred_mask(seg_logits, (img_size, img_size))
    ratio, left, top = letterbox.double().unbind(-1)
    h, w = orig_size.long().unbind(-1)
    # Resized size as the transform computes it (Python round: half to even, like torch.round).
    rh = torch.round(h.double() * ratio).long().clamp(1, img_size)
    rw = torch.round(w.double() * ratio).long().clamp(1, img_size)
    top_i, left_i = top.round().long(), left.round().long()
    hc, wc = canvas
    r0, r1, r_use = _linear_taps(h, rh, hc)
    c0, c1, c_use = _linear_taps(w, rw, wc)
    r0, r1 = r0 + top_i[:, None], r1 + top_i[:, None]
    c0, c1 = c0 + left_i[:, None], c1 + left_i[:, None]
    bi = torch.arange(pred_s.shape[0], device=pred_s.device)[:, None, None]

    def tap(r: Tensor, c: Tensor) -> Tensor:
        return pred_s[bi, r.clamp(0, img_size - 1)[:, :, None], c.clamp(0, img_size - 1)[:, None, :]]

    out = tap(r0, c0)
    out |= tap(r0, c1) & c_use[:, None, :]
    out |= tap(r1, c0) & r_use[:, :, None]
    out |= tap(r1, c1) & r_use[:, :, None] & c_use[:, None, :]
    return out & _valid_region(orig_size, canvas)


def _valid_region(orig_size: Tensor, canvas: Sequence[int]) -> Tensor:
    h, w = orig_size.long().unbind(-1)
    rows = torch.arange(canvas[0], device=h.device)[None, :, None] < h[:, None, None]
    return rows & (torch.arange(canvas[1], device=w.device)[None, None, :] < w[:, None, None])


def pad_masks(masks: Sequence[Tensor]) -> Tensor:
    """Stack masks of different (H, W) (or (1,H,W)) top-left into a (B, max H, max W) bool canvas."""
    masks = [m[0] if m.dim() == 3 else m for m in masks]
    hc, wc = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    out = torch.zeros(len(masks), hc, wc, dtype=torch.bool, device=masks[0].device)
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1]] = m.bool()
    return out


def _valid(valid: Tensor | None, per_sample: Tensor) -> Tensor:
    """The (B,) mask of samples that count: all of them, or ``valid`` (False for the padding
    repeats of an evaluation shard, oneref.data.samplers.ShardSampler)."""
    if valid is None:
        return torch.ones_like(per_sample, dtype=torch.bool)
    if valid.shape != per_sample.shape[:1]:
        raise ValueError(f"valid must be (B,) = {tuple(per_sample.shape[:1])}, got {tuple(valid.shape)}")
    return valid.to(per_sample.device, torch.bool)


class _SumMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def _add_sum(self, name: str, dtype: torch.dtype, size: int | None = None) -> None:
        default = torch.zeros(size, dtype=dtype) if size else torch.zeros((), dtype=dtype)
        self.add_state(name, default=default, dist_reduce_fx="sum")


class RECMetrics(_SumMetric):
    """REC accuracy at IoU thresholds and mean IoU (see the module docstring for the protocols).

    ``update(pred_box, gt_box, *, letterbox=None, orig_size=None, orig_box=None)``: pred_box and
    gt_box are (B,4) normalised cx,cy,w,h in the letterbox. With ``original_resolution=True``,
    ``letterbox`` (B,3), ``orig_size`` (B,2) and ``orig_box`` (B,4 xyxy pixels) are used instead of
    ``gt_box`` and ``img_size`` (S) is required.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5, 0.25, 0.75),
        original_resolution: bool = False,
        img_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if original_resolution and not img_size:
            raise ValueError("RECMetrics(original_resolution=True) needs img_size (the letterbox side S)")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.original_resolution = original_resolution
        self.img_size = img_size
        self._add_sum("count", torch.long)
        self._add_sum("correct", torch.long, len(self.thresholds))
        self._add_sum("iou_sum", torch.float64)

    def update(
        self,
        pred_box: Tensor,
        gt_box: Tensor | None = None,
        *,
        letterbox: Tensor | None = None,
        orig_size: Tensor | None = None,
        orig_box: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        if self.original_resolution:
            if letterbox is None or orig_size is None or orig_box is None:
                raise ValueError(
                    "RECMetrics(original_resolution=True).update needs letterbox, orig_size, orig_box"
                )
            iou = rec_box_iou_original(pred_box, letterbox, orig_size, orig_box, self.img_size)
        else:
            if gt_box is None:
                raise ValueError("RECMetrics.update needs gt_box (B,4) normalised cx,cy,w,h")
            iou = rec_box_iou(pred_box, gt_box)
        thr = torch.tensor(self.thresholds, device=iou.device, dtype=iou.dtype)
        valid = _valid(valid, iou)
        self.count += valid.sum()
        self.correct += ((iou[:, None] >= thr) & valid[:, None]).sum(0)
        self.iou_sum += torch.where(valid, iou.double(), 0.0).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        out = {_threshold_name("acc", t): self.correct[i].double() / n for i, t in enumerate(self.thresholds)}
        out["miou"] = self.iou_sum / n
        return out


class RESMetrics(_SumMetric):
    """RES mIoU, oIoU and precision at IoU thresholds (see the module docstring).

    ``update(seg_logits, gt_mask=None, *, letterbox=None, orig_size=None, orig_mask=None)``:
    seg_logits (B,1,h,w) at the seg-head resolution; gt_mask (B,1,S,S) bool in the letterbox. With
    ``original_resolution=True`` pass ``letterbox`` (B,3), ``orig_size`` (B,2) and ``orig_mask``,
    either a list of (h,w) masks or a (B, H, W) bool canvas with each mask in its top-left corner
    (H, W >= every h, w); ``img_size`` (S) is required.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
        nan_policy: NanPolicy = "official",
        original_resolution: bool = False,
        img_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if nan_policy not in ("official", "one"):
            raise ValueError(f"nan_policy must be 'official' or 'one', got {nan_policy!r}")
        if original_resolution and not img_size:
            raise ValueError("RESMetrics(original_resolution=True) needs img_size (the letterbox side S)")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.nan_policy = nan_policy
        self.original_resolution = original_resolution
        self.img_size = img_size
        self._add_sum("count", torch.long)
        self._add_sum("iou_sum", torch.float64)
        self._add_sum("inter_sum", torch.long)
        self._add_sum("union_sum", torch.long)
        self._add_sum("correct", torch.long, len(self.thresholds))

    def intersection_union(
        self,
        seg_logits: Tensor,
        gt_mask: Tensor | None = None,
        *,
        letterbox: Tensor | None = None,
        orig_size: Tensor | None = None,
        orig_mask: Tensor | Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample intersection and union pixel counts (int64) under this metric's protocol."""
        if self.original_resolution:
            if letterbox is None or orig_size is None or orig_mask is None:
                raise ValueError(
                    "RESMetrics(original_resolution=True).update needs letterbox, orig_size, orig_mask"
                )
            gt = (
                pad_masks(orig_mask)
                if isinstance(orig_mask, (list, tuple))
                else _as_bhw(orig_mask, "orig_mask")
            )
            hmax, wmax = orig_size.max(0).values.tolist()  # a host sync, only in this mode
            if hmax > gt.shape[1] or wmax > gt.shape[2]:
                raise ValueError(
                    f"orig_mask canvas {tuple(gt.shape[1:])} is smaller than the largest orig_size ({hmax}, {wmax})"
                )
            pred = res_pred_mask_original(seg_logits, letterbox, orig_size, self.img_size, gt.shape[1:])
            gt = gt & _valid_region(orig_size, gt.shape[1:])  # ignore anything outside (h, w)
        else:
            if gt_mask is None:
                raise ValueError("RESMetrics.update needs gt_mask (B,1,S,S)")
            gt = _as_bhw(gt_mask, "gt_mask")
            pred = res_pred_mask(seg_logits, gt.shape[-2:])
        inter = (pred & gt).flatten(1).sum(1)
        union = (pred | gt).flatten(1).sum(1)
        return inter, union

    def update(
        self,
        seg_logits: Tensor,
        gt_mask: Tensor | None = None,
        *,
        letterbox: Tensor | None = None,
        orig_size: Tensor | None = None,
        orig_mask: Tensor | Sequence[Tensor] | None = None,
        valid: Tensor | None = None,
    ) -> None:
        inter, union = self.intersection_union(
            seg_logits, gt_mask, letterbox=letterbox, orig_size=orig_size, orig_mask=orig_mask
        )
        iou = inter.double() / union.double()
        if self.nan_policy == "one":
            iou = torch.where(union == 0, torch.ones_like(iou), iou)
        thr = torch.tensor(self.thresholds, device=iou.device, dtype=iou.dtype)
        valid = _valid(valid, iou)
        self.count += valid.sum()
        self.iou_sum += torch.where(valid, iou, 0.0).sum()  # NaN (official empty-mask rule) stays NaN
        self.inter_sum += torch.where(valid, inter, 0).sum()
        self.union_sum += torch.where(valid, union, 0).sum()
        self.correct += ((iou[:, None] >= thr) & valid[:, None]).sum(0)

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        out = {"miou": self.iou_sum / n, "oiou": self.inter_sum.double() / self.union_sum.double()}
        for i, t in enumerate(self.thresholds):
            out[_threshold_name("prec", t)] = self.correct[i].double() / n
        return out
