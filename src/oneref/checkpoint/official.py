"""Converters between official OneRef / BEiT-3 / MRefM checkpoints and our model.

Each converter is a pure function ``(state_dict, cfg) -> (new_state_dict, ConversionReport)``
driven by the explicit name map :data:`NAME_MAP`; the source format is always named by the caller,
never guessed from key names. Loading is done by :func:`load_into`, which checks every key and
shape before copying anything, so a failed load leaves the model untouched.

Name map (official key prefix -> ours, and the head group it belongs to). Our parameter names
equal the official ones (spec 2.1), so every row maps a prefix onto itself; the table is still
the single source of truth for which keys exist and which group owns them:

==========================================  ===========  =================================================
official prefix                             group        notes
==========================================  ===========  =================================================
``beit3.``                                  backbone     BEiT-3 Multiway encoder (the only BEiT-3 keys)
``logit_scale``                             grounding    contrastive temperature (log), 0-dim
``language_head.`` ``vision_head.``         grounding    text / vision cls projections (no bias)
``bbox_embed.`` ``visu_proj.``              grounding    REC box head
``text_proj.``                              grounding    in every checkpoint, never used in forward
``seg_conv{1,2,3}.`` ``bn{1,2,3}.``         seg          RES head (official ``--use_mask_loss``)
``mim_head.`` ``mim_vts_head.``             mim          MRefM referring-aware MIM heads
``mlm_head.`` ``mlm_sts_head.``             mlm          MRefM referring-aware MLM heads
``layer_norm.``                             (not built)  only with ``--mim_mid_layer`` > 0, which no
                                                         released script uses: dropped and reported
==========================================  ===========  =================================================

A Lightning checkpoint of ours stores the network under the LightningModule's ``model.`` prefix;
``oneref.checkpoint.folder`` strips it before these converters run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oneref.checkpoint.io import CheckpointError
from oneref.checkpoint.report import ConversionReport
from oneref.models.beit3 import POSITION_OFFSET
from oneref.models.oneref import OneRefConfig
from oneref.models.registry import SIZES

log = logging.getLogger(__name__)

# (official prefix, our prefix, group). A prefix ending in "." matches a module subtree, any other
# entry matches one key exactly.
NAME_MAP: tuple[tuple[str, str, str], ...] = (
    ("beit3.", "beit3.", "backbone"),
    ("logit_scale", "logit_scale", "grounding"),
    ("language_head.", "language_head.", "grounding"),
    ("vision_head.", "vision_head.", "grounding"),
    ("bbox_embed.", "bbox_embed.", "grounding"),
    ("visu_proj.", "visu_proj.", "grounding"),
    ("text_proj.", "text_proj.", "grounding"),
    *((f"seg_conv{i}.", f"seg_conv{i}.", "seg") for i in (1, 2, 3)),
    *((f"bn{i}.", f"bn{i}.", "seg") for i in (1, 2, 3)),
    ("mim_head.", "mim_head.", "mim"),
    ("mim_vts_head.", "mim_vts_head.", "mim"),
    ("mlm_head.", "mlm_head.", "mlm"),
    ("mlm_sts_head.", "mlm_sts_head.", "mlm"),
)

# Official keys we deliberately do not build: prefix -> why.
NOT_BUILT: dict[str, str] = {
    "layer_norm.": "mim_mid_layer LayerNorm (official --mim_mid_layer > 0, unused by every released script); not built",
}

GROUPS: tuple[str, ...] = ("backbone", "grounding", "seg", "mim", "mlm")
HEAD_GROUPS: tuple[str, ...] = ("grounding", "seg", "mim", "mlm")
GROUP_ALIASES: dict[str, tuple[str, ...]] = {"heads": HEAD_GROUPS}

TASKS: tuple[str, ...] = ("rec", "res", "mrefm")
POS_A = "beit3.encoder.embed_positions.A.weight"
POS_B = "beit3.encoder.embed_positions.B.weight"
# Rows of the vision table before the patch grid: 2 unused fairseq rows + cls (spec 2.3).
POS_EXTRA_ROWS = POSITION_OFFSET + 1
DEFAULT_MIM_CODEBOOK = 8192  # VQKD codebook of the released MRefM models


def _match(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith(".") else key == prefix


def map_key(official_key: str) -> tuple[str, str] | None:
    """Official key -> (our key, group), or None when no name-map row covers it."""
    for src, dst, group in NAME_MAP:
        if _match(official_key, src):
            return dst + official_key[len(src) :], group
    return None


def unmap_key(our_key: str) -> tuple[str, str] | None:
    """Our key -> (official key, group): the inverse of :func:`map_key`."""
    for src, dst, group in NAME_MAP:
        if _match(our_key, dst):
            return src + our_key[len(dst) :], group
    return None


def key_group(our_key: str) -> str | None:
    hit = unmap_key(our_key)
    return hit[1] if hit else None


def built_groups(cfg: OneRefConfig) -> set[str]:
    groups = {"backbone", "grounding"}
    if cfg.seg_head:
        groups.add("seg")
    if cfg.mim_codebook_size:
        groups.add("mim")
    if cfg.mlm_head:
        groups.add("mlm")
    return groups


def expand_groups(names: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name in GROUP_ALIASES:
            out.update(GROUP_ALIASES[name])
        elif name in GROUPS:
            out.add(name)
        else:
            raise ValueError(f"unknown key group {name!r}; choose from {[*GROUPS, *GROUP_ALIASES]}")
    return out


# -- the official layout ---------------------------------------------------------------------------
def official_keys(cfg: OneRefConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the official state dict for ``cfg``, in official order, with shape and dtype.

    Spec 2.1 / official-keys-base384.txt; the tests check it against both.
    """
    d, f, p = cfg.embed_dim, cfg.ffn_dim, cfg.patch_size
    f32, i64 = torch.float32, torch.int64
    keys: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "logit_scale": ((), f32),
        "beit3.text_embed.weight": ((cfg.vocab_size, d), f32),
        "beit3.vision_embed.mask_token": ((1, 1, d), f32),
        "beit3.vision_embed.cls_token": ((1, 1, d), f32),
        "beit3.vision_embed.proj.weight": ((d, cfg.in_chans, p, p), f32),
        "beit3.vision_embed.proj.bias": ((d,), f32),
        POS_A: ((cfg.num_vision_tokens + POSITION_OFFSET, d), f32),
        POS_B: ((cfg.max_source_positions, d), f32),
    }

    def linear(name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
        keys[f"{name}.weight"] = ((out_dim, in_dim), f32)
        if bias:
            keys[f"{name}.bias"] = ((out_dim,), f32)

    def norm(name: str, dim: int) -> None:
        keys[f"{name}.weight"] = ((dim,), f32)
        keys[f"{name}.bias"] = ((dim,), f32)

    for i in range(cfg.depth):
        layer = f"beit3.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            for branch in "AB":
                linear(f"{layer}.self_attn.{proj}.{branch}", d, d)
        for branch in "AB":
            norm(f"{layer}.self_attn.inner_attn_ln.{branch}", d)
        for branch in "AB":
            norm(f"{layer}.self_attn_layer_norm.{branch}", d)
        for branch in "AB":
            linear(f"{layer}.ffn.{branch}.fc1", f, d)
            linear(f"{layer}.ffn.{branch}.fc2", d, f)
            norm(f"{layer}.ffn.{branch}.ffn_layernorm", f)
        for branch in "AB":
            norm(f"{layer}.final_layer_norm.{branch}", d)
    for branch in "AB":
        norm(f"beit3.encoder.layer_norm.{branch}", d)
    linear("language_head", d, d, bias=False)
    linear("vision_head", d, d, bias=False)
    for j, out_dim in enumerate((d, d, 4)):
        linear(f"bbox_embed.layers.{j}", out_dim, d)
    linear("visu_proj", d, d)
    linear("text_proj", d, d)
    if cfg.seg_head:
        for i in (1, 2, 3):
            keys[f"seg_conv{i}.weight"] = ((d, d, 2, 2), f32)
            for name in ("weight", "bias", "running_mean", "running_var"):
                keys[f"bn{i}.{name}"] = ((d,), f32)
            keys[f"bn{i}.num_batches_tracked"] = ((), i64)
    if cfg.mim_codebook_size:
        linear("mim_head", cfg.mim_codebook_size, d)
        for j, out_dim in enumerate((d, d, 4)):
            linear(f"mim_vts_head.layers.{j}", out_dim, d)
    if cfg.mlm_head:
        linear("mlm_head", cfg.vocab_size, d)
        for j, out_dim in enumerate((d, d, 1)):
            linear(f"mlm_sts_head.layers.{j}", out_dim, d)
    return keys


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
            f"max_source_positions={cfg.max_source_positions}; the text table is never resized (spec 2.3): "
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
                "resize the table bicubically as official fine-tuning does (spec 2.3); the model then computes "
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
    """Official ``load_model_and_may_interpolate`` (spec 2.3): keep the first 3 rows (2 unused +
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


# -- converters ---------------------------------------------------------------------------------------
_MISSING_WHY = {
    "official": "absent from the checkpoint",
    "mrefm": "not in MRefM checkpoints: initialised as the official fine-tuning does",
    "beit3": "not in BEiT-3 pretrained checkpoints: initialised as the official fine-tuning does",
}


def _convert(
    state_dict: Mapping[str, Tensor],
    cfg: OneRefConfig,
    fmt: str,
    *,
    resize_positions: bool,
    source: str,
) -> tuple[dict[str, Tensor], ConversionReport]:
    report = ConversionReport(source=source, source_format=fmt)
    arch = infer_architecture(state_dict)
    check_compatible(arch, cfg, resize_positions=resize_positions or fmt == "beit3")
    built = built_groups(cfg)
    expected = official_keys(cfg)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        not_built = next((why for prefix, why in NOT_BUILT.items() if _match(key, prefix)), None)
        if not_built:
            report.dropped[key] = not_built
            continue
        hit = map_key(key)
        if hit is None:
            if fmt == "beit3":  # pretraining-only tensors; the official loader ignores them too
                report.dropped[key] = (
                    "not part of OneRef (BEiT-3 pretraining only); ignored as the official loader does"
                )
            else:
                report.unexpected.append(key)
                out[key] = value  # kept so that a strict load names it
            continue
        ours, group = hit
        if group not in built:
            if fmt == "mrefm" and group in ("mim", "mlm"):
                report.dropped[key] = "MRefM pretraining head; the target model has no such head"
                continue
            if fmt == "beit3":
                report.dropped[key] = f"{group} head not built by the target model"
                continue
            report.unexpected.append(key)
            out[key] = value
            continue
        if ours not in expected:  # inside a known subtree but not a tensor the model has
            if fmt == "beit3":
                report.dropped[key] = (
                    "not part of OneRef (BEiT-3 pretraining only); ignored as the official loader does"
                )
            else:
                report.unexpected.append(key)
                out[key] = value
            continue
        if ours == POS_A and value.shape[0] != cfg.num_vision_tokens + POSITION_OFFSET:
            resized = resize_vision_positions(value, cfg.grid_size)
            report.resized.append(
                {
                    "key": ours,
                    "from": list(value.shape),
                    "to": list(resized.shape),
                    "method": "bicubic fp32 (spec 2.3)",
                }
            )
            value = resized
        if ours != key:
            report.renamed[key] = ours
        out[ours] = value
        report.mapped.append(ours)
    why = _MISSING_WHY[fmt]
    for key in expected:
        if key not in out:
            report.missing[key] = why
    if report.unexpected:
        report.notes.append(_unexpected_hint(report.unexpected, fmt))
    return out, report


def _unexpected_hint(keys: list[str], fmt: str) -> str:
    groups = {map_key(k)[1] if map_key(k) else None for k in keys}
    hints = []
    if groups & {"mim", "mlm"}:
        hints.append(
            "the checkpoint has MRefM heads: convert it as format 'mrefm' to drop them, or build the model with task=mrefm"
        )
    if "seg" in groups:
        hints.append("the checkpoint has a RES seg head: build the model with task=res (seg_head=True)")
    if None in groups:
        hints.append(
            f"keys outside the name map: this is not an official OneRef checkpoint of format {fmt!r}"
        )
    return "; ".join(hints)


def convert_official_oneref(
    state_dict: Mapping[str, Tensor], cfg: OneRefConfig, *, resize_positions: bool = False, source: str = ""
) -> tuple[dict[str, Tensor], ConversionReport]:
    """An official OneRef checkpoint (REC, RES or MRefM heads; base/large; 384/480) -> ours.

    Identity names; heads the checkpoint has but ``cfg`` does not build stay in the output as
    unexpected keys, so a strict :func:`load_into` names them. A different image size raises
    unless ``resize_positions`` is set.
    """
    return _convert(state_dict, cfg, "official", resize_positions=resize_positions, source=source)


def convert_mrefm(
    state_dict: Mapping[str, Tensor], cfg: OneRefConfig, *, resize_positions: bool = False, source: str = ""
) -> tuple[dict[str, Tensor], ConversionReport]:
    """An MRefM pretraining checkpoint -> a REC/RES (or MRefM) model. MIM/MLM heads that ``cfg``
    does not build are dropped and listed; a seg head ``cfg`` builds is reported missing."""
    return _convert(state_dict, cfg, "mrefm", resize_positions=resize_positions, source=source)


def convert_beit3_pretrained(
    state_dict: Mapping[str, Tensor], cfg: OneRefConfig, *, source: str = ""
) -> tuple[dict[str, Tensor], ConversionReport]:
    """A BEiT-3 pretrained checkpoint (``beit3_{base,large}_indomain_patch16_224.pth``, keys
    ``beit3.*``) -> ours, the vision position table resized to ``cfg.img_size`` exactly as spec
    2.3. Every OneRef head is reported missing: load with ``allow_missing=("heads",)``."""
    return _convert(state_dict, cfg, "beit3", resize_positions=True, source=source)


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
    model: dict[str, Tensor] = {}
    for key in expected:  # official order
        official, _ = unmap_key(key)
        model[official] = state_dict[key]
        report.mapped.append(key)
        if official != key:
            report.renamed[key] = official
    return {"model": model, "epoch": epoch}, report


# -- loading -----------------------------------------------------------------------------------------
class LoadError(CheckpointError):
    """Keys missing, unexpected or of the wrong shape; nothing was loaded."""

    def __init__(
        self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def diff_keys(
    given: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k])}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    return missing, unexpected, mismatched


def format_key_problems(
    title: str, missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 25
) -> str:
    lines = [title]
    for name, items in (("missing", missing), ("unexpected", unexpected), ("size mismatch", mismatched)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {name} ({len(items)}): " + "; ".join(items[:limit]) + more)
    return "\n".join(lines)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    report: ConversionReport | None = None,
) -> ConversionReport:
    """Copy ``state_dict`` into ``model`` after checking every key and shape.

    Strict (default): any missing, unexpected or mis-shaped key raises one :class:`LoadError`
    that lists them all (shapes included). ``strict=False`` needs ``allow_missing``, a list of key
    groups (``heads``, ``grounding``, ``seg``, ``mim``, ``mlm``, ``backbone``) whose keys may be
    absent: they keep their initialisation and are recorded in the report. Unexpected or
    mis-shaped keys always raise. Nothing is copied unless every check passes.
    """
    allow = expand_groups(allow_missing)
    if strict and allow:
        raise ValueError("allow_missing only applies with strict=False")
    if not strict and not allow:
        raise ValueError(
            "strict=False needs allow_missing: name the key groups that may be absent (e.g. ('heads',))"
        )
    report = report or ConversionReport()
    own = model.state_dict()
    missing, unexpected, mismatched = diff_keys(state_dict, {k: tuple(v.shape) for k, v in own.items()})
    bad_missing = [k for k in missing if key_group(k) not in allow]
    if bad_missing or unexpected or mismatched:
        headline = ""
        cfg = getattr(model, "cfg", None)
        if isinstance(cfg, OneRefConfig):
            try:
                check_compatible(infer_architecture(state_dict), cfg, resize_positions=False)
            except CheckpointError as e:
                headline = f"\n  {e}"
        hints = (
            "\n  hint: " + _unexpected_hint(unexpected, report.source_format or "official")
            if unexpected
            else ""
        )
        if bad_missing and all(key_group(k) in HEAD_GROUPS for k in bad_missing):
            hints += "\n  hint: only head weights are missing; a BEiT-3 pretrained checkpoint needs source_format='beit3'"
        src = f" {report.source}" if report.source else ""
        msg = format_key_problems(
            f"cannot load checkpoint{src} into {type(model).__name__}:{headline}",
            bad_missing,
            unexpected,
            mismatched,
        )
        raise LoadError(
            msg + hints + "\nNothing was loaded; the model's weights are unchanged.",
            bad_missing,
            unexpected,
            mismatched,
        )
    casts = sorted(
        {
            f"{state_dict[k].dtype} -> {own[k].dtype}"
            for k in state_dict
            if state_dict[k].dtype != own[k].dtype
        }
    )
    with torch.no_grad():
        result = model.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys or not set(result.missing_keys) <= set(missing):  # all checked above
        raise RuntimeError(f"load_state_dict disagreed with the key check: {result}")
    for key in missing:
        report.missing.setdefault(
            key, f"absent from the checkpoint; {key_group(key)} group allowed to start from initialisation"
        )
    if casts:
        report.notes.append(f"dtype cast on load: {', '.join(casts)}")
    report.log(logging.WARNING if missing or report.dropped else logging.INFO)
    return report
