"""Run a model on your own images and expressions:

    python -m oneref.predict ckpt_path=CKPT image=photo.jpg "text='the man in red on the left'"
    python -m oneref.predict ckpt_path=CKPT inputs=queries.jsonl     # {"image": ..., "text": ...} per line
    python -m oneref.predict ckpt_path=OneRef_B_refcoco.pth ckpt_format=official model=base \
        tokenizer=beit3.spm image=photo.jpg "text='the dog'"

ckpt_path is one of our .ckpt files, a converted checkpoint folder or an official .pth (as for
``oneref.eval``). Each image goes through the official evaluation transform; the box (REC) is
mapped back to the image's own pixels, and the mask (RES) is cut out of the letterbox and resized
to the image by the rule of the original-resolution metrics (oneref.tasks.metrics). Writes ``predictions.json`` and, with ``draw=true``, one PNG per query (prediction
in red) to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table

from oneref import factory
from oneref.config import config_dir
from oneref.drawing import draw_sample
from oneref.reporting import quiet_third_party

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    image: Path
    text: str


def read_queries(cfg: DictConfig) -> list[Query]:
    """``image`` + ``text``, or ``inputs``: a JSON-lines file of {"image", "text"} (relative image
    paths are relative to the file)."""
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
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'text' ({e})") from e
            image = Path(image).expanduser()
            queries.append(Query(image if image.is_absolute() else path.parent / image, str(text)))
        if not queries:
            raise ValueError(f"{path} holds no queries")
    elif cfg.get("image") is not None and cfg.get("text") is not None:
        queries = [Query(Path(str(cfg.image)).expanduser(), str(cfg.text))]
    else:
        raise ValueError("give image=PATH and text='...' or inputs=FILE.jsonl")
    for i, q in enumerate(queries):
        if not q.text.strip():
            raise ValueError(f"query {i} ({q.image}): the expression is empty")
        if not q.image.is_file():
            raise FileNotFoundError(f"query {i}: image not found: {q.image}")
    return queries


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    queries = read_queries(cfg)
    predictor = factory.load_predictor(cfg)
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(queries), predictor.batch_size):
        chunk = queries[start : start + predictor.batch_size]
        images = [load_image(q.image) for q in chunk]
        for k, (q, img, pred) in enumerate(
            zip(chunk, images, predictor.predict(images, [q.text for q in chunk]))
        ):
            n = start + k
            row: dict[str, Any] = {
                "image": str(q.image),
                "text": q.text,
                "box_xyxy": [round(float(v), 2) for v in pred.box_xyxy],
            }
            if pred.mask is not None:
                row["mask_area"] = int(pred.mask.sum())
                mask_file = out_dir / f"mask_{n:05d}.png"
                Image.fromarray(pred.mask.astype(np.uint8) * 255).save(mask_file)
                row["mask_png"] = str(mask_file)
            if cfg.get("draw", True):
                tile = draw_sample(
                    np.asarray(img),
                    q.text,
                    pred_box=None if pred.mask is not None else pred.box_xyxy,
                    pred_mask=pred.mask,
                )
                drawn = out_dir / f"pred_{n:05d}.png"
                Image.fromarray(tile).save(drawn)
                row["drawn"] = str(drawn)
            rows.append(row)
    (out_dir / "predictions.json").write_text(json.dumps(rows, indent=1))
    log.info("%d predictions written to %s", len(rows), out_dir / "predictions.json")
    return rows


def print_predictions(rows: list[dict[str, Any]]) -> None:
    table = Table(title="predictions")
    for col in ("image", "text", "box x1,y1,x2,y2"):
        table.add_column(col)
    for r in rows:
        table.add_row(Path(r["image"]).name, r["text"], ", ".join(f"{v:.1f}" for v in r["box_xyxy"]))
    Console().print(table)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    print_predictions(predict(cfg))


if __name__ == "__main__":
    main()
