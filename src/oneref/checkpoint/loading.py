"""Loading weights into a model: the strict, transactional :func:`load_into`, and the one loader
every entry point uses, :func:`load_pretrained` / :func:`load_model`, which open any supported
source with :meth:`oneref.checkpoint.descriptor.Checkpoint.open` (a checkpoint folder, an official
OneRef/MRefM file, a BEiT-3 pretrained file, one of our Lightning ``.ckpt`` files), convert it and
load it strictly, with a report of every key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from oneref.checkpoint.converters import check_compatible, infer_architecture
from oneref.checkpoint.descriptor import Checkpoint, allowed_missing
from oneref.checkpoint.io import CheckpointError
from oneref.checkpoint.keys import (
    HEAD_GROUPS,
    diff_keys,
    expand_groups,
    format_key_problems,
    key_group,
    meta_model,
    unexpected_hint,
)
from oneref.checkpoint.report import ConversionReport
from oneref.models.oneref import OneRef, OneRefConfig

log = logging.getLogger(__name__)


class LoadError(CheckpointError):
    """Keys missing, unexpected or of the wrong shape; nothing was loaded."""

    def __init__(
        self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


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
            "\n  hint: " + unexpected_hint(unexpected, report.source_format or "official")
            if unexpected
            else ""
        )
        if bad_missing and all(key_group(k) in HEAD_GROUPS for k in bad_missing):
            hints += "\n  hint: only head weights are missing; a BEiT-3 pretrained checkpoint needs ckpt_format='beit3'"
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


def build_model(cfg: OneRefConfig, *, initialise: bool = True) -> OneRef:
    """``OneRef(cfg)``; with ``initialise=False`` the weights are left uninitialised (fast: no
    random init of a large model) for a strict load that overwrites every tensor right after.

    Falls back to a normal build where the model cannot be constructed on the meta device or has
    state outside its state dict.
    """
    if initialise:
        return OneRef(cfg)
    try:
        model = meta_model(cfg)
    except (NotImplementedError, RuntimeError) as e:  # e.g. a .tolist() on a meta tensor
        log.debug("meta-device construction failed (%s); building with random init", e)
        return OneRef(cfg)
    n_state = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_buffers())
    if n_state != len(model.state_dict()):  # non-persistent buffers would stay garbage
        return OneRef(cfg)
    return model.to_empty(device="cpu")


def read_weights(
    source: str | Path,
    ckpt_format: str | None = None,
    cfg: OneRefConfig | None = None,
    *,
    resize_positions: bool = False,
    model_key: str = "model|module",
) -> tuple[dict[str, Tensor], OneRefConfig, ConversionReport, str]:
    """Read and convert any supported source: returns (our state dict, cfg, report, format).

    What the source is (its format, architecture) is decided by :meth:`Checkpoint.open`; ``cfg``
    None: the checkpoint's own architecture.
    """
    ckpt = Checkpoint.open(source, ckpt_format, model_key=model_key)
    return ckpt.read_weights(cfg, resize_positions=resize_positions)


def load_pretrained(
    model: OneRef,
    source: str | Path,
    ckpt_format: str | None = None,
    *,
    resize_positions: bool = False,
    allow_missing: Iterable[str] | None = None,
    model_key: str = "model|module",
) -> ConversionReport:
    """Load weights into ``model`` (in place) from a checkpoint folder, an official OneRef/MRefM
    file, a BEiT-3 pretrained file or one of our Lightning checkpoints; return the report.

    The one loader behind train ``init_from=``, eval and predict. Strict by default;
    ``allow_missing`` names key groups that may be absent and keep their initialisation. Its
    default depends on the format: ``('heads',)`` for beit3, ``('seg',)`` for mrefm, nothing
    otherwise. A failed load raises before any weight is copied.
    """
    if not isinstance(model, OneRef):
        raise TypeError(
            f"load_pretrained loads into a OneRef model, got {type(model).__name__}; use load_model to build one"
        )
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else Checkpoint.open(source, ckpt_format, model_key=model_key)
    )
    sd, cfg, report, fmt = ckpt.read_weights(model.cfg, resize_positions=resize_positions)
    allow = allowed_missing(fmt, cfg, allow_missing)
    return load_into(model, sd, strict=not allow, allow_missing=allow, report=report)


def load_model(
    source: str | Path,
    cfg: OneRefConfig | None = None,
    ckpt_format: str | None = None,
    *,
    resize_positions: bool = False,
    allow_missing: Iterable[str] | None = None,
    model_key: str = "model|module",
) -> tuple[OneRef, ConversionReport]:
    """Build a model for ``source`` and load it: the architecture comes from ``cfg``, else from the
    folder's config.yaml, a Lightning checkpoint's ``hyper_parameters['architecture']`` or the
    shapes (registered sizes). A strict load skips the random init (every tensor is overwritten)."""
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else Checkpoint.open(source, ckpt_format, model_key=model_key)
    )
    sd, cfg, report, fmt = ckpt.read_weights(cfg, resize_positions=resize_positions)
    allow = allowed_missing(fmt, cfg, allow_missing)
    model = build_model(cfg, initialise=bool(allow))
    load_into(model, sd, strict=not allow, allow_missing=allow, report=report)
    return model, report
