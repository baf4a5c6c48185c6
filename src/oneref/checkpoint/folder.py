"""Self-describing checkpoint folders and the one loader every entry point uses.

A checkpoint folder holds everything needed to run a model without the training config::

    model.safetensors   weights, our (= official) key names
    config.yaml         architecture (OneRefConfig), task, preprocessing, tokenizer entry
    beit3.spm           the tokenizer (a copy), unless config.yaml points to it by path
    conversion.json     what the conversion mapped, resized, dropped or left missing

:func:`load_pretrained` accepts such a folder, an official OneRef/MRefM file, a BEiT-3 pretrained
file, or one of our Lightning ``.ckpt`` files; the caller names the format whenever a file could
be more than one of them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.overrides import TorchFunctionMode

from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.official import (
    TASKS,
    built_groups,
    convert_beit3_pretrained,
    convert_mrefm,
    convert_official_oneref,
    diff_keys,
    format_key_problems,
    infer_architecture,
    infer_config,
    load_into,
    official_keys,
)
from oneref.checkpoint.report import ConversionReport
from oneref.models.oneref import OneRef, OneRefConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "conversion.json"
FOLDER_FORMAT = "oneref-checkpoint"
FOLDER_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_QUERY_LEN = 64  # every official script (spec 6.5)
SOURCE_FORMATS = ("official", "mrefm", "beit3", "folder", "lightning")
# What each format may legitimately lack (loaded non-strictly with these groups allowed).
DEFAULT_ALLOW_MISSING: dict[str, tuple[str, ...]] = {"beit3": ("heads",), "mrefm": ("seg",)}

TOKENIZER_HELP = (
    "the tokenizer is BEiT-3's sentencepiece model beit3.spm (published with BEiT-3 in microsoft/unilm, "
    "beit3/README.md); copy it into the folder and set `tokenizer: {file: beit3.spm}` in config.yaml, "
    "or rerun `python -m oneref.convert official ... --tokenizer PATH/beit3.spm`"
)
CONVERT_HELP = "write the folder with `python -m oneref.convert official CHECKPOINT.pth {dir}`"


# -- building the target ---------------------------------------------------------------------------
class _HostFactories(TorchFunctionMode):
    """During meta-device construction, run the small factories whose values a constructor reads
    back (``torch.linspace(...).tolist()`` for drop-path rates) on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func in (torch.linspace, torch.arange) and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_model(cfg: OneRefConfig, *, initialise: bool = True) -> OneRef:
    """``OneRef(cfg)``; with ``initialise=False`` the weights are left uninitialised (fast: no
    random init of a large model) for a strict load that overwrites every tensor right after.

    Falls back to a normal build where the model cannot be constructed on the meta device or has
    state outside its state dict.
    """
    if initialise:
        return OneRef(cfg)
    try:
        with torch.device("meta"), _HostFactories():
            model = OneRef(cfg)
    except (NotImplementedError, RuntimeError) as e:  # e.g. a .tolist() on a meta tensor
        log.debug("meta-device construction failed (%s); building with random init", e)
        return OneRef(cfg)
    n_state = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_buffers())
    if n_state != len(model.state_dict()):  # non-persistent buffers would stay garbage
        return OneRef(cfg)
    return model.to_empty(device="cpu")


# -- folder ------------------------------------------------------------------------------------------
@dataclass
class CheckpointFolder:
    path: Path
    cfg: OneRefConfig
    task: str
    preprocessing: dict[str, Any]
    tokenizer: Path | None  # resolved file path, None when the folder names none
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    def state_dict(self) -> dict[str, Tensor]:
        return load_file(self.weights)


def save_folder(
    out_dir: str | Path,
    state_dict: Mapping[str, Tensor],
    cfg: OneRefConfig,
    *,
    task: str,
    max_query_len: int = DEFAULT_MAX_QUERY_LEN,
    tokenizer: str | Path | None = None,
    copy_tokenizer: bool = True,
    report: ConversionReport | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder. The weights must match ``cfg`` exactly (no partial folders)."""
    out = Path(out_dir)
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; choose one of {TASKS}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out} exists and is not empty; choose a new folder or pass overwrite=True (--overwrite)"
        )
    problems = diff_keys(state_dict, {k: s for k, (s, _) in official_keys(cfg).items()})
    if any(problems):
        raise CheckpointError(
            format_key_problems(f"the weights do not match the architecture; {out} not written", *problems)
        )
    tok_entry: dict[str, str] | None = None
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_file():
            raise CheckpointError(f"tokenizer file {tok} does not exist; {TOKENIZER_HELP}")
        tok_entry = {"file": tok.name} if copy_tokenizer else {"path": str(tok.resolve())}
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "oneref"})
    if tokenizer is not None and copy_tokenizer:
        shutil.copyfile(tokenizer, out / Path(tokenizer).name)
    config = {
        "format": FOLDER_FORMAT,
        "version": FOLDER_VERSION,
        "task": task,
        "architecture": cfg.to_dict(),
        "preprocessing": {
            "img_size": cfg.img_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "max_query_len": max_query_len,
            "resize": "long side to img_size, zero padding centred (official eval letterbox)",
        },
        "tokenizer": tok_entry,
    }
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    if report is not None:
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    return out


@dataclass
class FolderCheck:
    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    folder: CheckpointFolder | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"
        return "\n".join(
            [head] + [f"  problem: {p}" for p in self.problems] + [f"  warning: {w}" for w in self.warnings]
        )


def _parse_config(path: Path, check: FolderCheck) -> tuple[OneRefConfig | None, dict[str, Any]]:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        check.problems.append(
            f"{CONFIG_FILE} is missing (architecture, task, preprocessing); {CONVERT_HELP.format(dir=path)}"
        )
        return None, {}
    try:
        config = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        check.problems.append(f"{cfg_file} is not valid YAML ({e}); {CONVERT_HELP.format(dir=path)}")
        return None, {}
    if not isinstance(config, dict):
        check.problems.append(f"{cfg_file} is not a mapping; {CONVERT_HELP.format(dir=path)}")
        return None, {}
    arch = config.get("architecture")
    cfg = None
    if not isinstance(arch, dict):
        check.problems.append(
            f"{cfg_file} has no 'architecture' mapping (OneRefConfig fields); {CONVERT_HELP.format(dir=path)}"
        )
    else:
        known = {f.name for f in fields(OneRefConfig)}
        unknown = sorted(set(arch) - known)
        if unknown:
            check.problems.append(
                f"{cfg_file}: unknown architecture fields {unknown}; valid fields: {sorted(known)}"
            )
        else:
            try:
                cfg = OneRefConfig(**arch)
            except (TypeError, ValueError) as e:
                check.problems.append(f"{cfg_file}: invalid architecture: {e}")
    if config.get("task") not in TASKS:
        check.problems.append(f"{cfg_file}: task is {config.get('task')!r}; set it to one of {TASKS}")
    pre = config.get("preprocessing")
    need = ("img_size", "mean", "std", "max_query_len")
    if not isinstance(pre, dict) or any(k not in pre for k in need):
        check.problems.append(
            f"{cfg_file}: 'preprocessing' must give {need}; {CONVERT_HELP.format(dir=path)}"
        )
    elif cfg is not None and pre["img_size"] != cfg.img_size:
        check.problems.append(
            f"{cfg_file}: preprocessing.img_size {pre['img_size']} differs from architecture.img_size {cfg.img_size}"
        )
    return cfg, config


def _check_weights(path: Path, cfg: OneRefConfig | None, check: FolderCheck) -> None:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        check.problems.append(f"{WEIGHTS_FILE} (the weights) is missing; {CONVERT_HELP.format(dir=path)}")
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        check.problems.append(
            f"{weights} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt: write it again"
        )
        return
    if cfg is None:
        return
    expected = {k: s for k, (s, _) in official_keys(cfg).items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [
        f"{k}: file {list(shapes[k])} vs config {list(expected[k])}"
        for k in expected
        if k in shapes and shapes[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        check.problems.append(
            format_key_problems(
                f"{WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}:",
                missing,
                unexpected,
                mismatched,
                limit=8,
            )
        )


def _resolve_tokenizer(path: Path, config: Mapping[str, Any], check: FolderCheck) -> Path | None:
    entry = config.get("tokenizer")
    if not entry:
        check.problems.append(f"no tokenizer named in {CONFIG_FILE}; {TOKENIZER_HELP}")
        return None
    if not isinstance(entry, dict) or not ({"file", "path"} & set(entry)):
        check.problems.append(
            f"{CONFIG_FILE}: tokenizer must be {{file: NAME}} (in the folder) or {{path: PATH}}; {TOKENIZER_HELP}"
        )
        return None
    tok = path / entry["file"] if "file" in entry else Path(entry["path"]).expanduser()
    if not tok.is_file():
        check.problems.append(f"tokenizer {tok} (named in {CONFIG_FILE}) does not exist; {TOKENIZER_HELP}")
        return None
    return tok


def validate_folder(path: str | Path, *, require_tokenizer: bool = True) -> FolderCheck:
    """Say exactly what a checkpoint folder lacks (weights, config, tokenizer) and how to get it."""
    path = Path(path)
    check = FolderCheck(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        check.problems.append(f"{path} {what}; {CONVERT_HELP.format(dir=path)}")
        return check
    cfg, config = _parse_config(path, check)
    _check_weights(path, cfg, check)
    tok = None
    if config:
        sub = FolderCheck(path)
        tok = _resolve_tokenizer(path, config, sub)
        (check.problems if require_tokenizer else check.warnings).extend(sub.problems)
    if not (path / REPORT_FILE).is_file():
        check.warnings.append(
            f"{REPORT_FILE} is missing: there is no record of how the weights were converted"
        )
    if cfg is not None and config.get("task") in TASKS and isinstance(config.get("preprocessing"), dict):
        check.folder = CheckpointFolder(path, cfg, config["task"], config["preprocessing"], tok, config)
    return check


def read_folder(path: str | Path, *, require_tokenizer: bool = False) -> CheckpointFolder:
    """Validate and open a folder; raises :class:`CheckpointError` listing every problem."""
    check = validate_folder(path, require_tokenizer=require_tokenizer)
    if not check.ok or check.folder is None:
        raise CheckpointError(
            f"{path} is not a usable checkpoint folder:\n" + "\n".join(f"  {p}" for p in check.problems)
        )
    return check.folder


# -- one loader for every entry point -----------------------------------------------------------------
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
        sd, report = convert_official_oneref(
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
        sd, conv = convert_official_oneref(raw, cfg, resize_positions=resize_positions, source=str(source))
        conv.source_format, conv.dropped, conv.renamed = (
            "lightning",
            {**report.dropped, **conv.dropped},
            report.renamed,
        )
        return sd, cfg, conv, fmt
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
    if fmt == "official":
        sd, report = convert_official_oneref(raw, cfg, resize_positions=resize_positions, source=str(source))
    elif fmt == "mrefm":
        sd, report = convert_mrefm(raw, cfg, resize_positions=resize_positions, source=str(source))
    else:
        sd, report = convert_beit3_pretrained(raw, cfg, source=str(source))
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
