"""OneRef / TransVG split files (`records.py` reads them: `load_split_file`, `parse_record`); this
module finds them for format detection and writes them (`python -m oneref.data.convert --to oneref`).

Written flat, `<dst>/<official name>/<official name>_<split>.pth`, a list of tuples saved with
`torch.save` as the authors' release (readable by the official `datasets/data_loader.py`):
COCO datasets (file, {'height', 'width'}, [x, y, w, h], phrase, segmentation); referit
(file, '', [x1, y1, x2, y2], phrase, None); flickr (file, [x1, y1, x2, y2], phrase).

Box convention: as the table of `records.py`: x, y, w, h for the COCO datasets, x1, y1, x2, y2 for
ReferIt and Flickr.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oneref.atomic import atomic_write
from oneref.data import records
from oneref.data.records import RefRecord

NAME = "oneref"
CACHE = False  # records.load_records reads these itself


def official_name(dataset: str) -> str:
    return records.OFFICIAL_NAMES[dataset]


def splits(split_root: Path, dataset: str) -> list[str]:
    if dataset not in records.SPLITS:
        return []
    return [s for s in records.SPLITS[dataset] if records.split_file(split_root, dataset, s).is_file()]


def files(split_root: Path, dataset: str) -> list[Path]:
    return [records.split_file(split_root, dataset, s) for s in splits(split_root, dataset)]


def present(split_root: Path, dataset: str) -> bool:
    return bool(splits(split_root, dataset))


def as_tuple(dataset: str, rec: RefRecord) -> tuple:
    x, y, w, h = rec.box_xywh
    if dataset == "flickr":
        return (rec.image_file, [x, y, x + w, y + h], rec.phrase)
    if dataset == "referit":
        return (rec.image_file, "", [x, y, x + w, y + h], rec.phrase, None)
    size = {} if rec.size is None else {"height": rec.size[0], "width": rec.size[1]}
    return (rec.image_file, size, [x, y, w, h], rec.phrase, rec.segmentation)


def write(dst_root: Path, dataset: str, by_split: dict[str, list[RefRecord]]) -> list[Path]:
    name = official_name(dataset)
    out = []
    for split, recs in by_split.items():
        path = Path(dst_root) / name / f"{name}_{split}.pth"
        data = [as_tuple(dataset, r) for r in recs]
        out.append(atomic_write(path, lambda tmp, data=data: torch.save(data, tmp)))
    return out
