"""Annotation formats: one reader per file format, each mapping to the pipeline's `RefRecord`.

`data.format` picks one (`FORMATS`); `auto` takes the first whose files exist under
`data.split_root`, in the order of `READERS`, and logs it. `records.load_records` is the one caller
(`read_records`). docs/data.md, "Other annotation formats", lists where each comes from and its exact schema.

Parsed records (checked, as plain tuples) are cached by content: `<cache_dir>/records/<format>-<dataset>-<split>-<hash>-v<version>.pkl`
(hash of the annotation files' bytes; plain containers, read back with the same safe unpickler),
and their bytes kept in memory for the rest of the process: the annotation files are parsed once
per process (all their splits at once), and not at all once cached.
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
_MEMO: dict[str, bytes] = {}  # the cache file's bytes, per cache file read or written
_LOGGED: set[tuple] = set()


def forget() -> None:
    """Drop what this process holds in memory (parsed files, entries, records); the disk cache stays."""
    _MEMO.clear()
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
    """`fmt` checked; `auto` detected; the reader logged once per folder and dataset; `oneref` when nothing is found, whose
    missing-file error lists the paths tried."""
    if fmt not in FORMATS:
        raise FormatError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    found = fmt if fmt != "auto" else detect(split_root, dataset) or "oneref"
    if (str(split_root), dataset) not in _LOGGED:  # the run log says which reader ran, once
        _LOGGED.add((str(split_root), dataset))
        log.info(
            "%s annotations under %s: read with the %s reader (data.format=%s)",
            dataset,
            split_root,
            found,
            fmt,
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
    if key not in _MEMO and path.is_file():
        _MEMO[key] = path.read_bytes()
    if key in _MEMO:
        try:
            return SafeUnpickler(io.BytesIO(_MEMO[key])).load()
        except Exception as e:  # a damaged cache is parsed again
            log.warning("ignoring unreadable records cache %s (%s)", path, e)
    _parse_all(reader, split_root, dataset, cache_dir)
    return SafeUnpickler(io.BytesIO(_MEMO[key])).load() if key in _MEMO else ([], [])


def _parse_all(reader: ModuleType, split_root: Path, dataset: str, cache_dir: Path) -> None:
    """Parse the annotation files once, for every split they hold; cache each split and keep its
    bytes (not its objects: forked loader workers would copy their pages) for this process."""
    t0 = time.perf_counter()
    n = 0
    for split in reader.splits(split_root, dataset):
        parsed = _collect(reader.read(split_root, dataset, split))
        n += len(parsed[0])
        blob = pickle.dumps(parsed, protocol=pickle.HIGHEST_PROTOCOL)
        path = _cache_path(reader, split_root, dataset, split, cache_dir)
        atomic_write_bytes(path, blob)
        _MEMO[str(path)] = blob
    for module in READERS.values():  # the parsed files are not needed any more
        module_cache = getattr(module, "_LOADED", None)
        if module_cache is not None:
            module_cache.clear()
    log.info(
        "%s %s: parsed %d records in %.1f s; cached in %s",
        reader.NAME,
        dataset,
        n,
        time.perf_counter() - t0,
        cache_dir / "records",
    )


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
    return records, problems
