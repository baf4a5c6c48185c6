"""Evaluate a checkpoint on every test split of a dataset, one dataloader per split:

    python -m oneref.eval ckpt_path=PATH data=refcoco model=base task=rec
    python -m oneref.eval ckpt_path=official/refcoco_base.pth ckpt_format=official data=refcoco model=base

ckpt_path is one of our Lightning .ckpt files, a converted checkpoint folder, or an official
OneRef .pth (then give ckpt_format=official; the architecture comes from ``model``). Our .ckpt
files carry their task; the data follows the loaded model (a mask head is scored on object masks).
Prints a table (datasets x splits) and writes every metric to JSON.
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

from oneref import factory
from oneref.config import config_dir, to_container
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


def evaluate(cfg: DictConfig) -> dict[str, float]:
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
        out.write_text(
            json.dumps(
                {"checkpoint": str(cfg.ckpt_path), "metrics": metrics, "config": to_container(cfg)},
                indent=2,
                default=str,
            )
        )
        log.info("metrics written to %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    evaluate(cfg)


if __name__ == "__main__":
    main()
