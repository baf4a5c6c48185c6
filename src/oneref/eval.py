"""Evaluate a checkpoint on every test split of a dataset, one dataloader per split:

    python -m oneref.eval ckpt_path=PATH data=refcoco model=base task=rec
    python -m oneref.eval ckpt_path=official/refcoco_base.pth ckpt_format=official data=refcoco model=base
    python -m oneref.eval ckpt_path=logs/rec_mixup_large_stage2/best.ckpt data=refcoco_plus model=large

ckpt_path is one of our Lightning .ckpt files, a converted checkpoint folder, or an official
OneRef .pth (then give ckpt_format=official; the architecture comes from ``model``). Our .ckpt
files carry their task; the data follows the loaded model (a mask head is scored on object masks).
Prints a table (datasets x splits) and writes every metric to JSON. Where the paper publishes
numbers for the checkpoint's kind of model and the splits evaluated, it prints them beside ours,
writes them into the JSON (key ``paper``) and ``paper_comparison.csv`` next to it. The row follows
the checkpoint's training (task, model size, single-dataset or RefCOCO/+/g mix), read from our
``.ckpt`` hyperparameters or an official ``.pth``'s saved args; ``paper_row=NAME`` names it (needed
for files that do not say how they were trained).

Every input is checked first (``oneref.preflight.check_eval``; ``preflight=false`` skips it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from oneref import factory, paper, preflight
from oneref.checkpoint import Checkpoint
from oneref.config import config_dir, to_container
from oneref.errors import report_user_errors
from oneref.models.registry import size_of
from oneref.reporting import quiet_third_party

log = logging.getLogger(__name__)


def results_table(metrics: dict[str, float], dataset: str) -> Table:
    """Rows: metric; columns: splits (the paper's layout)."""
    prefix = f"test/{dataset}/"
    cells: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            split, name = key[len(prefix) :].split("/", 1)
            cells.setdefault(name, {})[split] = value
    splits = sorted({s for row in cells.values() for s in row})
    table = Table(title=f"{dataset}")
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for name in sorted(cells):
        table.add_row(name, *(f"{100 * cells[name][s]:.2f}" if s in cells[name] else "-" for s in splits))
    return table


def training_of(checkpoint: Checkpoint) -> dict[str, str | None]:
    """How a checkpoint was trained, as far as it says (our ``.ckpt`` its hyperparameters, an
    official file its saved args and shapes): task, model size and training dataset; None where
    it does not say (then ``paper_row=`` names the published row)."""
    size = checkpoint.training.get("size") or (size_of(checkpoint.config) if checkpoint.config else None)
    return {"task": checkpoint.task, "size": size, "train_dataset": checkpoint.dataset}


def paper_comparison(
    metrics: dict[str, float], cfg: DictConfig, checkpoint: Checkpoint, out_dir: Path
) -> list[dict]:
    """The published numbers beside ours for this checkpoint (oneref.paper.report)."""
    facts = training_of(checkpoint)
    return paper.report(
        metrics,
        cfg,
        out_dir,
        task=facts["task"] or str(cfg.task.name),
        size=facts["size"] or str(cfg.model.size),
        # unknown training data: only an explicit paper_row picks a row
        train_dataset=facts["train_dataset"] or "unknown",
    )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("preflight", True):
        preflight.check_eval(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    module = factory.load_module(cfg)
    factory.match_data_to_module(cfg, module)
    datamodule = factory.build_datamodule(cfg, module.checkpoint)  # with the checkpoint's tokenizer
    trainer = factory.build_trainer(cfg, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        Console().print(results_table(metrics, str(cfg.data.dataset)))
        out = Path(cfg.get("output_json") or Path(cfg.paths.output_dir) / "metrics.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        published = paper_comparison(metrics, cfg, module.checkpoint, out.parent)
        out.write_text(
            json.dumps(
                {
                    "checkpoint": str(cfg.ckpt_path),
                    "metrics": metrics,
                    "paper": published,
                    **({"paper_source": paper.source()} if published else {}),
                    "config": to_container(cfg),
                },
                indent=2,
                default=str,
            )
        )
        log.info("metrics written to %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    evaluate(cfg)


if __name__ == "__main__":
    main()
