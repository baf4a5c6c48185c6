"""Run a OneRef model on your own images and expressions, from Python, without a Trainer or Hydra:

    import oneref

    model = oneref.load("best.ckpt")  # our .ckpt, a checkpoint folder, or an official .pth + tokenizer=
    pred = model.predict("photo.jpg", "the man in red on the left")
    x1, y1, x2, y2 = pred.box_xyxy  # in the photo's own pixels, as every viewer shows it

:func:`load` builds a :class:`Predictor` from any checkpoint the CLI takes. The Predictor holds the
network, its tokenizer and its preprocessing (the official evaluation letterbox). It reads every
image with :func:`oneref.data.images.load_photo` (EXIF orientation, every Pillow mode, size
limits), decodes images ahead of the model (:mod:`oneref.decode_ahead`), batches the queries, and maps
every result back to the image as the user sees it: for REC models the regressed box (xyxy); for
RES models the mask at the image's size (by the rule of the original-resolution metrics,
oneref.tasks.metrics) and, as the box, the mask's bounding box: the official RES recipes never
train the box head, so its output would be noise.

OneRef gives no confidence: its head regresses one box per expression, always, and nothing in the
official model is trained to say how sure it is. A :class:`Prediction` therefore has no score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert

from oneref import hub
from oneref.checkpoint import Checkpoint, CheckpointError, check_format, load_model
from oneref.checkpoint.folder import TOKENIZER_HELP
from oneref.data.datasets import RefCollate
from oneref.data.images import ImageError, ImageSource, Photo, PhotoOptions
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import (
    ObjMask,
    TransformResult,
    eval_transform,
    letterbox_to_original,
    long_side_size,
)
from oneref.decode_ahead import decode_ahead
from oneref.models.oneref import OneRef, OneRefConfig
from oneref.models.registry import SIZES
from oneref.reporting import progress_bar
from oneref.tasks.metrics import res_pred_mask_original

log = logging.getLogger(__name__)

SOURCES_HELP = (
    "give one of our Lightning .ckpt files, a checkpoint folder (python -m oneref.convert official IN.pth "
    "OUT_DIR --tokenizer beit3.spm) or an official .pth with tokenizer='beit3.spm'"
)


@dataclass(frozen=True, eq=False)
class Prediction:
    """One query's result, in the pixels of the image as the user sees it (after the EXIF
    rotation, before any downscaling)."""

    text: str
    # float32 (4,): x1, y1, x2, y2, inside the image. RES models: the mask's bounding box (pixel
    # edges, so x2 - x1 is the mask's width), None when the mask is empty.
    box_xyxy: np.ndarray | None
    image_size: tuple[int, int]  # (width, height)
    mask: np.ndarray | None = None  # bool (height, width), RES models only
    image: str = ""  # the image's name in messages: its path, "<PIL image>" or "<array>"
    # predict(..., similarity=True): float32 (h, w), the cosine of each patch with the expression
    # (the model's ``visu_sim``, whose softmax weights pool the box), bilinearly upsampled from the
    # patch grid and cropped to the image inside the letterbox: (h, w) is the upright image at the
    # model's input scale (long side img_size); resize it to the image to overlay it.
    similarity: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: image, text, box_xyxy (rounded to 0.01 px; null for an empty RES mask),
        image_size, mask_area (RES)."""
        box = None if self.box_xyxy is None else [round(float(v), 2) for v in self.box_xyxy]
        out: dict[str, Any] = {
            "image": self.image,
            "text": self.text,
            "box_xyxy": box,
            "image_size": list(self.image_size),
        }
        if self.mask is not None:
            out["mask_area"] = int(self.mask.sum())
        return out


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The bounding box (x1, y1, x2, y2, float32, pixel edges) of a bool (H, W) mask; None if empty."""
    # not torchvision's masks_to_boxes: a tensor in, inclusive pixel indices out, zeros when empty
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not len(cols):
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


@dataclass(frozen=True)
class _Prepared:
    """A decoded photo and its letterboxed sample (what the worker threads produce)."""

    photo: Photo
    sample: TransformResult = field(repr=False)


class Predictor:
    """``predict(images, texts)`` for a OneRef model (build it with :func:`load`).

    Args:
        model: the network (any heads; a seg head adds masks).
        tokenizer: the tokenizer it was trained with.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, or a torch.device.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on the CPU) or ``fp32``.
        batch_size: queries per forward.
        workers: threads decoding images ahead of the model (None: up to 4; 0: in the calling
            thread). At most ``batch_size + workers`` decoded images are held at a time.
        photo: how photos are read (:class:`oneref.data.images.PhotoOptions`, or a dict of its
            fields; default: EXIF orientation applied, downscaled over 50 MP).
    """

    def __init__(
        self,
        model: OneRef,
        tokenizer: Tokenizer,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int = 16,
        workers: int | None = None,
        photo: PhotoOptions | dict | None = None,
    ) -> None:
        if not isinstance(model, OneRef):
            raise TypeError(
                f"Predictor needs a OneRef model, got {type(model).__name__}; use oneref.load(path)"
            )
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} ids but the model's text embedding "
                f"has {model.cfg.vocab_size} rows: it is not this model's tokenizer (the released models use "
                "beit3.spm)"
            )
        device, workers = check_options(device, precision, batch_size, workers)
        self.photo = PhotoOptions.from_any(photo)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.collate = RefCollate(tokenizer.max_query_len, tokenizer=tokenizer)
        self.bf16 = self.device.type == "cuda" and precision == "auto"
        self.batch_size = int(batch_size)
        self.workers = workers
        self.source = ""  # the checkpoint, set by load()

    def __repr__(self) -> str:
        cfg = self.model.cfg
        return (
            f"Predictor({self.source or 'model'!r}, task={self.task}, img_size={cfg.img_size}, "
            f"width={cfg.embed_dim}, depth={cfg.depth}, device={self.device}, batch_size={self.batch_size})"
        )

    @property
    def img_size(self) -> int:
        return self.model.cfg.img_size

    @property
    def has_masks(self) -> bool:
        return self.model.cfg.seg_head

    @property
    def task(self) -> str:
        return "res" if self.has_masks else "rec"

    def load_photo(self, source: ImageSource) -> Photo:
        """``source`` read as this predictor reads every image (its photo settings)."""
        return self.photo.load(source)

    # -- the API ----------------------------------------------------------------------------------
    @overload
    def predict(
        self, images: ImageSource, texts: str, *, progress: bool = False, similarity: bool = False
    ) -> Prediction: ...

    @overload
    def predict(
        self,
        images: ImageSource | Iterable[ImageSource],
        texts: Iterable[str],
        *,
        progress: bool = False,
        similarity: bool = False,
    ) -> list[Prediction]: ...

    def predict(self, images, texts, *, progress=False, similarity=False):
        """Ground ``texts`` in ``images``.

        - one image and one text (a ``str``): one :class:`Prediction`;
        - one image and a list of texts: a list, one per text (the image is decoded once);
        - a list of images and a list of texts of the same length: a list, one per pair.

        An image is a path (str or Path), a PIL image or a numpy array (see ``load_photo``).
        ``progress``: a progress bar on the terminal (never in logs or pipes). Boxes and masks are
        in the pixels of each image as the user sees it.
        """
        single = isinstance(texts, str) and _is_single_image(images)
        preds = [p for _, p in self.iter_predict(images, texts, progress=progress, similarity=similarity)]
        return preds[0] if single else preds

    def iter_predict(
        self,
        images: ImageSource | Iterable[ImageSource],
        texts: str | Iterable[str],
        *,
        progress: bool = False,
        similarity: bool = False,
    ) -> Iterator[tuple[Photo, Prediction]]:
        """(photo, prediction) per query, in order, as batches finish: the photo is the upright
        image the model saw (downscaled over ``max_pixels``), e.g. to draw the prediction on.

        The queries are checked at once (counts, texts, paths); images are decoded while the
        model runs, by ``workers`` threads, and at most ``batch_size + workers`` are held."""
        sources, text_list = self._pairs(images, texts)
        return self._stream(sources, text_list, progress, similarity)

    # -- checks -----------------------------------------------------------------------------------
    def _pairs(self, images: Any, texts: Any) -> tuple[list[ImageSource], list[str]]:
        if isinstance(texts, str):
            text_list = [texts]
        elif isinstance(texts, Iterable):
            text_list = list(texts)
        else:
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if _is_single_image(images):
            sources = [images] * len(text_list)  # one image, several texts: decoded once (same object)
        elif isinstance(images, Iterable):
            sources = list(images)
            if len(sources) == 1 and len(text_list) > 1:
                sources = sources * len(text_list)
        else:
            raise TypeError(
                f"images must be a path, a PIL image, a numpy array or a list of them, got {type(images).__name__}"
            )
        if len(sources) != len(text_list):
            raise ValueError(
                f"{len(sources)} images but {len(text_list)} texts: give one text per image, or one image "
                "with several texts (to ask the same in every image, repeat the text: [text] * len(images))"
            )
        for i, (src, text) in enumerate(zip(sources, text_list)):
            where = _name(src)
            if not isinstance(text, str):
                raise TypeError(
                    f"query {i} ({where}): the expression must be a str, got {type(text).__name__}"
                )
            if not text.strip():
                raise ValueError(
                    f"query {i} ({where}): the expression {text!r} is empty; give the words that describe the "
                    "object to find"
                )
            if isinstance(src, (str, Path)) and not Path(src).expanduser().exists():
                raise FileNotFoundError(f"query {i}: image not found: {src}")
        return sources, text_list

    # -- running ----------------------------------------------------------------------------------
    def _prepare(self, index: int, source: ImageSource) -> _Prepared:
        """Decode and letterbox one image (runs in the worker threads)."""
        try:
            photo = self.load_photo(source)
        except (FileNotFoundError, ImageError, TypeError) as e:
            raise type(e)(f"query {index}: {e}") from e
        w, h = photo.image.size
        _, rw, rh = long_side_size(w, h, self.img_size)
        if rw < 1 or rh < 1:  # the official resize would ask Pillow for a 0-pixel side
            raise ImageError(
                f"query {index}: {photo.name} is {w}x{h}, too thin for the model's {self.img_size}x{self.img_size} "
                "letterbox (its short side would be 0 pixels); crop or pad it first"
            )
        # no ground truth: an empty box and mask ride along through the transform
        no_mask = ObjMask(rows=np.zeros(h, bool), cols=np.zeros(w, bool))
        return _Prepared(photo, eval_transform(photo.image, np.zeros(4, np.float32), no_mask, self.img_size))

    def _stream(
        self, sources: list[ImageSource], texts: list[str], progress: bool, similarity: bool = False
    ) -> Iterator[tuple[Photo, Prediction]]:
        n = len(texts)
        decoded = decode_ahead(self._prepare, sources, self.workers, self.batch_size + self.workers)
        with progress_bar(progress, n) as advance:
            try:
                for start in range(0, n, self.batch_size):
                    items = [next(decoded) for _ in range(min(self.batch_size, n - start))]
                    preds = self._forward(items, texts[start : start + len(items)], start, similarity)
                    advance(len(items))
                    yield from ((it.photo, p) for it, p in zip(items, preds))
            finally:
                decoded.close()  # stops the pool even when the caller stops early

    @torch.inference_mode()
    def _forward(
        self, items: Sequence[_Prepared], texts: Sequence[str], first: int, similarity: bool = False
    ) -> list[Prediction]:
        size = self.img_size
        # the batch assembly of training and evaluation (normalise, letterbox, tokenise)
        batch = self.collate(
            [
                {"result": it.sample, "text_ids": None, "index": first + k, "phrase": t, "image_file": ""}
                for k, (it, t) in enumerate(zip(items, texts))
            ]
        )
        pad = batch["text_padding_mask"].to(self.device) if batch["text_padded"] else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch["image"].to(self.device), batch["text_ids"].to(self.device), pad)
        letterbox, frame = batch["letterbox"], batch["orig_size"]
        boxes = box_convert(out["pred_box"].float().cpu(), "cxcywh", "xyxy") * size
        boxes = letterbox_to_original(boxes, letterbox, frame.float())  # in photo.image pixels
        seg = out["seg_mask"].float().cpu() if "seg_mask" in out else None
        sims = similarity_maps(out["visu_sim"], letterbox, frame, size) if similarity else None
        preds = []
        for k, (it, text) in enumerate(zip(items, texts)):
            photo = it.photo
            mask = None
            if seg is not None:  # one sample at a time: a batch canvas of large photos is too big
                h, w = photo.image.height, photo.image.width
                m = res_pred_mask_original(
                    seg[k : k + 1], letterbox[k : k + 1], frame[k : k + 1], size, (h, w)
                )
                mask = photo.mask_to_original(m[0].numpy())
                box = mask_box(mask)
            else:
                box = photo.box_to_original(boxes[k].numpy()).astype(np.float32)
            preds.append(
                Prediction(
                    text=text,
                    box_xyxy=box,
                    image_size=photo.original_size,
                    mask=mask,
                    image=photo.name,
                    similarity=None if sims is None else sims[k],
                )
            )
        return preds


def similarity_maps(
    visu_sim: torch.Tensor, letterbox: torch.Tensor, frame: torch.Tensor, img_size: int
) -> list[np.ndarray]:
    """The (B, G*G) patch cosines as one float32 map per sample over its image region of the
    letterbox: bilinear from the patch grid to the S x S input, then cropped where the image lies
    (the resized size as the transform computes it, as in ``res_pred_mask_original``)."""
    b, n = visu_sim.shape
    g = round(n**0.5)
    grid = visu_sim.float().cpu().reshape(b, 1, g, g)
    full = torch.nn.functional.interpolate(
        grid, size=(img_size, img_size), mode="bilinear", align_corners=False
    )
    maps = []
    for k in range(b):
        ratio, left, top = (float(v) for v in letterbox[k])
        h, w = (int(v) for v in frame[k])
        rh, rw = (min(max(round(v * ratio), 1), img_size) for v in (h, w))
        t, lft = round(top), round(left)
        maps.append(full[k, 0, t : t + rh, lft : lft + rw].numpy().copy())
    return maps


def check_options(
    device: str | torch.device,
    precision: str,
    batch_size: int,
    workers: int | None,
) -> tuple[torch.device, int]:
    """Refuse bad settings before any weight is read; returns the device and the worker count."""
    if precision not in ("auto", "fp32"):
        raise ValueError(f"precision must be 'auto' or 'fp32', got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(
            f"workers must be an integer >= 0 (0: decode in the calling thread), got {workers!r}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but torch sees no CUDA GPU here; use device='auto' or 'cpu'"
        )
    return device, workers


# -- loading ---------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike | Checkpoint,
    *,
    size: str | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    max_query_len: int | None = None,
    ckpt_format: str | None = None,
    config: OneRefConfig | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    workers: int | None = None,
    photo: PhotoOptions | dict | None = None,
) -> Predictor:
    """A ready :class:`Predictor` for any checkpoint the CLI takes, on the GPU when there is one.

    ``path``: one of our Lightning ``.ckpt`` files (they carry their architecture and embed their
    tokenizer), a checkpoint folder (config.yaml + weights + tokenizer), an official OneRef /
    MRefM ``.pth`` (``tokenizer`` required: ``beit3.spm``), an opened
    :class:`~oneref.checkpoint.Checkpoint`, or a Hugging Face Hub repository holding a checkpoint
    folder (``owner/name``, ``hf://owner/name@revision``; :mod:`oneref.hub`).

    ``size`` (tiny, base, large): checked against the checkpoint; the architecture of an official
    file is read off its shapes (size, image size, seg head), so it may be left out.
    ``tokenizer``: a sentencepiece file or a :class:`Tokenizer`, for a checkpoint that carries
    none; one that differs from the checkpoint's own is refused (the same pieces are accepted).
    ``max_query_len``: tokens per expression, bos and eos included (default: the checkpoint's, 64
    for official files); longer expressions are truncated with one warning, as in training.
    ``ckpt_format``: one of ``oneref.checkpoint.FORMATS`` (default: detected,
    :meth:`Checkpoint.open`). ``config``: the architecture to build instead of the checkpoint's
    (what the CLI composes for official files). ``photo``: how photos are read
    (:class:`~oneref.data.images.PhotoOptions`). The other arguments go to :class:`Predictor`.
    """
    if not isinstance(path, Checkpoint) and not hub.is_hub_id(path):  # Checkpoint.open resolves a Hub id
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}; {SOURCES_HELP}")
        check_format(ckpt_format)
        if ckpt_format == "beit3":
            raise CheckpointError(_no_head(path))
    if max_query_len is not None and (isinstance(max_query_len, bool) or not isinstance(max_query_len, int)):
        raise ValueError(f"max_query_len must be an integer, got {max_query_len!r}")
    if size is not None and size not in SIZES:
        raise CheckpointError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    photo = PhotoOptions.from_any(photo)
    check_options(device, precision, batch_size, workers)

    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path, ckpt_format)
    if not ckpt.runnable:
        raise CheckpointError(_no_head(ckpt.path))
    tok = ckpt.choose_tokenizer(tokenizer, max_query_len)
    if tok is None:
        raise CheckpointError(_no_tokenizer(ckpt))
    cfg = config or ckpt.config
    if cfg is None:
        raise CheckpointError(f"{ckpt.path}: {ckpt.config_problem}")
    _check_size(size, cfg, ckpt.path)  # before the weights are read
    model, _ = load_model(ckpt, config)
    predictor = Predictor(
        model, tok, device=device, precision=precision, batch_size=batch_size, workers=workers, photo=photo
    )
    predictor.source = str(ckpt.path)
    log.info("loaded %r (%s)", predictor, ckpt)
    return predictor


def _no_head(path: Path) -> str:
    return (
        f"{path}: a BEiT-3 pretrained checkpoint has no trained grounding head, so it cannot predict; "
        "fine-tune it first (python -m oneref.train init_from=... ckpt_format=beit3)"
    )


def _no_tokenizer(ckpt: Checkpoint) -> str:
    if ckpt.format == "folder":
        return f"checkpoint folder {ckpt.path} has no tokenizer: pass tokenizer=PATH to oneref.load, or {TOKENIZER_HELP}"
    if ckpt.format == "lightning":
        return (
            f"{ckpt.path} embeds no tokenizer (it was saved without a DataModule): pass tokenizer=PATH, the "
            "sentencepiece model it was trained with"
        )
    return (
        f"{ckpt.path} is an official checkpoint, which carries no tokenizer: pass tokenizer='beit3.spm' "
        "(oneref.load) or tokenizer=PATH (python -m oneref.predict). beit3.spm is published with "
        "BEiT-3 (microsoft/unilm, beit3/README.md, 'Text Tokenizer')"
    )


def _check_size(size: str | None, cfg: OneRefConfig, path: Path) -> None:
    if size is None:
        return
    want = SIZES[size]
    if (want["embed_dim"], want["depth"], want["ffn_dim"]) != (cfg.embed_dim, cfg.depth, cfg.ffn_dim):
        raise CheckpointError(
            f"size={size!r} was given but {path} holds a model {cfg.embed_dim} wide with {cfg.depth} layers "
            f"(FFN {cfg.ffn_dim}); drop size or fix it"
        )


# -- helpers ---------------------------------------------------------------------------------------
def _is_single_image(images: Any) -> bool:
    return isinstance(images, (str, Path, Image.Image, np.ndarray))


def _name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return "<array>" if isinstance(source, np.ndarray) else type(source).__name__
