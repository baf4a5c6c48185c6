"""The official split files: where they live, what their records hold, how to read them.

Each split file is a list of tuples. Two layouts of `split_root` are read (`split_file_candidates`):

- released: the authors' annotation download as unpacked, one folder holding
  `single_dataset/{name}/{name}_{split}.pth` and the pretraining mixes
  `mixup_with_refc/mixup/mixup_{split}.pth`, `mixup_with_refc_referit/mixup/mixup_{split}.pth`
  (the official scripts pass `--dataset mixup --split_root .../mixup_with_refc`);
- flat: `{name}/{name}_{split}.pth` for every dataset (the official `--split_root` of the
  single datasets; the synthetic set is written this way).

`{name}` is the official name of the dataset (`OFFICIAL_NAMES`: refcoco is `unc`, refcoco_plus
`unc+`, ...); everywhere else, configs and metric names included, a dataset goes by its own name.

Every record is normalised to a `RefRecord` (official ``datasets/data_loader.py`` ``pull_item``):

| dataset                      | tuple                                              | box on disk |
|------------------------------|----------------------------------------------------|-------------|
| refcoco, refcoco_plus,       | (file, {'height','width'}, box, phrase, polygons)  | xywh        |
| refcocog_google, refcocog_umd|                                                    |             |
| synthetic                    | same as refcoco                                    | xywh        |
| referit                      | (file, mask file name, box, phrase, unused)        | x1y1x2y2    |
| flickr                       | (file, box, phrase)                                | x1y1x2y2    |
| mixup_refc(_referit)         | COCO entries as refcoco; ReferIt/Flickr entries as | xywh        |
|                              | (file, 'referit'/'flickr', box, phrase, any)       |             |

Boxes are truncated to int before xywh -> x1y1x2y2, as the official loader does; the float xywh box is
kept for the box-rectangle mask. Phrases are lowercased.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oneref.errors import UserError

log = logging.getLogger(__name__)

# The one place the official dataset names appear: user-facing name -> the name of its split files
# (official datasets/data_loader.py `--dataset`; the mixes are folders of `--dataset mixup`).
OFFICIAL_NAMES: dict[str, str] = {
    "refcoco": "unc",
    "refcoco_plus": "unc+",
    "refcocog_google": "gref",
    "refcocog_umd": "gref_umd",
    "referit": "referit",
    "flickr": "flickr",
    "mixup_refc": "mixup_with_refc",
    "mixup_refc_referit": "mixup_with_refc_referit",
    "synthetic": "synthetic",
}
DATASETS = tuple(OFFICIAL_NAMES)
COCO_DATASETS = ("refcoco", "refcoco_plus", "refcocog_google", "refcocog_umd")
MIXUP_DATASETS = ("mixup_refc", "mixup_refc_referit")

_TRAIN = ("train", "train_pseudo")
SPLITS: dict[str, tuple[str, ...]] = {
    "refcoco": (*_TRAIN, "val", "trainval", "testA", "testB"),
    "refcoco_plus": (*_TRAIN, "val", "trainval", "testA", "testB"),
    "refcocog_google": (*_TRAIN, "val", "trainval"),
    "refcocog_umd": (*_TRAIN, "val", "trainval", "test"),
    "referit": (*_TRAIN, "val", "trainval", "test"),
    "flickr": (*_TRAIN, "val", "trainval", "test"),
    # The authors' README names the RefCOCOg-derived mixup test file testA; accept both names.
    "mixup_refc": (*_TRAIN, "val", "test", "testA"),
    "mixup_refc_referit": (*_TRAIN, "val", "test", "testA"),
    "synthetic": ("train", "val", "test"),
}
DEFAULT_TEST_SPLITS: dict[str, tuple[str, ...]] = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco_plus": ("val", "testA", "testB"),
    "refcocog_google": ("val",),
    "refcocog_umd": ("val", "test"),
    "referit": ("val", "test"),
    "flickr": ("val", "test"),
    "mixup_refc": ("val", "test"),
    "mixup_refc_referit": ("val", "test"),
    "synthetic": ("val", "test"),
}


def unknown_dataset_message(dataset: Any) -> str:
    """The error for a name that is not in DATASETS; an official name is pointed to ours."""
    ours = {v: k for k, v in OFFICIAL_NAMES.items()}.get(dataset)
    hint = f" ({dataset!r} is the official name of {ours!r}: use {ours})" if ours and ours != dataset else ""
    return f"unknown dataset {dataset!r}{hint}; choose one of {list(DATASETS)}"


def check_dataset(dataset: Any) -> str:
    if dataset not in OFFICIAL_NAMES:
        raise ValueError(unknown_dataset_message(dataset))
    return dataset


# Image folders under data_root, per record source (official datasets/data_loader.py).
IMAGE_DIRS: dict[str, str] = {
    "coco": "other/images/mscoco/images/train2014",
    "referit": "referit/images",
    "flickr": "Flickr30k/flickr30k-images",
    "synthetic": "images",
}

_LAYOUT = """\
Expected layout (docs/data.md), with data_root = {data_root} and split_root = {split_root}:
  <data_root>/other/images/mscoco/images/train2014/COCO_train2014_*.jpg   refcoco(_plus), refcocog_*, mixups
  <data_root>/referit/images/*.jpg                                       referit, mixup_refc_referit
  <data_root>/Flickr30k/flickr30k-images/*.jpg                           flickr
  split files, the released annotations as downloaded (one split_root holding three folders),
  <name> the official name (refcoco: unc, refcoco_plus: unc+, refcocog_google: gref, refcocog_umd: gref_umd):
  <split_root>/single_dataset/<name>/<name>_<split>.pth                   e.g. single_dataset/unc/unc_testA.pth
  <split_root>/mixup_with_refc/mixup/mixup_<split>.pth                    mixup_refc
  <split_root>/mixup_with_refc_referit/mixup/mixup_<split>.pth            mixup_refc_referit
  or flat: <split_root>/<name>/<name>_<split>.pth                         e.g. unc/unc_testA.pth
  synthetic: <data_root>/images/*.jpg, <data_root>/splits/synthetic/synthetic_<split>.pth"""


def image_folders(data_root: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """The image folder of each record source: ``IMAGE_DIRS`` under ``data_root``, then the
    folders ``overrides`` (``data.image_dirs``) name instead."""
    dirs = {k: Path(data_root) / v for k, v in IMAGE_DIRS.items()}
    dirs.update({k: Path(str(v)).expanduser() for k, v in (overrides or {}).items()})
    return dirs


def expected_layout(data_root: Any = "?", split_root: Any = "?") -> str:
    return _LAYOUT.format(data_root=data_root, split_root=split_root)


class RecordError(UserError, ValueError):
    """A split-file record that cannot be parsed (a ValueError too: the datasets count it as bad data)."""


@dataclass(frozen=True, slots=True)
class RefRecord:
    image_file: str
    source: str  # key of IMAGE_DIRS
    box: tuple[int, int, int, int]  # x1y1x2y2 after the official int truncation: the ground truth
    box_xywh: tuple[float, float, float, float]  # float, for the box-rectangle mask
    phrase: str  # lowercased
    size: tuple[int, int] | None  # (h, w) from the COCO size dict
    segmentation: Any = None  # COCO polygons / RLE (COCO-family and synthetic only)


def _source_of(dataset: str) -> str:
    if dataset in COCO_DATASETS:
        return "coco"
    if dataset in ("referit", "flickr", "synthetic"):
        return dataset
    raise ValueError(unknown_dataset_message(dataset))


def _floats(box: Any, where: str) -> tuple[float, float, float, float]:
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: box {box!r} is not 4 numbers") from e
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise RecordError(f"{where}: box {box!r} is not 4 finite numbers")
    return vals[0], vals[1], vals[2], vals[3]


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


def parse_record(dataset: str, raw: Any, where: str = "") -> RefRecord:
    """Normalise one split-file tuple of `dataset` (see the module table)."""
    where = where or f"{dataset} record"
    if not isinstance(raw, (tuple, list)):
        raise RecordError(f"{where}: expected a tuple, got {type(raw).__name__}")
    n = len(raw)
    if dataset == "flickr":
        if n != 3:
            raise RecordError(f"{where}: flickr records are (file, box, phrase), got {n} fields")
        file, box, phrase = raw
        source, xyxy, size, seg = "flickr", True, None, None
    elif n != 5:
        raise RecordError(f"{where}: {dataset} records have 5 fields, got {n}: {raw!r:.200}")
    elif dataset == "referit":
        file, _, box, phrase, _ = raw
        source, xyxy, size, seg = "referit", True, None, None
    elif dataset in MIXUP_DATASETS:
        file, tag, box, phrase, seg = raw
        xyxy = False  # the mixup conversion script wrote every box as xywh
        if str(file).startswith("COCO"):
            source, size = "coco", _size(tag)
        elif tag in ("referit", "flickr"):
            source, size, seg = str(tag), None, None
        else:
            raise RecordError(
                f"{where}: cannot tell the image folder of {file!r}: not a COCO_* file and the tag is "
                f"{tag!r}, not 'referit' or 'flickr'"
            )
    else:
        file, size_dict, box, phrase, seg = raw
        source, xyxy, size = _source_of(dataset), False, _size(size_dict)
    if not isinstance(file, str) or not file:
        raise RecordError(f"{where}: image file {file!r} is not a file name")
    if not isinstance(phrase, str):
        raise RecordError(f"{where}: phrase {phrase!r} is not a string")
    b = _floats(box, where)
    t = [int(v) for v in b]  # np.array(box, dtype=int): truncation towards zero
    if xyxy:
        ibox = (t[0], t[1], t[2], t[3])
        xywh = (b[0], b[1], b[2] - b[0], b[3] - b[1])
    else:
        ibox = (t[0], t[1], t[0] + t[2], t[1] + t[3])
        xywh = b
    return RefRecord(file, source, ibox, xywh, phrase.lower(), size, seg)


def record_problem(rec: RefRecord) -> str | None:
    """What makes a parsed record unusable (empty phrase, degenerate box), or None."""
    if not rec.phrase.strip():
        return "empty phrase"
    x1, y1, x2, y2 = rec.box
    if x2 <= x1 or y2 <= y1:
        return f"degenerate box x1y1x2y2={list(rec.box)} (after int truncation)"
    return None


RELEASED_SINGLE_DIR = "single_dataset"  # folder of the single datasets in the released annotations
RELEASED_MIXUP_NAME = "mixup"  # official dataset name of both mixes: <mix>/mixup/mixup_<split>.pth


def split_file_candidates(split_root: str | Path, dataset: str, split: str) -> list[Path]:
    """Where a split file may be, in the order tried: the released layout, then the flat one."""
    root = Path(split_root)
    name = OFFICIAL_NAMES[check_dataset(dataset)]
    flat = root / name / f"{name}_{split}.pth"
    if dataset == "synthetic":
        return [flat]
    if dataset in MIXUP_DATASETS:
        mix = RELEASED_MIXUP_NAME
        return [root / name / mix / f"{mix}_{split}.pth", flat]
    return [root / RELEASED_SINGLE_DIR / name / f"{name}_{split}.pth", flat]


def split_file(split_root: str | Path, dataset: str, split: str) -> Path:
    """The first existing candidate (`split_file_candidates`); the first one if none exists."""
    candidates = split_file_candidates(split_root, dataset, split)
    return next((c for c in candidates if c.is_file()), candidates[0])


def dataset_dirs(split_root: str | Path, dataset: str) -> list[Path]:
    """Folders that hold a dataset's split files in either layout."""
    return list(dict.fromkeys(c.parent for c in split_file_candidates(split_root, dataset, "train")))


def missing_split_file_message(split_root: str | Path, dataset: str, split: str) -> str:
    tried = "\n".join(f"  {c}" for c in split_file_candidates(split_root, dataset, split))
    return f"split file not found (dataset {dataset!r}, split {split!r}); tried:\n{tried}"


def split_files(split_root: str | Path, dataset: str, split: str) -> list[Path]:
    """Files making up a split: non-referit `trainval` is train + val (official loader)."""
    check_dataset(dataset)
    if split not in SPLITS[dataset]:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; valid splits: {list(SPLITS[dataset])}")
    return [split_file(split_root, dataset, s) for s in _file_split_names(dataset, split)]


def _file_split_names(dataset: str, split: str) -> list[str]:
    return ["train", "val"] if split == "trainval" and dataset != "referit" else [split]


def load_split_file(path: str | Path) -> list:
    """A split file's list of tuples, read with `weights_only=True` (plain containers only).

    Falls back to full unpickling only for files holding other objects (e.g. numpy arrays), with a
    warning: only do that for files from a trusted source.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning(
            "%s holds objects other than plain Python containers (%s); loading it with full unpickling. "
            "Only do this for split files from a trusted source (the authors' release).",
            path,
            str(e).splitlines()[0][:200],
        )
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RecordError(f"cannot read split file {path}: {e}") from e
    if not isinstance(data, (list, tuple)):
        raise RecordError(f"split file {path} holds a {type(data).__name__}, expected a list of tuples")
    return list(data)


def check_root(path: str | Path, what: str, data_root: Any = "?", split_root: Any = "?") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {p}\n{expected_layout(data_root, split_root)}")
    return p


def load_records(
    split_root: str | Path,
    dataset: str,
    split: str,
    bad_samples: str = "raise",
    data_root: Any = "?",
    *,
    format: str = "auto",
    cache_dir: str | Path | None = None,
) -> tuple[list[RefRecord], list[str]]:
    """Parse every record of a split. Returns (records, problems).

    `format` is the annotation format (`oneref.data.formats.FORMATS`; `auto` detects it from the
    files under `split_root`); all but `oneref` are read by `oneref.data.formats.read_records`
    (parsed records cached under `cache_dir`, default $ONEREF_CACHE or .cache).
    Records that cannot be parsed raise (`bad_samples="raise"`) or are dropped and listed in
    `problems` (`"skip"`).
    """
    check_root(split_root, "split root", data_root, split_root)
    from oneref.data import formats  # the readers build on this module

    fmt = formats.resolve(format, split_root, dataset)
    if fmt != "oneref":
        return formats.read_records(fmt, split_root, dataset, split, bad_samples, cache_dir)
    files = split_files(split_root, dataset, split)
    for f, s in zip(files, _file_split_names(dataset, split)):
        if not f.is_file():
            raise FileNotFoundError(
                missing_split_file_message(split_root, dataset, s)
                + "\n"
                + expected_layout(data_root, split_root)
                + "\n  or another annotation format: REFER, Hugging Face parquet, SeqTR, MDETR "
                "(data.format; docs/data.md, Other annotation formats)"
            )
    records: list[RefRecord] = []
    problems: list[str] = []
    for f in files:
        for k, raw in enumerate(load_split_file(f)):
            try:
                records.append(parse_record(dataset, raw, where=f"{f} record {k}"))
            except RecordError as e:
                if bad_samples == "raise":
                    raise
                problems.append(str(e))
    if problems:
        log.warning(
            "%s/%s: skipped %d unparsable records, e.g. %s", dataset, split, len(problems), problems[0]
        )
    return records, problems


class RecordStore(Sequence):
    """Records pickled into one numpy buffer.

    Forked dataloader workers touching millions of Python objects copy their pages (reference
    counts); one flat buffer is shared for free.
    """

    def __init__(self, records: Sequence[Any]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buf = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        # bytes this process pickled in __init__ from parsed records, never read from a file
        return pickle.loads(self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes())

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]
