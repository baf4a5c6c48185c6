"""Training throughput in the dashboards: samples/s, model FLOP/s, MFU and peak memory.

``Throughput`` logs ``perf/*`` at the logging cadence (``trainer.log_every_n_steps``) straight to
the loggers, from host-side counts only (batch sizes and text lengths), so it adds no host sync to
the training step. Lightning's ``ThroughputMonitor`` synchronises the GPU after every batch, which
is why it is not used. Times are wall clock between logging steps; each logging step already waits
for the device (the loggers read the loss), so over an interval the rate is the device's.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the
model (no memory, no compute) at three text lengths; a transformer's forward FLOPs are exactly
quadratic in the token count, so that gives every batch's count from its padded text length.
Training counts 3x the forward (forward + backward), the usual MFU convention.

``RichProgressBar`` is Lightning's, refreshing its metrics (``train/loss``, a device tensor that
must be copied to the host) at the logging cadence instead of after every batch.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device (vendor data sheets, no sparsity), first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
TRAIN_FLOPS_FACTOR = 3  # forward + backward (2x the forward)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak of a CUDA device from PEAK_BF16_FLOPS, None if unknown or not CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def count_forward_flops(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one ``model(*args, **kwargs)`` call, counted by FlopCounterMode (no grad)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


class FlopModel:
    """Forward FLOPs per sample of a OneRef model as a function of the padded text length.

    Counted on a meta-device copy built from ``model.cfg``; ``padded`` counts the batches that
    carry a text padding mask (the attention mask adds no matmul FLOPs, so both agree).
    """

    LENGTHS = (8, 16, 32)

    def __init__(self, cfg: Any) -> None:
        from oneref.models.oneref import OneRef

        with torch.device("meta"):
            model = OneRef(cfg).eval()
        s = cfg.img_size
        counts = []
        for n in self.LENGTHS:
            image = torch.empty(1, 3, s, s, device="meta")
            ids = torch.zeros(1, n, dtype=torch.long, device="meta")
            counts.append(count_forward_flops(model, image, ids))
        # exact quadratic through the three counts (Lagrange form, integer lengths)
        self._points = list(zip(self.LENGTHS, counts))

    def __call__(self, text_len: int) -> float:
        x = float(text_len)
        total = 0.0
        for i, (xi, yi) in enumerate(self._points):
            term = float(yi)
            for j, (xj, _) in enumerate(self._points):
                if i != j:
                    term *= (x - xj) / (xi - xj)
            total += term
        return total


@functools.lru_cache(maxsize=8)
def flop_model(cfg: Any) -> FlopModel:
    """FlopModel of a (frozen, hashable) model config, counted once per process."""
    return FlopModel(cfg)


def _batch_shape(batch: Any) -> tuple[int, int] | None:
    """(batch size, padded text length) from a batch dict, host-side shapes only."""
    if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        ids = batch.get("text_ids")
        return int(batch["image"].shape[0]), int(ids.shape[1]) if isinstance(ids, Tensor) else 0
    return None


class Throughput(L.Callback):
    """Logs ``perf/samples_per_s`` (all devices), ``perf/samples_per_s_per_device``,
    ``perf/tflops_per_s_per_device`` (model FLOPs, 3x forward), ``perf/mfu`` (with a known peak)
    and ``perf/peak_mem_gib`` (CUDA) every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: logging interval in optimizer steps; None = ``trainer.log_every_n_steps``.
        peak_flops: the device's dense peak in FLOP/s for MFU; ``auto`` looks the CUDA device up in
            PEAK_BF16_FLOPS; None = no MFU.
    """

    def __init__(self, every_n_steps: int | None = None, peak_flops: float | str | None = "auto") -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"Throughput every_n_steps must be >= 1 or null, got {every_n_steps!r}")
        if isinstance(peak_flops, str) and peak_flops != "auto":
            raise ValueError(f"Throughput peak_flops must be a number, 'auto' or null, got {peak_flops!r}")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.peak_flops_setting = peak_flops
        self.peak: float | None = None
        self.flops: FlopModel | None = None
        self.last: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._samples = 0
        self._flops = 0.0
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count_flops(pl_module)

    def _count_flops(self, pl_module: L.LightningModule) -> None:
        """The model's FLOP counts and the device's peak, once per loop start."""
        model = getattr(pl_module, "model", None)
        cfg = getattr(model, "cfg", None)
        self.flops = None
        if cfg is not None and hasattr(cfg, "img_size"):
            try:
                self.flops = flop_model(cfg)
            except Exception as e:  # a model FlopCounterMode cannot trace: samples/s only
                log.warning("Throughput: could not count the model's FLOPs (%s); logging samples/s only", e)
        setting = self.peak_flops_setting
        self.peak = peak_flops(pl_module.device) if setting == "auto" else setting
        self.peak = None if self.peak is None else float(self.peak)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None  # the first batch of an epoch starts the clock (loader start-up excluded)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None  # validation time is not training time

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        shape = _batch_shape(batch)
        if self._t0 is None:  # this batch's work is before the clock: not counted
            self._t0, self._samples, self._flops = now, 0, 0.0
            return
        if shape is not None:
            b, n = shape
            self._samples += b
            if self.flops is not None:
                self._flops += TRAIN_FLOPS_FACTOR * b * self.flops(n)
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step % every or step == self._last_step or self._samples == 0:
            return
        self._last_step = step
        elapsed = max(now - self._t0, 1e-9)
        world = trainer.world_size
        metrics = {
            "perf/samples_per_s": world * self._samples / elapsed,
            "perf/samples_per_s_per_device": self._samples / elapsed,
        }
        if self.flops is not None:
            achieved = self._flops / elapsed
            metrics["perf/tflops_per_s_per_device"] = achieved / 1e12
            if self.peak:
                metrics["perf/mfu"] = achieved / self.peak
        if pl_module.device.type == "cuda":
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self.last = metrics
        self._t0, self._samples, self._flops = now, 0, 0.0
        if trainer.is_global_zero:
            step_axis = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", step)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step_axis)


class StepWindow(Throughput):
    """Throughput over a fixed window of batches, ``first .. last - 1`` of a fit or a test loop (a
    benchmark's timed steps after its warm-up): the samples and model FLOPs counted as
    :class:`Throughput` counts them, per-step durations (CUDA events, recorded without a sync), one
    synchronize at each end of the window, and the peak memory over it. Logs nothing: read
    :meth:`result` after the loop. ``train=False`` counts 1x the forward (evaluation)."""

    def __init__(
        self, first: int, last: int, train: bool = True, peak_flops: float | str | None = "auto"
    ) -> None:
        if not 0 <= first < last:
            raise ValueError(f"StepWindow needs 0 <= first < last, got {first}, {last}")
        super().__init__(peak_flops=peak_flops)
        self.first, self.last_batch, self.train = int(first), int(last), bool(train)
        self.shapes: list[tuple[int, int]] = []
        self._marks: list[tuple[Any, Any]] = []
        self.wall: float | None = None
        self._window_t0 = 0.0
        self.peak_gib: float | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count_flops(pl_module)

    def _mark(self, device: torch.device) -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        if not self.first <= i < self.last_batch:
            return
        device = pl_module.device
        if i == self.first:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            self._window_t0 = time.perf_counter()
        shape = _batch_shape(batch)
        if shape is not None:
            self.shapes.append(shape)
        self._marks.append((self._mark(device), None))

    def _end(self, pl_module: L.LightningModule, i: int) -> None:
        if not self.first <= i < self.last_batch:
            return
        device = pl_module.device
        self._marks[-1] = (self._marks[-1][0], self._mark(device))
        if i == self.last_batch - 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                self.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            self.wall = time.perf_counter() - self._window_t0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start(pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end(pl_module, batch_idx)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        self._start(pl_module, batch, batch_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        *_: Any,
    ) -> None:
        self._end(pl_module, batch_idx)

    def step_ms(self) -> list[float]:
        return [s.elapsed_time(e) if not isinstance(s, float) else 1e3 * (e - s) for s, e in self._marks]

    def result(self) -> dict[str, Any]:
        """samples/s over the window, ms per step (median, min), forward GFLOPs per sample, model
        TFLOP/s and MFU (with a known peak), the mean padded text length, peak GiB (CUDA)."""
        if self.wall is None:
            raise RuntimeError(
                f"fewer than {self.last_batch} batches ran: the window {self.first}..{self.last_batch - 1} was not timed"
            )
        ms = sorted(self.step_ms())
        samples = sum(b for b, _ in self.shapes)
        sps = samples / self.wall
        out: dict[str, Any] = {
            "text_ids_mean": sum(n for _, n in self.shapes) / len(self.shapes),
            "samples_per_s": sps,
            "ms_per_step_median": ms[len(ms) // 2],
            "ms_per_step_min": ms[0],
        }
        if self.flops is not None:
            fwd = sum(b * self.flops(n) for b, n in self.shapes) / samples
            achieved = sps * (TRAIN_FLOPS_FACTOR if self.train else 1) * fwd
            out.update(fwd_gflops_per_sample=fwd / 1e9, tflops_per_s=achieved / 1e12)
            out["mfu"] = achieved / self.peak if self.peak else None
        out["peak_flops"] = self.peak
        if self.peak_gib is not None:
            out["peak_mem_gib"] = self.peak_gib
        return out


class RichProgressBar(_RichProgressBar):
    """Lightning's RichProgressBar, refreshing its metrics every ``metrics_every_n_steps`` training
    batches (None = ``trainer.log_every_n_steps``) instead of after each: reading a logged device
    tensor for the bar is a host sync."""

    def __init__(self, *args: Any, metrics_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, batch_idx + 1)
        every = self.metrics_every_n_steps or trainer.log_every_n_steps
        if (batch_idx + 1) % every == 0:
            self._update_metrics(trainer, pl_module)
        self.refresh()
