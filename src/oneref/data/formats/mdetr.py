"""MDETR fine-tuning annotations (`mdetr_annotations` of the MDETR release):

    <split_root>/finetune_<refcoco|refcoco+|refcocog>_<split>.json   (or <split_root>/mdetr_annotations/...)

COCO files with one image entry per expression: images [{id, file_name, height, width, caption,
tokens_positive_eval, original_id, ...}] and, per image entry, one annotation {image_id, bbox,
segmentation, tokens_positive, original_id, ...} (the referred object). One entry per image entry,
phrase = `caption`. RefCOCOg is the umd split.

Box convention: `bbox` is COCO x, y, w, h in pixels, used as is.
Images: `file_name` (COCO train2014 names).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from oneref.data.formats.common import (
    Entry,
    FormatError,
    RecordError,
    image_id_of,
    read_json,
    size_of,
    unsupported,
    write_json,
)
from oneref.data.records import RefRecord

NAME = "mdetr"
CACHE = True
DATASETS: dict[str, str] = {"refcoco": "refcoco", "refcoco_plus": "refcoco+", "refcocog_umd": "refcocog"}


def _dirs(split_root: Path) -> list[Path]:
    return [Path(split_root), Path(split_root) / "mdetr_annotations"]


def split_path(split_root: Path, dataset: str, split: str) -> Path:
    name = dataset
    if name not in DATASETS:
        raise unsupported(NAME, dataset, DATASETS)
    candidates = [d / f"finetune_{DATASETS[name]}_{split}.json" for d in _dirs(split_root)]
    return next((c for c in candidates if c.is_file()), candidates[0])


def splits(split_root: Path, dataset: str) -> list[str]:
    name = dataset
    if name not in DATASETS:
        return []
    pat = re.compile(rf"finetune_{re.escape(DATASETS[name])}_([A-Za-z]+)\.json$")
    found = {
        m.group(1) for d in _dirs(split_root) if d.is_dir() for p in d.iterdir() if (m := pat.match(p.name))
    }
    return sorted(found)


def files(split_root: Path, dataset: str) -> list[Path]:
    return [split_path(split_root, dataset, s) for s in splits(split_root, dataset)]


def present(split_root: Path, dataset: str) -> bool:
    return bool(splits(split_root, dataset))


def read(split_root: Path, dataset: str, split: str) -> Iterator[Entry | RecordError]:
    path = split_path(split_root, dataset, split)
    if not path.is_file():
        raise FormatError(f"MDETR split file not found: {path}")
    data = read_json(path)
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise FormatError(f"{path}: expected a COCO file with 'images' and 'annotations' (MDETR)")
    by_image = defaultdict(list)
    for a in data["annotations"]:
        by_image[a.get("image_id")].append(a)
    for k, img in enumerate(data["images"]):
        where = f"{path} image id {img.get('id')} (entry {k})"
        anns = by_image.get(img.get("id"), [])
        if len(anns) != 1:
            yield RecordError(f"{where}: {len(anns)} annotations, expected the one referred object")
            continue
        ann = anns[0]
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        yield Entry(
            where,
            str(img.get("file_name", "")),
            "coco",
            tuple(ann.get("bbox") or ()),
            (("caption", img.get("caption", "")),),
            size,
            ann.get("segmentation") or None,
        )


def write(dst_root: Path, dataset: str, by_split: dict[str, list[RefRecord]]) -> list[Path]:
    out = []
    for split, recs in by_split.items():
        path = Path(dst_root) / f"finetune_{DATASETS[dataset]}_{split}.json"
        images, anns = [], []
        for i, r in enumerate(recs, start=1):
            n = len(r.phrase)
            images.append(
                {
                    "id": i,
                    "file_name": r.image_file,
                    **size_of(r),
                    "caption": r.phrase,
                    "original_id": image_id_of(r.image_file),
                    "dataset_name": DATASETS[dataset],
                    "tokens_positive_eval": [[[0, n]]],
                    "tokens_negative": [[0, n]],
                }
            )
            x, y, w, h = r.box_xywh
            anns.append(
                {
                    "id": i,
                    "image_id": i,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "category_id": 1,
                    "tokens_positive": [[0, n]],
                    **({"segmentation": r.segmentation} if r.segmentation else {}),
                }
            )
        write_json(
            path,
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
            },
        )
        out.append(path)
    return out
