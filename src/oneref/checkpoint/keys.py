"""The key tables: which tensors a OneRef state dict holds, and which group owns each key.

Our parameter names are the official ones (official ``models/OneRef_model.py``
``BEiT3ForGrounding``, torchscale's BEiT-3 underneath), so a state dict converts key for key; what
differs between checkpoint formats is which *groups* of keys they hold. The groups come from the
model's own map of its parts (:data:`oneref.models.oneref.PARTS`), the one place that says which
tensor belongs where:

==============  ===================================================================================
group           keys
==============  ===================================================================================
``backbone``    ``beit3.*``: the BEiT-3 Multiway encoder (the only keys of a BEiT-3 checkpoint)
``grounding``   ``logit_scale``, ``language_head``, ``vision_head``, ``bbox_embed``, ``visu_proj``,
                ``text_proj`` (in every official checkpoint, never used in its forward)
``seg``         ``seg_conv{1,2,3}``, ``bn{1,2,3}``: the RES head (official ``--use_mask_loss``)
``mim``         ``mim_head``, ``mim_vts_head``: MRefM referring-aware MIM heads
``mlm``         ``mlm_head``, ``mlm_sts_head``: MRefM referring-aware MLM heads
==============  ===================================================================================

``heads`` names every group but the backbone. Official keys we deliberately do not build are in
:data:`NOT_BUILT`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from oneref.models.beit3 import POSITION_OFFSET
from oneref.models.oneref import KEY_GROUPS, OneRef, OneRefConfig, part_row

HEAD_GROUPS: tuple[str, ...] = tuple(g for g in KEY_GROUPS if g != "backbone")
GROUP_ALIASES: dict[str, tuple[str, ...]] = {"heads": HEAD_GROUPS}

# Official keys we do not build: prefix -> why.
NOT_BUILT: dict[str, str] = {
    "layer_norm.": "mim_mid_layer LayerNorm (official --mim_mid_layer > 0, unused by every released script); not built",
}

POS_A = "beit3.encoder.embed_positions.A.weight"  # vision positions
POS_B = "beit3.encoder.embed_positions.B.weight"  # text positions
# Rows of the vision table before the patch grid: 2 unused fairseq rows + cls (official
# models/utils.py load_model_and_may_interpolate counts them the same way).
POS_EXTRA_ROWS = POSITION_OFFSET + 1


def key_group(key: str) -> str | None:
    """The checkpoint key group of a state-dict key, or None for a key no part of the model holds."""
    row = part_row(key)
    return row.key_group if row else None


def not_built_reason(key: str) -> str | None:
    return next((why for prefix, why in NOT_BUILT.items() if key.startswith(prefix)), None)


def built_groups(cfg: OneRefConfig) -> set[str]:
    """The key groups a model built from ``cfg`` has."""
    return {key_group(k) for k in official_keys(cfg)}


def expand_groups(names: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name in GROUP_ALIASES:
            out.update(GROUP_ALIASES[name])
        elif name in KEY_GROUPS:
            out.add(name)
        else:
            raise ValueError(f"unknown key group {name!r}; choose from {[*KEY_GROUPS, *GROUP_ALIASES]}")
    return out


class HostFactories(TorchFunctionMode):
    """During meta-device construction, run the small factories whose values a constructor reads
    back (``torch.linspace(...).tolist()`` for drop-path rates) on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func in (torch.linspace, torch.arange) and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def meta_model(cfg: OneRefConfig) -> OneRef:
    """``OneRef(cfg)`` on the meta device: every shape and dtype, no memory, no init cost."""
    with torch.device("meta"), HostFactories():
        return OneRef(cfg)


@functools.lru_cache(maxsize=32)
def _official_keys(cfg: OneRefConfig) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in meta_model(cfg).state_dict().items())


def official_keys(cfg: OneRefConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the official state dict for ``cfg``, in official order, with shape and dtype.

    Read off our model (built on the meta device): its names, shapes and order are the official
    ones, which tests/test_checkpoint.py checks against the official key list
    (tests/golden/official-keys-base384.txt).
    """
    return {k: (s, dt) for k, s, dt in _official_keys(cfg)}


def diff_keys(
    given: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, size-mismatched) keys of ``given`` against ``expected`` shapes."""
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


def unexpected_hint(keys: Iterable[str], fmt: str) -> str:
    """What unexpected keys say about the checkpoint, as a hint for the error message."""
    groups = {key_group(k) for k in keys}
    hints = []
    if groups & {"mim", "mlm"}:
        hints.append(
            "the checkpoint has MRefM heads: convert it as format 'mrefm' to drop them, or build the model with task=mrefm"
        )
    if "seg" in groups:
        hints.append("the checkpoint has a RES seg head: build the model with task=res (seg_head=True)")
    if None in groups:
        hints.append(
            f"keys outside the model's parts: this is not an official OneRef checkpoint of format {fmt!r}"
        )
    return "; ".join(hints)
