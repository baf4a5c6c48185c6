"""Check a data root and split root: `python -m oneref.data.verify --data-root R --split-root S`.

Reports, per dataset and split, the record count and every problem: unparsable records, empty
phrases, degenerate boxes, missing or unreadable images, sizes that disagree with the image, boxes
outside their image. Exits 1 if anything is wrong (or a required split file is missing), else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from oneref.data import formats
from oneref.data.records import (
    DATASETS,
    DEFAULT_TEST_SPLITS,
    SPLITS,
    RecordError,
    dataset_dirs,
    expected_layout,
    image_folders,
    load_records,
    load_split_file,
    parse_record,
    record_problem,
    split_file,
    split_file_candidates,
)
from oneref.errors import UserError

log = logging.getLogger("oneref.data.verify")

PROBLEMS = (
    "unparsable",
    "empty_phrase",
    "degenerate_box",
    "missing_image",
    "unreadable_image",
    "size_mismatch",
    "box_outside",
)


@dataclass
class SplitReport:
    dataset: str
    split: str
    records: int = 0
    images: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, example: str, max_examples: int) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < max_examples:
            self.examples[kind].append(example)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "records": self.records,
            "images": self.images,
            **self.counts,
            "examples": dict(self.examples),
        }


def _check_image(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """((w, h), None) or (None, 'missing' / 'unreadable: why')."""
    if not path.is_file():
        return None, "missing"
    try:
        with Image.open(path) as im:
            size = im.size
            if decode:
                im.load()
            else:
                im.verify()  # header and structure; a full decode is --decode
        return size, None
    except Exception as e:  # PIL raises many types for bad files
        return None, f"unreadable: {type(e).__name__}: {e}"


def file_splits(dataset: str) -> list[str]:
    """Splits stored in their own file (non-referit trainval is train + val)."""
    return [s for s in SPLITS[dataset] if not (s == "trainval" and dataset != "referit")]


def required_splits(dataset: str) -> list[list[str]]:
    """Groups of alternatives; one file of each group must exist."""
    groups = [["train"], *([s] for s in DEFAULT_TEST_SPLITS[dataset])]
    if dataset.startswith("mixup"):
        groups = [["test", "testA"] if g == ["test"] else g for g in groups]
    return groups


def verify_split(
    data_root: Path,
    split_root: Path,
    dataset: str,
    split: str,
    decode: bool = False,
    workers: int = 8,
    box_tolerance: float = 0.0,
    max_examples: int = 5,
    image_cache: dict[Path, tuple] | None = None,
    fmt: str = "oneref",
) -> SplitReport:
    """Records, sentences, boxes and images of one split; ``fmt`` names the annotation format
    (`oneref.data.formats`; oneref: the split file read record by record, with its raw records in the report)."""
    rep = SplitReport(dataset, split)
    if fmt == "oneref":
        recs = _oneref_records(rep, split_root, dataset, split, max_examples)
    else:
        recs = _format_records(rep, data_root, split_root, dataset, split, fmt, max_examples)
    _check_images(rep, recs, data_root, decode, workers, box_tolerance, max_examples, image_cache)
    return rep


def _add_problem(rep: SplitReport, rec: Any, where: str, shown: str, max_examples: int) -> None:
    """Count a record's problem (`records.record_problem`): an empty phrase, else a bad box."""
    problem = record_problem(rec)
    if problem == "empty phrase":
        rep.add("empty_phrase", f"{where}: {shown}", max_examples)
    elif problem:
        rep.add("degenerate_box", f"{where}: {problem}", max_examples)


def _oneref_records(rep: SplitReport, split_root: Path, dataset: str, split: str, max_examples: int) -> list:
    path = split_file(split_root, dataset, split)
    raws = load_split_file(path)
    rep.records = len(raws)
    recs = []
    for k, raw in enumerate(raws):
        where = f"{path.name} record {k}"
        try:
            rec = parse_record(dataset, raw, where)
        except RecordError as e:
            rep.add("unparsable", str(e), max_examples)
            continue
        _add_problem(rep, rec, where, f"{raw!r:.200}", max_examples)
        recs.append((where, rec))
    return recs


# What a format reader's record error says -> the problem column it counts in.
_KINDS = (
    ("no area", "degenerate_box"),
    ("empty after tokenisation", "empty_phrase"),
    ("outside", "box_outside"),
)


def _format_records(
    rep: SplitReport, data_root: Path, split_root: Path, dataset: str, split: str, fmt: str, max_examples: int
) -> list:
    recs, problems = load_records(split_root, dataset, split, "skip", data_root, format=fmt)
    rep.records = len(recs) + len(problems)
    for msg in problems:
        kind = next((k for key, k in _KINDS if key in msg), "unparsable")
        rep.add(kind, msg, max_examples)
    good = []
    for k, rec in enumerate(recs):
        where = f"{fmt} {split} record {k}"
        _add_problem(rep, rec, where, rec.phrase, max_examples)
        good.append((where, rec))
    return good


def _check_images(
    rep: SplitReport,
    recs: list,
    data_root: Path,
    decode: bool,
    workers: int,
    box_tolerance: float,
    max_examples: int,
    image_cache: dict[Path, tuple] | None,
) -> None:
    roots = image_folders(data_root)
    cache = image_cache if image_cache is not None else {}
    todo = sorted({roots[r.source] / r.image_file for _, r in recs} - set(cache))
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for p, res in zip(todo, ex.map(lambda p: _check_image(p, decode), todo)):
            cache[p] = res
    images = {roots[r.source] / r.image_file for _, r in recs}
    rep.images = len(images)
    for p in sorted(images):
        size, err = cache[p]
        if err == "missing":
            rep.add("missing_image", str(p), max_examples)
        elif err:
            rep.add("unreadable_image", f"{p}: {err}", max_examples)
    tol = box_tolerance
    for where, rec in recs:
        size, err = cache[roots[rec.source] / rec.image_file]
        if size is None:
            continue
        w, h = size
        if rec.size is not None and rec.size != (h, w):
            rep.add(
                "size_mismatch",
                f"{where}: record says {rec.size[1]}x{rec.size[0]}, image is {w}x{h}",
                max_examples,
            )
        x1, y1, x2, y2 = rec.box
        if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
            rep.add("box_outside", f"{where}: box x1y1x2y2={list(rec.box)} in a {w}x{h} image", max_examples)


def verify(
    data_root: str | Path,
    split_root: str | Path,
    datasets: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    decode: bool = False,
    workers: int = 8,
    box_tolerance: float = 0.0,
    max_examples: int = 5,
    fmt: str = "auto",
) -> tuple[list[SplitReport], list[str]]:
    """Check datasets; returns (split reports, general problems such as missing folders or files).
    `fmt` is the annotation format (`oneref.data.formats.FORMATS`); auto detects it per dataset."""
    data_root, split_root = Path(data_root), Path(split_root)
    problems: list[str] = []
    for root, what in ((data_root, "data root"), (split_root, "split root")):
        if not root.is_dir():
            problems.append(f"{what} not found: {root}\n{expected_layout(data_root, split_root)}")
    if problems:
        return [], problems
    if datasets is None:
        datasets = [
            d
            for d in DATASETS
            if any(p.is_dir() for p in dataset_dirs(split_root, d))
            or (formats.detect(split_root, d) if fmt == "auto" else formats.present(fmt, split_root, d))
        ]
        if not datasets:
            problems.append(
                f"no dataset folder under {split_root}; expected e.g. {split_root / 'single_dataset' / 'unc'}, "
                f"{split_root / 'mixup_with_refc' / 'mixup'} or {split_root / 'unc'}"
            )
    reports = []
    image_cache: dict[Path, tuple] = {}  # an image shared by several splits is read once

    def check(ds: str, split: str, fmt: str = "oneref") -> SplitReport:
        return verify_split(
            data_root, split_root, ds, split, decode, workers, box_tolerance, max_examples, image_cache, fmt
        )

    for ds in datasets:
        if ds not in DATASETS:
            problems.append(f"unknown dataset {ds!r}; choose from {list(DATASETS)}")
            continue
        try:
            resolved = formats.resolve(fmt, split_root, ds)
            if resolved != "oneref":
                have = formats.available_splits(resolved, split_root, ds)
                for s in splits if splits is not None else have:
                    reports.append(check(ds, s, fmt=resolved))
                continue
        except UserError as e:
            problems.append(f"{ds}: {e}")
            continue
        if splits is None:
            for group in required_splits(ds):
                if not any(split_file(split_root, ds, s).is_file() for s in group):
                    problems.append(f"{ds}: missing split file {_tried(split_root, ds, group[0])}")
            todo = [s for s in file_splits(ds) if split_file(split_root, ds, s).is_file()]
        else:
            todo = []
            for s in splits:
                if split_file(split_root, ds, s).is_file():
                    todo.append(s)
                elif s in SPLITS[ds]:
                    problems.append(f"{ds}: missing split file {_tried(split_root, ds, s)}")
        for s in todo:
            try:
                reports.append(check(ds, s))
            except RecordError as e:
                problems.append(str(e))
    return reports, problems


def _tried(split_root: Path, dataset: str, split: str) -> str:
    return " or ".join(str(c) for c in split_file_candidates(split_root, dataset, split))


def format_report(reports: Sequence[SplitReport], problems: Sequence[str]) -> str:
    cols = ["dataset", "split", "records", "images", *PROBLEMS]
    rows = [
        [r.dataset, r.split, str(r.records), str(r.images), *(str(r.counts[p]) for p in PROBLEMS)]
        for r in reports
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    for r in reports:
        for kind, ex in r.examples.items():
            lines.append(f"{r.dataset}/{r.split} {kind} ({r.counts[kind]}), e.g.:")
            lines += [f"    {e}" for e in ex]
    lines += [f"PROBLEM: {p}" for p in problems]
    bad = sum(not r.ok for r in reports) + len(problems)
    lines.append("OK: no problems found" if bad == 0 else f"FAILED: {bad} problem group(s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oneref.data.verify",
        description="Check OneRef data: record counts, missing/unreadable images, boxes outside images.",
    )
    p.add_argument(
        "--data-root", required=True, help="folder with other/, referit/, Flickr30k/ (or synthetic images/)"
    )
    p.add_argument(
        "--split-root",
        required=True,
        help="the released annotations (single_dataset/, mixup_with_refc/, mixup_with_refc_referit/) "
        "or a folder with {dataset}/{dataset}_{split}.pth",
    )
    p.add_argument(
        "--datasets", nargs="+", default=None, help=f"default: every folder found of {list(DATASETS)}"
    )
    p.add_argument("--splits", nargs="+", default=None, help="default: every split file of each dataset")
    p.add_argument(
        "--decode", action="store_true", help="fully decode every image (slow; finds truncated files)"
    )
    p.add_argument("--workers", type=int, default=8, help="threads for image checks")
    p.add_argument("--box-tolerance", type=float, default=0.0, help="pixels a box may exceed its image")
    p.add_argument("--max-examples", type=int, default=5)
    p.add_argument(
        "--format", default="auto", choices=formats.FORMATS, help="annotation format (default: detected)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reports, problems = verify(
        args.data_root,
        args.split_root,
        args.datasets,
        args.splits,
        args.decode,
        args.workers,
        args.box_tolerance,
        args.max_examples,
        args.format,
    )
    log.info("%s", format_report(reports, problems))
    if args.json:
        args.json.write_text(
            json.dumps({"splits": [r.as_dict() for r in reports], "problems": problems}, indent=1)
        )
    return 0 if not problems and all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
