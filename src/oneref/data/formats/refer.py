"""REFER toolkit files (github.com/lichengunc/refer, `refer.py`), as the annotation zips unpack:

    <split_root>/<refcoco|refcoco+|refcocog|refclef>/refs(<unc|google|umd|berkeley>).p
    <split_root>/<...>/instances.json

`refs(*).p` is a Python 2 pickle: a list of refs {ref_id, ann_id, image_id, split, category_id,
sentences: [{raw, sent, tokens, sent_id}], ...}; it is read with `common.SafeUnpickler` (no class,
no code). `instances.json` is COCO: {images: [{id, file_name, height, width}], annotations: [{id,
image_id, bbox, segmentation}], categories}. One entry per sentence, phrase = `sent` (REFER's
lowercased, tokenised text).

Box convention: the annotation's `bbox`, COCO x, y, w, h in pixels, used as is.
Images: `file_name` of the image entry (COCO train2014 names for refcoco/+/g; refclef is ReferItGame
on SAIAPR TC-12, its file read by base name from the ReferIt image folder).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

from oneref.atomic import atomic_write_bytes
from oneref.data.formats.common import (
    Entry,
    FormatError,
    RecordError,
    group_objects,
    image_id_of,
    read_json,
    safe_load_pickle,
    size_of,
    unsupported,
    write_json,
)
from oneref.data.records import RefRecord

NAME = "refer"
CACHE = True
# dataset -> (REFER dataset folder, splitBy)
DATASETS: dict[str, tuple[str, str]] = {
    "refcoco": ("refcoco", "unc"),
    "refcoco_plus": ("refcoco+", "unc"),
    "refcocog_google": ("refcocog", "google"),
    "refcocog_umd": ("refcocog", "umd"),
    "referit": ("refclef", "berkeley"),
}

_LOADED: dict[tuple, tuple[list, dict, dict]] = {}  # once per process, per file version


def files(split_root: Path, dataset: str) -> list[Path]:
    name = dataset
    if name not in DATASETS:
        raise unsupported(NAME, dataset, DATASETS)
    folder, split_by = DATASETS[name]
    root = Path(split_root) / folder
    return [root / f"refs({split_by}).p", root / "instances.json"]


def present(split_root: Path, dataset: str) -> bool:
    return dataset in DATASETS and files(split_root, dataset)[0].is_file()


def _load(split_root: Path, dataset: str) -> tuple[list, dict, dict]:
    refs_path, inst_path = files(split_root, dataset)
    if not refs_path.is_file():
        raise FormatError(f"REFER refs file not found: {refs_path}")
    if not inst_path.is_file():
        raise FormatError(
            f"{refs_path} has no instances.json beside it ({inst_path}): the boxes and masks are in "
            "that file; unpack the whole annotation zip of the dataset"
        )
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (refs_path, inst_path))
    if key not in _LOADED:
        refs = safe_load_pickle(refs_path)
        inst = read_json(inst_path)
        if not isinstance(refs, list):
            raise FormatError(f"{refs_path}: holds a {type(refs).__name__}, expected a list of refs")
        if not isinstance(inst, dict) or not {"images", "annotations"} <= set(inst):
            raise FormatError(f"{inst_path}: expected a COCO file with 'images' and 'annotations'")
        anns = {a["id"]: a for a in inst["annotations"]}
        imgs = {i["id"]: i for i in inst["images"]}
        _LOADED.clear()  # keep one dataset's files in memory
        _LOADED[key] = (refs, anns, imgs)
    return _LOADED[key]


def splits(split_root: Path, dataset: str) -> list[str]:
    refs, _, _ = _load(split_root, dataset)
    return sorted({r.get("split") for r in refs if isinstance(r, dict) and r.get("split")})


def read(split_root: Path, dataset: str, split: str) -> Iterator[Entry | RecordError]:
    refs, anns, imgs = _load(split_root, dataset)
    refs_path, inst_path = files(split_root, dataset)
    source = "referit" if dataset == "referit" else "coco"
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            yield RecordError(f"{refs_path} ref {k}: a {type(ref).__name__}, expected a dict")
            continue
        if ref.get("split") != split:
            continue
        where = f"{refs_path} ref_id {ref.get('ref_id')}"
        ann = anns.get(ref.get("ann_id"))
        img = imgs.get(ref.get("image_id"))
        if ann is None:
            yield RecordError(f"{where}: ann_id {ref.get('ann_id')!r} is not in {inst_path}")
            continue
        if img is None:
            yield RecordError(f"{where}: image_id {ref.get('image_id')!r} is not in {inst_path}")
            continue
        file = str(img.get("file_name", ""))
        file = Path(file).name if source == "referit" else file
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        seg = ann.get("segmentation") or None
        phrases = tuple(
            (f"sent_id {s.get('sent_id')}", s.get("sent", s.get("raw", "")))
            if isinstance(s, dict)
            else ("sentence", "")
            for s in ref.get("sentences") or [{}]
        )
        yield Entry(where, file, source, tuple(ann.get("bbox") or ()), phrases, size, seg)


def write(dst_root: Path, dataset: str, by_split: dict[str, list[RefRecord]]) -> list[Path]:
    """refs(<splitBy>).p (pickle protocol 2, as the originals) and instances.json."""
    refs_path, inst_path = files(dst_root, dataset)
    images: dict[str, dict] = {}
    annotations: dict[tuple, dict] = {}
    refs, sent_id, used_ids = [], 0, set()
    for split, rec, phrases in group_objects(by_split):
        if rec.image_file not in images:
            iid = image_id_of(rec.image_file)
            iid = iid if iid is not None and iid not in used_ids else -len(images) - 1
            used_ids.add(iid)
            images[rec.image_file] = {"id": iid, "file_name": rec.image_file, **size_of(rec)}
        img = images[rec.image_file]
        akey = (rec.image_file, rec.box_xywh, repr(rec.segmentation))
        if akey not in annotations:
            annotations[akey] = {
                "id": len(annotations) + 1,
                "image_id": img["id"],
                "bbox": list(rec.box_xywh),
                "segmentation": rec.segmentation or [],
                "category_id": 1,
                "iscrowd": 0,
            }
        ann = annotations[akey]
        sents = []
        for p in phrases:
            sents.append({"raw": p, "sent": p, "tokens": p.split(), "sent_id": sent_id})
            sent_id += 1
        refs.append(
            {
                "ref_id": len(refs),
                "ann_id": ann["id"],
                "image_id": img["id"],
                "split": split,
                "category_id": 1,
                "file_name": rec.image_file,
                "sent_ids": [s["sent_id"] for s in sents],
                "sentences": sents,
            }
        )
    atomic_write_bytes(refs_path, pickle.dumps(refs, protocol=2))
    write_json(
        inst_path,
        {
            "images": list(images.values()),
            "annotations": list(annotations.values()),
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        },
    )
    return [refs_path, inst_path]
