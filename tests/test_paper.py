"""oneref.paper: the published numbers ship with the package, the right row is picked for a run,
and the comparison is printed, returned and written as CSV."""

from __future__ import annotations

import csv

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from oneref import paper
from oneref.errors import UserError


def test_the_numbers_are_the_published_ones():
    """A few cells of each table, as printed in the paper's README tables."""
    rows = paper.rows()
    assert set(rows) == {
        f"{t}_{s}_{m}" for t in ("rec", "res") for s in ("single", "mixup") for m in ("base", "large")
    }
    assert rows["rec_single_base"].published("acc@0.5", "unc", "testA") == 90.95
    assert rows["rec_single_large"].published("acc@0.5", "flickr", "test") == 84.75
    assert rows["rec_single_large"].published("acc@0.5", "referit", "test") == 81.11
    assert rows["rec_mixup_base"].published("acc@0.5", "gref_umd", "test") == 87.32
    assert rows["rec_mixup_large"].published("acc@0.5", "unc+", "testB") == 82.70
    assert rows["res_single_base"].published("miou", "unc+", "val") == 71.25
    assert rows["res_single_large"].published("oiou", "gref_umd", "test") == 77.36
    assert rows["res_mixup_base"].published("miou", "unc", "testA") == 81.86
    assert rows["res_mixup_large"].published("oiou", "unc", "val") == 81.95
    # no ReferIt/Flickr numbers for the mixed setting; the "unsupervised" rows are left out
    assert rows["rec_mixup_base"].published("acc@0.5", "referit", "test") is None
    assert all("unsupervised" not in r.label for r in rows.values())
    src = paper.source()
    assert src["title"].startswith("OneRef: Unified One-tower Expression Grounding and Segmentation")
    assert src["venue"] == "NeurIPS 2024" and "docs/tab1.jpg" in src["tables"]


@pytest.mark.parametrize(
    "task,size,trained_on,row",
    [
        ("rec", "base", "unc", "rec_single_base"),
        ("rec", "large", "refcoco_plus", "rec_single_large"),
        ("rec", "large", "mixup_with_refc", "rec_mixup_large"),
        ("rec", "large", "mixup_refc", "rec_mixup_large"),
        ("res", "base", "gref_umd", "res_single_base"),
        ("res", "large", "mixup_with_refc", "res_mixup_large"),
        ("rec", "tiny", "unc", None),
        ("rec", "base", "synthetic", None),
        ("rec", "base", "mixup_with_refc_referit", None),  # MRefM's pretraining data: no grounding row
        ("mrefm", "base", "mixup_with_refc_referit", None),
        ("rec", "base", None, None),
        ("res", "large", "mixup", "res_mixup_large"),  # official --dataset mixup: the RefC grounding mix
    ],
)
def test_row_choice(task, size, trained_on, row):
    chosen = paper.select_row(task, size, trained_on)
    assert (chosen.name if chosen else None) == row


def test_a_named_row_wins_and_an_unknown_one_lists_the_valid_names():
    assert paper.select_row("rec", "tiny", "synthetic", "res_mixup_base").name == "res_mixup_base"
    with pytest.raises(UserError, match="paper_row='rec_mixup_huge'.*rec_single_base, rec_single_large"):
        paper.select_row("rec", "base", "unc", "rec_mixup_huge")


METRICS = {
    "test/refcoco/val/acc@0.5": 0.9,
    "test/refcoco/testA/acc@0.5": 0.925,
    "test/refcoco/testA/miou": 0.8,  # no published REC mIoU
    "test/unc+/testB/acc@0.5": 0.8,
    "test/refcocog_umd/test/acc@0.5": 0.85,
    "test/referit/test/acc@0.5": 0.7,
    "val/acc@0.5": 0.5,
}


def _cfg(**extra):
    return OmegaConf.create(
        {"task": {"name": "rec"}, "model": {"size": "base"}, "data": {"dataset": "unc"}, **extra}
    )


def test_single_dataset_rows_compare_the_training_dataset_only(tmp_path):
    rows = paper.report(METRICS, _cfg(), tmp_path, console=Console(file=None, record=True))
    assert [(r["dataset"], r["split"]) for r in rows] == [("refcoco", "val"), ("refcoco", "testA")]
    assert rows[1] == {
        "row": "rec_single_base",
        "model": "OneRef-B (BEiT3-B)",
        "table": "REC, single-dataset fine-tuning (Acc@0.5)",
        "dataset": "refcoco",
        "split": "testA",
        "metric": "acc@0.5",
        "published": 90.95,
        "ours": 92.5,
        "difference": pytest.approx(1.55),
    }
    with (tmp_path / paper.CSV_NAME).open() as f:
        written = list(csv.DictReader(f))
    assert [w["split"] for w in written] == ["val", "testA"]
    assert float(written[0]["published"]) == 88.75 and float(written[0]["ours"]) == 90.0


def test_mixup_rows_compare_every_refcoco_split(tmp_path):
    console = Console(record=True, width=200)
    cfg = _cfg(data={"dataset": "mixup_with_refc"})
    rows = paper.report(METRICS, cfg, tmp_path, console=console)
    assert [(r["dataset"], r["split"], r["published"]) for r in rows] == [
        ("refcoco", "val", 91.89),
        ("refcoco", "testA", 94.31),
        ("unc+", "testB", 79.47),
        ("refcocog_umd", "test", 87.32),
    ]
    out = console.export_text()
    assert "OneRef-B† (0.2B)" in out and "94.31" in out and "-1.81" in out
    # the training data of an evaluated checkpoint comes from the checkpoint, not cfg.data
    assert (
        paper.report(METRICS, cfg, tmp_path, train_dataset="unc", console=console)[0]["row"]
        == "rec_single_base"
    )


def test_paper_row_from_the_config(tmp_path):
    rows = paper.report(METRICS, _cfg(paper_row="rec_mixup_large"), tmp_path, console=Console(record=True))
    assert {r["row"] for r in rows} == {"rec_mixup_large"} and len(rows) == 4
    # a named single-dataset row compares whatever dataset was evaluated
    rows = paper.report(
        METRICS,
        _cfg(paper_row="rec_single_large", data={"dataset": "synthetic"}),
        tmp_path,
        console=Console(record=True),
    )
    assert [(r["dataset"], r["published"]) for r in rows][-1] == ("referit", 81.11)
    with pytest.raises(UserError, match="valid names"):
        paper.report(METRICS, _cfg(paper_row="nope"), tmp_path)


def test_nothing_published_writes_nothing(tmp_path):
    assert paper.report(METRICS, _cfg(model={"size": "tiny"}), tmp_path) == []
    assert paper.report({"test/synthetic/test/acc@0.5": 0.5}, _cfg(), tmp_path) == []
    assert not (tmp_path / paper.CSV_NAME).exists()


def test_a_mixup_run_tested_on_its_own_splits_is_told_where_the_numbers_are(tmp_path, caplog):
    metrics = {"test/mixup_with_refc/val/acc@0.5": 0.9, "test/mixup_with_refc/test/acc@0.5": 0.9}
    with caplog.at_level("INFO", logger="oneref.paper"):
        assert paper.report(metrics, _cfg(data={"dataset": "mixup_with_refc"}), tmp_path) == []
    assert "data=refcoco" in caplog.text and "rec_mixup_base" in caplog.text
