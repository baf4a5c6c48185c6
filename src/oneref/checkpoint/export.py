"""Export a OneRef model for inference outside this package: ONNX or a ``torch.export`` program.

    python -m oneref.convert export CKPT OUT --format onnx|torch_export

Both formats hold one graph of the evaluation forward (docs/predict.md):

- inputs ``image`` (B, 3, S, S) float32, ImageNet-normalised and letterboxed as by
  ``oneref.data.transforms.eval_transform``; ``text_ids`` (B, L) int64 from the tokenizer (bos
  first); ``text_padding_mask`` (B, L) bool, True = padding (all False when no row is padded);
- outputs ``pred_box`` (B, 4) sigmoid cx, cy, w, h normalised to the S x S letterbox and, for a
  model with a seg head, ``seg_mask`` (B, 1, 8G, 8G) mask logits in [-1, 1] (G = S / patch size).

The batch B and the text length L are dynamic dimensions (L from 2 up to the model's text position
table, 1022 rows for the released models); S is fixed by the model. The graph goes through the
model's ``F.scaled_dot_product_attention`` with a boolean key mask, traced with the math backend,
which every runtime has (ONNX: MatMul / Softmax; no fused-attention op is needed).

The models need no change to export: :class:`InferenceGraph` only fixes the inputs (the padding
mask is always given, so the graph has one code path) and the outputs (the two predictions; the
backbone features and the MRefM heads are left out). ``export_model`` checks the exported file
against the eager model on random inputs of several text lengths, with and without padding.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from oneref.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oneref.models.beit3 import POSITION_OFFSET
from oneref.models.oneref import OneRef

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torch_export")
INPUT_NAMES = ("image", "text_ids", "text_padding_mask")
DEFAULT_OPSET = 18
METADATA_KEY = "oneref"  # ONNX metadata_props key / torch.export extra file holding the description
# ONNX files are protobufs, which cannot exceed 2 GiB: larger weights go to a side file.
_SINGLE_FILE_BYTES = 1_800_000_000
_EXTRA_HINT = "install the export extra: pip install 'oneref[export]' (onnx, onnxruntime, onnxscript)"

TextLengths = int | tuple[int, int] | None


class ExportError(RuntimeError):
    """A model that cannot be exported, or an export that does not match the eager model."""


class InferenceGraph(nn.Module):
    """The evaluation forward of a :class:`OneRef` with fixed inputs and outputs (what is exported)."""

    def __init__(self, model: OneRef) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names(model)
        self.training = False  # an inference graph; the model's own mode is set while exporting

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor) -> dict[str, Tensor]:
        out = self.model(image, text_ids, text_padding_mask)
        return {name: out[name] for name in self.output_names}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how closely it matches the eager model."""

    path: Path
    format: str
    files: tuple[Path, ...]
    text_lengths: tuple[int, int]
    batch: int | None
    max_abs_diff: float | None = None  # None: not verified
    checked: tuple[tuple[int, int], ...] = field(default=())  # (batch, L) of the checks

    def summary(self) -> str:
        dims = f"batch {'dynamic' if self.batch is None else self.batch}, text length "
        lo, hi = self.text_lengths
        dims += f"{lo}..{hi}" if lo != hi else str(lo)
        check = (
            "not verified"
            if self.max_abs_diff is None
            else f"max |exported - eager| = {self.max_abs_diff:.2e} on (batch, L) {list(self.checked)}"
        )
        return f"{self.format}: {self.path} ({dims}; {check})"


def output_names(model: OneRef) -> tuple[str, ...]:
    return ("pred_box", "seg_mask") if model.cfg.seg_head else ("pred_box",)


def max_text_length(model: OneRef) -> int:
    """Rows of the text position table a sequence may use (1022 for the released models)."""
    return model.cfg.max_source_positions - POSITION_OFFSET


def export_program(
    model: OneRef,
    path: str | Path | None = None,
    *,
    text_lengths: TextLengths = None,
    batch: int | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` the evaluation graph; saved with ``torch.export.save`` when ``path`` is given
    (load it with ``torch.export.load(path).module()``).

    ``text_lengths``: None = dynamic from 2 to :func:`max_text_length`, (lo, hi) = dynamic in that
    range, an int = that length only. ``batch``: None = dynamic, an int = that batch size only.
    The program runs on the device the model is on.
    """
    model = _check_model(model)
    lengths = _text_range(model, text_lengths)
    graph, args, shapes = _prepare(model, lengths, batch)
    with _eval_mode(model):
        ep = _run_exporter("torch.export", lambda: torch.export.export(graph, args, dynamic_shapes=shapes))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = _description(model, "torch_export", lengths, batch)
        torch.export.save(ep, path, extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    return ep


def export_onnx(
    model: OneRef,
    path: str | Path,
    *,
    text_lengths: TextLengths = None,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    external_data: bool | None = None,
) -> tuple[Path, ...]:
    """Export the evaluation graph to ONNX with torch's dynamo exporter (needs the ``export`` extra).

    ``text_lengths`` and ``batch`` as in :func:`export_program`; dynamic dimensions are named
    ``batch`` and ``text_len`` in the file. ``external_data``: weights in a ``PATH.data`` side file
    (None: only when they would not fit the 2 GiB protobuf limit). The model description (config,
    normalisation, inputs and outputs) is stored under the ``oneref`` metadata key. Returns the
    files written.
    """
    model = _check_model(model)
    _require_onnx_exporter()
    lengths = _text_range(model, text_lengths)
    graph, args, shapes = _prepare(model, lengths, batch)
    with _eval_mode(model), _quiet_onnx_exporter():
        program = _run_exporter(
            "the ONNX exporter",
            lambda: torch.onnx.export(
                graph,
                args,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=list(INPUT_NAMES),
                output_names=list(graph.output_names),
                opset_version=opset,
                verbose=False,
            ),
        )
    meta = _description(model, "onnx", lengths, batch)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > _SINGLE_FILE_BYTES
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=external_data)
    return (path, path.with_name(path.name + ".data")) if external_data else (path,)


def export_model(
    model: OneRef,
    out: str | Path,
    fmt: str = "onnx",
    *,
    text_lengths: TextLengths = None,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` to ``out`` as ``fmt`` ("onnx" or "torch_export") and, with ``verify``, run
    the written file (ONNX Runtime / ``torch.export.load``) against the eager model on random
    inputs: two text lengths, one padded row. Raises :class:`ExportError` above ``atol``."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    model = _check_model(model)
    out = Path(out)
    lengths = _text_range(model, text_lengths)
    if fmt == "onnx":
        if verify:
            _require_onnxruntime()
        files = export_onnx(model, out, text_lengths=lengths, opset=opset, batch=batch)
    else:
        export_program(model, out, text_lengths=lengths, batch=batch)
        files = (out,)
    report = ExportReport(path=out, format=fmt, files=files, text_lengths=lengths, batch=batch)
    if verify:
        run = _onnx_runner(out) if fmt == "onnx" else _program_runner(out)
        diff, checked = _compare(model, run, lengths, batch)
        report = replace(report, max_abs_diff=diff, checked=checked)
        if diff > atol:
            raise ExportError(
                f"{out}: the exported model differs from the eager model by up to {diff:.3g} "
                f"(tolerance {atol:g}) on (batch, L) {list(checked)}; the file is kept for inspection"
            )
    log.info("exported %s", report.summary())
    return report


# -- checks -----------------------------------------------------------------------------------------
def _check_model(model: Any) -> OneRef:
    if not isinstance(model, OneRef):
        inner = getattr(model, "model", None)
        hint = (
            "; pass its .model"
            if isinstance(inner, OneRef)
            else (
                "; load the checkpoint first (oneref.checkpoint.load_model(path))"
                if isinstance(model, (str, Path))
                else ""
            )
        )
        raise ExportError(f"can only export a OneRef model, got {type(model).__name__}{hint}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ExportError(
                f"{name} is on the meta device: the weights were never loaded; load a checkpoint into the "
                "model (oneref.checkpoint.load_model) before exporting"
            )
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ExportError(
                f"{name} is {t.dtype}: export a float32 model (model.float()); the exported inputs and "
                "outputs are float32"
            )
    return model


def _text_range(model: OneRef, text_lengths: TextLengths) -> tuple[int, int]:
    limit = max_text_length(model)
    if text_lengths is None:
        lo, hi = 2, limit
    elif isinstance(text_lengths, int) and not isinstance(text_lengths, bool):
        lo = hi = text_lengths
    elif isinstance(text_lengths, (tuple, list)) and len(text_lengths) == 2:
        lo, hi = (int(v) for v in text_lengths)
    else:
        raise ValueError(f"text_lengths must be None, an int or a (min, max) pair, got {text_lengths!r}")
    if not 2 <= lo <= hi <= limit:
        raise ValueError(
            f"text_lengths {text_lengths!r}: need 2 <= min <= max <= {limit} (a sequence holds at least bos "
            f"and eos; the model's text position table has {limit} usable rows)"
        )
    return lo, hi


def _prepare(
    model: OneRef, lengths: tuple[int, int], batch: int | None
) -> tuple[InferenceGraph, tuple[Tensor, Tensor, Tensor], dict[str, dict[int, Any]]]:
    """The wrapped model, example inputs and the dynamic-shape spec."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None (dynamic), got {batch!r}")
    lo, hi = lengths
    # Example sizes of dynamic dims must not be 0/1 (torch.export specialises those) and should
    # differ from each other and from the static sizes, so that nothing is unified by accident.
    b = 2 if batch is None else batch
    n = min(hi, max(lo, 7))
    args = _example_inputs(model, b, n, seed=0)
    batch_dim = torch.export.Dim("batch", min=1) if batch is None else None
    text_dim = torch.export.Dim("text_len", min=lo, max=hi) if lo != hi else None
    shapes = {
        "image": {0: batch_dim},
        "text_ids": {0: batch_dim, 1: text_dim},
        "text_padding_mask": {0: batch_dim, 1: text_dim},
    }
    return InferenceGraph(model), args, shapes


def _example_inputs(model: OneRef, b: int, n: int, *, seed: int, pad_row: bool = False) -> tuple[Tensor, ...]:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    s = model.cfg.img_size
    image = torch.randn(b, 3, s, s, generator=gen)
    text_ids = torch.randint(0, model.cfg.vocab_size, (b, n), generator=gen)
    mask = torch.zeros(b, n, dtype=torch.bool)
    if pad_row and n > 2:
        mask[0, max(2, n // 2) :] = True  # a shorter expression padded to the batch length
    return image.to(device), text_ids.to(device), mask.to(device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm statistics, no drop path) and the math SDPA backend while exporting;
    the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was_training)


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """The exporter's optimiser logs every rewrite at INFO, and torch warns that the axis names
    it then keeps (batch, text_len) "will not be used": both only hide our own messages."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"# The axis name: .* will not be used", category=UserWarning
            )
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_exporter(what: str, export: Callable[[], Any]) -> Any:
    try:
        with torch.no_grad():
            return export()
    except (ExportError, ImportError):
        raise
    except Exception as e:  # torch raises many types (UserError, Unsupported, ...): one clear error
        raise ExportError(f"{what} failed on this model: {type(e).__name__}: {e}") from e


def _description(model: OneRef, fmt: str, lengths: tuple[int, int], batch: int | None) -> dict[str, Any]:
    s = model.cfg.img_size
    return {
        "format": fmt,
        "config": model.cfg.to_dict(),
        "inputs": {
            "image": ["batch", 3, s, s],
            "text_ids": ["batch", "text_len"],
            "text_padding_mask": ["batch", "text_len"],
        },
        "outputs": list(output_names(model)),
        "text_len": list(lengths),
        "batch": batch,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "letterbox": "long side to img_size (PIL bilinear), centred, zero after normalisation",
    }


# -- verification -----------------------------------------------------------------------------------
Runner = Callable[[tuple[Tensor, ...]], Mapping[str, Tensor]]


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(args: tuple[Tensor, ...]) -> dict[str, Tensor]:
        feeds = {k: v.cpu().numpy() for k, v in zip(INPUT_NAMES, args)}
        return {k: torch.from_numpy(v) for k, v in zip(names, session.run(None, feeds))}

    return run


def _program_runner(path: Path) -> Runner:
    module = torch.export.load(path).module()

    def run(args: tuple[Tensor, ...]) -> Mapping[str, Tensor]:
        with torch.no_grad():
            return module(*args)

    return run


def _compare(
    model: OneRef, run: Runner, lengths: tuple[int, int], batch: int | None
) -> tuple[float, tuple[tuple[int, int], ...]]:
    """Max abs difference exported vs eager over a few (batch, L): the shortest and a longer length
    (capped at 40 to stay fast), and a padded row."""
    lo, hi = lengths
    sizes = sorted({(batch or 2, lo), (batch or 3, min(hi, max(lo, 40)))})
    worst = 0.0
    graph = InferenceGraph(model)
    with _eval_mode(model), torch.no_grad():
        for k, (b, n) in enumerate(sizes):
            args = _example_inputs(model, b, n, seed=k + 1, pad_row=True)
            want = graph(*args)
            got = run(args)
            for name in graph.output_names:
                worst = max(worst, float((got[name].to(want[name].device) - want[name]).abs().max()))
    return worst, tuple(sizes)


def _require_onnx_exporter() -> None:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"ONNX export needs {module}: {_EXTRA_HINT}") from e


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"checking an ONNX export needs onnxruntime: {_EXTRA_HINT}, or pass verify=False"
        ) from e
