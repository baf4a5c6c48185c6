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
from dataclasses import asdict, dataclass, fields

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
    # Initial vision position table: "normal" (official BEiT-3 init) or "sincos" (2-D sine-cosine
    # patch positions, still learned). Only matters from scratch; loaded weights overwrite it.
    position_init: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position_init not in ("normal", "sincos"):
            raise ValueError(f"position_init must be 'normal' or 'sincos', got {self.position_init!r}")

    @property
    def backbone(self) -> BEiT3Config:
        names = {f.name for f in fields(BEiT3Config)}
        return BEiT3Config(**{k: v for k, v in asdict(self).items() if k in names})

    @property
    def seg_size(self) -> int:
        return 8 * self.grid_size

    def to_dict(self) -> dict:
        return asdict(self)


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
        # loading stays strict, frozen so that DDP needs no find_unused_parameters.
        self.text_proj = nn.Linear(d, d).requires_grad_(False)
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
        for head in ("language_head", "vision_head", "mim_head", "mlm_head"):
            if hasattr(self, head):
                init_official(getattr(self, head))

    # -- trainer hooks (timm-style) ---------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {
            "logit_scale",
            "beit3.vision_embed.cls_token",
            "beit3.vision_embed.mask_token",
            "beit3.encoder.embed_positions.A.weight",
            "beit3.encoder.embed_positions.B.weight",
        }

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: embeddings 0, block i -> i+1, heads depth+1."""
        if name.startswith(("beit3.text_embed", "beit3.vision_embed", "beit3.encoder.embed_positions")):
            return 0
        if name.startswith("beit3.encoder.layers."):
            return int(name.split(".")[3]) + 1
        return self.cfg.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.beit3.set_grad_checkpointing(enable)

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
        return (dot / norm).unsqueeze(1)

    def forward(
        self,
        image: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        mim_masked_pos: Tensor | None = None,
        return_all_hiddens: bool = False,
    ) -> dict[str, Tensor]:
        """Run the backbone and every head this model has.

        image (B,3,S,S) normalised; text_ids (B,L) starting with bos; text_padding_mask (B,L),
        nonzero = padding, or None when no row is padded; mim_masked_pos (B,G*G) bool, True = patch replaced by the mask token.

        Returns ``pred_box`` (B,4) sigmoid cx,cy,w,h; ``visu_sim`` (B,G*G) raw cosines;
        ``vision_cls``/``language_cls`` (B,D) unit vectors; ``vision_tokens``/``text_tokens`` the
        backbone outputs; ``seg_mask`` (B,1,8G,8G) with a seg head; ``mim_logits`` (B,G*G,C)
        for every patch and ``mim_vts_pred`` (B,G*G,4) when ``mim_masked_pos`` is given.
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
        if mim_masked_pos is not None and self.cfg.mim_codebook_size:
            relation = language_cls.unsqueeze(1) * patches  # text-cls-modulated patches
            out["mim_logits"] = self.mim_head(F.normalize(relation, dim=-1))
            out["mim_vts_pred"] = self.mim_vts_head(relation)
        return out
