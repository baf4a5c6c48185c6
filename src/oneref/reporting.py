"""What a run tells its user: run facts for the loggers, the result table, the baseline, the
progress bar of prediction."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from oneref.atomic import atomic_copy
from oneref.config import to_container

log = logging.getLogger(__name__)

# Third-party console noise, silenced by message so that every other warning still shows:
# Lightning's advertising tips (rank_zero_info on this logger) and a deprecation inside
# lightning/pytorch/utilities/_pytree.py that Lightning itself triggers on every run.
_LIGHTNING_TIPS_LOGGER = "lightning.pytorch.utilities.rank_zero"
_TIP_PREFIX = "💡 Tip:"
_LIGHTNING_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP_PREFIX)


def quiet_third_party() -> None:
    """Silence exactly the messages above (idempotent); called by every entry point."""
    logger = logging.getLogger(_LIGHTNING_TIPS_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    for message in _LIGHTNING_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


def log_run_facts(trainer: L.Trainer, cfg: DictConfig) -> dict[str, Any]:
    """Effective batch size, world size, precision and the resolved config, to every logger."""
    per_device = int(cfg.data.get("batch_size", 0))
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    facts = {
        "effective_batch_size": per_device * trainer.world_size * accumulate,
        "per_device_batch_size": per_device,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": accumulate,
        "precision": str(trainer.precision),
    }
    log.info("run facts: %s", facts)
    for logger in trainer.loggers:
        logger.log_hyperparams({"run": facts, "config": to_container(cfg)})
    return facts


def print_results(metrics: dict[str, float], title: str, checkpoint: str | None = None) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in metrics if k.startswith(("test/", "baseline/"))):
        table.add_row(key, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    if checkpoint:
        console.print(f"checkpoint: {checkpoint}")


def print_next_steps(export: str | Path | None, cfg: DictConfig) -> None:
    """What to do with the model a run exported: evaluate it, predict with it, look at it. For the
    synthetic set, the predict command names a test image copied next to the export, with its
    expression, so that it runs as printed."""
    if not export or not Path(export).is_file() or str(cfg.task.name) == "mrefm":
        return
    ckpt = str(export)
    image, text = "photo.jpg", "the man in red on the left"
    if str(cfg.data.dataset) == "synthetic":
        from oneref.data.records import load_split_file
        from oneref.data.synthetic import SyntheticPaths

        paths = SyntheticPaths(Path(str(cfg.data.data_root)).expanduser())
        test = paths.split_file("test")
        if test.is_file():
            first = load_split_file(test)[0]
            image = str(Path(ckpt).with_name("example.jpg"))
            atomic_copy(paths.image_dir / first[0], image)
            text = str(first[3])
    lines = [
        f"python -m oneref.predict ckpt_path={ckpt} image={image} \"text='{text}'\"",
        f"python -m oneref.eval ckpt_path={ckpt} data={cfg.data.dataset}",
        f"python -m oneref.demo ckpt_path={ckpt}   # in the browser (the demo extra; make app)",
    ]
    Console().print("try the model:\n  " + "\n  ".join(lines), highlight=False, soft_wrap=True)


def finish_loggers(trainer: L.Trainer | None) -> None:
    """Close W&B runs even after a crash, so the next job of a multirun starts clean."""
    if trainer is None:
        return
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


# -- progress bar -------------------------------------------------------------------------------------
class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} queries/s" if task.speed else "", style="progress.data.speed")


@contextmanager
def progress_bar(enabled: bool, total: int, label: str = "predicting") -> Iterator[Callable[[int], None]]:
    """``advance(n)`` of a rich progress bar with queries/s, on a terminal only (never in logs
    or pipes)."""
    console = Console(stderr=True)
    if not (enabled and total and console.is_terminal):
        yield lambda n: None
        return
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
