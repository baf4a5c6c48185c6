"""Scenes to pixels: object placement, drawing, and image n of a split as a pure function of
(parameters, split, n)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from oneref.data.synthetic.config import SPLIT_NAMES, SyntheticConfig
from oneref.data.synthetic.grammar import COLOURS, KINDS, SIZE_WORDS, Obj, Scene, choose_query


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
        scene = Scene(objs)
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
