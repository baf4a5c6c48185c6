"""What every annotation reader shares: the entry a reader yields, its checks, and the record it becomes.

A reader turns one split of one dataset into `Entry`s, one per sentence, each with its box as float
COCO x, y, w, h (whatever the file holds, the reader converts it in one place and says so).
`to_record` makes the pipeline's `RefRecord` from it through `records.parse_record` (the official
int truncation), so a box reads the same whichever format it came from.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

from oneref.atomic import atomic_write_bytes
from oneref.data import records as _records
from oneref.data.records import RecordError, RefRecord, parse_record
from oneref.errors import UserError

# A box may reach this far (pixels) past its image: COCO boxes end exactly on the border, as floats.
BOX_TOLERANCE = 1.0
_WORD = re.compile(r"\w")


class FormatError(UserError):
    """An annotation file that cannot be read as its format (missing partner file, wrong schema,
    a pickle carrying code, a split the source does not have)."""


class Entry(NamedTuple):
    """One referred object and its sentences, as a reader found it."""

    where: str  # file and record, for messages
    image_file: str  # file name under the image folder of `source` (or an absolute path)
    source: str  # key of records.IMAGE_DIRS
    xywh: tuple[float, float, float, float]  # COCO x, y, w, h in pixels
    phrases: tuple[tuple[str, str], ...]  # (label for messages, e.g. "sent_id 7", sentence)
    size: tuple[int, int] | None  # (h, w)
    segmentation: Any  # COCO polygons or RLE, or None


def _box_problem(entry: Entry) -> str | None:
    try:
        x, y, w, h = (float(v) for v in entry.xywh)
    except (TypeError, ValueError):
        return f"box {entry.xywh!r} is not 4 numbers"
    if not w > 0 or not h > 0:
        return f"box x,y,w,h={list(entry.xywh)} has no area"
    if entry.size is not None:
        ih, iw = entry.size
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > iw + t or y + h > ih + t:
            return f"box x,y,w,h={list(entry.xywh)} lies outside its {iw}x{ih} image"
    return None


def to_records(entry: Entry) -> tuple[list[RefRecord], list[RecordError]]:
    """One record per sentence, and a RecordError (a UserError) naming file, record and sentence
    for each sentence that cannot be used: the box is not 4 numbers, has no area or lies outside
    its image, or the sentence has no word."""
    problem = _box_problem(entry)
    if problem:
        return [], [RecordError(f"{entry.where} {label}: {problem}") for label, _ in entry.phrases]
    size = None if entry.size is None else {"height": entry.size[0], "width": entry.size[1]}
    raw = (entry.image_file, size, [float(v) for v in entry.xywh], "", entry.segmentation)
    t = parse_record(_records.COCO_DATASETS[0], raw, entry.where)  # the official box rule, once per object
    out, errors = [], []
    for label, phrase in entry.phrases:
        if not isinstance(phrase, str) or not _WORD.search(phrase):
            errors.append(
                RecordError(f"{entry.where} {label}: sentence {phrase!r} is empty after tokenisation")
            )
        else:  # lowercased, as parse_record does
            out.append(
                RefRecord(
                    t.image_file, entry.source, t.box, t.box_xywh, phrase.lower(), t.size, t.segmentation
                )
            )
    return out, errors


def coco_file_name(image_id: int) -> str:
    """COCO train2014 file name of an image id (RefCOCO/+/g images all come from train2014)."""
    return f"COCO_train2014_{int(image_id):012d}.jpg"


def image_id_of(file_name: str) -> int | None:
    """The image id in a COCO or ReferIt file name (`COCO_train2014_000000000009.jpg`, `25.jpg`)."""
    m = re.search(r"(\d+)\.\w+$", Path(file_name).name)
    return int(m.group(1)) if m else None


def polygon_or_rle(seg: Any) -> Any:
    """Segmentation as stored: a list of flat polygons, one flat polygon, or an RLE dict."""
    if isinstance(seg, (list, tuple)) and seg and not isinstance(seg[0], (list, tuple)):
        return [list(seg)]
    return seg


def unsupported(fmt: str, dataset: str, table: dict) -> FormatError:
    return FormatError(
        f"the {fmt} format has no dataset {dataset!r}; it holds {sorted(table)} (docs/data.md, Other annotation formats)"
    )


class CodeRefused(pickle.UnpicklingError):
    """A pickle names a class or function."""


class SafeUnpickler(pickle.Unpickler):
    """Plain containers, strings, bytes and numbers only: a pickle that names any class or function
    (the way a pickle runs code) is refused by that name, before anything is built or called."""

    def find_class(self, module: str, name: str) -> Any:
        raise CodeRefused(f"refers to {module}.{name}")


def safe_load_pickle(path: Path) -> Any:
    """A pickle of plain data (Python 2 `str` read as UTF-8, else Latin-1), or FormatError."""
    data = path.read_bytes()
    for encoding in ("utf-8", "latin1"):
        try:
            return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except CodeRefused as e:
            raise FormatError(
                f"{path}: refused: the pickle {e}, i.e. it carries code, not plain annotations; "
                "nothing was executed. Use the original file of the annotation release."
            ) from e
        except Exception as e:  # truncated or not a pickle at all
            raise FormatError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    raise FormatError(f"{path}: text that is neither UTF-8 nor Latin-1")


def read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable JSON file ({e})") from e


def write_json(path: Path, content: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(content, separators=(",", ":")).encode())


def size_of(rec: RefRecord) -> dict[str, int]:
    return {} if rec.size is None else {"height": rec.size[0], "width": rec.size[1]}


def group_objects(records_by_split: dict[str, list[RefRecord]]) -> list[tuple[str, RefRecord, list[str]]]:
    """(split, first record, phrases) per referred object and split, in first-seen order: the
    sentences of one object (same image, box and segmentation) are one REFER ref / SeqTR item."""
    groups: dict[tuple, tuple[str, RefRecord, list[str]]] = {}
    for split, recs in records_by_split.items():
        for r in recs:
            key = (split, r.source, r.image_file, r.box_xywh, json.dumps(r.segmentation, sort_keys=True))
            if key not in groups:
                groups[key] = (split, r, [])
            groups[key][2].append(r.phrase)
    return list(groups.values())
