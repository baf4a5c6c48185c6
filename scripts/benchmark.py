"""oneref benchmarks: `python scripts/benchmark.py <subcommand> [options]`.

Every subcommand returns rows (dicts) that are logged as a table and written as JSON to `--out`
(default `bench_<subcommand>.json`). Add a subcommand with the `@subcommand` decorator:

    @subcommand("model", "forward/backward throughput")
    def model_bench(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], list[dict]]:
        p.add_argument(...)
        return run_model_bench

Subcommands:
    data   training samples/s per loader worker at 384 px on JPEG images (decode, augment, letterbox,
           mask, tokenise, collate), on synthetic 640x480 JPEGs in a temporary folder; also with the
           MRefM fields (`train+mrefm`: VQ-KD image, MIM mask, VTS, text masking).
    model  REC training steps (forward, loss, backward, AdamW) per second and peak memory, ours
           (bf16 autocast on CUDA, text padded to the batch's longest, fused attention, fused AdamW,
           optional compile and activation checkpointing) against the official numerics mode (fp32,
           text padded to 64, the math attention kernel, unfused AdamW).
    all    data, then model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmark")

Runner = Callable[[argparse.Namespace], list[dict[str, Any]]]
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str) -> Callable:
    def register(
        fn: Callable[[argparse.ArgumentParser], Runner],
    ) -> Callable[[argparse.ArgumentParser], Runner]:
        SUBCOMMANDS[name] = (help, fn)
        return fn

    return register


def machine_info() -> dict[str, Any]:
    import numpy as np
    import PIL
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


# --- data -------------------------------------------------------------------------------------------


def _fake_coco(root: Path, num_images: int, samples: int, size: tuple[int, int], seed: int) -> list[str]:
    """JPEGs with photo-like statistics (smooth shading, shapes, texture noise) + a unc split file."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    img_dir = root / "other/images/mscoco/images/train2014"
    img_dir.mkdir(parents=True)
    (root / "splits/unc").mkdir(parents=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    words = ["man", "woman", "dog", "car", "red", "shirt", "tall", "chair", "near", "with", "the", "white"]
    spatial = ["left", "right", "top", "bottom", "middle"]
    records, phrases = [], []
    for n in range(num_images):
        base = np.stack(
            [
                np.sin(xx / rng.uniform(40, 200) + c) * 60 + np.cos(yy / rng.uniform(40, 200) + c) * 50
                for c in range(3)
            ],
            -1,
        )
        base = base + rng.uniform(60, 190, size=3) + rng.normal(0, 12, size=(h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            draw.ellipse(
                [x0, y0, x0 + rng.uniform(20, 200), y0 + rng.uniform(20, 200)],
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
            )
        fname = f"COCO_train2014_{n:012d}.jpg"
        img.save(img_dir / fname, "JPEG", quality=90)
    for k in range(samples):
        n = k % num_images
        bw, bh = rng.uniform(30, w * 0.6), rng.uniform(30, h * 0.6)
        bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        poly = [bx, by, bx + bw, by + bh * 0.1, bx + bw * 0.9, by + bh, bx + bw * 0.05, by + bh * 0.8]
        phrase = " ".join(rng.choice(words, size=int(rng.integers(2, 7))))
        if rng.random() < 0.4:
            phrase += " on the " + str(rng.choice(spatial))
        phrases.append(phrase)
        records.append(
            (f"COCO_train2014_{n:012d}.jpg", {"height": h, "width": w}, [bx, by, bw, bh], phrase, [poly])
        )
    torch.save(records, root / "splits/unc/unc_train.pth")
    return phrases


def _fresh_memory_row(img_size: int, batch_size: int, repeats: int = 5) -> dict[str, Any]:
    """Cost of only writing a batch's output tensors into fresh memory (what a worker's collate must
    do for the float32 image and the masks). Page faults dominate it and vary a lot between machines
    (expensive in small VMs), so it is reported for context."""
    import numpy as np
    import torch

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        image = torch.empty((batch_size, 3, img_size, img_size), dtype=torch.float32)
        masks = torch.empty((batch_size, 2, img_size, img_size), dtype=torch.bool)
        image.numpy()[...] = 0
        masks.numpy()[...] = False
        best = min(best, time.perf_counter() - t0)
        del image, masks
    return {
        "bench": "data",
        "mode": "fresh-memory write only",
        "img_size": img_size,
        "workers": "1 (in-process)",
        "samples_per_s_cpu_best": batch_size / best,
        "ms_per_sample": float(np.round(1e3 * best / batch_size, 3)),
    }


@subcommand("data", "training samples/s per loader worker on 640x480 JPEGs")
def data_bench(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--num-images", type=int, default=64, help="distinct JPEG files")
    p.add_argument("--samples", type=int, default=1024, help="samples timed per configuration")
    p.add_argument("--image-size", default="640x480", help="WxH of the JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--round-size", type=int, default=128, help="samples per timed round (whole batches)")
    p.add_argument(
        "--loader-workers", type=int, nargs="*", default=[2], help="also time a DataLoader with N workers"
    )
    p.add_argument("--seed", type=int, default=0)
    return run_data_bench


def run_data_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np
    from torch.utils.data import DataLoader

    from oneref.data.anchors import RuleAnchorParser
    from oneref.data.datamodule import _init_worker
    from oneref.data.datasets import RefCollate, RefDataset, configure_worker_process
    from oneref.data.mrefm import MRefMConfig
    from oneref.data.tokenizer import Tokenizer, train_sentencepiece

    configure_worker_process()  # what RefDataModule's DataLoader workers run first
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phrases = _fake_coco(root, args.num_images, max(args.samples, 2 * args.batch_size), (w, h), args.seed)
        tok = Tokenizer(train_sentencepiece(phrases, root / "bench.model", vocab_size=64), 64)
        # MRefM fields on top of the REC training pipeline (7 scales, so only the extra work differs)
        mrefm = MRefMConfig(enabled=True, mim_scales=False)
        anchors = dict(zip(phrases, RuleAnchorParser().parse(phrases)))
        configs = [
            ("train", False, {}),
            ("train+mrefm", False, {}),
            ("train", True, {}),
            ("train-exact", False, {"resize_backend": "pil", "jpeg_draft": False}),
            ("eval", False, {}),
        ]
        for mode, seg, aug in configs:
            with_mrefm = mode.endswith("+mrefm")
            ds = RefDataset(
                "unc",
                "train",
                root,
                root / "splits",
                img_size=args.img_size,
                train=mode.startswith("train"),
                augment=aug,
                seg_masks=seg,
                tokenizer=tok,
                seed=args.seed,
                mrefm=mrefm if with_mrefm else None,
                anchors=anchors if with_mrefm else None,
            )
            collate = RefCollate(64, mrefm=mrefm)
            order = np.random.default_rng(args.seed).permutation(len(ds))[: args.samples]
            for i in order[:8]:  # warm-up (imports, caches)
                ds[int(i)]
            # Rounds of whole batches; the best round is the per-worker capability on a busy machine.
            rounds = [order[k : k + args.round_size] for k in range(0, len(order), args.round_size)]
            cpu_rates, wall_rates = [], []
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            for rnd in rounds:
                c0, t0 = time.process_time(), time.perf_counter()
                batch: list = []
                for i in rnd:
                    batch.append(ds[int(i)])
                    if len(batch) == args.batch_size:
                        collate(batch)
                        batch = []
                if batch:
                    collate(batch)
                cpu_rates.append(len(rnd) / (time.process_time() - c0))
                wall_rates.append(len(rnd) / (time.perf_counter() - t0))
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            rows.append(
                {
                    "bench": "data",
                    "mode": mode,
                    "seg_masks": seg,
                    "img_size": args.img_size,
                    "images": f"{w}x{h} JPEG",
                    "workers": "1 (in-process)",
                    "samples": len(order),
                    "samples_per_s_cpu_best": max(cpu_rates),
                    "samples_per_s_cpu_median": float(np.median(cpu_rates)),
                    "samples_per_s_wall_median": float(np.median(wall_rates)),
                    "involuntary_ctx_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
                }
            )
            log.info("%s", rows[-1])
        rows.append(_fresh_memory_row(args.img_size, args.batch_size))
        log.info("%s", rows[-1])
        ds = RefDataset(
            "unc",
            "train",
            root,
            root / "splits",
            img_size=args.img_size,
            train=True,
            tokenizer=tok,
            seed=args.seed,
        )
        for nw in args.loader_workers:
            dl = DataLoader(
                ds,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=nw,
                collate_fn=RefCollate(64),
                persistent_workers=nw > 0,
                drop_last=True,
                worker_init_fn=_init_worker if nw else None,
            )
            it = iter(dl)
            next(it)  # worker start-up excluded
            t0, n = time.perf_counter(), 0
            while n < args.samples:
                try:
                    n += len(next(it)["index"])
                except StopIteration:
                    it = iter(dl)
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "bench": "data",
                    "mode": "train",
                    "seg_masks": False,
                    "img_size": args.img_size,
                    "images": f"{w}x{h} JPEG",
                    "workers": f"{nw} (DataLoader)",
                    "samples": n,
                    "samples_per_s_wall": n / wall,
                }
            )
            del it, dl
    return rows


# --- model ------------------------------------------------------------------------------------------
@subcommand("model", "REC training-step throughput and peak memory, ours vs the official numerics")
def model_bench(p: argparse.ArgumentParser) -> Runner:
    p.add_argument(
        "--sizes", nargs="+", default=None, help="model sizes (default: base large on CUDA, tiny on CPU)"
    )
    p.add_argument("--img-size", type=int, default=None, help="default 384 (tiny: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (large on CUDA: 16)")
    p.add_argument("--text-len", type=int, default=20, help="longest expression in the batch (ids)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["official", "ours"],
        choices=["official", "ours", "ours_compile", "ours_ckpt"],
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return run_model_bench


def _model_step_fn(size: str, img_size: int, mode: str, device: Any) -> tuple[Any, Callable[[dict], Any]]:
    import torch

    from oneref.models.registry import create_model
    from oneref.tasks.losses import GroundingCriterion

    torch.manual_seed(0)
    extra = {"patch_size": 8, "depth": 3} if size == "tiny" else {}
    model = create_model(size, img_size=img_size, **extra).to(device)
    if mode == "ours_ckpt":
        model.set_grad_checkpointing(True)
    if mode == "ours_compile":
        for layer in model.beit3.encoder.layers:
            layer.compile()
    cuda = device.type == "cuda"
    fused = cuda and mode != "official"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)
    criterion = GroundingCriterion(use_regress_box=True, use_box_mask_constraints=True)
    bf16 = cuda and mode != "official"

    def step(batch: dict) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if mode == "official":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH):
                    out = model(batch["image"], batch["text_ids"], batch["text_padding_mask"])
            else:
                out = model(batch["image"], batch["text_ids"], batch["text_padding_mask"])
        loss = criterion(out, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def _model_batch(b: int, img_size: int, text_len: int, pad_to: int | None, device: Any) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    n = max(text_len, pad_to or 0)
    lengths = torch.randint(max(3, text_len // 2), text_len + 1, (b,), generator=g)
    lengths[0] = text_len
    ids = torch.randint(4, 1000, (b, n), generator=g)
    ids[:, 0] = 0
    pad = torch.arange(n)[None] >= lengths[:, None]
    ids[pad] = 1
    cxcy = torch.rand(b, 2, generator=g) * 0.5 + 0.25
    wh = torch.rand(b, 2, generator=g) * 0.3 + 0.1
    obj = torch.zeros(b, 1, img_size, img_size, dtype=torch.bool)
    for k in range(b):  # benchmark setup only, outside the timed region
        x0, y0 = ((cxcy[k] - wh[k] / 2) * img_size).long().tolist()
        x1, y1 = ((cxcy[k] + wh[k] / 2) * img_size).long().tolist()
        obj[k, 0, y0:y1, x0:x1] = True
    batch = {
        "image": torch.randn(b, 3, img_size, img_size, generator=g),
        "text_ids": ids,
        "text_padding_mask": pad,
        "box": torch.cat([cxcy, wh], 1),
        "obj_mask": obj,
    }
    return {k: v.to(device) for k, v in batch.items()}


def run_model_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cuda = device.type == "cuda"
    sizes = args.sizes or (["base", "large"] if cuda else ["tiny"])
    rows = []
    for size in sizes:
        img = args.img_size or (64 if size == "tiny" else 384)
        b = args.batch_size or (16 if cuda and size == "large" else 32)
        for mode in args.modes:
            pad_to = 64 if mode == "official" else None
            try:
                model, step = _model_step_fn(size, img, mode, device)
                batch = _model_batch(b, img, args.text_len, pad_to, device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(args.warmup):
                    step(batch)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    loss = step(batch)
                float(loss)  # waits for the device
                wall = time.perf_counter() - t0
            except torch.OutOfMemoryError:
                rows.append(
                    {"size": size, "img_size": img, "batch": b, "mode": mode, "error": "out of memory"}
                )
                torch.cuda.empty_cache()
                continue
            row = {
                "size": size,
                "img_size": img,
                "batch": b,
                "text_ids": batch["text_ids"].shape[1],
                "mode": mode,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "ms_per_step": 1000 * wall / args.steps,
                "samples_per_s": b * args.steps / wall,
            }
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            else:
                row["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            rows.append(row)
            log.info("%s", row)
            del model, step, batch
            if cuda:
                torch.cuda.empty_cache()
    base = {
        (r["size"], r["img_size"]): r["samples_per_s"]
        for r in rows
        if r.get("mode") == "official" and "samples_per_s" in r
    }
    for r in rows:
        ref = base.get((r["size"], r["img_size"]))
        if ref and "samples_per_s" in r:
            r["speedup_vs_official"] = r["samples_per_s"] / ref
    return rows


@subcommand("all", "data, then model")
def all_bench(p: argparse.ArgumentParser) -> Runner:
    data_defaults = argparse.ArgumentParser()
    data_bench(data_defaults)
    model_defaults = argparse.ArgumentParser()
    model_bench(model_defaults)

    def run(args: argparse.Namespace) -> list[dict[str, Any]]:
        rows = [{"bench": "data", **r} for r in run_data_bench(data_defaults.parse_args([]))]
        return rows + [{"bench": "model", **r} for r in run_model_bench(model_defaults.parse_args([]))]

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    runners: dict[str, Runner] = {}
    for name, (help_text, add) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--out", type=Path, default=None, help=f"JSON output (default bench_{name}.json)")
        runners[name] = add(sp)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("oneref").setLevel(logging.WARNING)
    rows = runners[args.command](args)
    out = args.out or Path(f"bench_{args.command}.json")
    out.write_text(json.dumps({"command": args.command, "machine": machine_info(), "rows": rows}, indent=1))
    log.info("%s\nwritten to %s", format_table(rows), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
