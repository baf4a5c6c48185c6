"""Hugging Face parquet folders, as downloaded (e.g. `huggingface-cli download --repo-type dataset
jxu124/refcoco --local-dir <split_root>/refcoco`); read with pyarrow (`pip install 'oneref[formats]'`).

    <split_root>/<refcoco|refcocoplus|refcocog>/**/*.parquet      jxu124/refcoco, refcocoplus, refcocog
    <split_root>/<RefCOCO|RefCOCOplus|RefCOCOg>/**/*.parquet      lmms-lab/RefCOCO, RefCOCOplus, RefCOCOg

Which of the two a folder holds is told by its columns:

- jxu124 (all splits, one row per ref): ref_id, ann_id, image_id, file_name, split (REFER's split
  name: the row's split, whatever the file is called), sentences [{raw, sent, sent_id, tokens}],
  bbox (x1, y1, x2, y2 pixels), raw_anns (the COCO annotation as JSON: bbox x, y, w, h, segmentation),
  raw_image_info (the COCO image as JSON: height, width). One entry per sentence, phrase = `sent`.
  RefCOCOg is the umd split.
- lmms-lab (evaluation only: val, test, testA, testB, from the file names `<split>-NNNNN-of-NNNNN.parquet`
  or the folder of `<split>/NNNN.parquet`;
  train is an error), one row per object: question_id, image (embedded: {bytes, path}), question
  (a prompt), answer [expressions], bbox (x, y, w, h), segmentation (one flat polygon), iscrowd,
  file_name. The images are written once to `<cache_dir>/hf_images/<file_name>` and read from there.

Box convention: jxu124: `raw_anns.bbox`, COCO x, y, w, h, used as is (the `bbox` column, x1y1x2y2,
is checked against it to 0.01 px); lmms-lab: `bbox`, x, y, w, h, used as is.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from oneref.atomic import atomic_write_bytes
from oneref.data.formats.common import (
    Entry,
    FormatError,
    RecordError,
    polygon_or_rle,
    unsupported,
)

NAME = "hf"
CACHE = False  # lmms-lab parquets are gigabytes of images; the columns read are quick
DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("refcoco", "RefCOCO"),
    "refcoco_plus": ("refcocoplus", "RefCOCOplus", "refcoco+"),
    "refcocog_umd": ("refcocog", "RefCOCOg"),
}
JXU_COLUMNS = ("file_name", "split", "sentences", "bbox", "raw_anns")
LMMS_COLUMNS = ("question_id", "image", "answer", "bbox", "segmentation", "file_name")
LMMS_SPLITS = ("val", "test", "testA", "testB")
_FILE_SPLIT = re.compile(r"^([A-Za-z]+)[-_.]")


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise FormatError("reading Hugging Face parquet needs pyarrow: pip install 'oneref[formats]'") from e
    return pq


def folder(split_root: Path, dataset: str) -> Path:
    name = dataset
    if name not in DATASETS:
        raise unsupported(NAME, dataset, DATASETS)
    candidates = [Path(split_root) / n for n in DATASETS[name]]
    return next((c for c in candidates if c.is_dir() and any(c.rglob("*.parquet"))), candidates[0])


def files(split_root: Path, dataset: str) -> list[Path]:
    f = folder(split_root, dataset)
    return sorted(f.rglob("*.parquet")) if f.is_dir() else []


def present(split_root: Path, dataset: str) -> bool:
    return dataset in DATASETS and bool(files(split_root, dataset))


def kind(path: Path) -> str:
    """'jxu124' or 'lmms' from a parquet file's columns; FormatError naming the columns it has."""
    names = _pq().read_schema(path).names
    if all(c in names for c in LMMS_COLUMNS):
        return "lmms"
    if all(c in names for c in JXU_COLUMNS):
        return "jxu124"
    raise FormatError(
        f"{path}: not a known RefCOCO parquet; it has the columns {names}, expected those of jxu124 "
        f"{list(JXU_COLUMNS)} or of lmms-lab {list(LMMS_COLUMNS)}"
    )


def _file_split(path: Path) -> str | None:
    """`val-00000-of-00004.parquet` -> val; the Hub's converted layout `default/val/0000.parquet` -> val."""
    m = _FILE_SPLIT.match(path.name)
    return m.group(1) if m else path.parent.name


def splits(split_root: Path, dataset: str) -> list[str]:
    out: set[str] = set()
    for p in files(split_root, dataset):
        if kind(p) == "lmms":
            out.add(_file_split(p) or "?")
        else:
            out.update(s for s in _pq().read_table(p, columns=["split"]).column("split").to_pylist() if s)
    return sorted(out)


def read(
    split_root: Path, dataset: str, split: str, cache_dir: Path | None = None
) -> Iterator[Entry | RecordError]:
    paths = files(split_root, dataset)
    if not paths:
        raise FormatError(f"no parquet files under {folder(split_root, dataset)}")
    kinds = {p: kind(p) for p in paths}
    if any(k == "lmms" for k in kinds.values()) and split not in LMMS_SPLITS:
        raise FormatError(
            f"{folder(split_root, dataset)} is an lmms-lab evaluation set: it has no {split!r} split "
            f"(only {list(LMMS_SPLITS)}); train from another format (REFER, jxu124, SeqTR, MDETR or OneRef)"
        )
    for p in paths:
        if kinds[p] == "jxu124":
            yield from _read_jxu(p, split)
        elif _file_split(p) == split:
            yield from _read_lmms(p, _image_dir(cache_dir))


def _read_jxu(path: Path, split: str) -> Iterator[Entry | RecordError]:
    pq = _pq()
    names = pq.read_schema(path).names
    cols = [*JXU_COLUMNS, *(c for c in ("ref_id", "raw_image_info") if c in names)]
    for k, row in enumerate(pq.read_table(path, columns=cols).to_pylist()):
        if row["split"] != split:
            continue
        where = f"{path} row {k} ref_id {row.get('ref_id')}"
        try:
            ann = json.loads(row["raw_anns"])
            info = json.loads(row.get("raw_image_info") or "{}")
        except (TypeError, ValueError) as e:
            yield RecordError(f"{where}: raw_anns/raw_image_info is not JSON ({e})")
            continue
        if isinstance(ann, list):  # some revisions store the annotation in a one-element list
            ann = ann[0] if len(ann) == 1 else {}
        xywh = tuple(ann.get("bbox") or ())
        xyxy = row["bbox"] or ()
        if len(xywh) == 4 and len(xyxy) == 4:
            x, y, w, h = xywh
            if max(abs(a - b) for a, b in zip((x, y, x + w, y + h), xyxy)) > 0.01:
                yield RecordError(
                    f"{where}: bbox {list(xyxy)} (x1y1x2y2) disagrees with raw_anns bbox {list(xywh)} (xywh)"
                )
                continue
        size = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
        seg = ann.get("segmentation") or None
        phrases = tuple(
            (f"sent_id {s.get('sent_id')}", s.get("sent", s.get("raw", ""))) for s in row["sentences"] or [{}]
        )
        yield Entry(where, row["file_name"], "coco", xywh, phrases, size, seg)


def _image_dir(cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("ONEREF_CACHE", ".cache"))
    return root.expanduser().resolve() / "hf_images"


def _read_lmms(path: Path, image_dir: Path) -> Iterator[Entry | RecordError]:
    from PIL import Image

    pq = _pq()
    pf = pq.ParquetFile(path)
    k = -1
    for batch in pf.iter_batches(columns=list(LMMS_COLUMNS), batch_size=256):
        for row in batch.to_pylist():
            k += 1
            where = f"{path} row {k} question_id {row.get('question_id')}"
            name = Path(str(row["file_name"] or "")).name
            if not name:
                yield RecordError(f"{where}: no file_name")
                continue
            target = image_dir / name
            img = row["image"] or {}
            data = img.get("bytes") if isinstance(img, dict) else None
            try:
                if not target.is_file():
                    if not data:
                        raise OSError("no embedded image bytes")
                    atomic_write_bytes(target, data)
                with Image.open(io.BytesIO(data) if data else target) as im:
                    w, h = im.size
            except OSError as e:
                yield RecordError(f"{where}: embedded image {name}: {e}")
                continue
            seg = polygon_or_rle(row["segmentation"]) or None
            phrases = tuple((f"answer {j}", a) for j, a in enumerate(row["answer"] or [""]))
            yield Entry(where, str(target), "coco", tuple(row["bbox"] or ()), phrases, (h, w), seg)
