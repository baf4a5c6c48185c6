"""Loading the released VQ-KD tokenizer (``vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth``,
BEiT v2) for MRefM targets.

The tokenizing path is loaded strictly (every encoder, task-layer and codebook tensor must be there
with the right shape); the decoder, the quantizer's EMA statistics and any distillation-teacher
tensors, which only training the tokenizer needs, are dropped and listed in the report; any other
key is an error. The architecture is read from the shapes,
except the number of heads (default: head width 64, as the release).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from oneref.checkpoint.io import CheckpointError, load_checkpoint_file
from oneref.checkpoint.report import ConversionReport
from oneref.models.vqkd import VQKD, VQKDConfig

_TOKENIZING = ("encoder.", "encode_task_layer.", "quantize.embedding.weight")
_DROP_REASONS = {
    "decoder.": "VQ-KD decoder (only used to train the tokenizer)",
    "decode_task_layer.": "VQ-KD decoder head (only used to train the tokenizer)",
    "quantize.": "quantizer EMA statistics (only used to train the tokenizer)",
    "teacher_model.": "distillation teacher (only used to train the tokenizer)",
    "scaling_layer.": "teacher input scaling (only used to train the tokenizer)",
}
HELP = (
    "the VQ-KD tokenizer of BEiT v2 (vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth, "
    "github.com/microsoft/unilm, beit2 README, 'visual tokenizer')"
)


def vqkd_config_from_state_dict(sd: Mapping[str, Tensor], num_heads: int | None = None) -> VQKDConfig:
    try:
        d = sd["encoder.cls_token"].shape[-1]
        patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
        n_pos = sd["encoder.pos_embed"].shape[1] - 1
        hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        codes, code_dim = sd["quantize.embedding.weight"].shape
    except KeyError as e:
        raise CheckpointError(f"not a VQ-KD state dict: {e.args[0]} is missing; expected {HELP}") from e
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    grid = int(round(n_pos**0.5))
    return VQKDConfig(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=d,
        depth=depth,
        num_heads=num_heads or max(1, d // 64),
        mlp_ratio=hidden / d,
        code_dim=code_dim,
        num_codes=codes,
    )


def load_vqkd(path: str | Path, num_heads: int | None = None) -> tuple[VQKD, ConversionReport]:
    """Build the tokenizer from a VQ-KD checkpoint file (``{'model': sd}`` or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ-KD checkpoint not found: {path}; it is {HELP}")
    obj = load_checkpoint_file(path)
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} holds no state dict; expected {HELP}")
    cfg = vqkd_config_from_state_dict(sd, num_heads)
    model = VQKD(cfg)
    report = ConversionReport(source=str(path), source_format="vqkd")
    keep = {}
    for key, value in sd.items():
        if key.startswith(_TOKENIZING):
            keep[key] = value
        else:
            reason = next((r for p, r in _DROP_REASONS.items() if key.startswith(p)), None)
            if reason is None:
                report.unexpected.append(key)
            else:
                report.dropped[key] = reason
    own = model.state_dict()
    missing = sorted(set(own) - set(keep))
    mismatched = [
        f"{k}: checkpoint {list(keep[k].shape)} vs model {list(own[k].shape)}"
        for k in keep
        if k in own and keep[k].shape != own[k].shape
    ]
    extra = sorted(set(keep) - set(own)) + report.unexpected
    if missing or mismatched or extra:
        lines = [f"{path}: the VQ-KD tokenizer does not load strictly ({cfg})"]
        lines += [f"  missing: {k}" for k in missing[:25]] + [f"  unexpected: {k}" for k in extra[:25]]
        lines += [f"  shape: {m}" for m in mismatched[:25]]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict({k: v.float() for k, v in keep.items()}, strict=True)
    report.mapped = sorted(keep)
    return model, report


__all__ = ["load_vqkd", "vqkd_config_from_state_dict"]
