"""What a checkpoint path is, decided once: :meth:`Checkpoint.open`.

Every reader goes through it: :func:`oneref.checkpoint.load_model` / ``load_pretrained``, the
Predictor (:func:`oneref.load`), evaluation and ``init_from`` (:mod:`oneref.factory`) and
``python -m oneref.convert``. It says the format (the vocabulary of
:mod:`oneref.checkpoint.formats`), the architecture, the task, the tokenizer the checkpoint
carries, the training facts it records, and reads the weights only when asked (files are
memory-mapped). The way open_clip's ``factory.load_checkpoint`` and litgpt's self-describing
checkpoint folder answer the same question.

Detection (``ckpt_format`` None or ``auto``) reads the content, never the file name: a directory
is a folder, a file with ``state_dict`` + ``pytorch-lightning_version`` is ours (``lightning``);
any other file is an official-layout state dict: ``beit3`` without a grounding head, else
``official``. ``mrefm`` is only ever named: an MRefM pretraining file holds the same key groups as
an official checkpoint with MIM/MLM heads, and naming it says to drop those heads for a REC/RES
model. A named format is taken as given;
a container that contradicts it (a folder named ``lightning``, a Lightning file named
``official``) is an error that names both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oneref.checkpoint.converters import convert_state_dict, infer_architecture, infer_config
from oneref.checkpoint.folder import CONVERT_HELP, DEFAULT_MAX_QUERY_LEN, WEIGHTS_FILE, read_folder
from oneref.checkpoint.formats import FORMATS, check_format
from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.keys import (
    built_groups,
    diff_keys,
    expand_groups,
    format_key_problems,
    key_group,
    official_keys,
)
from oneref.checkpoint.report import ConversionReport
from oneref.data.tokenizer import Tokenizer
from oneref.models.oneref import OneRefConfig

log = logging.getLogger(__name__)

# What each format may legitimately lack (loaded non-strictly with these groups allowed).
DEFAULT_ALLOW_MISSING: dict[str, tuple[str, ...]] = {"beit3": ("heads",), "mrefm": ("seg",)}
BEIT3_NEEDS_CONFIG = (
    "a BEiT-3 checkpoint does not say which OneRef model to build: pass a config (size, img_size, task)"
)


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The path names nothing."""


def resolve_source(path: str | os.PathLike) -> Path:
    """The local path of the checkpoint the user named: the one place that turns a name into a
    file or folder (a remote scheme would be fetched here)."""
    from oneref import hub  # a Hub id (owner/name, hf://owner/name@rev): its folder in the Hub's cache

    local = Path(hub.resolve(path)).expanduser()
    if not local.exists():
        raise CheckpointNotFound(
            f"checkpoint {local} does not exist; check the path (it is relative to {Path.cwd()})"
        )
    return local


@dataclass(frozen=True)
class CarriedTokenizer:
    """The sentencepiece model a checkpoint carries: embedded bytes (our ``.ckpt``) or a file (a
    folder)."""

    name: str  # what messages call it
    max_query_len: int
    proto: bytes | None = field(default=None, repr=False)
    file: Path | None = None

    def load(self, max_query_len: int | None = None) -> Tokenizer:
        length = int(max_query_len or self.max_query_len)
        if self.file is not None:
            return Tokenizer(self.file, length)
        return Tokenizer.from_serialized(self.proto, length, name=self.name)


def same_pieces(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two sentencepiece models map text to the same ids: the same pieces, in order."""
    if a.serialized() == b.serialized():
        return True
    return a.vocab_size == b.vocab_size and all(
        a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size)
    )


@dataclass(eq=False)
class Checkpoint:
    """A checkpoint, described: build it with :meth:`open`.

    Attributes:
        path: the local file or folder.
        format: one of :data:`oneref.checkpoint.formats.FORMATS`.
        detected: True when the format was read off the content, False when the caller named it.
        config: the architecture, or None where the checkpoint does not say it (a BEiT-3 file, a
            width that is no registered size); :attr:`config_problem` then says what to pass.
        task: rec | res | mrefm, where known.
        carried_tokenizer: the tokenizer it carries, or None.
        training: the training facts it records (dataset, task, size, epoch, ...; empty if none).
        max_query_len: the tokens per expression it was trained or converted with, where known.
        hyper_parameters: what a Lightning checkpoint saved of its module (empty otherwise).
    """

    path: Path
    format: str
    detected: bool
    config: OneRefConfig | None
    task: str | None
    carried_tokenizer: CarriedTokenizer | None = None
    training: dict[str, Any] = field(default_factory=dict)
    config_problem: str = ""
    max_query_len: int | None = None
    hyper_parameters: dict[str, Any] = field(default_factory=dict, repr=False)
    arch: dict[str, Any] | None = field(default=None, repr=False)
    _raw: Mapping[str, Tensor] | None = field(default=None, repr=False)
    _report: ConversionReport | None = field(default=None, repr=False)
    _notes: list[str] = field(default_factory=list, repr=False)

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, format: str | None = None, *, model_key: str = "model|module"
    ) -> Checkpoint:
        """Describe ``path``; ``format`` None or ``auto``: detect it (see the module docstring)."""
        fmt = check_format(format)
        local = resolve_source(path)
        if local.is_dir():
            if fmt not in (None, "folder"):
                raise CheckpointError(
                    f"{local} is a checkpoint folder, not ckpt_format={fmt!r}; drop ckpt_format"
                )
            return cls._open_folder(local, detected=fmt is None)
        if fmt == "folder":
            raise CheckpointError(
                f"{local} is a file, not a checkpoint folder; {CONVERT_HELP.format(dir=local)}"
            )
        obj = load_checkpoint_file(local, mmap=True)
        if is_lightning_checkpoint(obj):
            if fmt not in (None, "lightning"):
                raise CheckpointError(
                    f"{local} is a Lightning checkpoint, not ckpt_format={fmt!r}; use ckpt_format=lightning or auto"
                )
            return cls._open_lightning(local, obj, detected=fmt is None)
        if fmt == "lightning":
            raise CheckpointError(
                f"{local} is not a Lightning checkpoint (no 'state_dict' + 'pytorch-lightning_version'); "
                "drop ckpt_format to detect its format"
            )
        return cls._open_state_dict(local, obj, fmt, model_key)

    @classmethod
    def _open_folder(cls, path: Path, detected: bool) -> Checkpoint:
        folder = read_folder(path)
        length = int(folder.preprocessing.get("max_query_len", DEFAULT_MAX_QUERY_LEN))
        tok = None
        if folder.tokenizer is not None:
            tok = CarriedTokenizer(str(folder.tokenizer), length, file=folder.tokenizer)
        return cls(path, "folder", detected, folder.cfg, folder.task, tok, {}, max_query_len=length)

    @classmethod
    def _open_lightning(cls, path: Path, obj: Mapping[str, Any], detected: bool) -> Checkpoint:
        report = ConversionReport(source=str(path), source_format="lightning")
        raw = _lightning_state_dict(obj, report)
        hp = obj.get("hyper_parameters") or {}
        data = obj.get("datamodule_hyper_parameters") or {}
        if isinstance(data.get("data"), Mapping):  # the DataModule's options under one key
            data = data["data"]
        # the module's facts (older files: `dataset` at the top level of its hyperparameters)
        facts = hp.get("training") if isinstance(hp.get("training"), Mapping) else {}
        arch = hp.get("architecture")
        problem = ""
        if isinstance(arch, Mapping):
            cfg: OneRefConfig | None = OneRefConfig(**arch)
        else:
            cfg, problem = _config_from_shapes(raw, None)
        task = (hp.get("task") or {}).get("name") if isinstance(hp.get("task"), Mapping) else None
        if task is None and cfg is not None:
            task = "mrefm" if cfg.mim_codebook_size or cfg.mlm_head else "res" if cfg.seg_head else "rec"
        entry = obj.get("tokenizer")
        tok = None
        if entry:
            tok = CarriedTokenizer(
                f"{path} (embedded tokenizer)", int(entry["max_query_len"]), proto=bytes(entry["model"])
            )
        model = hp.get("model") if isinstance(hp.get("model"), Mapping) else {}
        training = {
            "dataset": facts.get("dataset") or hp.get("dataset") or data.get("dataset"),
            "task": task,
            "size": model.get("size"),
            "img_size": cfg.img_size if cfg else None,
            "max_query_len": data.get("max_query_len"),
            "frozen_backbone": bool((hp.get("task") or {}).get("frozen_backbone", False)) if task else None,
            "epoch": obj.get("epoch"),
            "global_step": obj.get("global_step"),
        }
        length = tok.max_query_len if tok else data.get("max_query_len")
        return cls(
            path,
            "lightning",
            detected,
            cfg,
            task,
            tok,
            training,
            problem,
            length,
            dict(hp),
            _raw=raw,
            _report=report,
        )

    @classmethod
    def _open_state_dict(cls, path: Path, obj: Any, fmt: str | None, model_key: str) -> Checkpoint:
        extracted = extract_state_dict(obj, model_key, source=str(path))
        raw = extracted.state_dict
        arch = infer_architecture(raw)
        detected = fmt is None
        if fmt is None:  # the key groups say which official-layout file this is
            # mrefm is never detected: official checkpoints hold the same MIM/MLM heads (the
            # official model builds them), so naming it is what says "drop them".
            fmt = "official" if any(key_group(k) == "grounding" for k in raw) else "beit3"
        if fmt == "beit3":
            cfg, problem = None, BEIT3_NEEDS_CONFIG
        else:
            cfg, problem = _config_from_shapes(raw, "rec" if fmt == "mrefm" else None)
        notes = []
        if extracted.stripped_prefix:
            notes.append(f"stripped the prefix {extracted.stripped_prefix!r} from every key")
        if extracted.model_key:
            notes.append(f"weights read from checkpoint[{extracted.model_key!r}]")
        args = obj.get("args") if isinstance(obj, Mapping) else None  # official train_oneref.py's arguments
        training = {"task": arch["task"], "size": arch["size"], "img_size": arch["img_size"]}
        if args is not None:
            training["dataset"] = getattr(args, "dataset", None)
        if isinstance(obj, Mapping) and "epoch" in obj:
            training["epoch"] = obj["epoch"]
        task = None if fmt == "beit3" else arch["task"]
        return cls(path, fmt, detected, cfg, task, None, training, problem, None, {}, arch, raw, None, notes)

    # -- what it says -----------------------------------------------------------------------------------
    def __str__(self) -> str:
        how = "detected" if self.detected else "given"
        cfg = self.config
        model = (
            f"width {cfg.embed_dim}, {cfg.depth} layers, img_size {cfg.img_size}"
            if cfg
            else "architecture from the config"
        )
        tok = "its own tokenizer" if self.carried_tokenizer else "no tokenizer"
        return f"{self.path}: {self.format} ({how}; {FORMATS[self.format].recognised}), task {self.task}, {model}, {tok}"

    @property
    def dataset(self) -> str | None:
        """The dataset it was trained on, where it records it."""
        return self.training.get("dataset")

    @property
    def setting(self) -> str | None:
        """The training setting of the paper's tables: ``mrefm`` (pretraining), ``mixup``
        (dataset-mixed), ``single`` (one dataset); None where the checkpoint does not say."""
        if self.task == "mrefm":
            return "mrefm"
        if not self.dataset:
            return None
        return "mixup" if "mixup" in str(self.dataset) else "single"

    @property
    def runnable(self) -> bool:
        """Whether it has a trained grounding head (a BEiT-3 file has none)."""
        return self.format != "beit3"

    def tokenizer(self, max_query_len: int | None = None) -> Tokenizer | None:
        """The tokenizer it carries (None if none), with ``max_query_len`` (default: its own)."""
        return self.carried_tokenizer.load(max_query_len) if self.carried_tokenizer else None

    def choose_tokenizer(
        self,
        given: str | os.PathLike | Tokenizer | None,
        max_query_len: int | None = None,
        *,
        knob: str = "tokenizer",
    ) -> Tokenizer | None:
        """The tokenizer to run this checkpoint with: the one it carries. ``given`` (from the
        config or the caller) is used only when it carries none; one that differs from the
        carried one (other sentencepiece pieces) is refused, naming both."""
        carried = self.tokenizer(max_query_len)
        if given is None:
            return carried
        if isinstance(given, Tokenizer):
            other = given
            if max_query_len and other.max_query_len != max_query_len:
                other = Tokenizer.from_serialized(other.serialized(), max_query_len, name=other.model_path)
        elif isinstance(given, (str, os.PathLike)):
            other = Tokenizer(
                Path(given).expanduser(), max_query_len or self.max_query_len or DEFAULT_MAX_QUERY_LEN
            )
        else:
            raise TypeError(
                f"{knob} must be a path to a sentencepiece model or a Tokenizer, got {type(given).__name__}"
            )
        if carried is None:
            return other
        if not same_pieces(carried, other):
            raise CheckpointError(
                f"{knob}={other.model_path} ({other.num_pieces} pieces) is not the tokenizer {self.path} was trained "
                f"with ({carried.model_path}, {carried.num_pieces} pieces): the model's text ids would mean other "
                f"words. Set {knob}=null (the checkpoint's own is used) or give the same sentencepiece model"
            )
        return carried

    # -- weights ------------------------------------------------------------------------------------------
    def _state_dict(self) -> tuple[Mapping[str, Tensor], ConversionReport | None]:
        if self.format == "folder":
            return read_folder(self.path).state_dict(), None
        return self._raw, self._report

    def _shapes(self) -> dict[str, Tensor]:
        """Meta tensors of the checkpoint's shapes: the key and shape checks without reading data."""
        if self.format == "folder":
            from safetensors import safe_open

            with safe_open(str(self.path / WEIGHTS_FILE), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._raw.items()}

    def _target(self, cfg: OneRefConfig | None) -> OneRefConfig:
        cfg = cfg or self.config
        if cfg is None:
            raise CheckpointError(f"{self.path}: {self.config_problem}")
        return cfg

    def _convert(
        self, raw: Mapping[str, Tensor], cfg: OneRefConfig, resize_positions: bool
    ) -> tuple[dict[str, Tensor], ConversionReport, str]:
        """(our state dict, report, the conversion format that says what may be missing)."""
        if self.format == "folder":
            sd, report = convert_state_dict(
                raw, cfg, resize_positions=resize_positions, source=str(self.path)
            )
            report.source_format = "folder"
            return sd, report, "folder"
        if self.format == "lightning":
            # One of our MRefM pretraining checkpoints into a REC/RES model: its MIM/MLM heads are
            # dropped and listed, and a seg head it never had starts from initialisation (as "mrefm").
            pretraining = {key_group(k) for k in raw} & {"mim", "mlm"}
            src = "mrefm" if pretraining - built_groups(cfg) else "official"
            sd, report = convert_state_dict(
                raw, cfg, src, resize_positions=resize_positions, source=str(self.path)
            )
            lightning = self._report or ConversionReport()
            report.source_format = "lightning" if src == "official" else "lightning (MRefM pretraining)"
            report.dropped = {**lightning.dropped, **report.dropped}
            report.renamed = dict(lightning.renamed)
            return sd, report, "lightning" if src == "official" else "mrefm"
        sd, report = convert_state_dict(
            raw, cfg, self.format, resize_positions=resize_positions, source=str(self.path)
        )
        report.notes.extend(self._notes)
        return sd, report, self.format

    def read_weights(
        self, cfg: OneRefConfig | None = None, *, resize_positions: bool = False
    ) -> tuple[dict[str, Tensor], OneRefConfig, ConversionReport, str]:
        """The weights converted for a model of ``cfg`` (default: :attr:`config`): (our state
        dict, cfg, report, the format whose missing groups are allowed)."""
        cfg = self._target(cfg)
        raw, _ = self._state_dict()
        sd, report, fmt = self._convert(raw, cfg, resize_positions)
        return sd, cfg, report, fmt

    def check_fits(self, model_cfg: OneRefConfig, *, resize_positions: bool = False) -> list[str]:
        """What does not match between the checkpoint and a model built from ``model_cfg``, from
        its keys and shapes only (no weight is read, no model is built); empty when it loads."""
        try:
            sd, report, fmt = self._convert(self._shapes(), model_cfg, resize_positions)
        except CheckpointError as e:
            return [str(e)]
        allow = expand_groups(allowed_missing(fmt, model_cfg))
        expected = {k: s for k, (s, _) in official_keys(model_cfg).items()}
        missing, unexpected, mismatched = diff_keys(sd, expected)
        missing = [k for k in missing if key_group(k) not in allow]
        if not (missing or unexpected or mismatched):
            return []
        hint = f" ({'; '.join(report.notes)})" if report.notes else ""
        return [
            format_key_problems(f"{self.path} does not fit the model{hint}:", missing, unexpected, mismatched)
        ]


def allowed_missing(
    fmt: str, cfg: OneRefConfig, allow_missing: Iterable[str] | None = None
) -> tuple[str, ...]:
    """The key groups a load of conversion format ``fmt`` may leave at initialisation."""
    allow = tuple(DEFAULT_ALLOW_MISSING.get(fmt, ()) if allow_missing is None else allow_missing)
    # Only groups the model builds can be missing; a default that does not apply is no reason to go non-strict.
    return tuple(g for g in allow if g == "heads" or g in built_groups(cfg))


def _config_from_shapes(raw: Mapping[str, Tensor], task: str | None) -> tuple[OneRefConfig | None, str]:
    try:
        return infer_config(infer_architecture(raw), task=task), ""
    except CheckpointError as e:  # e.g. a width that is no registered size: the caller passes a config
        return None, str(e)


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
