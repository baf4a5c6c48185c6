"""Loading weights into a model: the strict, transactional :func:`load_into`, and the one loader
every entry point uses, :func:`load_pretrained` / :func:`load_model`, which read any supported
source (a checkpoint folder, an official OneRef/MRefM file, a BEiT-3 pretrained file, one of our
Lightning ``.ckpt`` files), convert it and load it strictly, with a report of every key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oneref.checkpoint.converters import (
    check_compatible,
    convert_state_dict,
    infer_architecture,
    infer_config,
)
from oneref.checkpoint.folder import CONVERT_HELP, read_folder
from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.keys import (
    HEAD_GROUPS,
    built_groups,
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

SOURCE_FORMATS = ("official", "mrefm", "beit3", "folder", "lightning")
# What each format may legitimately lack (loaded non-strictly with these groups allowed).
DEFAULT_ALLOW_MISSING: dict[str, tuple[str, ...]] = {"beit3": ("heads",), "mrefm": ("seg",)}


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


def _lightning_state_dict(obj: Mapping[str, Any], report: ConversionReport) -> dict[str, Tensor]:
    """Our LightningModules hold the network as ``self.model``; everything else is dropped and listed."""
    out: dict[str, Tensor] = {}
    for key, value in obj["state_dict"].items():
        if not key.startswith("model."):
            report.dropped[key] = "LightningModule state outside the network (self.model)"
            continue
        ours = key[len("model.") :]
        if ours.startswith("_orig_mod."):  # saved from a torch.compile'd network
            ours = ours[len("_orig_mod.") :]
        report.renamed[key] = ours
        out[ours] = value
    if not out:
        raise CheckpointError(
            f"{report.source} is a Lightning checkpoint without 'model.*' weights; oneref LightningModules keep the "
            "network as self.model"
        )
    return out


def read_weights(
    source: str | Path,
    source_format: str | None = None,
    cfg: OneRefConfig | None = None,
    *,
    resize_positions: bool = False,
    model_key: str = "model|module",
) -> tuple[dict[str, Tensor], OneRefConfig, ConversionReport, str]:
    """Read and convert any supported source: returns (our state dict, cfg, report, format).

    ``source_format`` None: a folder is a folder, a file with ``state_dict`` and
    ``pytorch-lightning_version`` is one of our Lightning checkpoints, and any other file is taken
    as an official OneRef checkpoint (strict: an MRefM or BEiT-3 file then fails with a hint to
    name its format). ``cfg`` None: from the folder's config.yaml, a Lightning checkpoint's
    ``hyper_parameters['architecture']``, or the shapes (registered sizes only).
    """
    source = Path(source)
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise CheckpointError(f"unknown source format {source_format!r}; choose one of {SOURCE_FORMATS}")
    if source_format == "folder" or (source_format is None and source.is_dir()):
        folder = read_folder(source)
        cfg = cfg or folder.cfg
        sd, report = convert_state_dict(
            folder.state_dict(), cfg, resize_positions=resize_positions, source=str(source)
        )
        report.source_format = "folder"
        return sd, cfg, report, "folder"
    if source_format == "folder":
        raise CheckpointError(f"{source} is not a folder; {CONVERT_HELP.format(dir=source)}")
    obj = load_checkpoint_file(source, mmap=True)
    lightning = is_lightning_checkpoint(obj)
    fmt = source_format or ("lightning" if lightning else "official")
    if fmt == "lightning":
        if not lightning:
            raise CheckpointError(
                f"{source} is not a Lightning checkpoint (no 'state_dict' + 'pytorch-lightning_version')"
            )
        report = ConversionReport(source=str(source), source_format="lightning")
        raw = _lightning_state_dict(obj, report)
        arch = (obj.get("hyper_parameters") or {}).get("architecture")
        if cfg is None and isinstance(arch, Mapping):
            cfg = OneRefConfig(**arch)
        cfg = cfg or infer_config(infer_architecture(raw))
        # One of our MRefM pretraining checkpoints into a REC/RES model: its MIM/MLM heads are
        # dropped and listed, and a seg head it never had starts from initialisation (as "mrefm").
        pretraining = {key_group(k) for k in raw} & {"mim", "mlm"}
        src_fmt = "mrefm" if pretraining - built_groups(cfg) else "official"
        sd, conv = convert_state_dict(
            raw, cfg, src_fmt, resize_positions=resize_positions, source=str(source)
        )
        conv.source_format, conv.dropped, conv.renamed = (
            "lightning" if src_fmt == "official" else "lightning (MRefM pretraining)",
            {**report.dropped, **conv.dropped},
            report.renamed,
        )
        return sd, cfg, conv, "lightning" if src_fmt == "official" else "mrefm"
    if lightning:
        raise CheckpointError(
            f"{source} is a Lightning checkpoint, not format {fmt!r}; use source_format='lightning'"
        )
    extracted = extract_state_dict(obj, model_key, source=str(source))
    raw = extracted.state_dict
    arch = infer_architecture(raw)
    if cfg is None:
        if fmt == "beit3":
            raise CheckpointError(
                "a BEiT-3 checkpoint does not say which OneRef model to build: pass a config (size, img_size, task)"
            )
        cfg = infer_config(arch, task="rec" if fmt == "mrefm" else None)
    sd, report = convert_state_dict(raw, cfg, fmt, resize_positions=resize_positions, source=str(source))
    if extracted.stripped_prefix:
        report.notes.append(f"stripped the prefix {extracted.stripped_prefix!r} from every key")
    if extracted.model_key:
        report.notes.append(f"weights read from checkpoint[{extracted.model_key!r}]")
    return sd, cfg, report, fmt


def load_pretrained(
    model: OneRef,
    source: str | Path,
    source_format: str | None = None,
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
    sd, cfg, report, fmt = read_weights(
        source, source_format, model.cfg, resize_positions=resize_positions, model_key=model_key
    )
    allow = allowed_missing(fmt, cfg, allow_missing)
    return load_into(model, sd, strict=not allow, allow_missing=allow, report=report)


def load_model(
    source: str | Path,
    cfg: OneRefConfig | None = None,
    source_format: str | None = None,
    *,
    resize_positions: bool = False,
    allow_missing: Iterable[str] | None = None,
    model_key: str = "model|module",
) -> tuple[OneRef, ConversionReport]:
    """Build a model for ``source`` and load it: the architecture comes from ``cfg``, else from the
    folder's config.yaml, a Lightning checkpoint's ``hyper_parameters['architecture']`` or the
    shapes (registered sizes). A strict load skips the random init (every tensor is overwritten)."""
    sd, cfg, report, fmt = read_weights(
        source, source_format, cfg, resize_positions=resize_positions, model_key=model_key
    )
    allow = allowed_missing(fmt, cfg, allow_missing)
    model = build_model(cfg, initialise=bool(allow))
    load_into(model, sd, strict=not allow, allow_missing=allow, report=report)
    return model, report


def allowed_missing(fmt: str, cfg: OneRefConfig, allow_missing: Iterable[str] | None) -> tuple[str, ...]:
    allow = tuple(DEFAULT_ALLOW_MISSING.get(fmt, ()) if allow_missing is None else allow_missing)
    # Only groups the model builds can be missing; a default that does not apply is no reason to go non-strict.
    return tuple(g for g in allow if g == "heads" or g in built_groups(cfg))
