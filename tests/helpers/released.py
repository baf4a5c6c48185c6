"""A fake copy of the released data in the official layout, for end-to-end runs of the official
recipes on a CPU: split files of every released dataset (single_dataset/, mixup_with_refc/,
mixup_with_refc_referit/), the image folders they point into, a sentencepiece model at
``beit3.spm``, and tiny weights in the official file formats (BEiT-3, MRefM, OneRef) under
``checkpoints/``.

``write_released_data(root)`` returns ``root``, to pass as ``paths.data_dir``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oneref.data.tokenizer import train_sentencepiece

COCO_DIR = "other/images/mscoco/images/train2014"
REFERIT_DIR = "referit/images"
FLICKR_DIR = "Flickr30k/flickr30k-images"

_WORDS = ("left", "right", "red", "blue", "man", "dog", "car", "top", "the", "small", "big", "green")


def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=85)


def _phrase(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 5))))


def _box(rng: np.random.Generator, w: int, h: int) -> list[float]:
    bw, bh = float(rng.integers(8, w // 2)), float(rng.integers(8, h // 2))
    x, y = float(rng.integers(0, w - int(bw))), float(rng.integers(0, h - int(bh)))
    return [x, y, bw, bh]


def _save(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(records, path)


def write_released_data(
    root: Path, *, per_split: int = 8, images: int = 6, weights: Iterable[tuple[str, str]] = (), seed: int = 0
) -> Path:
    """Write the fake release under ``root``; ``weights`` lists ``(file name, format)`` pairs
    (format beit3 | mrefm | official) written as tiny-model weights in that official layout."""
    rng = np.random.default_rng(seed)
    data = root / "image_data"
    coco = [(f"COCO_train2014_{k:012d}.jpg", 96 + 8 * k, 80 + 4 * k) for k in range(images)]
    referit = [(f"{1000 + k}.jpg", 88, 72) for k in range(images)]
    flickr = [(f"{2000 + k}.jpg", 90, 96) for k in range(images)]
    for k, (name, w, h) in enumerate(coco):
        _jpeg(data / COCO_DIR / name, w, h, k)
    for k, (name, w, h) in enumerate(referit):
        _jpeg(data / REFERIT_DIR / name, w, h, 100 + k)
    for k, (name, w, h) in enumerate(flickr):
        _jpeg(data / FLICKR_DIR / name, w, h, 200 + k)

    def coco_rec() -> tuple:
        name, w, h = coco[int(rng.integers(len(coco)))]
        x, y, bw, bh = _box(rng, w, h)
        poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        return (name, {"height": h, "width": w}, [x, y, bw, bh], _phrase(rng), poly)

    def referit_rec(mixup: bool = False) -> tuple:
        name, w, h = referit[int(rng.integers(len(referit)))]
        x, y, bw, bh = _box(rng, w, h)
        if mixup:  # mixups store ReferIt boxes as xywh with a source tag
            return (name, "referit", [x, y, bw, bh], _phrase(rng), name.replace(".jpg", "_1.mat"))
        return (name, name.replace(".jpg", "_1.mat"), [x, y, x + bw, y + bh], _phrase(rng), None)

    def flickr_rec(mixup: bool = False) -> tuple:
        name, w, h = flickr[int(rng.integers(len(flickr)))]
        x, y, bw, bh = _box(rng, w, h)
        if mixup:
            return (name, "flickr", [x, y, bw, bh], _phrase(rng), "placeholder")
        return (name, [x, y, x + bw, y + bh], _phrase(rng))

    splits = root / "split" / "data"
    single = splits / "single_dataset"
    for ds, names in (
        ("unc", ("train", "val", "testA", "testB")),
        ("unc+", ("train", "val", "testA", "testB")),
        ("gref_umd", ("train", "val", "test")),
    ):
        for split in names:
            _save(single / ds / f"{ds}_{split}.pth", [coco_rec() for _ in range(per_split)])
    for split in ("train", "val", "test"):
        _save(single / "referit" / f"referit_{split}.pth", [referit_rec() for _ in range(per_split)])
        _save(single / "flickr" / f"flickr_{split}.pth", [flickr_rec() for _ in range(per_split)])
    for mix, extra in (("mixup_with_refc", ()), ("mixup_with_refc_referit", ("referit", "flickr"))):
        for split in ("train", "val", "test"):
            recs = [coco_rec() for _ in range(per_split)]
            if "referit" in extra:
                recs += [referit_rec(True) for _ in range(2)] + [flickr_rec(True) for _ in range(2)]
            _save(splits / mix / "mixup" / f"mixup_{split}.pth", recs)

    sentences = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))] * 4
    train_sentencepiece(sentences, root / "beit3.spm", vocab_size=40)
    for name, fmt in weights:
        write_official_weights(root / "checkpoints" / name, fmt)
    return root


def write_official_weights(path: Path, fmt: str, *, seed: int = 0) -> Path:
    """Tiny-model weights in an official file layout: ``official`` (a OneRef grounding
    checkpoint), ``mrefm`` (an MRefM pretraining checkpoint) or ``beit3`` (BEiT-3 pretrained
    weights: the backbone only)."""
    from oneref.checkpoint.converters import to_official

    from .models import tiny_model

    net = tiny_model(seed=seed)
    official, _ = to_official(net.state_dict(), net.cfg)
    if fmt == "beit3":
        official = {"model": {k: v for k, v in official["model"].items() if k.startswith("beit3.")}}
    elif fmt not in ("official", "mrefm"):
        raise ValueError(f"unknown weights format {fmt!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, path)
    return path
