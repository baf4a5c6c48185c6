"""Training losses of OneRef (official ``utils/loss_utils.py`` ``one_ref_loss``).

Every function is vectorised over the batch with static shapes and no host syncs, so it runs
unchanged under ``torch.compile`` and CUDA graphs. Normalisation follows the official code: the
per-device batch size B (``num_boxes``), never a cross-device count.

Deliberate differences from the official code, none of which changes a number:
- GIoU is computed for the B (pred, gt) pairs only, not as a B x B matrix whose diagonal is kept,
  and without DETR's ``x2 >= x1`` assert (a host sync).
- The MIM cross-entropy takes logits for *all* patches and ignores the visible ones
  (``ignore_index``), instead of gathering ``logits[masked]`` into a data-dependent shape.
- The box-mask constraint target samples the object mask at the nearest-neighbour indices
  directly instead of interpolating a float copy of the whole mask.
- Losses are computed in float32 even when the model runs under bf16/fp16 autocast.

One documented non-official option: ``temperature`` of the box-mask constraint (see
:func:`box_mask_constraint`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn
from torchvision.ops import box_convert

from oneref.data.transforms import nearest_indices
from oneref.errors import UserError

FOCAL_WEIGHT = 20.0  # hard-coded in the official one_ref_loss
DICE_WEIGHT = 2.0


# -- boxes ---------------------------------------------------------------------------------------
def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter, area_a + area_b - inter


def generalized_box_iou_pairwise(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of each ``a[i]`` with ``b[i]`` (xyxy).

    Numerically the diagonal of DETR's all-pairs ``generalized_box_iou`` (same operations per
    pair; torchvision's ``generalized_box_iou_loss`` adds an epsilon, so it is not used). Unlike
    DETR it does not assert ``x2 >= x1``: that check is a host sync on every step. Degenerate boxes
    (zero-area enclosing box) give NaN.
    """
    inter, union = _inter_union(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def box_l1(pred_cxcywh: Tensor, gt_cxcywh: Tensor) -> Tensor:
    """Sum of |pred - gt| over the 4 numbers and the batch, divided by B."""
    return F.l1_loss(pred_cxcywh, gt_cxcywh, reduction="sum") / pred_cxcywh.shape[0]


def box_giou(pred_cxcywh: Tensor, gt_cxcywh: Tensor) -> Tensor:
    """Sum over the batch of (1 - GIoU(pred_b, gt_b)), divided by B."""
    giou = generalized_box_iou_pairwise(
        box_convert(pred_cxcywh, "cxcywh", "xyxy"), box_convert(gt_cxcywh, "cxcywh", "xyxy")
    )
    return (1 - giou).sum() / pred_cxcywh.shape[0]


# -- dense binary losses (DETR / MDETR versions) -------------------------------------------------
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """RetinaNet focal loss on (B, N) logits: mean over N per sample, summed over samples, / B
    (torchvision's, which has the operation order of the official DETR copy)."""
    loss = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / logits.shape[0]


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice on (B, N) logits with +1 smoothing: sum over samples of 1 - dice, / B."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / logits.shape[0]


@functools.lru_cache(maxsize=64)
def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> Tensor:
    # torch's 'nearest' source rule (oneref.data.transforms.nearest_indices), built once per size
    # and device: a copy to the GPU every step would be a host sync.
    return torch.from_numpy(nearest_indices(in_size, out_size)).to(device)


def downsample_mask_nearest(obj_mask: Tensor, grid: int) -> Tensor:
    """(B,1,S,S) object mask -> (B, grid*grid) bool: the top-left pixel of each patch, ``> 0.5``.

    Identical to the official ``F.interpolate(mask.float(), (grid, grid), mode='nearest') > 0.5``.
    """
    if obj_mask.dim() != 4 or obj_mask.shape[1] != 1:
        raise ValueError(f"obj_mask must be (B,1,H,W), got {tuple(obj_mask.shape)}")
    h, w = obj_mask.shape[-2:]
    rows = _nearest_indices(h, grid, obj_mask.device)
    cols = _nearest_indices(w, grid, obj_mask.device)
    sampled = obj_mask[:, 0].index_select(1, rows).index_select(2, cols)
    sampled = sampled if sampled.dtype == torch.bool else sampled.float() > 0.5
    return sampled.flatten(1)


def box_mask_constraint(
    visu_sim: Tensor, obj_mask: Tensor, grid: int | None = None, temperature: float | None = None
) -> dict[str, Tensor]:
    """HiVG box-mask constraint (official ``one_ref_loss``, ``--use_box_mask_constraints``): focal x20 + dice x2 on the patch similarities.

    visu_sim (B, G*G) raw cosines; obj_mask (B,1,S,S). ``temperature`` divides the logits: a
    non-official option for training from scratch (the official uses the raw cosines, so
    sigmoid(s) stays within [0.27, 0.73]); leave it None with official weights.
    """
    b, n = visu_sim.shape
    if grid is None:
        grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"visu_sim has {n} patches, which is not grid*grid for grid={grid}")
    target = downsample_mask_nearest(obj_mask, grid).to(visu_sim.dtype)
    logits = visu_sim if temperature is None else visu_sim / temperature
    return {
        "loss_mrm_focal": sigmoid_focal_loss(logits, target) * FOCAL_WEIGHT,
        "loss_mrm_dice": dice_loss(logits, target) * DICE_WEIGHT,
    }


def seg_loss(seg_logits: Tensor, obj_mask: Tensor) -> dict[str, Tensor]:
    """RES loss (official ``one_ref_loss``, ``--use_mask_loss``): logits bilinearly upsampled to the mask size, focal x20 + dice x2."""
    up = F.interpolate(seg_logits, size=obj_mask.shape[-2:], mode="bilinear", align_corners=False)
    logits = up.flatten(1)
    target = obj_mask.flatten(1).to(logits.dtype)
    return {
        "loss_seg_focal": sigmoid_focal_loss(logits, target) * FOCAL_WEIGHT,
        "loss_seg_dice": dice_loss(logits, target) * DICE_WEIGHT,
    }


# -- contrastive -----------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (official
    GatherLayer; public collectives only, so it runs on NCCL and gloo alike)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows concatenated (gradients flow back to every rank), and this rank's index."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank()


def clip_loss(vision_cls: Tensor, language_cls: Tensor, logit_scale: Tensor) -> Tensor:
    """Official ClipLoss (open_clip): mean of the image->text and text->image cross-entropies.

    ``logit_scale`` is the model's *log* scale parameter (``model.logit_scale``); it is
    exponentiated here, as the official model does before calling ClipLoss. Under
    torch.distributed with world > 1 the features of all ranks are gathered with gradients and
    the labels are ``arange(B) + B * rank`` (requires the same B on every rank).
    """
    all_vision, rank = _gather_with_grad(vision_cls)
    all_language, _ = _gather_with_grad(language_cls)
    scale = logit_scale.exp()
    logits_per_image = scale * vision_cls @ all_language.T
    logits_per_text = scale * language_cls @ all_vision.T
    b = vision_cls.shape[0]
    labels = torch.arange(b, device=vision_cls.device) + b * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def contrastive_loss(vision_cls: Tensor, language_cls: Tensor, logit_scale: Tensor) -> Tensor:
    """``loss_contrastive``: :func:`clip_loss` divided once more by the batch size (official)."""
    return clip_loss(vision_cls, language_cls, logit_scale) / vision_cls.shape[0]


# -- MRefM -----------------------------------------------------------------------------------------
def mim_loss(mim_logits: Tensor, codes: Tensor, masked: Tensor) -> Tensor:
    """Mean cross-entropy over the masked patches (official ``one_ref_loss`` ``loss_mim``).

    mim_logits (B,N,C) for every patch; codes (B,N) int64 codebook ids; masked (B,N) bool.
    Equal to the official ``cross_entropy(logits[masked], codes[masked])`` but with static shapes.
    A batch without any masked patch gives NaN, as the official code does.
    """
    target = codes.masked_fill(~masked, -100)
    return F.cross_entropy(mim_logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def mim_vts_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Visual target-relation score loss: mean over (B,N) of the L1 summed over the 4 numbers."""
    return (pred - target).abs().sum(-1).mean()


# -- which losses run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossFlags:
    """Which OneRef losses run: the official ``train_oneref.py`` switches, off by default as there
    (argparse ``store_true``).

    ``use_box_mask_constraints`` stands for the official ``--use_box_mask_constraints or
    --enable_dynamic_mim``; ``enable_mim`` for ``--enable_ref_mim`` (the MIM terms are added only
    on MIM steps, when the outputs carry ``mim_logits``); ``enable_mlm`` for ``--enable_ref_mlm``
    (only on MLM steps); the others have the official names.
    """

    use_regress_box: bool = False
    use_box_mask_constraints: bool = False
    use_mask_loss: bool = False
    use_contrastive_loss: bool = False
    enable_mim: bool = False
    enable_mim_vts: bool = False
    enable_mlm: bool = False
    enable_mlm_sts: bool = False

    def __post_init__(self) -> None:
        if self.enable_mim_vts and not self.enable_mim:
            raise ValueError(
                "enable_mim_vts=True needs enable_mim=True (the VTS loss is part of the MIM step)"
            )
        if self.enable_mlm_sts and not self.enable_mlm:
            raise ValueError(
                "enable_mlm_sts=True needs enable_mlm=True (the STS loss is part of the MLM step)"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_official_args(cls, args: Mapping[str, Any] | Any) -> LossFlags:
        """The flags of an official run from its ``args`` (an ``argparse.Namespace`` or a mapping,
        e.g. a golden set's ``relevant_args``); a switch it lacks is off, as under argparse."""
        get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
        return cls(
            use_regress_box=bool(get("use_regress_box", False)),
            use_box_mask_constraints=bool(get("use_box_mask_constraints", False))
            or bool(get("enable_dynamic_mim", False)),
            use_mask_loss=bool(get("use_mask_loss", False)),
            use_contrastive_loss=bool(get("use_contrastive_loss", False)),
            enable_mim=bool(get("enable_ref_mim", False)),
            enable_mim_vts=bool(get("enable_mim_vts", False)),
            enable_mlm=bool(get("enable_ref_mlm", False)),
            enable_mlm_sts=bool(get("enable_mlm_sts", False)),
        )

    @classmethod
    def from_config(cls, losses: Mapping[str, Any], **forced: bool) -> LossFlags:
        """The flags of a ``task.losses`` mapping (its ``mlm`` options aside); ``forced`` flags
        are what the task always runs. An unknown key is a :class:`oneref.errors.UserError`."""
        flags = {k: v for k, v in losses.items() if k != "mlm"}
        unknown = sorted(set(flags) - set(cls.names()))
        if unknown:
            raise UserError(
                f"task.losses: unknown loss flag(s) {unknown}; known: {list(cls.names())} and mlm"
            )
        try:
            return cls(**{k: bool(v) for k, v in {**flags, **forced}.items()})
        except ValueError as e:
            raise UserError(f"task.losses: {e}") from e

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in self.names() if getattr(self, name))

    def reached_parts(self) -> set[str]:
        """The model parts that the enabled losses train (see LOSS_REACH)."""
        return set().union(*(LOSS_REACH[name] for name in self.enabled()))


# Model parts (oneref.models.oneref.PARTS) that each loss flag sends gradients to. Training freezes
# every part no enabled loss reaches: the official code leaves them without gradients, so AdamW
# skips them (same numbers), and DDP then needs no find_unused_parameters.
_SIMILARITY = frozenset({"backbone", "vision_head", "language_head"})  # the patch-text cosines
LOSS_REACH: dict[str, frozenset[str]] = {
    "use_regress_box": _SIMILARITY | {"box_head"},  # the box pools visu_proj patches by the cosines
    "use_box_mask_constraints": _SIMILARITY,
    "use_mask_loss": frozenset({"backbone", "language_head", "seg_head"}),  # raw patches . text cls
    "use_contrastive_loss": _SIMILARITY | {"logit_scale"},
    "enable_mim": _SIMILARITY | {"mask_token", "mim_head"},
    "enable_mim_vts": _SIMILARITY | {"mask_token", "mim_vts_head"},
    "enable_mlm": frozenset({"backbone", "mlm_head"}),  # raw text features at the masked positions
    "enable_mlm_sts": _SIMILARITY | {"mlm_sts_head"},  # vision cls . normalised language_head(text)
}


def _flat_rows(logits: Tensor, labels: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(N, C) float32 logits, (N,) labels (0 in unused slots), (N,) bool validity."""
    c = logits.shape[-1]
    logits = logits.reshape(-1, c).float()
    labels = labels.reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {labels.shape[0]} labels")
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    else:
        valid = valid.reshape(-1).bool()
        if valid.shape != labels.shape:
            raise ValueError(f"valid has {valid.shape[0]} entries, labels {labels.shape[0]}")
        labels = labels.masked_fill(~valid, 0)  # unused slots may hold -100
    return logits, labels, valid


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def mlm_loss(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    *,
    step: int = 0,
    label_smoothing: float = 0.1,
    drop_worst_ratio: float = 0.2,
    drop_worst_after: int = 12000,
    keep_at_least_one: bool = True,
) -> Tensor:
    """Referring-aware MLM loss: the official ``BertCaptioningLoss`` (``models/utils.py``).

    Per masked position, the KL divergence from the label-smoothed one-hot target
    (``1 - eps`` on the label, ``eps / (C - 1)`` elsewhere, C = the logit width, unused table
    rows included) to ``softmax(logits)``; strictly after ``drop_worst_after`` (``step`` is the
    official ``global_step``, MIM and MLM steps counted) only the ``int(N * (1 - ratio))`` smallest
    of the N per-position losses are averaged; then the mean.

    ``logits`` (B, K, C) with ``labels`` and ``valid`` (B, K) (the static slot layout of the MRefM
    batch: unused slots are excluded, as if the used ones had been gathered), or (N, C) with (N,)
    labels and no ``valid``.

    Differences from the official code, none of which changes a number beyond float rounding:
    the KL is computed in closed form (target entropy minus the smoothed cross-entropy) instead of
    materialising the (N, C) target; the drop keeps the smallest rows by sorting instead of
    ``topk``. One deliberate change: when the drop keeps no row (N = 1 after the step limit) the
    official loss is NaN and training stops; ``keep_at_least_one`` (default) keeps the smallest
    row instead; ``keep_at_least_one=False`` restores the NaN.
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0 <= drop_worst_ratio <= 1:
        raise ValueError(f"drop_worst_ratio must be in [0, 1], got {drop_worst_ratio}")
    logits, labels, valid = _flat_rows(logits, labels, valid)
    c = logits.shape[1]
    logp = F.log_softmax(logits, dim=-1)
    logp_label = logp.gather(1, labels[:, None])[:, 0]
    eps = float(label_smoothing)
    if eps > 0:
        off = eps / (c - 1)
        entropy = _xlogx(1 - eps) + (c - 1) * _xlogx(off)  # sum_c q log q
        rows = entropy - (1 - eps) * logp_label - off * (logp.sum(-1) - logp_label)
    else:
        rows = -logp_label
    n = valid.sum()
    if drop_worst_ratio > 0 and step > drop_worst_after:
        # official int(N * (1 - ratio)) in float64, then the k smallest rows
        k = (n.double() * (1.0 - drop_worst_ratio)).floor().long()
        if keep_at_least_one:
            k = k.clamp(min=1)
        ranked = rows.masked_fill(~valid, float("inf")).sort().values
        kept = torch.arange(ranked.shape[0], device=ranked.device) < k
        return torch.where(kept, ranked, 0.0).sum() / k
    return torch.where(valid, rows, 0.0).sum() / n


def mlm_accuracy(logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Official ``mlm_acc``: share of masked positions whose argmax is the label (layouts as
    :func:`mlm_loss`)."""
    logits, labels, valid = _flat_rows(logits, labels, valid)
    hits = (logits.argmax(-1) == labels) & valid
    return hits.sum().float() / valid.sum()


def mlm_sts_loss(sts_scores: Tensor, labels: Tensor, double_softmax: bool = True) -> Tensor:
    """Semantic target-relation score loss of the MLM step (official ``loss_mlm_sts``).

    ``sts_scores`` (B, T): the STS head's raw output at the text positions 1 .. L-2 (the official
    ``mlm_sts_head(...)[:, 1:L-1]``; eos and padding included, as officially); ``labels`` (B, T).
    Official: the model returns ``softmax(scores)`` and the loss is
    ``KLDiv(batchmean)(log_softmax(that), softmax(labels))``, a softmax applied twice;
    ``double_softmax=True`` reproduces it (needed to match official numbers),
    ``False`` uses ``log_softmax(scores)``. The result has the labels' dtype when they are wider
    (official labels are float64, and so is the official term). No released split carries STS
    labels, so the official scripts never add this term.
    """
    if sts_scores.shape != labels.shape:
        raise ValueError(
            f"STS scores {tuple(sts_scores.shape)} and labels {tuple(labels.shape)} differ; the labels "
            "need one score per text position 1 .. L-2"
        )
    scores = sts_scores.float()
    pred = F.softmax(scores, dim=-1) if double_softmax else scores
    return F.kl_div(F.log_softmax(pred, dim=-1), F.softmax(labels, dim=-1), reduction="batchmean")


# -- criterion -------------------------------------------------------------------------------------
class GroundingCriterion(nn.Module):
    """All OneRef training losses, switched by :class:`LossFlags`.

    ``similarity_temperature`` is the non-official temperature of the box-mask constraint (None =
    official); ``mlm`` the options of :func:`mlm_loss`.

    ``forward(outputs, targets, logit_scale=None, step=0)``: ``outputs`` holds the model's
    ``pred_box``, ``visu_sim``, ``seg_mask``, ``vision_cls``, ``language_cls``, ``mim_logits``,
    ``mim_vts_pred``, ``mlm_logits``, ``mlm_sts_scores`` as needed; ``targets`` holds ``box``
    (B,4) cxcywh, ``obj_mask`` (B,1,S,S), for MIM ``mim_codes`` and ``mim_mask`` (which rows of
    ``mim_logits`` count: (B,N) for all patches, or the (B,K) slot validity) and ``mim_vts``
    (B,N,4), for MLM ``mlm_labels`` and ``mlm_valid`` (B,K) and ``mlm_sts_labels`` (B,L-2).
    ``step`` is the global step (the MLM loss drops its worst rows after ``drop_worst_after``).
    ``logit_scale`` (the model's log scale) is needed for the contrastive term; it may also be
    given as ``outputs["logit_scale"]``. Returns the named terms in the official order plus
    ``loss``, their sum. Everything is computed in float32, outside autocast.
    """

    MLM_OPTIONS = ("label_smoothing", "drop_worst_ratio", "drop_worst_after", "keep_at_least_one")

    def __init__(
        self,
        flags: LossFlags,
        similarity_temperature: float | None = None,
        mlm: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(flags, LossFlags):
            raise TypeError(f"GroundingCriterion takes a LossFlags, got {type(flags).__name__}")
        self.flags = flags
        self.similarity_temperature = similarity_temperature
        self.mlm = dict(mlm or {})
        unknown = set(self.mlm) - set(self.MLM_OPTIONS)
        if unknown:
            raise UserError(
                f"task.losses.mlm: unknown MLM loss option(s) {sorted(unknown)}; known: {list(self.MLM_OPTIONS)}"
            )

    def reached_parts(self) -> set[str]:
        """The model parts this criterion's enabled terms send gradients to."""
        return self.flags.reached_parts()

    def extra_repr(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in asdict(self.flags).items())
        return f"{flags}, similarity_temperature={self.similarity_temperature}"

    @staticmethod
    def _get(d: Mapping[str, Tensor], key: str, where: str, why: str) -> Tensor:
        if key not in d or d[key] is None:
            raise KeyError(f"GroundingCriterion: {where}[{key!r}] is missing but {why}; have {sorted(d)}")
        value = d[key]
        return value.float() if value.is_floating_point() else value

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        logit_scale: Tensor | None = None,
        step: int = 0,
    ) -> dict[str, Tensor]:
        tensors = [v for v in outputs.values() if isinstance(v, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self._losses(outputs, targets, logit_scale, step)

    def _losses(
        self,
        outputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        logit_scale: Tensor | None,
        step: int,
    ) -> dict[str, Tensor]:
        get = self._get
        losses: dict[str, Tensor] = {}
        if self.flags.use_regress_box:
            why = "use_regress_box is on"
            pred, gt = get(outputs, "pred_box", "outputs", why), get(targets, "box", "targets", why)
            losses["loss_bbox"] = box_l1(pred, gt)
            losses["loss_giou"] = box_giou(pred, gt)
        if self.flags.use_contrastive_loss:
            why = "use_contrastive_loss is on"
            if logit_scale is None:
                logit_scale = get(outputs, "logit_scale", "outputs", why + " (or pass logit_scale=)")
            losses["loss_contrastive"] = contrastive_loss(
                get(outputs, "vision_cls", "outputs", why),
                get(outputs, "language_cls", "outputs", why),
                logit_scale.float(),
            )
        if self.flags.use_box_mask_constraints:
            why = "use_box_mask_constraints is on"
            losses.update(
                box_mask_constraint(
                    get(outputs, "visu_sim", "outputs", why),
                    get(targets, "obj_mask", "targets", why),
                    temperature=self.similarity_temperature,
                )
            )
        if self.flags.use_mask_loss:
            why = "use_mask_loss is on (build the model with seg_head=True)"
            losses.update(
                seg_loss(get(outputs, "seg_mask", "outputs", why), get(targets, "obj_mask", "targets", why))
            )
        if self.flags.enable_mlm and outputs.get("mlm_logits") is not None:  # official dict order: mlm first
            why = "the outputs carry mlm_logits (an MLM step)"
            losses["loss_mlm"] = mlm_loss(
                get(outputs, "mlm_logits", "outputs", why),
                get(targets, "mlm_labels", "targets", why),
                get(targets, "mlm_valid", "targets", why).bool(),
                step=step,
                **self.mlm,
            )
            if self.flags.enable_mlm_sts:
                why = "enable_mlm_sts is on"
                losses["loss_mlm_sts"] = mlm_sts_loss(
                    get(outputs, "mlm_sts_scores", "outputs", why),
                    get(targets, "mlm_sts_labels", "targets", why),
                ).float()
        if self.flags.enable_mim and outputs.get("mim_logits") is not None:
            why = "the outputs carry mim_logits (a MIM step)"
            losses["loss_mim"] = mim_loss(
                get(outputs, "mim_logits", "outputs", why),
                get(targets, "mim_codes", "targets", why),
                get(targets, "mim_mask", "targets", why).bool(),
            )
            if self.flags.enable_mim_vts:
                why = "enable_mim_vts is on"
                losses["loss_mim_vts"] = mim_vts_loss(
                    get(outputs, "mim_vts_pred", "outputs", why), get(targets, "mim_vts", "targets", why)
                )
        if not losses:
            raise ValueError(
                f"GroundingCriterion({self.extra_repr()}) produced no loss term for these outputs"
            )
        # Summed in dict order, as the official engine does (same float rounding).
        losses["loss"] = sum(losses.values())
        return losses
