"""OneRef's published numbers beside ours.

The numbers ship as package data (``results.yaml``: the paper, its README tables, one row per
released model family). :func:`report` picks the row that matches a run (task, setting, model
size, training dataset) or the one ``paper_row=`` names, prints published vs ours for every split
with a published number and writes ``paper_comparison.csv``.

A row's ``setting`` is ``single`` (each dataset's number comes from the model trained on that
dataset, so only the training dataset is compared) or ``mixup`` (trained on ``mixup_with_refc``,
compared on every RefCOCO/+/g split it publishes).
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from oneref.errors import UserError

log = logging.getLogger(__name__)

CSV_NAME = "paper_comparison.csv"
COLUMNS = ("row", "model", "table", "dataset", "split", "metric", "published", "ours", "difference")

# Names a dataset goes by besides ours (oneref.data.records.OFFICIAL_NAMES maps ours to the
# official split-file names the published tables use).
OTHER_NAMES: dict[str, str] = {
    "refcoco+": "unc+",
    "refcocog": "gref_umd",  # the paper's RefCOCOg is the umd split
    "flickr30k": "flickr",
    # official train_oneref.py --dataset of both mixes; the grounding models were trained on RefC
    "mixup": "mixup_with_refc",
}
# The training data of the published mixup rows (the released "grounding pretraining" models).
MIXUP_TRAINING = "mixup_with_refc"


def official_dataset(name: str) -> str:
    """The official split-file name of a dataset given by any of its names (refcoco -> unc)."""
    from oneref.data.records import OFFICIAL_NAMES

    name = str(name)
    return OFFICIAL_NAMES.get(name) or OTHER_NAMES.get(name, name)


@dataclass(frozen=True)
class PaperRow:
    name: str
    label: str
    table: str
    task: str
    setting: str  # single | mixup
    model: str
    results: Mapping[str, Mapping[str, Mapping[str, float]]]  # metric -> dataset -> split -> %

    def published(self, metric: str, dataset: str, split: str) -> float | None:
        return self.results.get(metric, {}).get(official_dataset(dataset), {}).get(split)


@functools.cache
def _load() -> tuple[dict[str, Any], dict[str, PaperRow]]:
    text = resources.files(__package__).joinpath("results.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    rows = {name: PaperRow(name=name, **row) for name, row in data["rows"].items()}
    return data["source"], rows


def source() -> dict[str, Any]:
    """Where the numbers come from: title, authors, venue, tables."""
    return dict(_load()[0])


def rows() -> dict[str, PaperRow]:
    return dict(_load()[1])


def get_row(name: str) -> PaperRow:
    table = rows()
    if name not in table:
        raise UserError(
            f"paper_row={name!r} is not a published row; valid names: {', '.join(table)} (or auto: chosen "
            "from the task, model size and training dataset)"
        )
    return table[name]


def setting_of(train_dataset: str | None) -> str | None:
    """single | mixup for a training dataset, None where the paper publishes no such setting."""
    if train_dataset is None:
        return None
    ds = official_dataset(train_dataset)
    if ds == MIXUP_TRAINING:
        return "mixup"
    if ds in ("mixup_with_refc_referit", "synthetic"):
        return None
    return "single"


def select_row(
    task: str, size: str, train_dataset: str | None, paper_row: str | None = "auto"
) -> PaperRow | None:
    """The published row for a model: ``paper_row`` when it names one, else (auto or None) the row
    of (task, model size, setting of the training dataset); None when the paper has none."""
    if paper_row not in (None, "auto"):
        return get_row(str(paper_row))
    setting = setting_of(train_dataset)
    for row in rows().values():
        if (row.task, row.setting, row.model) == (task, setting, size):
            return row
    return None


def compare(
    metrics: Mapping[str, float], row: PaperRow, train_dataset: str | None = None, explicit: bool = False
) -> list[dict[str, Any]]:
    """One dict per ``test/<dataset>/<split>/<metric>`` with a published number, in percent.

    A single-dataset row is only compared on the training dataset (its other numbers come from
    other models) unless the row was named explicitly (``explicit``: the user vouches for it)."""
    out: list[dict[str, Any]] = []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "test":
            continue
        _, dataset, split, metric = parts
        if row.setting == "single" and not explicit and train_dataset is not None:
            if official_dataset(dataset) != official_dataset(train_dataset):
                continue
        published = row.published(metric, dataset, split)
        if published is None:
            continue
        ours = 100.0 * float(value)
        out.append(
            {
                "row": row.name,
                "model": row.label,
                "table": row.table,
                "dataset": dataset,
                "split": split,
                "metric": metric,
                "published": float(published),
                "ours": round(ours, 4),
                "difference": round(ours - float(published), 4),
            }
        )
    return out


def comparison_table(rows_: list[dict[str, Any]]) -> Table:
    first = rows_[0]
    src = source()
    table = Table(
        title=f"{src['title'].split(':')[0]} ({src['venue']}), {first['model']}: {first['table']}",
        caption=f"published: {src['tables']}",
    )
    for col, justify in (
        ("dataset", "left"),
        ("split", "left"),
        ("metric", "left"),
        ("published", "right"),
        ("ours", "right"),
        ("difference", "right"),
    ):
        table.add_column(col, justify=justify)
    for r in rows_:
        diff = r["difference"]
        style = "green" if diff >= 0 else "red"
        table.add_row(
            r["dataset"],
            r["split"],
            r["metric"],
            f"{r['published']:.2f}",
            f"{r['ours']:.2f}",
            f"[{style}]{diff:+.2f}[/{style}]",
        )
    return table


def write_csv(rows_: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows_)
    return path


def _cfg_get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def report(
    metrics: Mapping[str, float],
    cfg: Any,
    out_dir: str | Path,
    *,
    task: str | None = None,
    size: str | None = None,
    train_dataset: str | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Print published vs ours for every split with a published number, write
    ``out_dir/paper_comparison.csv`` and return the rows ([] when the paper has none).

    The row comes from ``cfg.paper_row`` (a row name, or auto/absent: chosen from ``task``,
    ``size`` and ``train_dataset``, which default to ``cfg.task.name``, ``cfg.model.size`` and
    ``cfg.data.dataset``, i.e. a training run's own data)."""
    task = task or _cfg_get(cfg, "task.name")
    size = size or _cfg_get(cfg, "model.size")
    train_dataset = train_dataset or _cfg_get(cfg, "data.dataset")
    paper_row = _cfg_get(cfg, "paper_row", "auto")
    row = select_row(str(task), str(size), train_dataset, paper_row)
    if row is None:
        # the paper has only base and large models on real data: nothing to say for tiny/synthetic
        published_kind = str(size) in ("base", "large") and train_dataset != "synthetic"
        (log.info if published_kind else log.debug)(
            "no published OneRef row for task=%s model=%s trained on %s; name one with paper_row= (%s)",
            task,
            size,
            train_dataset,
            ", ".join(rows()),
        )
        return []
    found = compare(metrics, row, train_dataset, explicit=paper_row not in (None, "auto"))
    if not found:
        hint = (
            ": its numbers are on RefCOCO/+/g, e.g. python -m oneref.eval ckpt_path=BEST.ckpt data=refcoco "
            f"model={size} (also data=refcoco_plus, data=refcocog_umd)"
            if row.setting == "mixup"
            else ""
        )
        log.info("the paper publishes no %s number for the splits evaluated here%s", row.name, hint)
        return []
    (console or Console()).print(comparison_table(found))
    path = write_csv(found, Path(out_dir) / CSV_NAME)
    log.info("paper comparison written to %s", path)
    return found


__all__ = [
    "CSV_NAME",
    "OTHER_NAMES",
    "PaperRow",
    "compare",
    "get_row",
    "official_dataset",
    "report",
    "rows",
    "select_row",
    "setting_of",
    "source",
]
