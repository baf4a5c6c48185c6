"""Embedded synthetic referring-expression dataset, generated deterministically on first use.

Images hold a few coloured shapes (circle, square, triangle, diamond; small or big) on a light,
slightly noisy background. Every expression picks out exactly one object and needs some of colour,
shape, size, absolute position or a relation to another object, e.g.

    "the small red circle", "the blue shape on the left", "the square left of the green triangle"

Each expression is a structured query that `resolve` evaluates against the scene; a query is kept
only if it matches the target alone and no other object is a borderline case. The data is written
in the official RefCOCO layout, so the same loader reads it:

    {root}/images/{split}_{n:06d}.jpg
    {root}/splits/synthetic/synthetic_{train,val,test}.pth   (file, {'height','width'}, xywh, phrase, polygons)
    {root}/synthetic.model                                    (sentencepiece, XLM-R ids via Tokenizer)
    {root}/scenes.json                                        (every object of every image, for checks)
    {root}/synthetic.json                                     (generator parameters: the cache marker)

Generation writes into a temporary sibling folder and renames it into place (atomic), under a file
lock, so concurrent processes neither collide nor see half a dataset; changed parameters regenerate.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from oneref.config import options_from
from oneref.data.tokenizer import train_sentencepiece

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLIT_NAMES = ("train", "val", "test")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
KINDS = ("circle", "square", "triangle", "diamond")
SIZE_WORDS = ("small", "big")
SIDES = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = ("the", "shape", "on", "at", "of", "above", "below", *SIDES, *COLOURS, *KINDS, *SIZE_WORDS)


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters (all of them go into the cache marker)."""

    seed: int = 0
    canvas_min: int = 64  # canvas width and height are drawn independently in [min, max]
    canvas_max: int = 96
    min_objects: int = 2
    max_objects: int = 5
    # Object side as a fraction of the canvas long side, which the letterbox maps to img_size, so
    # "small" and "big" keep their pixel sizes after the evaluation resize.
    small_size: tuple[float, float] = (0.17, 0.23)
    big_size: tuple[float, float] = (0.30, 0.38)
    num_train: int = 20000  # expressions (samples) per split
    num_val: int = 1000
    num_test: int = 1000
    expressions_per_image: int = 2
    background_noise: float = 3.0  # std of the Gaussian pixel noise
    image_format: str = "jpg"  # "jpg" (quality 95, 4:4:4) or "png"
    spm_vocab_size: int = 64  # upper bound; the vocabulary has about 25 words
    spm_model_type: str = "word"  # every word one piece; "unigram"/"bpe" give sub-words

    @classmethod
    def from_any(cls, value: SyntheticConfig | Mapping[str, Any] | None) -> SyntheticConfig:
        return options_from(cls, value, "synthetic").validated()

    def validated(self) -> SyntheticConfig:
        if not 16 <= self.canvas_min <= self.canvas_max:
            raise ValueError(f"need 16 <= canvas_min <= canvas_max, got {self.canvas_min}, {self.canvas_max}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0 < self.small_size[0] <= self.small_size[1] < self.big_size[0] <= self.big_size[1] < 1:
            raise ValueError(
                f"need 0 < small_size <= ... < big_size < 1 (fractions, small and big separated), "
                f"got {self.small_size}, {self.big_size}"
            )
        if self.expressions_per_image < 1 or min(self.num_train, self.num_val, self.num_test) < 1:
            raise ValueError("expressions_per_image and num_train/num_val/num_test must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be jpg or png, got {self.image_format!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def num_samples(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


# --- scenes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    size: str
    x: int
    y: int
    s: int  # side of the (square) bounding box

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.s, self.s

    @property
    def cx(self) -> float:
        return self.x + self.s / 2

    @property
    def cy(self) -> float:
        return self.y + self.s / 2

    def polygon(self) -> list[float]:
        """Flat x,y list (COCO polygon) of the drawn shape."""
        x, y, s = self.x, self.y, self.s
        if self.kind == "square":
            pts = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
        elif self.kind == "diamond":
            pts = [(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)]
        elif self.kind == "triangle":
            pts = [(x + s / 2, y), (x + s, y + s), (x, y + s)]
        else:
            r = s / 2
            pts = [
                (x + r + r * math.cos(a), y + r + r * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)
            ]
        return [round(float(v), 2) for p in pts for v in p]


@dataclass(frozen=True)
class Desc:
    """Attribute description; None = not mentioned."""

    size: str | None = None
    colour: str | None = None
    kind: str | None = None

    def matches(self, o: Obj) -> bool:
        return (
            (self.size is None or o.size == self.size)
            and (self.colour is None or o.colour == self.colour)
            and (self.kind is None or o.kind == self.kind)
        )

    def text(self) -> str:
        words = [w for w in (self.size, self.colour) if w] + [self.kind or "shape"]
        return "the " + " ".join(words)

    @property
    def n_attributes(self) -> int:
        return sum(v is not None for v in (self.size, self.colour, self.kind))


@dataclass(frozen=True)
class Query:
    desc: Desc
    side: str | None = None  # absolute position among the objects matching desc
    relation: str | None = None  # relation to the (unique) object matching ref
    ref: Desc | None = None

    def text(self) -> str:
        t = self.desc.text()
        if self.side in ("left", "right"):
            return f"{t} on the {self.side}"
        if self.side:
            return f"{t} at the {self.side}"
        if self.relation:
            return f"{t} {self.relation} {self.ref.text()}"
        return t


def _rel_state(rel: str, a: Obj, r: Obj) -> bool | None:
    """True when `a rel r` clearly holds, False when it clearly does not, None when borderline."""
    tol = 0.25 * min(a.s, r.s)
    if rel == "left of":
        yes, no = a.x + a.s <= r.x + tol, a.cx >= r.cx
    elif rel == "right of":
        yes, no = a.x >= r.x + r.s - tol, a.cx <= r.cx
    elif rel == "above":
        yes, no = a.y + a.s <= r.y + tol, a.cy >= r.cy
    else:
        yes, no = a.y >= r.y + r.s - tol, a.cy <= r.cy
    return True if yes else (False if no else None)


def _clearly_extreme(side: str, t: Obj, o: Obj) -> bool:
    m = 0.5 * max(t.s, o.s)
    if side == "left":
        return t.cx + m <= o.cx
    if side == "right":
        return t.cx >= o.cx + m
    if side == "top":
        return t.cy + m <= o.cy
    return t.cy >= o.cy + m


def resolve(q: Query, objs: Sequence[Obj]) -> list[int] | None:
    """Indices of the objects the query denotes; None when it is ambiguous or borderline."""
    cand = [i for i, o in enumerate(objs) if q.desc.matches(o)]
    if q.side:
        if len(cand) < 2:
            return None  # "on the left" needs something to be left of
        best = [i for i in cand if all(_clearly_extreme(q.side, objs[i], objs[j]) for j in cand if j != i)]
        return best if len(best) == 1 else None
    if q.relation:
        refs = [j for j, o in enumerate(objs) if q.ref.matches(o)]
        if len(refs) != 1:
            return None
        r = refs[0]
        out = []
        for i in cand:
            if i == r:
                continue
            st = _rel_state(q.relation, objs[i], objs[r])
            if st is None:
                return None
            if st:
                out.append(i)
        return out
    return cand


def _own_descs(o: Obj) -> list[Desc]:
    """The 7 descriptions that match o (every non-empty subset of its attributes)."""
    return [
        Desc(size, colour, kind)
        for size in (None, o.size)
        for colour in (None, o.colour)
        for kind in (None, o.kind)
        if (size, colour, kind) != (None, None, None)
    ]


def _descs_of(o: Obj, objs: Sequence[Obj]) -> list[Desc]:
    """Descriptions of o usable in an expression.

    A size word is used only with a contrast in the scene: "the small circle" needs a big circle.
    """
    out = []
    for d in _own_descs(o):
        if d.size is not None:
            plain = Desc(None, d.colour, d.kind)
            if not any(plain.matches(p) and p.size != d.size for p in objs):
                continue
        out.append(d)
    return out


class _Scene:
    """Per-scene caches: which objects each description matches, pairwise relation states."""

    def __init__(self, objs: Sequence[Obj]) -> None:
        self.objs = objs
        self.match: dict[Desc, list[int]] = {}
        for i, o in enumerate(objs):
            for d in _own_descs(o):
                self.match.setdefault(d, []).append(i)
        self.rel = {rel: [[_rel_state(rel, a, r) for r in objs] for a in objs] for rel in RELATIONS}
        self._usable = [_descs_of(o, objs) for o in objs]

    def usable(self, i: int) -> list[Desc]:
        return self._usable[i]

    def unique(self, i: int) -> list[Desc]:
        return [d for d in self._usable[i] if len(self.match[d]) == 1]


def _candidates(kind: str, t: int, sc: _Scene) -> list[tuple[Query, bool]]:
    """Unambiguous queries of one type for target t, each with whether its location part is needed."""
    objs = sc.objs
    if kind == "attr":
        return [(Query(d), True) for d in sc.unique(t)]
    if kind == "side":
        out = []
        for d in sc.usable(t):
            others = [j for j in sc.match[d] if j != t]
            if not others:
                continue
            for side in SIDES:
                if all(_clearly_extreme(side, objs[t], objs[j]) for j in others):
                    out.append((Query(d, side=side), True))
        return out
    out = []
    for r in range(len(objs)):
        refs = sc.unique(r) if r != t else []
        if not refs:
            continue
        for rel in RELATIONS:
            states = sc.rel[rel]
            if states[t][r] is not True:
                continue
            for d in sc.usable(t):
                if all(states[j][r] is False for j in sc.match[d] if j not in (t, r)):
                    out.append((Query(d, relation=rel, ref=refs[0]), len(sc.match[d]) > 1, r))
    return out


# Weights of the expression types; relations and positions are what the model must learn to read.
_TYPES = ("attr", "side", "rel")
_TYPE_WEIGHTS = np.array([0.35, 0.25, 0.40])


def choose_query(
    t: int, objs: Sequence[Obj], rng: np.random.Generator, scene: _Scene | None = None
) -> Query | None:
    """A random unambiguous query for target t (checked with `resolve`), or None."""
    sc = scene or _Scene(objs)
    # Weighted order without replacement (Efraimidis-Spirakis keys).
    for k in np.argsort(-(rng.random(len(_TYPES)) ** (1.0 / _TYPE_WEIGHTS))):
        kind = _TYPES[k]
        pool = _candidates(kind, t, sc)
        if not pool:
            continue
        if kind == "rel":
            needed = [c for c in pool if c[1]]
            if needed and rng.random() < 0.8:
                pool = needed  # prefer relations that are necessary, not decorative
            q, _, r = pool[rng.integers(len(pool))]
            refs = sc.unique(r)
            q = Query(q.desc, relation=q.relation, ref=refs[rng.integers(len(refs))])
        else:
            if kind == "attr" and rng.random() < 0.5:
                fewest = min(q.desc.n_attributes for q, _ in pool)
                pool = [c for c in pool if c[0].desc.n_attributes == fewest]
            q = pool[rng.integers(len(pool))][0]
        if resolve(q, objs) != [t]:  # the generator's promise, checked by the reference resolver
            raise AssertionError(
                f"generated an ambiguous expression {q.text()!r} for {objs[t]} in {list(objs)}"
            )
        return q
    return None


_PHRASE_RE = re.compile(
    r"^(?P<d>the(?: \w+)*?) (?:(?:on|at) the (?P<side>left|right|top|bottom)|(?P<rel>left of|right of|above|below) "
    r"(?P<ref>the(?: \w+)+))$"
)


def _parse_desc(text: str) -> Desc:
    words = text.split()
    if not words or words[0] != "the":
        raise ValueError(f"not a description: {text!r}")
    size = colour = kind = None
    for wd in words[1:]:
        if wd in SIZE_WORDS:
            size = wd
        elif wd in COLOURS:
            colour = wd
        elif wd in KINDS:
            kind = wd
        elif wd != "shape":
            raise ValueError(f"unknown word {wd!r} in {text!r}")
    return Desc(size, colour, kind)


def parse_phrase(phrase: str) -> Query:
    """Inverse of `Query.text` (used by tests to re-check every generated expression)."""
    m = _PHRASE_RE.match(phrase)
    if m is None:
        return Query(_parse_desc(phrase))
    if m.group("side"):
        return Query(_parse_desc(m.group("d")), side=m.group("side"))
    return Query(_parse_desc(m.group("d")), relation=m.group("rel"), ref=_parse_desc(m.group("ref")))


def _place(cfg: SyntheticConfig, w: int, h: int, rng: np.random.Generator) -> list[Obj]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    long = max(w, h)
    objs: list[Obj] = []
    for _ in range(n):
        size = SIZE_WORDS[int(rng.integers(2))]
        lo, hi = cfg.small_size if size == "small" else cfg.big_size
        s = min(min(w, h) - 3, max(4, int(round(rng.uniform(lo, hi) * long))))
        for _try in range(30):
            x = int(rng.integers(1, w - s))
            y = int(rng.integers(1, h - s))
            # non-overlapping boxes with a 2-pixel gap
            if all(
                x + s + 2 <= o.x or o.x + o.s + 2 <= x or y + s + 2 <= o.y or o.y + o.s + 2 <= y for o in objs
            ):
                kind = KINDS[int(rng.integers(len(KINDS)))]
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                objs.append(Obj(kind, colour, size, x, y, s))
                break
    return objs


def _render(
    cfg: SyntheticConfig, w: int, h: int, objs: Sequence[Obj], rng: np.random.Generator
) -> Image.Image:
    bg = rng.integers(185, 245, size=3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for o in objs:
        base = np.array(COLOURS[o.colour]) + rng.integers(-12, 13, size=3)
        colour = tuple(int(v) for v in np.clip(base, 0, 255))
        p = o.polygon()
        draw.polygon(list(zip(p[0::2], p[1::2])), fill=colour)
    if cfg.background_noise > 0:
        noise = rng.standard_normal(size=(h, w, 3), dtype=np.float32) * np.float32(cfg.background_noise)
        arr = np.asarray(img, dtype=np.float32) + noise
        np.clip(arr + np.float32(0.5), 0, 255, out=arr)
        img = Image.fromarray(arr.astype(np.uint8))
    return img


def generate_image(
    cfg: SyntheticConfig, split: str, n: int
) -> tuple[Image.Image, list[Obj], list[tuple[int, str]]]:
    """Image n of a split: (image, objects, [(target index, phrase)]), a pure function of (cfg, split, n)."""
    rng = np.random.default_rng([cfg.seed, SPLIT_NAMES.index(split), n])
    for _attempt in range(100):
        w = int(rng.integers(cfg.canvas_min, cfg.canvas_max + 1))
        h = int(rng.integers(cfg.canvas_min, cfg.canvas_max + 1))
        objs = _place(cfg, w, h, rng)
        if len(objs) < cfg.min_objects:
            continue
        exprs: list[tuple[int, str]] = []
        order = list(rng.permutation(len(objs)))
        # distinct targets first; a target repeats only when there are fewer objects than expressions
        targets = (order * math.ceil(cfg.expressions_per_image / len(objs)))[
            : max(len(objs), cfg.expressions_per_image)
        ]
        seen: set[str] = set()
        scene = _Scene(objs)
        for t in targets:
            if len(exprs) == cfg.expressions_per_image:
                break
            q = choose_query(int(t), objs, rng, scene)
            if q is None or q.text() in seen:
                continue
            seen.add(q.text())
            exprs.append((int(t), q.text()))
        if len(exprs) == cfg.expressions_per_image:
            return _render(cfg, w, h, objs, rng), objs, exprs
    raise RuntimeError(
        f"synthetic generator found no scene for {split} image {n} in 100 attempts; relax the parameters"
    )


# --- writing ----------------------------------------------------------------------------------------


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
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_dataset(tmp, cfg, workers)
            if root.exists():
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("synthetic dataset ready in %.1f s", time.perf_counter() - t0)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the synthetic dataset into ROOT (nothing to do if it is there with these parameters)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m oneref.data.synthetic", description=main.__doc__)
    p.add_argument("root", help="cache folder, e.g. .cache/synthetic")
    p.add_argument("--workers", type=int, default=None, help="generator processes (default: up to 4)")
    for f in fields(SyntheticConfig):
        if isinstance(f.default, tuple):
            p.add_argument(f"--{f.name}", type=float, nargs=2, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    args = vars(p.parse_args(argv))
    root = args.pop("root")
    workers = args.pop("workers")
    cfg = SyntheticConfig.from_any({k: v for k, v in args.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = ensure_synthetic(root, cfg, workers)
    for split in SPLIT_NAMES:
        log.info("%s: %d samples in %s", split, cfg.num_samples(split), paths.split_file(split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
