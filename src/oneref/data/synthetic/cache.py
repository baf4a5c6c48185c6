"""The on-disk cache: the official RefCOCO layout written once per parameter set, atomically and
under a file lock (see the package docstring)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from oneref.atomic import atomic_folder
from oneref.data.synthetic.config import SPLIT_NAMES, SyntheticConfig
from oneref.data.synthetic.grammar import VOCABULARY, Obj
from oneref.data.synthetic.render import generate_image
from oneref.data.tokenizer import train_sentencepiece

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = "synthetic.json"


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    image_dir: Path = field(init=False)
    split_root: Path = field(init=False)
    tokenizer: Path = field(init=False)
    scenes: Path = field(init=False)
    marker: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_dir", self.root / "images")
        object.__setattr__(self, "split_root", self.root / "splits")
        object.__setattr__(self, "tokenizer", self.root / "synthetic.model")
        object.__setattr__(self, "scenes", self.root / "scenes.json")
        object.__setattr__(self, "marker", self.root / MARKER)

    def split_file(self, split: str) -> Path:
        return self.split_root / "synthetic" / f"synthetic_{split}.pth"


def _marker_content(cfg: SyntheticConfig) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "params": cfg.as_dict()}


def is_complete(root: str | Path, cfg: SyntheticConfig | Mapping[str, Any] | None = None) -> bool:
    paths = SyntheticPaths(Path(root))
    try:
        marker = json.loads(paths.marker.read_text())
    except (OSError, ValueError):
        return False
    want = _marker_content(SyntheticConfig.from_any(cfg))
    return (
        marker.get("generator_version") == want["generator_version"]
        and marker.get("params") == want["params"]
    )


def _write_images(cfg: SyntheticConfig, split: str, start: int, stop: int, image_dir: Path) -> list[tuple]:
    """Generate and write images [start, stop) of a split; returns (file, size, objects, exprs) rows."""
    rows = []
    for n in range(start, stop):
        img, objs, exprs = generate_image(cfg, split, n)
        fname = f"{split}_{n:06d}.{cfg.image_format}"
        buf = io.BytesIO()
        if cfg.image_format == "jpg":
            img.save(buf, "JPEG", quality=95, subsampling=0)
        else:
            img.save(buf, "PNG", compress_level=1)
        (image_dir / fname).write_bytes(buf.getvalue())
        rows.append((fname, (img.height, img.width), [asdict(o) for o in objs], exprs))
    return rows


def _default_workers() -> int:
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def write_dataset(out: str | Path, cfg: SyntheticConfig, workers: int | None = None) -> SyntheticPaths:
    """Generate every split into `out` (no locking, no atomic rename: see `ensure_synthetic`).

    Images are pure functions of (cfg, split, index), so `workers` processes give identical files.
    """
    paths = SyntheticPaths(Path(out))
    paths.image_dir.mkdir(parents=True, exist_ok=True)
    (paths.split_root / "synthetic").mkdir(parents=True, exist_ok=True)
    workers = _default_workers() if workers is None else max(1, int(workers))
    jobs = []
    for split in SPLIT_NAMES:
        n_img = math.ceil(cfg.num_samples(split) / cfg.expressions_per_image)
        step = max(1, math.ceil(n_img / (4 * workers)))
        jobs += [(split, a, min(a + step, n_img)) for a in range(0, n_img, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            futures = [ex.submit(_write_images, cfg, sp, a, b, paths.image_dir) for sp, a, b in jobs]
            results = [f.result() for f in futures]
    else:
        results = [_write_images(cfg, sp, a, b, paths.image_dir) for sp, a, b in jobs]
    scenes: dict[str, list[dict[str, Any]]] = {}
    records: dict[str, list[tuple]] = {sp: [] for sp in SPLIT_NAMES}
    for (split, _, _), rows in zip(jobs, results):
        for fname, (h, w), objs, exprs in rows:
            scenes[fname] = objs
            size = {"height": h, "width": w}
            for t, phrase in exprs:
                o = Obj(**objs[t])
                records[split].append((fname, size, [float(v) for v in o.box], phrase, [o.polygon()]))
    for split in SPLIT_NAMES:
        torch.save(records[split][: cfg.num_samples(split)], paths.split_file(split))
    # Every word once more, so a small train split still covers the vocabulary.
    phrases = [r[3] for r in records["train"][: cfg.num_train]]
    train_sentencepiece(
        [*phrases, " ".join(VOCABULARY)],
        paths.tokenizer,
        vocab_size=cfg.spm_vocab_size,
        model_type=cfg.spm_model_type,
    )
    paths.scenes.write_text(json.dumps(scenes, separators=(",", ":")))
    paths.marker.write_text(json.dumps(_marker_content(cfg), indent=1))
    return paths


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename alone keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_synthetic(
    root: str | Path, cfg: SyntheticConfig | Mapping[str, Any] | None = None, workers: int | None = None
) -> SyntheticPaths:
    """Generate the dataset into `root` unless it is already there with the same parameters."""
    cfg = SyntheticConfig.from_any(cfg).validated()
    root = Path(root).expanduser().absolute()
    paths = SyntheticPaths(root)
    if is_complete(root, cfg):
        return paths
    with _file_lock(root.parent / f".{root.name}.lock"):
        if is_complete(root, cfg):  # another process finished while we waited
            return paths
        if root.exists() and any(root.iterdir()) and not paths.marker.exists():
            raise FileExistsError(
                f"{root} exists, is not empty and is not a synthetic dataset cache (no {MARKER}); "
                "choose another data_root for the synthetic dataset or empty that folder"
            )
        t0 = time.perf_counter()
        log.info("generating the synthetic dataset into %s (%s)", root, cfg.as_dict())
        atomic_folder(root, lambda tmp: write_dataset(tmp, cfg, workers))
        log.info("synthetic dataset ready in %.1f s", time.perf_counter() - t0)
    return paths
