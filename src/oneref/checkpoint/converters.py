"""Converters between official OneRef / BEiT-3 / MRefM checkpoints and our model, and architecture
inference from a state dict's shapes.

:func:`convert_state_dict` is a pure function ``(state_dict, cfg, format) -> (our state dict,
ConversionReport)``; the format is always named by the caller, never guessed from key names:

- ``official``: a released OneRef checkpoint (REC, RES or MRefM heads; base/large; 384/480). Heads
  the checkpoint has but ``cfg`` does not build stay in the output as unexpected keys, so that a
  strict load names them; another image size raises unless ``resize_positions``.
- ``mrefm``: an MRefM pretraining checkpoint; MIM/MLM heads ``cfg`` does not build are dropped and
  listed, heads it lacks are reported missing.
- ``beit3``: a BEiT-3 pretrained checkpoint (``beit3_{base,large}_indomain_patch16_224.pth``, keys
  ``beit3.*``); the vision position table is resized to ``cfg.img_size`` as official fine-tuning
  does, and every OneRef head is reported missing.

Our names equal the official ones, so no key is renamed; the key groups come from
:mod:`oneref.checkpoint.keys`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from oneref.checkpoint.formats import LAYOUT_FORMATS
from oneref.checkpoint.io import CheckpointError
from oneref.checkpoint.keys import (
    POS_A,
    POS_B,
    POS_EXTRA_ROWS,
    built_groups,
    diff_keys,
    format_key_problems,
    key_group,
    not_built_reason,
    official_keys,
    unexpected_hint,
)
from oneref.checkpoint.report import ConversionReport
from oneref.models.beit3 import POSITION_OFFSET
from oneref.models.oneref import OneRefConfig
from oneref.models.registry import SIZES

TASKS: tuple[str, ...] = ("rec", "res", "mrefm")
DEFAULT_MIM_CODEBOOK = 8192  # VQ-KD codebook of the released MRefM models


# -- reading the architecture off the shapes ------------------------------------------------------
def infer_architecture(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture facts readable from the shapes of an official-layout state dict.

    Returns embed_dim, depth, ffn_dim, patch_size, in_chans, vocab_size, max_source_positions,
    pos_rows, grid (None if the table is not a square grid), img_size, size (registered name or
    None), num_heads (only for a registered size: heads are not visible in shapes), seg_head,
    mim_codebook_size, mlm_head and task.
    """
    need = ("beit3.vision_embed.proj.weight", "beit3.text_embed.weight", POS_A, POS_B)
    absent = [k for k in need if k not in state_dict]
    if absent:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"the state dict has no BEiT-3 backbone keys ({', '.join(absent)} missing; its first keys: {sample}); "
            "it is not a OneRef/BEiT-3 checkpoint in the official layout, or it needs another source format "
            "(official, beit3, mrefm, lightning, folder)"
        )
    proj = state_dict["beit3.vision_embed.proj.weight"]
    layer_ids = {int(k.split(".")[3]) for k in state_dict if k.startswith("beit3.encoder.layers.")}
    depth = max(layer_ids) + 1 if layer_ids else 0
    if layer_ids != set(range(depth)):
        raise CheckpointError(
            f"encoder layers {sorted(set(range(depth)) - layer_ids)} are missing from the state dict"
        )
    fc1 = state_dict.get("beit3.encoder.layers.0.ffn.A.fc1.weight")
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    ffn_dim = fc1.shape[0] if fc1 is not None else None
    rows = state_dict[POS_A].shape[0]
    grid = math.isqrt(max(rows - POS_EXTRA_ROWS, 0))
    if grid * grid != rows - POS_EXTRA_ROWS:
        grid = None
    size = next(
        (
            n
            for n, s in SIZES.items()
            if (s["embed_dim"], s["depth"], s["ffn_dim"]) == (embed_dim, depth, ffn_dim)
        ),
        None,
    )
    seg = "seg_conv1.weight" in state_dict
    mim = state_dict["mim_head.weight"].shape[0] if "mim_head.weight" in state_dict else 0
    mlm = "mlm_head.weight" in state_dict
    return {
        "size": size,
        "embed_dim": embed_dim,
        "depth": depth,
        "ffn_dim": ffn_dim,
        "num_heads": SIZES[size]["num_heads"] if size else None,
        "patch_size": patch,
        "in_chans": proj.shape[1],
        "vocab_size": state_dict["beit3.text_embed.weight"].shape[0],
        "max_source_positions": state_dict[POS_B].shape[0],
        "pos_rows": rows,
        "grid": grid,
        "img_size": grid * patch if grid else None,
        "seg_head": seg,
        "mim_codebook_size": mim,
        "mlm_head": mlm,
        "task": "mrefm" if (mim or mlm) else "res" if seg else "rec",
    }


def _size_label(size: str | None, width: int, depth: int, ffn: int | None) -> str:
    name = size or "custom"
    return f"{name} (width {width}, {depth} layers, ffn {ffn})"


def check_compatible(
    arch: Mapping[str, Any], cfg: OneRefConfig, *, resize_positions: bool, what: str = "checkpoint"
) -> None:
    """Raise one clear :class:`CheckpointError` when ``arch`` (from :func:`infer_architecture`)
    cannot be loaded into a model built from ``cfg``: another size, patch, vocabulary or image size."""
    model_size = next(
        (n for n, s in SIZES.items() if all(getattr(cfg, k) == v for k, v in s.items())),
        None,
    )
    if (arch["embed_dim"], arch["depth"], arch["ffn_dim"]) != (cfg.embed_dim, cfg.depth, cfg.ffn_dim):
        ck = _size_label(arch["size"], arch["embed_dim"], arch["depth"], arch["ffn_dim"])
        mo = _size_label(model_size, cfg.embed_dim, cfg.depth, cfg.ffn_dim)
        fix = (
            f"size={arch['size']} (CLI --size {arch['size']}, Hydra model={arch['size']})"
            if arch["size"]
            else (f"embed_dim={arch['embed_dim']}, depth={arch['depth']}, ffn_dim={arch['ffn_dim']}")
        )
        raise CheckpointError(
            f"the {what} is a {ck} model but the model to load it into is {mo}: build the model with {fix}"
        )
    if arch["patch_size"] != cfg.patch_size or arch["in_chans"] != cfg.in_chans:
        raise CheckpointError(
            f"the {what} has patch size {arch['patch_size']} / {arch['in_chans']} input channels but the model "
            f"has {cfg.patch_size} / {cfg.in_chans}: build it with patch_size={arch['patch_size']}"
        )
    if arch["vocab_size"] != cfg.vocab_size:
        raise CheckpointError(
            f"the {what} has a {arch['vocab_size']}-row text embedding but the model has vocab_size={cfg.vocab_size}: "
            f"build it with vocab_size={arch['vocab_size']}"
        )
    if arch["max_source_positions"] != cfg.max_source_positions:
        raise CheckpointError(
            f"the {what} has a {arch['max_source_positions']}-row text position table but the model has "
            f"max_source_positions={cfg.max_source_positions}; the text table is never resized: "
            f"build the model with max_source_positions={arch['max_source_positions']}"
        )
    want_rows = cfg.num_vision_tokens + POSITION_OFFSET
    if arch["pos_rows"] != want_rows:
        if arch["grid"] is None:
            raise CheckpointError(
                f"the {what}'s vision position table ({POS_A}) has {arch['pos_rows']} rows, which is not "
                f"{POS_EXTRA_ROWS} + a square patch grid; it cannot be resized to img_size {cfg.img_size}"
            )
        if not resize_positions:
            raise CheckpointError(
                f"the {what} was trained at img_size {arch['img_size']} (its vision position table {POS_A} has "
                f"{arch['pos_rows']} rows = {POS_EXTRA_ROWS} + {arch['grid']}x{arch['grid']}) but the model is built "
                f"for img_size {cfg.img_size} ({want_rows} rows): build the model with img_size={arch['img_size']} "
                f"(CLI --img-size {arch['img_size']}), or pass resize_positions=True (CLI --resize-positions) to "
                "resize the table bicubically as official fine-tuning does; the model then computes "
                "something other than the released one until it is fine-tuned"
            )
    if (
        cfg.mim_codebook_size
        and arch["mim_codebook_size"]
        and arch["mim_codebook_size"] != cfg.mim_codebook_size
    ):
        raise CheckpointError(
            f"the {what}'s MIM head predicts {arch['mim_codebook_size']} codes but the model has "
            f"mim_codebook_size={cfg.mim_codebook_size}: build it with mim_codebook_size={arch['mim_codebook_size']}"
        )


def infer_config(
    arch: Mapping[str, Any],
    *,
    size: str | None = None,
    img_size: int | None = None,
    task: str | None = None,
    num_heads: int | None = None,
    **overrides: Any,
) -> OneRefConfig:
    """A :class:`OneRefConfig` for a checkpoint: shapes give everything but the number of heads
    (known for registered sizes, else ``num_heads`` is required). ``task`` picks the heads
    (rec: box only, res: + seg, mrefm: + MIM/MLM); default: the heads the checkpoint has."""
    if size is not None:
        if size not in SIZES:
            raise CheckpointError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
        s = SIZES[size]
        if (s["embed_dim"], s["depth"], s["ffn_dim"]) != (arch["embed_dim"], arch["depth"], arch["ffn_dim"]):
            ck = _size_label(arch["size"], arch["embed_dim"], arch["depth"], arch["ffn_dim"])
            raise CheckpointError(
                f"--size {size} was given but the checkpoint is a {ck} model; drop --size or fix it"
            )
    heads = num_heads or (SIZES[size]["num_heads"] if size else arch["num_heads"])
    if heads is None:
        raise CheckpointError(
            f"the checkpoint has width {arch['embed_dim']} and {arch['depth']} layers, which is no registered size "
            f"({', '.join(f'{n}: {s}' for n, s in SIZES.items())}); the number of attention heads is not visible "
            "in the weights: pass num_heads (CLI --num-heads)"
        )
    task = task or arch["task"]
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; choose one of {TASKS}")
    mim = arch["mim_codebook_size"] or DEFAULT_MIM_CODEBOOK
    fields: dict[str, Any] = dict(
        embed_dim=arch["embed_dim"],
        num_heads=heads,
        depth=arch["depth"],
        ffn_dim=arch["ffn_dim"],
        img_size=img_size or arch["img_size"],
        patch_size=arch["patch_size"],
        in_chans=arch["in_chans"],
        vocab_size=arch["vocab_size"],
        max_source_positions=arch["max_source_positions"],
        seg_head=task == "res" or (task == "mrefm" and arch["seg_head"]),
        mim_codebook_size=mim if task == "mrefm" else 0,
        mlm_head=task == "mrefm" and (arch["mlm_head"] or not arch["mim_codebook_size"]),
    )
    if fields["img_size"] is None:
        raise CheckpointError(
            "the image size cannot be read off the position table: pass img_size (CLI --img-size)"
        )
    fields.update(overrides)
    return OneRefConfig(**fields)


# -- position table ---------------------------------------------------------------------------------
def resize_vision_positions(table: Tensor, new_grid: int) -> Tensor:
    """Official ``load_model_and_may_interpolate`` (models/utils.py): keep the first 3 rows (2 unused +
    cls), reshape the rest row-major to the old square grid, bicubic (align_corners=False) in
    float32 to ``new_grid`` x ``new_grid``, flatten row-major, concatenate."""
    rows, dim = table.shape
    old_grid = math.isqrt(rows - POS_EXTRA_ROWS)
    if old_grid * old_grid != rows - POS_EXTRA_ROWS:
        raise CheckpointError(
            f"vision position table with {rows} rows is not {POS_EXTRA_ROWS} + a square grid"
        )
    extra, grid = table[:POS_EXTRA_ROWS], table[POS_EXTRA_ROWS:]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim)
    return torch.cat([extra, grid.to(table.dtype)], dim=0)


# -- converting -------------------------------------------------------------------------------------
_MISSING_WHY = {
    "official": "absent from the checkpoint",
    "mrefm": "not in MRefM checkpoints: initialised as the official fine-tuning does",
    "beit3": "not in BEiT-3 pretrained checkpoints: initialised as the official fine-tuning does",
}
_PRETRAINING_ONLY = "not part of OneRef (BEiT-3 pretraining only); ignored as the official loader does"


def convert_state_dict(
    state_dict: Mapping[str, Tensor],
    cfg: OneRefConfig,
    fmt: str = "official",
    *,
    resize_positions: bool = False,
    source: str = "",
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A checkpoint of format ``fmt`` (official | mrefm | beit3, see the module docstring) -> our
    state dict for a model built from ``cfg``, and the report of what happened to every key."""
    if fmt not in LAYOUT_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {LAYOUT_FORMATS}")
    report = ConversionReport(source=source, source_format=fmt)
    arch = infer_architecture(state_dict)
    check_compatible(arch, cfg, resize_positions=resize_positions or fmt == "beit3")
    built = built_groups(cfg)
    expected = official_keys(cfg)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        not_built = not_built_reason(key)
        if not_built:
            report.dropped[key] = not_built
            continue
        group = key_group(key)
        if group is None or (key not in expected and group in built):
            # outside every part, or inside a known subtree but not a tensor the model has
            if fmt == "beit3":  # pretraining-only tensors; the official loader ignores them too
                report.dropped[key] = _PRETRAINING_ONLY
            else:
                report.unexpected.append(key)
                out[key] = value  # kept so that a strict load names it
            continue
        if group not in built:
            if fmt == "mrefm" and group in ("mim", "mlm"):
                report.dropped[key] = "MRefM pretraining head; the target model has no such head"
            elif fmt == "beit3":
                report.dropped[key] = f"{group} head not built by the target model"
            else:
                report.unexpected.append(key)
                out[key] = value
            continue
        if key == POS_A and value.shape[0] != cfg.num_vision_tokens + POSITION_OFFSET:
            resized = resize_vision_positions(value, cfg.grid_size)
            report.resized.append(
                {
                    "key": key,
                    "from": list(value.shape),
                    "to": list(resized.shape),
                    "method": "bicubic fp32 (official load_model_and_may_interpolate)",
                }
            )
            value = resized
        out[key] = value
        report.mapped.append(key)
    why = _MISSING_WHY[fmt]
    for key in expected:
        if key not in out:
            report.missing[key] = why
    if report.unexpected:
        report.notes.append(unexpected_hint(report.unexpected, fmt))
    return out, report


def to_official(
    state_dict: Mapping[str, Tensor], cfg: OneRefConfig, *, epoch: int = 0
) -> tuple[dict[str, Any], ConversionReport]:
    """Our weights -> the official file layout ``{'model': state_dict, 'epoch': epoch}``.

    ``epoch`` is there because the official ``eval.py`` reads ``checkpoint['epoch']``. Raises if
    the weights do not match ``cfg`` exactly (a partial official checkpoint is never written).
    """
    expected = official_keys(cfg)
    report = ConversionReport(source_format="oneref", source="ours")
    problems = diff_keys(state_dict, {k: s for k, (s, _) in expected.items()})
    if any(problems):
        raise CheckpointError(
            format_key_problems("cannot export these weights to the official layout", *problems)
        )
    model = {key: state_dict[key] for key in expected}  # official order
    report.mapped = list(model)
    return {"model": model, "epoch": epoch}, report
