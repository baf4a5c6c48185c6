"""SeqTR / SimVG / C3VG annotations: one `instances.json` per dataset,

    <split_root>/<refcoco-unc|refcocoplus-unc|refcocog-umd|refcocog-google|referitgame-berkeley>/instances.json
    (or <split_root>/annotations/<...>/instances.json, SeqTR's data/annotations layout)

holding {split: [{image_id, bbox, expressions: [str], mask, height, width, category_id}]}, one item
per referred object, `mask` COCO polygons or RLE. One entry per expression.

Box convention: `bbox` is COCO x, y, w, h in pixels, used as is.
Images: COCO train2014 names built from `image_id` (`COCO_train2014_%012d.jpg`); ReferIt `<image_id>.jpg`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from oneref.data.formats.common import (
    Entry,
    FormatError,
    RecordError,
    coco_file_name,
    group_objects,
    image_id_of,
    read_json,
    unsupported,
    write_json,
)
from oneref.data.records import RefRecord

NAME = "seqtr"
CACHE = True
DATASETS: dict[str, str] = {
    "refcoco": "refcoco-unc",
    "refcoco_plus": "refcocoplus-unc",
    "refcocog_umd": "refcocog-umd",
    "refcocog_google": "refcocog-google",
    "referit": "referitgame-berkeley",
}
_LOADED: dict[tuple, dict] = {}


def files(split_root: Path, dataset: str) -> list[Path]:
    name = dataset
    if name not in DATASETS:
        raise unsupported(NAME, dataset, DATASETS)
    root = Path(split_root)
    candidates = [
        root / DATASETS[name] / "instances.json",
        root / "annotations" / DATASETS[name] / "instances.json",
    ]
    return [next((c for c in candidates if c.is_file()), candidates[0])]


def present(split_root: Path, dataset: str) -> bool:
    return dataset in DATASETS and files(split_root, dataset)[0].is_file()


def _load(split_root: Path, dataset: str) -> dict:
    (path,) = files(split_root, dataset)
    if not path.is_file():
        raise FormatError(f"SeqTR instances file not found: {path}")
    key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _LOADED:
        data = read_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise FormatError(f"{path}: expected {{split: [objects]}} (SeqTR instances.json)")
        _LOADED.clear()
        _LOADED[key] = data
    return _LOADED[key]


def splits(split_root: Path, dataset: str) -> list[str]:
    return sorted(_load(split_root, dataset))


def read(split_root: Path, dataset: str, split: str) -> Iterator[Entry | RecordError]:
    data = _load(split_root, dataset)
    (path,) = files(split_root, dataset)
    if split not in data:
        raise FormatError(f"{path} has no split {split!r}; it holds {sorted(data)}")
    referit = dataset == "referit"
    for k, item in enumerate(data[split]):
        where = f"{path} {split}[{k}]"
        if not isinstance(item, dict) or "image_id" not in item or "bbox" not in item:
            yield RecordError(f"{where}: expected an object with image_id, bbox, expressions")
            continue
        iid = int(item["image_id"])
        file = f"{iid}.jpg" if referit else coco_file_name(iid)
        size = (int(item["height"]), int(item["width"])) if "height" in item and "width" in item else None
        seg = item.get("mask") or None
        exprs = item.get("expressions") or [""]
        phrases = tuple((f"expression {j}", e) for j, e in enumerate(exprs))
        source = "referit" if referit else "coco"
        yield Entry(where, file, source, tuple(item["bbox"]), phrases, size, seg)


def write(dst_root: Path, dataset: str, by_split: dict[str, list[RefRecord]]) -> list[Path]:
    (path,) = files(dst_root, dataset)
    out: dict[str, list] = {s: [] for s in by_split}
    for split, rec, phrases in group_objects(by_split):
        iid = image_id_of(rec.image_file)
        if iid is None:
            raise FormatError(f"SeqTR names images by id; {rec.image_file!r} has no id in its name")
        item = {"image_id": iid, "bbox": list(rec.box_xywh), "expressions": phrases, "category_id": 1}
        if rec.size is not None:
            item.update(height=rec.size[0], width=rec.size[1])
        if rec.segmentation:
            item["mask"] = rec.segmentation
        out[split].append(item)
    write_json(path, out)
    return [path]
