"""OneRef: the one-tower grounding and segmentation model.

Paper: "OneRef: Unified One-tower Expression Grounding and Segmentation with Mask Referring
Modeling" (Xiao et al., NeurIPS 2024).

A BEiT-3 backbone plus light heads, every one driven by the text "cls" (the bos token output):
- REC: cosine similarity of the text cls with each patch -> softmax over patches -> weighted sum of
  ``visu_proj`` patch features -> 3-layer MLP -> sigmoid box (cx, cy, w, h), normalised to the
  padded square image.
- RES: patch features -> 3 x (ConvTranspose2d 2x2/2 -> BatchNorm, ReLU between) -> channel-L2
  normalised -> dot with the text cls -> mask logits in [-1, 1] at 8x the patch grid.
- MRefM heads: referring-aware MIM (codebook logits and visual target-relation scores from the
  text-cls-modulated patch tokens) and MLM (text token logits).

Every head is broadcasting or einsum; nothing is ``.repeat``-ed. Attribute names match the
official state dict keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oneref.models.beit3 import BEiT3, BEiT3Config, init_backbone, init_official, init_vision_positions_sincos


@dataclass(frozen=True)
class OneRefConfig(BEiT3Config):
    seg_head: bool = False  # RES head (official --use_mask_loss)
    mim_codebook_size: int = 0  # >0 adds the referring-aware MIM heads (MRefM)
    mlm_head: bool = False  # referring-aware MLM heads (MRefM)
    # Divides the patch similarities before the box pooling softmax (and the box-mask
    # constraint). None = official (raw cosines). Only for training from scratch: leave it
    # unset whenever official weights are loaded.
    similarity_temperature: float | None = None
    # Divides the RES mask logits (official: cosines in [-1, 1], where focal + dice from scratch
    # collapse to empty masks). The prediction (logit > 0) does not change. None = official.
    seg_temperature: float | None = None
    # Initial vision position table: "normal" (official BEiT-3 init) or "sincos" (2-D sine-cosine
    # patch positions, still learned). Only matters from scratch; loaded weights overwrite it.
    position_init: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("similarity_temperature", "seg_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if self.position_init not in ("normal", "sincos"):
            raise ValueError(f"position_init must be 'normal' or 'sincos', got {self.position_init!r}")

    @property
    def backbone(self) -> BEiT3Config:
        names = {f.name for f in fields(BEiT3Config)}
        return BEiT3Config(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


# -- the map of the model's parts --------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Part:
    """Parameters (and buffers) of the model that train, freeze, decay and convert together.

    ``prefix`` ending in "." names a module subtree, any other prefix one tensor exactly.
    ``key_group``: the checkpoint key group (what a checkpoint may lack, see oneref.checkpoint);
    ``layer``: depth for layer-wise lr decay ("embed" = 0, "block" = its layer index + 1,
    "head" = depth + 1); ``decay``: False keeps it out of weight decay when
    ``optim.no_weight_decay_groups`` is on (1-D tensors are always kept out then).
    """

    prefix: str
    part: str
    key_group: str
    layer: str = "head"
    decay: bool = True

    def matches(self, name: str) -> bool:
        return name.startswith(self.prefix) if self.prefix.endswith(".") else name == self.prefix


# Every tensor of OneRef is in exactly one row (tests/test_model.py checks it). The parts are what
# the losses reach (oneref.tasks.losses.LOSS_REACH): a part no enabled loss reaches is frozen.
# fmt: off
PARTS: tuple[Part, ...] = (
    # the contrastive temperature
    Part(prefix="logit_scale", part="logit_scale", key_group="grounding", decay=False),
    Part(prefix="beit3.text_embed.", part="backbone", key_group="backbone", layer="embed"),
    # only masked image modelling reads the mask token
    Part(prefix="beit3.vision_embed.mask_token", part="mask_token", key_group="backbone", layer="embed", decay=False),
    Part(prefix="beit3.vision_embed.cls_token", part="backbone", key_group="backbone", layer="embed", decay=False),
    Part(prefix="beit3.vision_embed.proj.", part="backbone", key_group="backbone", layer="embed"),
    Part(prefix="beit3.encoder.embed_positions.", part="backbone", key_group="backbone", layer="embed", decay=False),
    Part(prefix="beit3.encoder.layers.", part="backbone", key_group="backbone", layer="block"),
    Part(prefix="beit3.encoder.layer_norm.", part="backbone", key_group="backbone", layer="head"),
    Part(prefix="language_head.", part="language_head", key_group="grounding"),
    Part(prefix="vision_head.", part="vision_head", key_group="grounding"),
    Part(prefix="bbox_embed.", part="box_head", key_group="grounding"),
    Part(prefix="visu_proj.", part="box_head", key_group="grounding"),
    # in every official checkpoint, never used by its forward (official models/OneRef_model.py)
    Part(prefix="text_proj.", part="text_proj", key_group="grounding"),
    *(
        Part(prefix=f"{m}{i}.", part="seg_head", key_group="seg")
        for i in (1, 2, 3)
        for m in ("seg_conv", "bn")
    ),
    Part(prefix="mim_head.", part="mim_head", key_group="mim"),
    Part(prefix="mim_vts_head.", part="mim_vts_head", key_group="mim"),
    Part(prefix="mlm_head.", part="mlm_head", key_group="mlm"),
    Part(prefix="mlm_sts_head.", part="mlm_sts_head", key_group="mlm"),
)
# fmt: on
KEY_GROUPS: tuple[str, ...] = ("backbone", "grounding", "seg", "mim", "mlm")
BACKBONE_PARTS: frozenset[str] = frozenset({"backbone", "mask_token"})


def part_row(name: str) -> Part | None:
    """The row of PARTS that holds the tensor ``name`` (a state-dict key), or None."""
    return next((row for row in PARTS if row.matches(name)), None)


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's MLP; official ``layers`` naming)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        outs = [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class OneRef(nn.Module):
    def __init__(self, cfg: OneRefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.beit3 = BEiT3(cfg.backbone)
        self.language_head = nn.Linear(d, d, bias=False)
        self.vision_head = nn.Linear(d, d, bias=False)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.visu_proj = nn.Linear(d, d)
        # Present in every official checkpoint but never used in its forward: kept so that
        # loading stays strict; no loss reaches it, so training freezes it (oneref.tasks.losses).
        self.text_proj = nn.Linear(d, d)
        if cfg.seg_head:
            for i in (1, 2, 3):
                setattr(self, f"seg_conv{i}", nn.ConvTranspose2d(d, d, 2, stride=2, bias=False))
                setattr(self, f"bn{i}", nn.BatchNorm2d(d))
        if cfg.mim_codebook_size:
            self.mim_head = nn.Linear(d, cfg.mim_codebook_size)
            self.mim_vts_head = MLP(d, d, 4, 3)
        if cfg.mlm_head:
            self.mlm_head = nn.Linear(d, cfg.vocab_size)
            self.mlm_sts_head = MLP(d, d, 1, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_backbone(self.beit3)
        if self.cfg.position_init == "sincos":
            init_vision_positions_sincos(self.beit3)
        # official BEiT3ForGrounding.__init__: these three get the wrapper's _init_weights; every other
        # head (mim_head included) keeps PyTorch's default init
        for head in ("language_head", "vision_head", "mlm_head"):
            if hasattr(self, head):
                init_official(getattr(self, head))

    # -- the parts map and trainer hooks (timm-style) -------------------------------------------
    def part_names(self) -> dict[str, str]:
        """Every state-dict key -> its part (see PARTS). Raises for a tensor no row holds."""
        out = {}
        for name in self.state_dict():
            row = part_row(name)
            if row is None:
                raise KeyError(f"{name} is in no row of oneref.models.oneref.PARTS: add it there")
            out[name] = row.part
        return out

    def parts(self) -> set[str]:
        """The parts this model has (its heads depend on the config)."""
        return set(self.part_names().values())

    def set_trainable(self, parts: set[str]) -> None:
        """requires_grad on exactly the parameters of ``parts``; every other one is frozen."""
        unknown = set(parts) - {row.part for row in PARTS}
        if unknown:
            raise ValueError(
                f"unknown model parts {sorted(unknown)}; known: {sorted({r.part for r in PARTS})}"
            )
        for name, p in self.named_parameters():
            p.requires_grad_(part_row(name).part in parts)

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if not part_row(name).decay}

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
        layer = part_row(name).layer
        if layer == "embed":
            return 0
        if layer == "block":
            return int(name.split(".")[3]) + 1
        return self.cfg.depth + 1

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping (``timm.optim.param_groups_layer_decay``), from the same map:
        embeddings first, one group per encoder layer, everything else last."""
        embed = "|".join(re.escape(r.prefix) for r in PARTS if r.layer == "embed")
        blocks = r"^beit3\.encoder\.layers\.(\d+)\."
        return {"stem": rf"^(?:{embed})", "blocks": blocks if coarse else [(blocks, None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.beit3.set_grad_checkpointing(enable)

    def compile_layers(self, mode: str | None = None) -> None:
        """``torch.compile`` each encoder layer in place, once (``BEiT3.compile_layers``); ``mode``
        is torch.compile's (``reduce-overhead`` for CUDA graphs; None/``default``)."""
        if not getattr(self, "_layers_compiled", False):
            self.beit3.compile_layers(**({} if mode in (None, "default") else {"mode": mode}))
            self._layers_compiled = True

    # -- forward -----------------------------------------------------------------------------
    def forward_seg(self, patch_tokens: Tensor, language_cls: Tensor) -> Tensor:
        b, n, d = patch_tokens.shape
        g = self.cfg.grid_size
        x = patch_tokens.transpose(1, 2).reshape(b, d, g, g)
        x = F.relu(self.bn1(self.seg_conv1(x)))
        x = F.relu(self.bn2(self.seg_conv2(x)))
        x = self.bn3(self.seg_conv3(x))  # no ReLU after the last BN (official)
        # = einsum(F.normalize(x, dim=1), cls): divides the (B,H,W) dot products by the channel
        # norms instead of materialising the normalised (B,D,H,W) map (and its backward)
        dot = torch.einsum("bdhw,bd->bhw", x, language_cls.to(x.dtype))
        norm = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)
        logits = dot / norm
        if self.cfg.seg_temperature is not None:
            logits = logits / self.cfg.seg_temperature
        return logits.unsqueeze(1)

    def forward(
        self,
        image: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        mim_masked_pos: Tensor | None = None,
        return_all_hiddens: bool = False,
        *,
        mim_positions: Tensor | None = None,
        mim_vts: bool = False,
        mlm_positions: Tensor | None = None,
        mlm_sts: bool = False,
    ) -> dict[str, Tensor]:
        """Run the backbone and the heads asked for.

        image (B,3,S,S) normalised; text_ids (B,L) starting with bos; text_padding_mask (B,L),
        nonzero = padding, or None when no row is padded; mim_masked_pos (B,G*G) bool, True = patch
        replaced by the mask token (an MIM step).

        Always: ``pred_box`` (B,4) sigmoid cx,cy,w,h; ``visu_sim`` (B,G*G) raw cosines;
        ``vision_cls``/``language_cls`` (B,D) unit vectors; ``vision_tokens``/``text_tokens`` the
        backbone outputs; with a seg head ``seg_mask`` (B,1,8G,8G). MRefM heads, on request:

        - ``mim_logits`` at the patches ``mim_positions`` (B,K) gives, (B,K,C); with
          ``mim_masked_pos`` but no positions, at every patch (B,G*G,C). Computing them only at
          the masked patches saves the (B, 576, 8192) logits of the official code.
        - ``mim_vts_pred`` (B,G*G,4) with ``mim_vts``;
        - ``mlm_logits`` (B,K,V) at the text positions ``mlm_positions`` (B,K), from the raw
          final-LayerNorm text features (official ``use_vanilla_text_token``);
        - ``mlm_sts_scores`` (B,L-2) with ``mlm_sts``: the STS head's raw scores at text positions
          1..L-2 (the official ``mlm_sts_pred`` is their softmax; oneref.tasks.losses.mlm_sts_loss).
        """
        feats = self.beit3(image, text_ids, text_padding_mask, mim_masked_pos, return_all_hiddens)
        vision, text = feats["vision"], feats["text"]
        v_hat = F.normalize(self.vision_head(vision), dim=-1)
        language_cls = F.normalize(self.language_head(text[:, 0]), dim=-1)
        patches = v_hat[:, 1:]
        visu_sim = torch.einsum("bnd,bd->bn", patches, language_cls)
        logits = visu_sim
        if self.cfg.similarity_temperature is not None:
            logits = visu_sim / self.cfg.similarity_temperature
        weights = logits.float().softmax(dim=-1).to(vision.dtype)
        pooled = torch.einsum("bn,bnd->bd", weights, self.visu_proj(vision[:, 1:]))
        out = {
            "pred_box": self.bbox_embed(pooled).float().sigmoid(),
            "visu_sim": visu_sim,
            "vision_cls": v_hat[:, 0],
            "language_cls": language_cls,
            "vision_tokens": vision,
            "text_tokens": text,
        }
        if return_all_hiddens:
            out["hidden_states"] = feats["hidden_states"]
        if self.cfg.seg_head:
            out["seg_mask"] = self.forward_seg(vision[:, 1:], language_cls)
        wants_mim = mim_positions is not None or mim_masked_pos is not None or mim_vts
        if wants_mim and self.cfg.mim_codebook_size:
            relation = language_cls.unsqueeze(1) * patches  # text-cls-modulated patches (B,N,D)
            at = relation if mim_positions is None else _gather_rows(relation, mim_positions)
            out["mim_logits"] = self.mim_head(F.normalize(at, dim=-1))
            if mim_vts:
                out["mim_vts_pred"] = self.mim_vts_head(relation)
        if mlm_positions is not None:
            self._require("mlm_head", "mlm_positions")
            out["mlm_logits"] = self.mlm_head(_gather_rows(text, mlm_positions))
        if mlm_sts:
            self._require("mlm_sts_head", "mlm_sts")
            t_hat = F.normalize(self.language_head(text[:, 1 : text.shape[1] - 1]), dim=-1)
            out["mlm_sts_scores"] = self.mlm_sts_head(out["vision_cls"].unsqueeze(1) * t_hat).squeeze(-1)
        return out

    def _require(self, head: str, arg: str) -> None:
        if not hasattr(self, head):
            raise ValueError(f"{arg} needs the MRefM heads: build the model with mlm_head=True (task=mrefm)")


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B,N,D) at the rows index (B,K) -> (B,K,D) (a static-shape gather)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
