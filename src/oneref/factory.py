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

from oneref import hub
from oneref.checkpoint import Checkpoint, CheckpointError
from oneref.checkpoint.resume import AtomicCheckpointIO
from oneref.config import to_container
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


def build_datamodule(cfg: DictConfig, checkpoint: Checkpoint | None = None) -> L.LightningDataModule:
    """The DataModule of ``cfg.data``; given the ``checkpoint`` it runs, it tokenises with the
    tokenizer that checkpoint carries (:func:`follow_checkpoint_tokenizer`)."""
    from hydra.errors import InstantiationException

    from oneref.errors import UserError

    try:
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as e:  # a bad data option: the user's error, not Hydra's wrapper
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    if checkpoint is not None:
        follow_checkpoint_tokenizer(datamodule, checkpoint)
    return datamodule


def follow_checkpoint_tokenizer(datamodule: L.LightningDataModule, checkpoint: Checkpoint) -> None:
    """A checkpoint that carries its tokenizer is evaluated and fine-tuned with it: the data then
    tokenise with that one. ``data.tokenizer`` may name the same model (the same sentencepiece
    pieces); another one is refused, naming both. A ``data.tokenizer`` file that does not exist
    (a dataset default such as beit3.spm) is no claim against the checkpoint's own."""
    if checkpoint.carried_tokenizer is None:
        return
    given = Path(datamodule.config.tokenizer) if datamodule.config.tokenizer else None
    if given is not None and not given.is_file():
        log.info("data.tokenizer %s does not exist: using the tokenizer %s carries", given, checkpoint.path)
        given = None
    tokenizer = checkpoint.choose_tokenizer(given, datamodule.config.max_query_len, knob="data.tokenizer")
    datamodule.use_tokenizer(tokenizer)


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule of ``cfg.task`` (REC/RES transfer or MRefM pretraining), around the one
    OneRef model."""
    kind = MRefMModule if cfg.task.name == "mrefm" else GroundingModule
    return kind(
        model=to_container(cfg.model),
        task=to_container(cfg.task),
        optim=to_container(cfg.get("optim")),  # none when evaluating
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


def init_weights(
    module: GroundingModule,
    source: str,
    ckpt_format: str | None,
    datamodule: L.LightningDataModule | None = None,
) -> Checkpoint:
    """Initialise the module's network from a checkpoint (fine-tuning; no optimizer state); the
    ``datamodule`` then tokenises with the tokenizer the checkpoint carries, if it carries one."""
    from oneref.checkpoint import load_pretrained

    checkpoint = Checkpoint.open(source, ckpt_format)
    log.info("init_from %s", checkpoint)
    report = load_pretrained(module.model, checkpoint)
    log.info("initialised from %s\n%s", source, report)
    if datamodule is not None:
        follow_checkpoint_tokenizer(datamodule, checkpoint)
    return checkpoint


# -- any checkpoint, for evaluation and prediction ---------------------------------------------------
def apply_folder_architecture(cfg: DictConfig, checkpoint: Checkpoint) -> None:
    """A checkpoint folder describes its own model: its architecture (config.yaml) replaces the
    composed ``model`` fields (the similarity temperature included), so that what runs is what was
    saved. The heads still follow ``task``."""
    arch = checkpoint.config.to_dict()
    arch.pop("seg_head", None)
    changed = {k: (cfg.model.get(k), v) for k, v in arch.items() if cfg.model.get(k) != v}
    if changed:
        log.info("architecture from %s (composed -> folder): %s", checkpoint.path, changed)
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
    """The module of ``cfg.ckpt_path``, opened once (:meth:`Checkpoint.open`, ``ckpt_format``):
    one of our Lightning REC/RES checkpoints (its own architecture and task), a checkpoint folder
    (its own architecture) or an official-layout file (architecture from ``cfg.model``). The
    module's ``checkpoint`` attribute is that description: evaluation builds its data with it
    (:func:`build_datamodule`), so that the checkpoint's own tokenizer is used."""
    checkpoint = Checkpoint.open(str(cfg.ckpt_path), cfg.get("ckpt_format"))
    log.info("evaluating %s", checkpoint)
    if checkpoint.format == "lightning" and checkpoint.task in ("rec", "res"):
        try:
            module = GroundingModule.load_from_checkpoint(
                checkpoint.path, map_location="cpu", weights_only=True
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{checkpoint.path} is not a oneref Lightning checkpoint: {e}") from e
        module.dataset_name = str(cfg.data.dataset)
        # the metric protocol is an evaluation choice, not the checkpoint's
        module.set_original_resolution(bool(cfg.task.get("original_resolution", False)))
    else:
        from oneref.checkpoint import load_pretrained

        if checkpoint.format == "folder":
            apply_folder_architecture(cfg, checkpoint)
        module = build_module(cfg)
        report = load_pretrained(module.model, checkpoint)
        log.info("loaded %s\n%s", checkpoint.path, report)
    module.checkpoint = checkpoint
    return module


def predict_tokenizer(cfg: DictConfig, checkpoint: Checkpoint) -> str | None:
    """The tokenizer the prediction config names for ``checkpoint``: ``tokenizer=``, else
    ``data.tokenizer`` (ignored when that file does not exist and the checkpoint carries its own),
    else, for our own checkpoints that carry none, the synthetic dataset's model when it has been
    generated (an official file is never paired with the synthetic vocabulary)."""
    from oneref.data.synthetic import SyntheticPaths

    if cfg.get("tokenizer"):
        return str(cfg.tokenizer)
    carried = checkpoint.carried_tokenizer is not None
    if cfg.data.get("tokenizer"):
        data_tokenizer = Path(str(cfg.data.tokenizer)).expanduser()
        if not (carried and not data_tokenizer.is_file()):
            return str(data_tokenizer)
    if carried:
        return None
    if checkpoint.format in ("lightning", "folder") and cfg.data.get("dataset") == "synthetic":
        synthetic = SyntheticPaths(Path(str(cfg.data.data_root)).expanduser().absolute()).tokenizer
        if synthetic.is_file():
            return str(synthetic)
    raise CheckpointError(
        f"no tokenizer found for {checkpoint.path}: it carries none; pass tokenizer=PATH (beit3.spm for the "
        "released models) or data.tokenizer=PATH"
    )


def load_predictor(cfg: DictConfig) -> Predictor:
    """A :class:`~oneref.predictor.Predictor` for ``cfg.ckpt_path`` (any checkpoint the CLI takes),
    through :func:`oneref.predictor.load`. Our ``.ckpt`` files and checkpoint folders bring their
    architecture and tokenizer; an official file is built as the composed ``model`` and ``task`` say."""
    from oneref.checkpoint import CheckpointError
    from oneref.models.registry import config_from_options
    from oneref.predictor import load

    path = str(cfg.ckpt_path)
    if not hub.is_hub_id(path) and not Path(path).expanduser().exists():  # Checkpoint.open resolves a Hub id
        raise FileNotFoundError(f"ckpt_path not found: {Path(path).expanduser()}")
    checkpoint = Checkpoint.open(path, cfg.get("ckpt_format"))
    config = None
    if checkpoint.format not in ("folder", "lightning"):
        try:
            config = config_from_options(to_container(cfg.model), seg_head=cfg.task.name == "res")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"model={cfg.model.size} task={cfg.task.name}: {e}") from e
    tokenizer = predict_tokenizer(cfg, checkpoint)
    return load(
        checkpoint,
        tokenizer=tokenizer,
        # a tokenizer of the config: the data's length; the checkpoint's own: its length
        max_query_len=None if checkpoint.carried_tokenizer else int(cfg.data.max_query_len),
        config=config,
        device=cfg.get("device", "auto"),
        precision=cfg.get("precision", "auto"),
        batch_size=int(cfg.get("batch_size", 16)),
        workers=cfg.get("workers"),
        photo=to_container(cfg.get("photo") or {}),
    )
