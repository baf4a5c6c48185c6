"""One small RefCOCO-style annotation set written by hand in every format the readers take
(REFER, jxu124 and lmms-lab parquet, SeqTR, MDETR, OneRef split files), with its images, so that
tests can check each reader against the same records."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from oneref.data import records
from oneref.data.formats.oneref import official_name

# the Hugging Face parquet needs pyarrow (the `formats` extra); without it those writers are left out
HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None
# the RefCOCO dataset under the name records.py gives it
DATASET = "refcoco"
COCO_DIR = records.IMAGE_DIRS["coco"]
SPLITS = ("train", "val", "testA", "testB")
# image id -> (height, width)
IMAGES = {9: (48, 64), 25: (40, 56), 30: (50, 50)}


def _rle(box: list[float], h: int, w: int) -> dict:
    rle = coco_mask.encode(np.asfortranarray(_box_mask(box, h, w)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _box_mask(box: list[float], h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    x, y, bw, bh = (int(v) for v in box)
    m[y : y + bh, x : x + bw] = 1
    return m


def _poly(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# annotation id -> (image id, bbox x,y,w,h, segmentation)
ANNS = {
    101: (9, [3.5, 4.25, 20.75, 18.5], _poly(3.5, 4.25, 20.75, 18.5)),
    102: (9, [30.0, 10.0, 25.0, 30.0], _poly(30.0, 10.0, 25.0, 30.0)),
    103: (25, [1.2, 2.7, 30.6, 20.1], _poly(1.2, 2.7, 30.6, 20.1)),
    104: (30, [10.0, 10.0, 30.0, 35.0], _rle([10.0, 10.0, 30.0, 35.0], 50, 50)),
    105: (25, [20.0, 5.0, 30.0, 30.0], _poly(20.0, 5.0, 30.0, 30.0)),
}
# REFER refs: (ref id, ann id, split, sentences)
REFS = [
    (0, 101, "train", ["the left man", "man on left"]),
    (1, 102, "train", ["right person"]),
    (2, 103, "val", ["blue car"]),
    (3, 104, "testA", ["woman in red", "lady"]),
    (4, 105, "testB", ["the dog"]),
]


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def expected_records(split: str) -> list[records.RefRecord]:
    """The records every format must give, computed here by hand (x1y1x2y2 = int truncation of
    x, y, w, h, then x + w, y + h)."""
    out = []
    for _, ann_id, s, sents in REFS:
        if s != split:
            continue
        iid, (x, y, w, h), seg = ANNS[ann_id]
        box = (int(x), int(y), int(x) + int(w), int(y) + int(h))
        for sent in sents:
            out.append(records.RefRecord(file_name(iid), "coco", box, (x, y, w, h), sent, IMAGES[iid], seg))
    return out


def write_images(data_root: Path) -> None:
    for k, (iid, (h, w)) in enumerate(IMAGES.items()):
        path = data_root / COCO_DIR / file_name(iid)
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(k).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, "JPEG", quality=90)


def _coco_instances() -> dict:
    return {
        "images": [
            {"id": i, "file_name": file_name(i), "height": h, "width": w} for i, (h, w) in IMAGES.items()
        ],
        "annotations": [
            {"id": a, "image_id": i, "bbox": b, "segmentation": s, "category_id": 1, "iscrowd": 0}
            for a, (i, b, s) in ANNS.items()
        ],
        "categories": [{"id": 1, "name": "person"}],
    }


def write_refer(root: Path) -> None:
    refs = []
    sent_id = 0
    for ref_id, ann_id, split, sents in REFS:
        ss = []
        for s in sents:
            ss.append({"raw": s.capitalize(), "sent": s, "tokens": s.split(), "sent_id": sent_id})
            sent_id += 1
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": ANNS[ann_id][0],
                "split": split,
                "sentences": ss,
                "sent_ids": [x["sent_id"] for x in ss],
                "category_id": 1,
                "file_name": file_name(ANNS[ann_id][0])[:-4] + f"_{ann_id}.jpg",
            }
        )
    d = root / "refcoco"
    d.mkdir(parents=True, exist_ok=True)
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (d / "instances.json").write_text(json.dumps(_coco_instances()))


def write_jxu124(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {s: [] for s in SPLITS}
    sent_id = 0
    for ref_id, ann_id, split, sents in REFS:
        iid, (x, y, w, h), seg = ANNS[ann_id]
        ss = []
        for s in sents:
            ss.append({"raw": s.capitalize(), "sent": s, "sent_id": sent_id, "tokens": s.split()})
            sent_id += 1
        ann = {"id": ann_id, "image_id": iid, "bbox": [x, y, w, h], "segmentation": seg, "category_id": 1}
        ih, iw = IMAGES[iid]
        rows[split].append(
            {
                "sent_ids": [q["sent_id"] for q in ss],
                "file_name": file_name(iid),
                "ann_id": ann_id,
                "ref_id": ref_id,
                "image_id": iid,
                "split": split,
                "sentences": ss,
                "category_id": 1,
                "raw_anns": json.dumps(ann),
                "raw_image_info": json.dumps({"id": iid, "height": ih, "width": iw}),
                "raw_sentences": json.dumps(ss),
                "image_path": "coco/train2014/" + file_name(iid),
                "bbox": [x, y, x + w, y + h],
                "captions": sents,
                "global_image_id": f"coco.{iid}",
            }
        )
    d = root / "refcoco" / "data"
    d.mkdir(parents=True, exist_ok=True)
    # the Hub names the splits train, validation, test (= testA), testB; the rows carry REFER's
    for split, hub in zip(SPLITS, ("train", "validation", "test", "testB")):
        pq.write_table(pa.Table.from_pylist(rows[split]), d / f"{hub}-00000-of-00001-abc.parquet")


def write_lmms(root: Path, data_root: Path) -> None:
    """Evaluation splits only, images embedded (the bytes of the image files under data_root)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "RefCOCO" / "data"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("val", "testA", "testB"):
        rows = []
        for _, ann_id, s, sents in REFS:
            if s != split:
                continue
            iid, box, seg = ANNS[ann_id]
            data = (data_root / COCO_DIR / file_name(iid)).read_bytes()
            flat = seg[0] if isinstance(seg, list) else []
            rows.append(
                {
                    "question_id": str(ann_id),
                    "image": {"bytes": data, "path": None},
                    "question": "Please carefully observe the area ...",
                    "answer": sents,
                    "segmentation": flat,
                    "bbox": box,
                    "iscrowd": 0,
                    "file_name": file_name(iid),
                }
            )
        pq.write_table(pa.Table.from_pylist(rows), d / f"{split}-00000-of-00001.parquet")


def write_seqtr(root: Path) -> None:
    out = {s: [] for s in SPLITS}
    for _, ann_id, split, sents in REFS:
        iid, box, seg = ANNS[ann_id]
        h, w = IMAGES[iid]
        out[split].append(
            {
                "image_id": iid,
                "bbox": box,
                "expressions": sents,
                "mask": seg,
                "category_id": 1,
                "height": h,
                "width": w,
            }
        )
    d = root / "refcoco-unc"
    d.mkdir(parents=True, exist_ok=True)
    (d / "instances.json").write_text(json.dumps(out))


def write_mdetr(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, anns = [], []
        for _, ann_id, s, sents in REFS:
            if s != split:
                continue
            iid, box, seg = ANNS[ann_id]
            h, w = IMAGES[iid]
            for sent in sents:
                k = len(images) + 1
                images.append(
                    {
                        "id": k,
                        "file_name": file_name(iid),
                        "height": h,
                        "width": w,
                        "caption": sent,
                        "original_id": iid,
                        "dataset_name": "refcoco",
                        "tokens_positive_eval": [[[0, 3]]],
                    }
                )
                anns.append(
                    {
                        "id": k,
                        "image_id": k,
                        "bbox": box,
                        "segmentation": seg,
                        "original_id": ann_id,
                        "category_id": 1,
                        "iscrowd": 0,
                        "area": box[2] * box[3],
                        "tokens_positive": [[0, 3]],
                    }
                )
        (root / f"finetune_refcoco_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )


def write_oneref(root: Path) -> None:
    name = official_name(DATASET)
    for split in SPLITS:
        recs = [
            (
                r.image_file,
                {"height": r.size[0], "width": r.size[1]},
                list(r.box_xywh),
                r.phrase,
                r.segmentation,
            )
            for r in expected_records(split)
        ]
        path = root / name / f"{name}_{split}.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(recs, path)


WRITERS = {
    "oneref": write_oneref,
    "refer": write_refer,
    **({"hf": write_jxu124} if HAVE_PYARROW else {}),
    "seqtr": write_seqtr,
    "mdetr": write_mdetr,
}


def write_all(base: Path) -> dict[str, Path]:
    """Images under base/data and one split root per format, base/<format>; returns the roots
    (key 'data' for the images, 'lmms' for the lmms-lab evaluation parquet, with pyarrow)."""
    data = base / "data"
    write_images(data)
    roots = {"data": data}
    for fmt, write in WRITERS.items():
        roots[fmt] = base / fmt
        write(roots[fmt])
    if HAVE_PYARROW:
        roots["lmms"] = base / "lmms"
        write_lmms(roots["lmms"], data)
    return roots
