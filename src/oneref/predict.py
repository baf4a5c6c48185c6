"""Run a model on your own images and expressions:

    python -m oneref.predict ckpt_path=CKPT image=photo.jpg "text='the man in red on the left'"
    python -m oneref.predict ckpt_path=CKPT inputs=queries.jsonl     # {"image": ..., "text": ...} per line
    python -m oneref.predict ckpt_path=OneRef_B_refcoco.pth ckpt_format=official model=base \
        tokenizer=beit3.spm image=photo.jpg "text='the dog'"

ckpt_path is one of our .ckpt files, a converted checkpoint folder or an official .pth (as for
``oneref.eval``; an official file is built as the composed ``model`` and ``task`` say). A thin layer
over the Python API (:func:`oneref.load`, :class:`oneref.predictor.Predictor`): images are read by
``oneref.data.images.load_photo`` (EXIF orientation applied, settings under ``photo.``) in
``workers`` threads, boxes and RES masks come back in the pixels of the image as you see it. Writes
``predictions.json`` and, with ``draw=true``, one PNG per query (prediction in red, on the upright
image) to ``output_dir``; prints the boxes and the queries/s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table

from oneref import factory
from oneref.config import config_dir
from oneref.data.images import Photo
from oneref.drawing import draw_sample
from oneref.errors import UserError
from oneref.predictor import Prediction
from oneref.reporting import quiet_third_party

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictInput:
    image: Path
    text: str
    where: str  # "queries.jsonl:3" or "image=": what error messages point at


def read_queries(cfg: DictConfig) -> list[PredictInput]:
    """``image`` + ``text``, or ``inputs``: a JSON-lines file of {"image", "text"} (relative image
    paths are relative to the file). Checked before the checkpoint is loaded: every image exists,
    every expression has words."""
    if cfg.get("inputs"):
        path = Path(str(cfg.inputs)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inputs file not found: {path} (JSON lines: {{'image': ..., 'text': ...}})"
            )
        queries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, text = row["image"], row["text"]
                if not isinstance(image, str) or not isinstance(text, str):
                    raise TypeError("'image' and 'text' must be strings")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'text' ({e})") from e
            image = Path(image).expanduser()
            queries.append(
                PredictInput(image if image.is_absolute() else path.parent / image, text, f"{path}:{n}")
            )
        if not queries:
            raise ValueError(f"{path} holds no queries")
    elif cfg.get("image") is not None and cfg.get("text") is not None:
        queries = [PredictInput(Path(str(cfg.image)).expanduser(), str(cfg.text), "image=")]
    else:
        raise ValueError("give image=PATH and text='...' or inputs=FILE.jsonl")
    for q in queries:
        if not q.text.strip():
            raise ValueError(f"{q.where}: the expression {q.text!r} for {q.image} is empty")
        if not q.image.is_file():
            what = "is a directory, not an image" if q.image.is_dir() else "not found"
            raise FileNotFoundError(f"{q.where}: image {what}: {q.image}")
    return queries


def run(cfg: DictConfig) -> tuple[list[dict[str, Any]], float]:
    """Predict every query of ``cfg``; returns the rows of predictions.json and the seconds taken
    (decoding, model and writing; not loading the checkpoint)."""
    queries = read_queries(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    predictor = factory.load_predictor(cfg)
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = bool(cfg.get("draw", True))
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    stream = predictor.iter_predict(
        [q.image for q in queries], [q.text for q in queries], progress=bool(cfg.get("progress", True))
    )
    # PNG encoding costs more than the tiny model: files are written by threads, a bounded few ahead
    with ThreadPoolExecutor(max(1, predictor.workers), thread_name_prefix="oneref-write") as pool:
        writing: deque[Future] = deque()
        for n, (photo, pred) in enumerate(stream):  # to its end: the bar and the pool close there
            q = queries[n]
            row: dict[str, Any] = {**pred.to_dict(), "image": str(q.image)}
            if pred.mask is not None:
                row["mask_png"] = str(out_dir / f"mask_{n:05d}.png")
            if draw:
                row["drawn"] = str(out_dir / f"pred_{n:05d}.png")
            if pred.mask is not None or draw:
                writing.append(pool.submit(write_outputs, photo if draw else None, pred, row))
            while len(writing) > 2 * max(1, predictor.workers):
                writing.popleft().result()
            rows.append(row)
        for fut in writing:
            fut.result()
    seconds = time.perf_counter() - start
    (out_dir / "predictions.json").write_text(json.dumps(rows, indent=1))
    log.info(
        "%d predictions in %.2f s (%.1f queries/s) written to %s",
        len(rows),
        seconds,
        len(rows) / max(seconds, 1e-9),
        out_dir / "predictions.json",
    )
    return rows, seconds


def write_outputs(photo: Photo | None, pred: Prediction, row: dict[str, Any]) -> None:
    """The mask PNG (RES) and, given the photo, the drawn PNG of one query, as ``row`` names them."""
    if "mask_png" in row:
        Image.fromarray(pred.mask.astype(np.uint8) * 255).save(row["mask_png"])  # 0 / 255
    if photo is not None:
        # the fastest zlib level: half the default's time, a slightly larger file
        Image.fromarray(draw_prediction(photo, pred)).save(row["drawn"], compress_level=1)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    return run(cfg)[0]


def draw_prediction(photo: Photo, pred: Prediction) -> np.ndarray:
    """The prediction in red on the upright image the model saw, with the expression underneath
    (on the downscaled copy when the photo was over ``photo.max_pixels``: its box is scaled down)."""
    sx, sy = photo.scale
    mask = pred.mask
    if mask is not None and photo.downscaled:
        mask = np.asarray(Image.fromarray(mask).resize(photo.image.size, Image.Resampling.NEAREST))
    return draw_sample(
        np.asarray(photo.image),
        pred.text,
        pred_box=None if mask is not None else pred.box_xyxy / np.array([sx, sy, sx, sy], np.float32),
        pred_mask=mask,
    )


MAX_TABLE_ROWS = 20


def print_predictions(rows: list[dict[str, Any]], seconds: float | None = None) -> None:
    table = Table(title="predictions")
    for col in ("image", "text", "box x1,y1,x2,y2"):
        table.add_column(col)
    for r in rows[:MAX_TABLE_ROWS]:
        box = r["box_xyxy"]
        shown = "- (empty mask)" if box is None else ", ".join(f"{v:.1f}" for v in box)
        table.add_row(Path(r["image"]).name, r["text"], shown)
    console = Console()
    console.print(table)
    if len(rows) > MAX_TABLE_ROWS:
        console.print(f"... and {len(rows) - MAX_TABLE_ROWS} more in predictions.json")
    if seconds is not None:
        console.print(
            f"{len(rows)} queries in {seconds:.2f} s: {len(rows) / max(seconds, 1e-9):.1f} queries/s"
        )


def cli(cfg: DictConfig) -> int:
    """The command: predictions printed, or bad input reported in one line (exit status 2)."""
    try:
        print_predictions(*run(cfg))
    except (FileNotFoundError, ValueError, UserError) as e:  # bad input: the message says what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    if code := cli(cfg):
        sys.exit(code)


if __name__ == "__main__":
    main()
