"""A run's own checkpoints: written atomically, and the newest intact one found to resume from.

A job killed while writing (preemption, a timeout, a full disk) must never leave a truncated file
where the next attempt looks: :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a
temporary file in the same folder and renames it into place. ``ckpt_path=auto`` resumes from the
newest intact checkpoint of the run folder (:func:`newest_intact_checkpoint`: our per-epoch
``last.ckpt``, the periodic step checkpoints and Lightning's SLURM ``hpc_ckpt_*.ckpt``), skipping
and naming any file that does not load; an explicit ``ckpt_path`` that does not load is refused by
name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from oneref.atomic import atomic_write
from oneref.checkpoint.descriptor import Checkpoint
from oneref.checkpoint.io import CheckpointError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, written to a temporary file and renamed into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        save = super().save_checkpoint
        # atomic on POSIX: readers see the old file or the new one
        atomic_write(path, lambda tmp: save(checkpoint, tmp, storage_options))


def checkpoint_step(path: str | Path) -> tuple[int, int]:
    """(global_step, epoch) stored in one of our Lightning checkpoints; raises CheckpointError
    naming a file that does not load (truncated, corrupt, not a checkpoint)."""
    ckpt = Checkpoint.open(path, "lightning")
    if ckpt.training.get("global_step") is None:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of a training run (no global_step)")
    return int(ckpt.training["global_step"]), int(ckpt.training.get("epoch") or 0)


def newest_intact_checkpoint(*folders: str | Path) -> Path | None:
    """The checkpoint with the highest global step among the ``*.ckpt`` files of ``folders``;
    files that do not load are skipped with a warning naming them. On a tie the step checkpoint
    wins (``step*.ckpt``: a run stopped by max_steps or max_time mid-epoch also writes
    ``last.ckpt``, which Lightning then takes for an epoch end), then the newest file."""
    best: tuple[tuple[int, bool, float], Path] | None = None
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.glob("*.ckpt"):
            try:
                step, _ = checkpoint_step(path)
            except CheckpointError as e:
                log.warning("not resuming from %s: %s", path, e)
                continue
            key = (step, path.stem.startswith("step"), path.stat().st_mtime)
            if best is None or key > best[0]:
                best = (key, path)
    return None if best is None else best[1]


def resolve_ckpt_path(ckpt_path: str | None, *folders: str | Path) -> str | None:
    """``ckpt_path`` for ``Trainer.fit``: ``auto`` -> the newest intact checkpoint of ``folders``
    (None when there is none: a fresh run); a path -> itself once it loads; None -> None."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "auto":
        found = newest_intact_checkpoint(*folders)
        if found is not None:
            log.info("resuming from %s (the newest intact checkpoint of this run)", found)
        return None if found is None else str(found)
    path = Path(str(ckpt_path)).expanduser()
    checkpoint_step(path)  # refuse a missing, truncated or foreign file by name, before training
    return str(path)


def resume_mismatch(
    path: str | Path, hparams: Any, keys: tuple[str, ...] = ("model", "task", "optim")
) -> list[str]:
    """The hyperparameter groups in which the checkpoint at ``path`` differs from ``hparams`` (a
    resumed run must be the same run: another stage written into the same folder is not)."""
    saved = Checkpoint.open(path, "lightning").hyper_parameters
    return [k for k in keys if k in hparams and saved.get(k) != dict(hparams[k])]
