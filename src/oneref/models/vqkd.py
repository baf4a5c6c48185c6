"""VQ-KD visual tokenizer (BEiT v2): the frozen model that gives MRefM its MIM targets (official
``models/modeling_vqkd.py`` ``get_codebook_indices``).

Only the tokenizing path is built: a ViT encoder (BEiT blocks: q and v biases, no k bias, no
layer scale; mean-pooling variant, so ``fc_norm`` normalises the patch tokens), the
``encode_task_layer`` (Linear, Tanh, Linear to the code dimension), and the nearest L2-normalised
codeword. Parameter names equal the released ``vqkd_encoder_base_decoder_3x768x12_clip`` keys; its
decoder and EMA statistics are not needed to tokenize (oneref.checkpoint.vqkd drops and reports them).

The encoder is built for ``img_size`` (224 for the release) and, like the official code, resizes
its position table on the fly for other inputs (384 in MRefM): bicubic with DINO's
``scale_factor = (g + 0.1) / g0``, reproduced exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VQKDConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    code_dim: int = 32
    num_codes: int = 8192
    layernorm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VQKDEncoder(nn.Module):
    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, cfg.embed_dim))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)

    def positions(self, grid: int) -> Tensor:
        """The position table for a grid x grid input (official DINO-style bicubic resize)."""
        g0 = self.cfg.img_size // self.cfg.patch_size
        if grid == g0:
            return self.pos_embed
        d = self.pos_embed.shape[-1]
        table = self.pos_embed[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
        # scale_factor, not size: PyTorch then maps coordinates with 1/scale, as the official call
        scale = (grid + 0.1) / math.sqrt(g0 * g0)
        table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic")
        if table.shape[-1] != grid:
            raise ValueError(f"position resize gave {table.shape[-1]} columns, expected {grid}")
        return torch.cat((self.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, grid * grid, d)), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [-1, 1] -> fc_norm-ed patch tokens (B, N, D)."""
        if x.shape[-1] != x.shape[-2] or x.shape[-1] % self.cfg.patch_size:
            raise ValueError(
                f"VQKD needs square images, a multiple of {self.cfg.patch_size} px; got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.positions(x.shape[-1] // self.cfg.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(tokens[:, 1:])


class Quantizer(nn.Module):
    """Codebook of the NormEMA vector quantizer (unit-norm rows); only the lookup."""

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_codes, cfg.code_dim)

    def forward(self, z: Tensor) -> Tensor:
        """(B, N, C) features -> (B, N) indices of the nearest codeword after L2 normalisation."""
        flat = F.normalize(z, dim=-1).reshape(-1, z.shape[-1])
        w = self.embedding.weight
        # the official distance expression, so near-ties break the same way
        dist = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", flat, w)
        return dist.argmin(1).view(z.shape[:-1])


class VQKD(nn.Module):
    """Frozen visual tokenizer: ``get_codebook_indices(images)`` gives the MIM targets."""

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VQKDEncoder(cfg)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.Tanh(), nn.Linear(cfg.embed_dim, cfg.code_dim)
        )
        self.quantize = Quantizer(cfg)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VQKD:
        return super().train(False)  # always frozen and in eval mode

    @staticmethod
    def pre_process(images: Tensor) -> Tensor:
        """Official 'default' process: [0, 1] (or [0, 255]) -> [-1, 1]."""
        if images.max() <= 1.0:
            images = images * 255.0
        return images / 127.5 - 1.0

    def quantizer_input(self, images: Tensor) -> Tensor:
        feats = self.encoder(self.pre_process(images))
        with torch.autocast(images.device.type, enabled=False):
            return self.encode_task_layer(feats.float())

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """(B,3,S,S) un-normalised images in [0, 1] -> (B, (S/patch)^2) int64 codes, row-major."""
        with torch.autocast(images.device.type, enabled=False):
            return self.quantize(self.quantizer_input(images.float()))
