"""What the entry points share: building the data, the LightningModule and the Trainer from a composed
config, and loading a model from any checkpoint for evaluation or prediction.

``oneref.train``, ``oneref.eval`` and ``oneref.predict`` only orchestrate; everything they build
comes from here (the way open_clip's ``factory.py`` serves training and inference alike).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, open_dict

from oneref.checkpoint.resume import AtomicCheckpointIO
from oneref.config import to_container
from oneref.data.tokenizer import Tokenizer
from oneref.distributed import SyncBatchNormAnyBackend
from oneref.predictor import Predictor
from oneref.tasks.grounding import GroundingModule
from oneref.tasks.mrefm import MRefMModule

log = logging.getLogger(__name__)


def resolve_precision(precision: Any) -> Any:
    """``auto``: bf16-mixed on CUDA, fp32 elsewhere (autocast on the CPU is slower than fp32)."""
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    from hydra.errors import InstantiationException

    from oneref.errors import UserError

    try:
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:  # a bad data option: the user's error, not Hydra's wrapper
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule of ``cfg.task`` (REC/RES transfer or MRefM pretraining), around the one
    OneRef model."""
    kind = MRefMModule if cfg.task.name == "mrefm" else GroundingModule
    return kind(
        model=to_container(cfg.model),
        task=to_container(cfg.task),
        optim=to_container(cfg.optim),
        training={"dataset": str(cfg.data.dataset)},
    )


def build_trainer(cfg: DictConfig, callbacks: list | None = None) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured loggers, callbacks and strategy.

    ``callbacks`` replaces the configured ones (evaluation passes ``[]``). A group entry set to
    null (``callbacks.rich_progress_bar=null``) is switched off.
    """
    trainer_cfg = to_container(cfg.trainer)
    trainer_cfg.pop("_target_", None)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if callbacks is None:
        callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = hydra.utils.instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    if cfg.task.get("find_unused_parameters"):
        strategy = _find_unused(strategy, trainer_cfg)
    if isinstance(strategy, FSDPStrategy) and not (
        torch.cuda.is_available() and trainer_cfg.get("accelerator") in ("auto", "gpu", "cuda")
    ):
        raise ValueError(
            "strategy=fsdp needs CUDA GPUs (Lightning's FSDP does not run on the CPU): use strategy=ddp, "
            "or trainer=ddp_sim strategy=auto to try distributed code on the CPU"
        )
    # checkpoints are written to a temporary file and renamed: a killed job never leaves half a file
    plugins = [*(trainer_cfg.pop("plugins", None) or []), AtomicCheckpointIO()]
    if trainer_cfg.get("sync_batchnorm") and not torch.cuda.is_available():
        plugins.append(SyncBatchNormAnyBackend())  # torch's SyncBatchNorm is CUDA-only
    return L.Trainer(
        **trainer_cfg, callbacks=callbacks, logger=loggers or False, strategy=strategy, plugins=plugins
    )


def _find_unused(strategy: Any, trainer_cfg: dict[str, Any]) -> Any:
    """DDP for a task whose steps leave some parameters without gradients (MRefM: the heads of the
    other step kind); their gradients stay None, so the optimizer skips them, as officially."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        if not strategy._ddp_kwargs.get("find_unused_parameters"):
            log.info("find_unused_parameters=True for this task (steps use different heads)")
        strategy._ddp_kwargs["find_unused_parameters"] = True
        return strategy
    if strategy == "auto":
        from oneref.distributed import num_devices

        processes = num_devices(trainer_cfg) * int(trainer_cfg.get("num_nodes") or 1)
        if processes > 1:
            return DDPStrategy(find_unused_parameters=True)
    return strategy


def init_weights(module: GroundingModule, source: str, source_format: str | None) -> None:
    """Initialise the module's network from a checkpoint (fine-tuning; no optimizer state)."""
    from oneref.checkpoint import load_pretrained

    report = load_pretrained(module.model, source, source_format=source_format)
    log.info("initialised from %s\n%s", source, report)


# -- any checkpoint, for evaluation and prediction ---------------------------------------------------
def apply_folder_architecture(cfg: DictConfig, path: str | Path) -> None:
    """A checkpoint folder describes its own model: its architecture (config.yaml) replaces the
    composed ``model`` fields (the similarity temperature included), so that what runs is what was
    saved. The heads still follow ``task``."""
    from oneref.checkpoint import read_folder

    arch = read_folder(path).cfg.to_dict()
    arch.pop("seg_head", None)
    changed = {k: (cfg.model.get(k), v) for k, v in arch.items() if cfg.model.get(k) != v}
    if changed:
        log.info("architecture from %s (composed -> folder): %s", path, changed)
    with open_dict(cfg):
        for k, v in arch.items():
            cfg.model[k] = v


def match_data_to_module(cfg: DictConfig, module: GroundingModule) -> None:
    """Evaluation data follows the loaded model, not the composed ``task``: a model with a mask
    head is scored against the object masks (``data.seg_masks``, as every official RES recipe
    pairs ``--use_mask_loss`` with ``--enable_seg_mask``), a box model against box rectangles. A
    RES ``.ckpt`` evaluated without ``task=res`` was otherwise scored against its boxes."""
    masks = bool(module.model.cfg.seg_head)
    if bool(cfg.data.get("seg_masks", False)) != masks:
        log.info(
            "data.seg_masks=%s: the checkpoint's model %s a mask head", masks, "has" if masks else "has no"
        )
        with open_dict(cfg):
            cfg.data.seg_masks = masks


def load_module(cfg: DictConfig) -> GroundingModule:
    """The module of ``cfg.ckpt_path``: one of our Lightning ``.ckpt`` files (its own architecture
    and task), a converted checkpoint folder (its own architecture) or an official ``.pth``
    (``ckpt_format``, architecture from ``cfg.model``)."""
    path = str(cfg.ckpt_path)
    if path.endswith(".ckpt") and cfg.get("ckpt_format") in (None, "lightning"):
        from oneref.checkpoint import CheckpointError, load_checkpoint_file

        load_checkpoint_file(path)  # refuses a missing, truncated or unsafe file by name
        try:
            module = GroundingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a oneref Lightning checkpoint: {e}") from e
        module.dataset_name = str(cfg.data.dataset)
        # the metric protocol is an evaluation choice, not the checkpoint's
        module.set_original_resolution(bool(cfg.task.get("original_resolution", False)))
        return module
    from oneref.checkpoint import load_pretrained

    if Path(path).is_dir():
        apply_folder_architecture(cfg, path)
    module = build_module(cfg)
    report = load_pretrained(module.model, path, source_format=cfg.get("ckpt_format"))
    log.info("loaded %s\n%s", path, report)
    return module


def resolve_tokenizer(cfg: DictConfig) -> Tokenizer:
    """The tokenizer for ``cfg.ckpt_path``, without building a DataModule: ``tokenizer=`` if given,
    else the checkpoint's own (a folder's file, or the copy our ``.ckpt`` files embed), else
    ``data.tokenizer``, else, for our own checkpoints only, the synthetic dataset's model when it
    has been generated (an official file is never paired with the synthetic vocabulary)."""
    from oneref.checkpoint import CheckpointError, load_checkpoint_file, read_folder
    from oneref.data.synthetic import SyntheticPaths

    max_len = int(cfg.data.max_query_len)
    if cfg.get("tokenizer"):
        return Tokenizer(Path(str(cfg.tokenizer)).expanduser(), max_len)
    path = Path(str(cfg.ckpt_path)).expanduser()
    ours = path.is_dir() or path.suffix == ".ckpt"
    if path.is_dir():
        folder = read_folder(path)
        if folder.tokenizer is not None:
            return Tokenizer(folder.tokenizer, int(folder.preprocessing.get("max_query_len", max_len)))
    elif path.suffix == ".ckpt":
        entry = load_checkpoint_file(path, mmap=True).get("tokenizer")
        if entry:
            return Tokenizer.from_serialized(
                entry["model"], int(entry["max_query_len"]), name=f"{path} (embedded tokenizer)"
            )
    if cfg.data.get("tokenizer"):
        return Tokenizer(Path(str(cfg.data.tokenizer)).expanduser(), max_len)
    if ours and cfg.data.get("dataset") == "synthetic":
        synthetic = SyntheticPaths(Path(str(cfg.data.data_root)).expanduser().absolute()).tokenizer
        if synthetic.is_file():
            return Tokenizer(synthetic, max_len)
    raise CheckpointError(
        f"no tokenizer found for {path}: it carries none; pass tokenizer=PATH (beit3.spm for the released "
        "models) or data.tokenizer=PATH"
    )


def load_predictor(cfg: DictConfig) -> Predictor:
    """A :class:`~oneref.predictor.Predictor` for ``cfg.ckpt_path`` (any checkpoint the CLI takes),
    through :func:`oneref.predictor.load`. Our ``.ckpt`` files and checkpoint folders bring their
    architecture; an official file is built as the composed ``model`` and ``task`` say."""
    from oneref.checkpoint import CheckpointError
    from oneref.models.registry import config_from_options
    from oneref.predictor import load

    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path not found: {path}")
    fmt = cfg.get("ckpt_format")
    config = None
    if not (path.is_dir() or (path.suffix == ".ckpt" and fmt in (None, "lightning"))):
        try:
            config = config_from_options(to_container(cfg.model), seg_head=cfg.task.name == "res")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"model={cfg.model.size} task={cfg.task.name}: {e}") from e
    photo = to_container(cfg.get("photo") or {})
    if isinstance(photo.get("background"), list):
        photo["background"] = tuple(photo["background"])
    return load(
        path,
        tokenizer=resolve_tokenizer(cfg),
        source_format=fmt,
        config=config,
        device=cfg.get("device", "auto"),
        precision=cfg.get("precision", "auto"),
        batch_size=int(cfg.get("batch_size", 16)),
        workers=cfg.get("workers"),
        **photo,
    )
