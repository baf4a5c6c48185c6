"""The checkpoint folder format: save, read, validate.

A checkpoint folder holds everything needed to run a model without the training config::

    model.safetensors   weights, our (= official) key names
    config.yaml         architecture (OneRefConfig), task, preprocessing, tokenizer entry
    beit3.spm           the tokenizer (a copy), unless config.yaml points to it by path
    conversion.json     what the conversion mapped, resized, dropped or left missing

:func:`oneref.checkpoint.load_pretrained` and ``load_model`` read such a folder like any other
checkpoint; :func:`validate_folder` says exactly what a folder lacks and how to get it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from oneref.checkpoint.converters import TASKS
from oneref.checkpoint.io import CheckpointError
from oneref.checkpoint.keys import diff_keys, format_key_problems, official_keys
from oneref.checkpoint.report import ConversionReport
from oneref.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oneref.models.oneref import OneRefConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "conversion.json"
FOLDER_FORMAT = "oneref-checkpoint"
FOLDER_VERSION = 1
DEFAULT_MAX_QUERY_LEN = 64  # every official script passes --max_query_len 64

TOKENIZER_HELP = (
    "the tokenizer is BEiT-3's sentencepiece model beit3.spm (published with BEiT-3 in microsoft/unilm, "
    "beit3/README.md); copy it into the folder and set `tokenizer: {file: beit3.spm}` in config.yaml, "
    "or rerun `python -m oneref.convert official ... --tokenizer PATH/beit3.spm`"
)
CONVERT_HELP = "write the folder with `python -m oneref.convert official CHECKPOINT.pth {dir}`"


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
