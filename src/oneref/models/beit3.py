"""BEiT-3 Multiway transformer, as used by OneRef.

Paper: "Image as a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks"
(Wang et al., 2022); OneRef (Xiao et al., NeurIPS 2024) uses it as its one tower.

One joint self-attention over [image cls, patches | text tokens], with separate vision (``A``) and
language (``B``) copies of every projection, LayerNorm and FFN. The vision/text split is the
number of vision tokens, fixed by the image size: every layer carries the two streams as separate
tensors and only concatenates them for attention, so no module ever stores a split position.

Module and parameter names mirror the official state dict (``beit3.encoder.layers.0.self_attn.
q_proj.A.weight`` ...), so official checkpoints map one to one (see ``oneref.checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

# fairseq convention: rows 0 and 1 of both position tables are never read.
POSITION_OFFSET = 2
# Attention kernels for padded batches (unpadded batches always take SDPA without a mask, which
# dispatches to flash attention): "sdpa" (boolean key mask; portable, what export traces) or
# "flex" (FlexAttention with a key-padding block mask: flash-like speed with padding on CUDA;
# on the CPU only without gradients).
ATTENTION_KINDS = ("sdpa", "flex")
FLEX_BLOCK_SIZE = 128


@dataclass(frozen=True)
class BEiT3Config:
    embed_dim: int = 768
    num_heads: int = 12
    depth: int = 12
    ffn_dim: int = 3072
    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_source_positions: int = 1024
    layernorm_eps: float = 1e-5
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_vision_tokens(self) -> int:
        """cls + patches: the multiway split position."""
        return self.num_patches + 1


class Multiway(nn.Module):
    """A vision (``A``) and a language (``B``) copy of one module. Callers pick the branch."""

    def __init__(self, make: callable) -> None:
        super().__init__()
        self.A = make()
        self.B = make()


class DropPath(nn.Module):
    """Per-sample stochastic depth; one draw per sample covers both modalities."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def keep_scale(self, x: Tensor) -> Tensor | None:
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return x.new_empty(x.shape[0], 1, 1).bernoulli_(keep).div_(keep)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: Tensor, masked_position: Tensor | None = None) -> Tensor:
        if image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"image is {tuple(image.shape[-2:])} but the model is built for {self.img_size}x{self.img_size}"
            )
        x = self.proj(image).flatten(2).transpose(1, 2)  # (B, G*G, D), row-major patches
        if masked_position is not None:
            w = masked_position.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class PositionEmbeddings(nn.Module):
    """Two separate learned tables; each modality counts its positions from ``POSITION_OFFSET``."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.A = nn.Embedding(cfg.num_vision_tokens + POSITION_OFFSET, cfg.embed_dim)
        self.B = nn.Embedding(cfg.max_source_positions, cfg.embed_dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)  # official: exact GELU in fp32
        return self.fc2(self.ffn_layernorm(h))


class MultiwaySelfAttention(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.k_proj = Multiway(lambda: nn.Linear(d, d))
        self.v_proj = Multiway(lambda: nn.Linear(d, d))
        self.q_proj = Multiway(lambda: nn.Linear(d, d))
        self.out_proj = Multiway(lambda: nn.Linear(d, d))
        self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(d, eps=cfg.layernorm_eps))

    def _heads(self, proj: Multiway, v: Tensor, t: Tensor) -> Tensor:
        x = torch.cat([proj.A(v), proj.B(t)], dim=1)
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, v: Tensor, t: Tensor, attn_mask: Tensor | BlockMask | None) -> tuple[Tensor, Tensor]:
        q = self._heads(self.q_proj, v, t)
        k = self._heads(self.k_proj, v, t)
        val = self._heads(self.v_proj, v, t)
        if isinstance(attn_mask, BlockMask):
            o = _flex(q, k, val, attn_mask)
        else:
            o = F.scaled_dot_product_attention(q, k, val, attn_mask=attn_mask)
        b, h, n, hd = o.shape
        o = o.transpose(1, 2).reshape(b, n, h * hd)
        nv = v.shape[1]
        ov, ot = o[:, :nv], o[:, nv:]
        ov = self.out_proj.A(self.inner_attn_ln.A(ov))
        ot = self.out_proj.B(self.inner_attn_ln.B(ot))
        return ov, ot


class EncoderLayer(nn.Module):
    """Pre-LN Sub-LN multiway block (torchscale ``subln=True``)."""

    def __init__(self, cfg: BEiT3Config, drop_path: float) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.self_attn = MultiwaySelfAttention(cfg)
        self.self_attn_layer_norm = Multiway(lambda: nn.LayerNorm(d, eps=cfg.layernorm_eps))
        self.ffn = Multiway(lambda: FeedForward(cfg))
        self.final_layer_norm = Multiway(lambda: nn.LayerNorm(d, eps=cfg.layernorm_eps))
        self.drop_path = DropPath(drop_path)

    def forward(self, v: Tensor, t: Tensor, attn_mask: Tensor | BlockMask | None) -> tuple[Tensor, Tensor]:
        av, at = self.self_attn(self.self_attn_layer_norm.A(v), self.self_attn_layer_norm.B(t), attn_mask)
        scale = self.drop_path.keep_scale(v)
        if scale is not None:
            av, at = av * scale, at * scale
        v, t = v + av, t + at
        fv = self.ffn.A(self.final_layer_norm.A(v))
        ft = self.ffn.B(self.final_layer_norm.B(t))
        scale = self.drop_path.keep_scale(v)  # a fresh draw for the FFN residual
        if scale is not None:
            fv, ft = fv * scale, ft * scale
        return v + fv, t + ft


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.embed_positions = PositionEmbeddings(cfg)
        rates = (
            torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
            if cfg.depth > 1
            else [0.0]
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg, r) for r in rates)
        self.layer_norm = Multiway(lambda: nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))


class BEiT3(nn.Module):
    """The Multiway backbone. Returns the final vision and text token states separately."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.grad_checkpointing = False
        self.attention = "sdpa"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attention(self, kind: str) -> None:
        """Kernel for padded batches: ``sdpa`` (default) or ``flex`` (see ATTENTION_KINDS)."""
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
        self.attention = kind

    def compile_layers(self, **options: Any) -> None:
        """``torch.compile`` each encoder layer in place (state-dict keys unchanged). Per block, not
        the whole model: one graph reused by every layer, and the order the FSDP docs and open_clip
        give (compile each block, then activation checkpointing around it, then sharding)."""
        for layer in self.encoder.layers:
            layer.compile(**options)

    def embed(
        self,
        image: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None,
        masked_position: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Token embeddings plus positions; padded text rows zeroed (official order)."""
        n_text = text_ids.shape[1]
        if n_text > self.cfg.max_source_positions - POSITION_OFFSET:
            raise ValueError(
                f"{n_text} text tokens exceed the {self.cfg.max_source_positions}-row text table"
            )
        v = self.vision_embed(image, masked_position)
        t = self.text_embed(text_ids)
        pos = self.encoder.embed_positions
        v = v + pos.A.weight[POSITION_OFFSET : POSITION_OFFSET + v.shape[1]].to(v.dtype)
        t = t + pos.B.weight[POSITION_OFFSET : POSITION_OFFSET + n_text].to(t.dtype)
        if text_padding_mask is not None:
            t = t * (1 - text_padding_mask.unsqueeze(-1).to(t.dtype))
        return v, t

    def forward(
        self,
        image: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        masked_position: Tensor | None = None,
        return_all_hiddens: bool = False,
    ) -> dict[str, Tensor | list[Tensor]]:
        """image (B,3,S,S) normalised; text_ids (B,L); text_padding_mask (B,L), nonzero = padding,
        or None when no row of the batch is padded. Whether a batch has padding is decided where
        the batch is built (the collate), never here: a data-dependent branch would be a host sync
        every step and a graph break under torch.compile and torch.export.

        Returns ``vision`` (B, 1+G*G, D), ``text`` (B, L, D) after the final LayerNorm and,
        with ``return_all_hiddens``, ``hidden_states``: the embeddings and each layer's output as
        (B, N, D) tensors before the final LayerNorm.
        """
        pad = None if text_padding_mask is None else text_padding_mask.bool()
        v, t = self.embed(image, text_ids, pad, masked_position)
        attn_mask: Tensor | BlockMask | None = None
        if pad is not None:
            # True = attend. Vision keys are never masked, so no row is empty.
            attend = torch.cat([pad.new_ones(pad.shape[0], v.shape[1]), ~pad], dim=1)
            # FlexAttention has no CPU backward: CPU training keeps SDPA (the same math)
            if self.attention == "flex" and (attend.is_cuda or not torch.is_grad_enabled()):
                attn_mask = key_padding_block_mask(attend)
            else:
                attn_mask = attend[:, None, None, :]  # SDPA boolean mask
        hidden = [torch.cat([v, t], dim=1)] if return_all_hiddens else None
        for layer in self.encoder.layers:
            if self.grad_checkpointing and self.training:
                v, t = checkpoint(layer, v, t, attn_mask, use_reentrant=False)
            else:
                v, t = layer(v, t, attn_mask)
            if hidden is not None:
                hidden.append(torch.cat([v, t], dim=1))
        ln = self.encoder.layer_norm
        out: dict[str, Tensor | list[Tensor]] = {"vision": ln.A(v), "text": ln.B(t)}
        if hidden is not None:
            out["hidden_states"] = hidden
        return out


def key_padding_block_mask(attend: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """FlexAttention block mask of a (B, N) key mask (True = attend), the same for every query and
    head. Built from block counts with tensor ops only (no ``create_block_mask``, which evaluates
    the mask over B x N x N): no host sync and static shapes, so it runs inside compiled code."""
    b, n = attend.shape
    blocks = -(-n // block_size)
    keep = F.pad(attend, (0, blocks * block_size - n))  # keys past N never attended
    counts = keep.view(b, blocks, block_size).sum(-1)
    full = counts == block_size
    partial = (counts > 0) & ~full

    def first(selected: Tensor) -> tuple[Tensor, Tensor]:
        # the selected block indices first (stable), each row repeated for every query block
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        num = selected.sum(-1, dtype=torch.int32)
        return num[:, None, None].expand(b, 1, blocks), order[:, None, None].expand(b, 1, blocks, blocks)

    def mask_mod(batch: Tensor, head: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return keep[batch, kv]

    kv_num, kv_idx = first(partial)
    full_num, full_idx = first(full)
    return BlockMask.from_kv_blocks(
        kv_num.contiguous(),
        kv_idx.contiguous(),
        full_num.contiguous(),
        full_idx.contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n, n),
    )


_compiled_flex: Any = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    # FlexAttention is a fused kernel only when compiled; eager (the CPU path, tests) materialises
    # the scores. Compiling needs a GPU backend here, so the CPU stays eager.
    global _compiled_flex
    if not q.is_cuda or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def init_official(module: nn.Module) -> None:
    """Official BEiT3Wrapper init: Linear ~ trunc_normal(std .02, cut at +-.02), bias 0; LN 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_backbone(backbone: BEiT3) -> None:
    d = backbone.cfg.embed_dim
    nn.init.normal_(backbone.text_embed.weight, std=d**-0.5)
    nn.init.trunc_normal_(backbone.vision_embed.cls_token, std=0.02)
    nn.init.trunc_normal_(backbone.vision_embed.mask_token, std=0.02)
    backbone.apply(init_official)
    for table in (backbone.encoder.embed_positions.A, backbone.encoder.embed_positions.B):
        nn.init.normal_(table.weight, std=d**-0.5)
    fan_in = backbone.vision_embed.proj.in_channels * backbone.cfg.patch_size**2
    nn.init.uniform_(backbone.vision_embed.proj.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) 2-D sine-cosine position code (MAE), row-major: the first half of the
    channels encodes the row, the second the column; each half is [sin | cos] over ``dim/4``
    frequencies 1/10000^(k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def code(pos: Tensor) -> Tensor:
        angle = pos.flatten()[:, None] * freqs[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


def init_vision_positions_sincos(backbone: BEiT3) -> None:
    """Patch rows of the vision position table <- sincos_2d, the cls row <- 0 (the table stays
    learned). Non-official: gives a model trained from scratch usable positions from step 0."""
    cfg = backbone.cfg
    table = backbone.encoder.embed_positions.A.weight
    with torch.no_grad():
        table[POSITION_OFFSET].zero_()
        table[POSITION_OFFSET + 1 : POSITION_OFFSET + 1 + cfg.num_patches] = sincos_2d(
            cfg.grid_size, cfg.embed_dim
        )
