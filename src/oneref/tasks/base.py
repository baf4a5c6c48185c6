"""What every OneRef LightningModule shares: the model built from ``model`` (architecture and
``model.runtime``), the criterion from ``task.losses`` (:class:`~oneref.tasks.losses.LossFlags`),
freezing the parts no enabled loss reaches, compiling in ``configure_model``, the optimizer of
``optim`` and the tokenizer embedded in each checkpoint. The tasks (oneref.tasks.grounding,
oneref.tasks.mrefm) add their steps and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L

from oneref.errors import UserError
from oneref.models.oneref import BACKBONE_PARTS, OneRef
from oneref.models.registry import model_config
from oneref.models.runtime import join_model_options, split_model_options
from oneref.tasks.losses import GroundingCriterion, LossFlags
from oneref.tasks.optim import configure_optimizers

log = logging.getLogger(__name__)


def embed_tokenizer(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Put the training tokenizer into a checkpoint (a sentencepiece model is ~1 MB), so that
    evaluating, fine-tuning or predicting from the file uses it (oneref.checkpoint.Checkpoint)."""
    tokenizer = getattr(getattr(module._trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is not None:
        checkpoint["tokenizer"] = {
            "model": tokenizer.serialized(),
            "max_query_len": tokenizer.max_query_len,
            "source": tokenizer.model_path,
        }


class OneRefModule(L.LightningModule):
    """Base of the task modules.

    Args are plain containers (saved as hyperparameters, so our checkpoints load under
    ``torch.load(weights_only=True)``):
        model: ``size``, OneRefConfig overrides and ``runtime`` (oneref.models.runtime).
        task: ``name``, ``frozen_backbone``, ``losses`` (LossFlags and ``mlm`` options), and what
            the task adds.
        optim: see conf/optim/adamw.yaml.
        training: facts about the run, kept apart from the DataModule's hyperparameters:
            ``dataset`` (the training set's name, used in test metric names).
        architecture: ignored on input; saved as the resolved OneRefConfig (for load_model).
        dataset: read only from checkpoints written before ``training`` (its ``dataset``).
    """

    TASKS: tuple[str, ...] = ()

    def __init__(
        self,
        model: dict[str, Any],
        task: dict[str, Any],
        optim: dict[str, Any],
        training: dict[str, Any] | None = None,
        architecture: dict[str, Any] | None = None,
        dataset: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["dataset"])
        if task.get("name") not in self.TASKS:
            raise UserError(
                f"task.name={task.get('name')!r}: {type(self).__name__} takes {' | '.join(self.TASKS)}"
            )
        training = dict(training or {})
        if dataset is not None:  # a checkpoint written before ``training``
            training.setdefault("dataset", dataset)
        training.setdefault("dataset", "data")
        self.hparams["training"] = training
        self.dataset_name = str(training["dataset"])
        size, arch, self.runtime = split_model_options(model)
        self.hparams["model"] = join_model_options(size, arch, self.runtime)
        self.model = OneRef(model_config(size, **arch, **self.heads(task)))
        # The resolved OneRefConfig, so that load_model() rebuilds the model from a .ckpt alone.
        self.hparams["architecture"] = self.model.cfg.to_dict()
        self.runtime.apply(self.model)
        losses = dict(task.get("losses") or {})
        self.criterion = GroundingCriterion(
            LossFlags.from_config(losses, **self.forced_losses()),
            similarity_temperature=self.model.cfg.similarity_temperature,
            mlm=losses.get("mlm"),
        )

    # -- what a task decides ----------------------------------------------------------------------
    def heads(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """OneRefConfig fields of the task's heads."""
        return {}

    def forced_losses(self) -> dict[str, bool]:
        """Loss flags the task always runs, whatever ``task.losses`` says."""
        return {}

    # -- setup ---------------------------------------------------------------------------------------
    def freeze_unreached(self, frozen_backbone: bool) -> None:
        """Train exactly the parts that an enabled loss reaches (oneref.tasks.losses.LOSS_REACH)."""
        trainable = self.criterion.reached_parts() & self.model.parts()
        if frozen_backbone:  # official --frozen_backbone: every beit3.* parameter
            trainable -= BACKBONE_PARTS
        if not trainable:
            raise UserError("no enabled loss reaches any trainable parameter: check task.losses")
        self.model.set_trainable(trainable)
        log.info(
            "trained parts: %s; frozen: %s",
            ", ".join(sorted(trainable)),
            ", ".join(sorted(self.model.parts() - trainable)) or "none",
        )

    def configure_model(self) -> None:
        self.runtime.compile_model(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        embed_tokenizer(self, checkpoint)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizers(self, self.model, self.hparams.optim)
