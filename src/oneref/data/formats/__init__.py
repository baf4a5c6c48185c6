"""Annotation formats: one reader per file format, each mapping to the pipeline's `RefRecord`.

`data.format` picks one (`FORMATS`); `auto` takes the first whose files exist under
`data.split_root`, in the order of `READERS`, and logs it. `records.load_records` is the one caller
(`read_records`). docs/data.md, "Other annotation formats", lists where each comes from and its exact schema.

Parsed records (checked, as plain tuples) are cached by content: `<cache_dir>/records/<format>-<dataset>-<split>-<hash>-v<version>.pkl`
(hash of the annotation files' bytes; plain containers, read back with the same safe unpickler),
and kept in memory for the rest of the process.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import time
from pathlib import Path
from types import ModuleType

from oneref.atomic import atomic_write_bytes
from oneref.data.formats import hf, mdetr, oneref, refer, seqtr
from oneref.data.formats.common import Entry, FormatError, SafeUnpickler, to_records
from oneref.data.records import RecordError, RefRecord

log = logging.getLogger(__name__)

READERS: dict[str, ModuleType] = {"oneref": oneref, "refer": refer, "hf": hf, "seqtr": seqtr, "mdetr": mdetr}
FORMATS = ("auto", *READERS)
CACHE_VERSION = 3  # of the cached layout (RefRecord fields, checks); a new one parses again
_MEMO: dict[str, tuple[list, list]] = {}  # parsed records per cache file
_RECORDS: dict[tuple, tuple[list, list]] = {}  # records per split read
_LOGGED: set[tuple] = set()


def forget() -> None:
    """Drop what this process holds in memory (parsed files, entries, records); the disk cache stays."""
    _MEMO.clear()
    _RECORDS.clear()
    refer._LOADED.clear()
    seqtr._LOADED.clear()


def present(name: str, split_root: Path, dataset: str) -> bool:
    try:
        return READERS[name].present(split_root, dataset)
    except FormatError:
        return False


def detect(split_root: str | Path, dataset: str) -> str | None:
    """The first format whose files for `dataset` exist under `split_root`, or None."""
    return next((n for n in READERS if present(n, Path(split_root), dataset)), None)


def resolve(fmt: str, split_root: str | Path, dataset: str) -> str:
    """`fmt` checked; `auto` detected (and logged once); `oneref` when nothing is found, whose
    missing-file error lists the paths tried."""
    if fmt not in FORMATS:
        raise FormatError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    found = detect(split_root, dataset) or "oneref"
    if (str(split_root), dataset) not in _LOGGED:
        _LOGGED.add((str(split_root), dataset))
        log.info(
            "%s annotations under %s: read with the %s reader (data.format=auto)", dataset, split_root, found
        )
    return found


def available_splits(fmt: str, split_root: str | Path, dataset: str) -> list[str]:
    return READERS[fmt].splits(Path(split_root), dataset)


def _cache_path(reader: ModuleType, split_root: Path, dataset: str, split: str, cache_dir: Path) -> Path:
    from oneref.data.anchors import file_sha256  # content hash memoised per path, size and mtime

    h = hashlib.sha256()
    for f in reader.files(split_root, dataset):
        h.update(f.name.encode() + file_sha256(f).encode())
    return (
        cache_dir / "records" / f"{reader.NAME}-{dataset}-{split}-{h.hexdigest()[:16]}-v{CACHE_VERSION}.pkl"
    )


def _read_split(
    reader: ModuleType, split_root: Path, dataset: str, split: str, cache_dir: Path
) -> tuple[list, list]:
    """(records as field tuples, error messages) of one split, from the cache when it has them."""
    if not reader.CACHE:
        return _collect(reader.read(split_root, dataset, split, cache_dir))
    if not all(f.is_file() for f in reader.files(split_root, dataset)):
        return _collect(reader.read(split_root, dataset, split))  # its error names what is missing
    path = _cache_path(reader, split_root, dataset, split, cache_dir)
    key = str(path)
    if key in _MEMO:
        return _MEMO[key]
    if path.is_file():
        try:
            _MEMO[key] = SafeUnpickler(io.BytesIO(path.read_bytes())).load()
            return _MEMO[key]
        except Exception as e:  # a damaged cache is parsed again
            log.warning("ignoring unreadable records cache %s (%s)", path, e)
    t0 = time.perf_counter()
    _MEMO[key] = _collect(reader.read(split_root, dataset, split))
    atomic_write_bytes(path, pickle.dumps(_MEMO[key], protocol=pickle.HIGHEST_PROTOCOL))
    log.info(
        "%s %s/%s: parsed %d records in %.1f s; cached in %s",
        reader.NAME,
        dataset,
        split,
        len(_MEMO[key][0]),
        time.perf_counter() - t0,
        path,
    )
    return _MEMO[key]


def _collect(items) -> tuple[list, list]:
    """(records as field tuples, error messages) of what a reader yields, in order."""
    recs, errors = [], []
    for it in items:
        if isinstance(it, Entry):
            good, bad = to_records(it)
            recs += [astuple(r) for r in good]
            errors += [str(b) for b in bad]
        else:
            errors.append(str(it))
    return recs, errors


def astuple(r: RefRecord) -> tuple:  # shallow, so that pickle keeps one copy of a shared mask
    return (r.image_file, r.source, r.box, r.box_xywh, r.phrase, r.size, r.segmentation)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONEREF_CACHE", ".cache")).expanduser()


def read_records(
    fmt: str,
    split_root: str | Path,
    dataset: str,
    split: str,
    bad_samples: str = "raise",
    cache_dir: str | Path | None = None,
) -> tuple[list[RefRecord], list[str]]:
    """Records of one split in format `fmt` (not `oneref`: records.load_records reads those).
    `trainval` is train + val. Bad records raise a
    RecordError naming file and record, or with `bad_samples="skip"` are listed in `problems`."""
    reader = READERS[fmt]
    root = Path(split_root)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    parts = ["train", "val"] if split == "trainval" else [split]
    stamp = tuple(
        (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in reader.files(root, dataset) if f.is_file()
    )
    key = (fmt, str(root.resolve()), dataset, split, bad_samples, stamp)
    if key in _RECORDS:  # once per process
        return _RECORDS[key]
    records: list[RefRecord] = []
    problems: list[str] = []
    for p in parts:
        recs, errors = _read_split(reader, root, dataset, p, cache)
        if not recs and not errors:  # an empty or a missing split: say which splits there are
            have = reader.splits(root, dataset)
            if p not in have:
                raise FormatError(
                    f"{dataset} in the {fmt} format under {root} has no split {p!r}; it has {have}"
                )
        if errors and bad_samples == "raise":
            raise RecordError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        problems += errors
        records += [RefRecord(*t) for t in recs]
    if problems:
        log.warning(
            "%s/%s (%s): skipped %d bad records, e.g. %s", dataset, split, fmt, len(problems), problems[0]
        )
    if reader.CACHE:
        _RECORDS[key] = (records, problems)
    return records, problems
