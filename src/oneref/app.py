"""The demo app: a Gradio page around a :class:`~oneref.predictor.Predictor` (start it with
``python -m oneref.demo``, see docs/demo.md).

Give an image (upload, paste, webcam or an example) and one expression per line; the page shows
the prediction drawn on the image as ``python -m oneref.predict`` draws it, the numbers as the rows
of its ``predictions.json``, and the model's patch-similarity map (``visu_sim``: the cosine of each
image patch with the expression, whose softmax weights pool the features the box is regressed
from) as a heat map over the image. Every query goes through ``Predictor.iter_predict``: the image
is read from the uploaded file by the same ``load_photo`` as the CLI and the Python API.

The examples come from the synthetic test split, chosen when the app starts: some the model gets
right (IoU >= 0.5 with the ground truth box) and some it gets wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from oneref.data.images import ImageError, Photo
from oneref.drawing import draw_sample, enlarge, overlay_heatmap
from oneref.errors import UserError
from oneref.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

MIN_SHOWN_SIDE = 320  # small images (the synthetic ones are 64-96 px) are enlarged to about this side
IOU_RIGHT = 0.5  # Acc@0.5: the usual REC criterion


@dataclass(frozen=True)
class Example:
    image: Path
    text: str
    iou: float

    @property
    def label(self) -> str:
        verdict = "right" if self.iou >= IOU_RIGHT else "wrong"
        return f"{verdict} (IoU {self.iou:.2f}): {self.text}"


def pick_examples(
    predictor: Predictor,
    records: list[tuple],
    image_dir: Path,
    *,
    candidates: int = 32,
    right: int = 3,
    wrong: int = 3,
) -> list[Example]:
    """Up to ``right`` queries the model gets right and ``wrong`` it gets wrong (box IoU with the
    ground truth), among the first ``candidates`` records (file, size, box xywh, phrase, ...)."""
    rows = records[:candidates]
    if not rows:
        return []
    paths = [image_dir / r[0] for r in rows]
    preds = predictor.predict(paths, [r[3] for r in rows])
    gt = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    gt[:, 2:] += gt[:, :2]  # xywh -> xyxy
    ious = [
        0.0 if p.box_xyxy is None else float(box_iou(torch.from_numpy(p.box_xyxy)[None], g[None])[0, 0])
        for p, g in zip(preds, gt)
    ]
    found = [Example(path, r[3], iou) for path, r, iou in zip(paths, rows, ious)]
    good = sorted((e for e in found if e.iou >= IOU_RIGHT), key=lambda e: -e.iou)[:right]
    bad = sorted((e for e in found if e.iou < IOU_RIGHT), key=lambda e: e.iou)[:wrong]
    return good + bad


def read_expressions(text: str | None, max_expressions: int) -> list[str]:
    """One expression per non-empty line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise UserError("type an expression (one per line) that describes the object to find")
    if len(lines) > max_expressions:
        raise UserError(f"{len(lines)} expressions; give at most {max_expressions}, one per line")
    return lines


def truncation_notes(predictor: Predictor, texts: list[str]) -> list[str]:
    """What the model will not read: an expression longer than ``max_query_len - 2`` pieces is cut,
    as ``predict`` and training do (``Tokenizer.encode``)."""
    tok = predictor.tokenizer
    limit = tok.max_query_len - 2
    notes = []
    for i, text in enumerate(texts, 1):
        pieces = tok.tokenize(text)
        if len(pieces) > limit:
            kept = tok.decode(tok.encode(text)[1:-1])
            notes.append(
                f"expression {i} has {len(pieces)} pieces; the model reads at most {limit} "
                f"(max_query_len - 2): truncated to {kept!r}"
            )
    return notes


def zoom_of(photo: Photo) -> int:
    """The integer factor that enlarges a small image to about ``MIN_SHOWN_SIDE`` (1 for others)."""
    return max(1, MIN_SHOWN_SIDE // max(photo.image.size))


def draw(photo: Photo, pred: Prediction) -> np.ndarray:
    """The prediction in red on the upright image the model saw, enlarged (nearest) when small,
    as ``python -m oneref.predict`` draws it: the mask for RES models, else the box."""
    zoom = zoom_of(photo)
    image = enlarge(np.asarray(photo.image)[None], zoom)[0]
    h, w = image.shape[:2]
    if pred.mask is not None:
        mask = np.asarray(Image.fromarray(pred.mask).resize((w, h), Image.Resampling.NEAREST))
        return draw_sample(image, pred.text, pred_mask=mask)
    sx, sy = photo.scale  # the box is in the original pixels; the photo may be downscaled
    box = None if pred.box_xyxy is None else pred.box_xyxy / np.array([sx, sy, sx, sy], np.float32) * zoom
    return draw_sample(image, pred.text, pred_box=box)


def heat_map(photo: Photo, pred: Prediction) -> np.ndarray:
    """The patch-similarity map over the image (enlarged as :func:`draw`)."""
    image = enlarge(np.asarray(photo.image)[None], zoom_of(photo))[0]
    return overlay_heatmap(image, pred.similarity)


def summary_table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    lines = ["| # | expression | box x1, y1, x2, y2 | mask area |", "|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        box = "- (empty mask)" if r["box_xyxy"] is None else ", ".join(f"{v:.2f}" for v in r["box_xyxy"])
        text = r["text"].replace("|", "\\|")
        lines.append(f"| {i} | {text} | {box} | {r.get('mask_area', '-')} |")
    return "\n".join(lines + [""] + [f"> note: {n}" for n in notes])


class Answer(NamedTuple):
    tiles: list[tuple[np.ndarray, str]]  # the prediction drawn, per expression (with its caption)
    heat: list[tuple[np.ndarray, str]]  # the similarity map over the image, per expression
    table: str  # markdown: the boxes, mask areas and notes
    rows: list[dict[str, Any]]  # predictions.json's rows
    notes: list[str]  # truncated expressions


class Demo:
    """The page's one action: ground every expression in the image."""

    def __init__(self, predictor: Predictor, max_expressions: int = 16) -> None:
        self.predictor = predictor
        self.max_expressions = max_expressions

    def run(self, image: str | Path, expressions: str) -> Answer:
        """What the page shows for the image file and the expressions; a :class:`UserError` says
        what is wrong with them."""
        texts = read_expressions(expressions, self.max_expressions)
        path = Path(image)
        notes = truncation_notes(self.predictor, texts)
        try:
            results = list(self.predictor.iter_predict(path, texts, similarity=True))
        except (FileNotFoundError, ImageError, ValueError, TypeError) as e:
            # the upload's temporary folder means nothing to the user: name the file only
            raise UserError(str(e).replace(str(path), path.name)) from e
        tiles, heat, rows = [], [], []
        for photo, pred in results:
            rows.append({**pred.to_dict(), "image": path.name})
            tiles.append((draw(photo, pred), pred.text))
            heat.append((heat_map(photo, pred), pred.text))
        return Answer(tiles, heat, summary_table(rows, notes), rows, notes)

    # -- the page's callback: UserErrors become a message in the page -----------------------------
    def answer(self, image: Any, expressions: str) -> tuple:
        path = _upload_path(image)
        if path is None:
            raise gr.Error("give an image: upload, paste or take one, or pick an example")
        try:
            answer = self.run(path, expressions)
        except UserError as e:
            raise gr.Error(str(e)) from e
        for note in answer.notes:
            gr.Warning(note)
        return answer.tiles, answer.heat, answer.table, answer.rows


def _upload_path(payload: Any) -> str | None:
    """The uploaded file's path. The callback takes the raw payload (``preprocess=False``) so that
    Gradio never decodes the image: the Predictor reads the file itself, and a file that is not an
    image gets the Predictor's message."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return str(payload)


def build_app(
    predictor: Predictor,
    examples: list[Example] = (),
    *,
    title: str = "OneRef",
    max_expressions: int = 16,
) -> gr.Blocks:
    """The Blocks of the demo for ``predictor`` (queue and launch it: ``oneref.demo``)."""
    demo = Demo(predictor, max_expressions)
    what = "box and mask" if predictor.has_masks else "box"
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(
            f"## {title}\nGive an image and one referring expression per line; the model ({predictor.task.upper()}, "
            f"{predictor.source or 'in memory'}) predicts the {what} of the object each one describes. "
            "The heat map is the model's patch-similarity map: how close each image patch is to the "
            "expression (bright = close); the box is regressed from the patches weighted by it."
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    label="image",
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    height=280,
                    elem_id="image",
                )
                expressions = gr.Textbox(
                    label="expressions (one per line)",
                    lines=3,
                    placeholder="the small red circle left of the square",
                    elem_id="expressions",
                )
                button = gr.Button("ground", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(
                        [[str(e.image), e.text] for e in examples],
                        inputs=[image, expressions],
                        example_labels=[e.label for e in examples],
                        label="examples from the synthetic test split: the model gets some right, some wrong",
                    )
            with gr.Column(scale=3):
                with gr.Row():
                    gallery = dict(columns=1, height="auto", object_fit="contain", preview=False)
                    drawn = gr.Gallery(label="prediction", elem_id="predictions", **gallery)
                    heat = gr.Gallery(
                        label="patch similarity (bright: close)", elem_id="similarity", **gallery
                    )
                table = gr.Markdown(label="summary", elem_id="summary")
                numbers = gr.JSON(label="numbers", elem_id="numbers", open=True)
        event = dict(
            fn=demo.answer,
            inputs=[image, expressions],
            outputs=[drawn, heat, table, numbers],
            preprocess=False,
        )
        button.click(**event, api_name="predict")
        expressions.submit(**event, api_name=False)
    return blocks


def launch(blocks: gr.Blocks, **kwargs: Any) -> Any:
    """``blocks.launch`` with the page's settings: system fonts (no web font is fetched), errors
    shown in the page; ``kwargs`` go to Gradio (server_name, server_port, share, ...)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    return blocks.launch(theme=theme, show_error=True, **kwargs)
