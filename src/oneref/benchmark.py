"""oneref benchmarks, one runner per measured thing (timm's benchmark.py runners):
`python scripts/benchmark.py <command> [options]` (or `python -m oneref.benchmark`).

Every command appends one JSON line per configuration to `--out` (default `bench_<command>.jsonl`)
and logs a table. A runner is registered in RUNNERS with :func:`register`: its name, what it
measures, its options and the function that returns its rows.

Runners:
    train  what `python -m oneref.train` runs: the real Hydra config (conf/train.yaml, task, model,
           optim), `oneref.factory.build_module` / `build_trainer`, and a short `Trainer.fit` on fixed
           in-memory batches collated by `RefCollate`, so the GroundingModule training step with
           its own optimizer, schedule, freezing and precision is what is timed. The library's
           `oneref.tasks.throughput.StepWindow` callback times the steps after warm-up (CUDA events;
           a synchronize only at the ends of the window). `--modes official ours`: the
           official numerics (fp32, text padded to 64 ids, the math attention kernel, unfused
           AdamW) are the 1.0x reference; `ours` takes `--precision` (auto: bf16-mixed on CUDA),
           `--compile`, `--compile-mode`, `--grad-ckpt`, `--attention`, `--text` (64 | realistic |
           N) and `--text-buckets`.
    infer  the evaluation step (`Trainer.test`: forward and metrics), same options.
    mrefm  the MRefM pretraining step (`task=mrefm`, built by the same factory) on batches from the
           real data pipeline with the MRefM fields (synthetic images); beyond tiny, a random
           VQ-KD of the released shape (the same compute without the file).
    records  parse time of a full-size REFER RefCOCO file (synthetic, 142k sentences), cold, from the
           content-hashed records cache and in process (`oneref.data.formats`).
    data   training samples/s per loader worker at 384 px on JPEG images (decode, augment, letterbox,
           mask, tokenise, collate), on synthetic 640x480 JPEGs in a temporary folder; also with the
           MRefM fields (`train+mrefm`: VQ-KD image, MIM mask, VTS, text masking).
    all    data, then train.

Rows carry samples/s, ms per step, the forward GFLOPs per sample (FlopCounterMode on a meta copy of
our model, at each batch's padded text length), model TFLOP/s (3x the forward for training), MFU
against the device's dense bf16 peak (`oneref.tasks.throughput.PEAK_BF16_FLOPS`: 989 TFLOP/s for
H100 SXM and H200), peak GiB (CUDA) or max RSS (CPU), device, torch version, git commit, load.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmark")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Runner:
    """One measured thing: ``add_arguments`` declares its options, ``run`` returns its rows."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Rows]


RUNNERS: dict[str, Runner] = {}


def register(runner: Runner) -> Runner:
    if runner.name in RUNNERS:
        raise ValueError(f"a benchmark runner named {runner.name!r} is already registered")
    RUNNERS[runner.name] = runner
    return runner


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
    """JPEGs with photo-like statistics (smooth shading, shapes, texture noise) + a refcoco split file."""
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


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--num-images", type=int, default=64, help="distinct JPEG files")
    p.add_argument("--samples", type=int, default=1024, help="samples timed per configuration")
    p.add_argument("--image-size", default="640x480", help="WxH of the JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--round-size", type=int, default=128, help="samples per timed round (whole batches)")
    p.add_argument(
        "--loader-workers", type=int, nargs="*", default=[2], help="also time a DataLoader with N workers"
    )
    p.add_argument(
        "--formats",
        nargs="*",
        default=["refer", "seqtr", "mdetr"],
        help="also time the training transform on the same records written in these annotation formats",
    )
    p.add_argument("--seed", type=int, default=0)


def _time_samples(ds: Any, collate: Any, args: argparse.Namespace, size: tuple[int, int]) -> dict[str, Any]:
    """Samples/s of one in-process worker over ``args.samples`` samples of ``ds`` (decode, transform,
    collate), in rounds of whole batches; the best round is the per-worker capability on a busy
    machine."""
    import numpy as np

    order = np.random.default_rng(args.seed).permutation(len(ds))[: args.samples]
    for i in order[:8]:  # warm-up (imports, caches)
        ds[int(i)]
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
    return {
        "img_size": args.img_size,
        "images": f"{size[0]}x{size[1]} JPEG",
        "workers": "1 (in-process)",
        "samples": len(order),
        "samples_per_s_cpu_best": max(cpu_rates),
        "samples_per_s_cpu_median": float(np.median(cpu_rates)),
        "samples_per_s_wall_median": float(np.median(wall_rates)),
        "involuntary_ctx_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
    }


def run_data_bench(args: argparse.Namespace) -> Rows:
    from torch.utils.data import DataLoader

    from oneref.data.anchors import RuleAnchorParser
    from oneref.data.config import DataConfig
    from oneref.data.datasets import RefCollate, RefDataset
    from oneref.data.mrefm import MRefMConfig
    from oneref.data.tokenizer import Tokenizer, train_sentencepiece
    from oneref.data.workers import configure_worker_process, init_worker

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
        common = dict(
            dataset="refcoco",
            data_root=root,
            split_root=root / "splits",
            img_size=args.img_size,
            seed=args.seed,
        )
        configs = [
            ("train", False, {}),
            ("train+mrefm", False, {}),
            ("train", True, {}),
            ("train-exact", False, {"resize_backend": "pil", "jpeg_draft": False}),
            ("eval", False, {}),
        ]
        for mode, seg, aug in configs:
            with_mrefm = mode.endswith("+mrefm")
            config = DataConfig(**common, augment=aug, seg_masks=seg, mrefm=mrefm if with_mrefm else None)
            ds = RefDataset(
                config,
                "train",
                train=mode.startswith("train"),
                tokenizer=tok,
                anchors=anchors if with_mrefm else None,
            )
            row = {"bench": "data", "mode": mode, "format": "oneref", "seg_masks": seg}
            rows.append({**row, **_time_samples(ds, RefCollate(64, mrefm=mrefm), args, (w, h))})
            log.info("%s", rows[-1])
        # The same records in every other annotation format (oneref.data.convert): after reading,
        # every format yields the same RefRecords, so the per-sample work must not differ.
        for fmt in args.formats:
            from oneref.data.convert import convert

            convert(root / "splits", root / fmt, to=fmt, datasets=["refcoco"], cache_dir=root / "cache")
            config = DataConfig(**{**common, "split_root": root / fmt}, format=fmt)
            ds = RefDataset(config, "train", train=True, tokenizer=tok)
            row = {"bench": "data", "mode": "train", "format": fmt, "seg_masks": False}
            rows.append({**row, **_time_samples(ds, RefCollate(64), args, (w, h))})
            log.info("%s", rows[-1])
        rows.append(_fresh_memory_row(args.img_size, args.batch_size))
        log.info("%s", rows[-1])
        ds = RefDataset(DataConfig(**common), "train", train=True, tokenizer=tok)
        for nw in args.loader_workers:
            dl = DataLoader(
                ds,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=nw,
                collate_fn=RefCollate(64),
                persistent_workers=nw > 0,
                drop_last=True,
                worker_init_fn=init_worker if nw else None,
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


register(
    Runner("data", "training samples/s per loader worker on 640x480 JPEGs", add_data_options, run_data_bench)
)


# --- reading annotations -------------------------------------------------------------------------
def _fake_refer(root: Path, refs_n: int, sentences: int, images: int, seed: int) -> None:
    """A REFER refcoco folder of the size asked (random boxes, one 16-point polygon per object,
    REFER's split shares of RefCOCO)."""
    import pickle
    import random

    rng = random.Random(seed)
    shares = (("train", 0.8485), ("val", 0.0762), ("testA", 0.0395), ("testB", 0.0358))
    imgs = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640}
        for i in range(images)
    ]
    anns, refs, sent_id = [], [], 0
    for r in range(refs_n):
        iid = r * images // refs_n
        x, y = rng.uniform(0, 300), rng.uniform(0, 200)
        w, h = rng.uniform(10, 300), rng.uniform(10, 250)
        poly = [v for k in range(16) for v in (x + w * (k % 4) / 3, y + h * (k // 4) / 3)]
        anns.append(
            {
                "id": r + 1,
                "image_id": iid,
                "bbox": [x, y, w, h],
                "segmentation": [poly],
                "area": w * h,
                "iscrowd": 0,
                "category_id": 1,
            }
        )
        n = sentences * (r + 1) // refs_n - sentences * r // refs_n
        u = rng.random()
        split = next(
            (
                s
                for s, c in ((s, sum(q for _, q in shares[: k + 1])) for k, (s, _) in enumerate(shares))
                if u < c
            ),
            "train",
        )
        sents = []
        for _ in range(n):
            words = rng.choices(
                ("man", "left", "red", "shirt", "the", "on", "woman", "car", "blue", "big"), k=4
            )
            sents.append(
                {"raw": " ".join(words), "sent": " ".join(words), "tokens": words, "sent_id": sent_id}
            )
            sent_id += 1
        refs.append(
            {
                "ref_id": r,
                "ann_id": r + 1,
                "image_id": iid,
                "split": split,
                "category_id": 1,
                "sent_ids": [s["sent_id"] for s in sents],
                "sentences": sents,
                "file_name": f"COCO_train2014_{iid:012d}_{r + 1}.jpg",
            }
        )
    d = root / "refcoco"
    d.mkdir(parents=True, exist_ok=True)
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (d / "instances.json").write_text(json.dumps({"images": imgs, "annotations": anns, "categories": []}))


def add_records_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refs", type=int, default=50000)
    p.add_argument("--sentences", type=int, default=142210)
    p.add_argument("--images", type=int, default=19994)


def run_records_bench(args: argparse.Namespace) -> Rows:
    import tempfile

    from oneref.data import formats
    from oneref.data.records import load_records

    dataset = "refcoco"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "refer", Path(tmp) / "cache"
        _fake_refer(root, args.refs, args.sentences, args.images, seed=0)
        mb = sum(f.stat().st_size for f in (root / "refcoco").iterdir()) / 2**20
        for stage in ("cold (parse + write cache)", "disk cache (new process)", "in process (second read)"):
            if stage != "in process (second read)":
                formats.forget()
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(
                len(load_records(root, dataset, s, format="refer", cache_dir=cache)[0])
                for s in ("train", "val", "testA", "testB")
            )
            cpu = time.process_time() - c0  # what the wall time is on an idle core
            rows.append(
                {
                    "stage": stage,
                    "sentences": n,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "cpu_seconds": round(cpu, 2),
                    "files_MB": round(mb, 1),
                }
            )
    return rows


register(
    Runner(
        "records",
        "parse time of a full-size REFER RefCOCO (142k sentences): cold, disk cache, in process",
        add_records_options,
        run_records_bench,
    )
)


# --- the training and evaluation steps users run ----------------------------------------------------
# Official numerics (the 1.0x reference): fp32, text padded to 64 ids, the math attention kernel,
# unfused AdamW, no compile.
OFFICIAL_TEXT_LEN = 64
DEFAULT_BATCH = {
    "train": {"tiny": 32, "base": 64, "large": 32},
    "infer": {"tiny": 64, "base": 128, "large": 64},
    "mrefm": {"tiny": 32, "base": 64, "large": 32},
}


def git_commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]  # the repository of a source checkout

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ONEREF_GIT_COMMIT", "unknown")


def compose_bench_config(overrides: list[str], output_dir: Path) -> Any:
    """The real training config (conf/train.yaml and its groups), composed as the CLI does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from oneref.config import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(
                config_name="train",
                overrides=[*overrides, "logger=none", f"paths.output_dir={output_dir}"],
            )
    finally:
        GlobalHydra.instance().clear()


def text_lengths(kind: str, b: int, gen: Any) -> Any:
    """Ids per expression (bos + pieces + eos): ``64`` (every row full), ``realistic`` (RefCOCO-like:
    85% of expressions 6-20 pieces, 10% 2-5, 5% 21-40) or an int N (every row N ids)."""
    import torch

    if kind == "realistic":
        u = torch.rand(b, generator=gen)
        pieces = torch.where(
            u < 0.85,
            torch.randint(6, 21, (b,), generator=gen),
            torch.where(
                u < 0.95, torch.randint(2, 6, (b,), generator=gen), torch.randint(21, 41, (b,), generator=gen)
            ),
        )
        return (pieces + 2).clamp(max=OFFICIAL_TEXT_LEN)
    n = int(kind)
    if not 3 <= n <= OFFICIAL_TEXT_LEN:
        raise ValueError(f"--text {kind}: a length must be within 3..{OFFICIAL_TEXT_LEN} ids, or 'realistic'")
    return torch.full((b,), n)


def synthetic_batch(
    b: int, img: int, vocab: int, lengths: Any, pad_to: int | None, buckets: list[int] | None, gen: Any
) -> dict[str, Any]:
    """One batch of random square images, boxes and token ids, collated by
    oneref.data.datasets.RefCollate itself (``pad_to``: data.pad_to_max_len; ``buckets``:
    data.text_buckets)."""
    import numpy as np
    import torch
    from PIL import Image

    from oneref.data.datasets import RefCollate
    from oneref.data.tokenizer import BOS_ID, EOS_ID
    from oneref.data.transforms import ObjMask, eval_transform

    samples = []
    for k in range(b):
        pixels = torch.randint(0, 256, (img, img, 3), generator=gen, dtype=torch.uint8).numpy()
        x, y = (torch.rand(2, generator=gen) * 0.5 * img).tolist()
        w, h = ((torch.rand(2, generator=gen) * 0.3 + 0.1) * img).tolist()
        n = int(lengths[k])
        ids = torch.randint(4, vocab, (n,), generator=gen).numpy()
        ids[0], ids[-1] = BOS_ID, EOS_ID
        result = eval_transform(
            Image.fromarray(pixels),
            np.array([x, y, x + w, y + h]),
            ObjMask.from_box_xywh(x, y, w, h, img, img),
            img,
        )
        samples.append(
            {
                "result": result,
                "text_ids": ids,
                "index": k,
                "phrase": "synthetic",
                "image_file": "synthetic.jpg",
            }
        )
    collate = RefCollate(OFFICIAL_TEXT_LEN, pad_to_max_len=pad_to is not None, text_buckets=buckets)
    return collate(samples)


class FixedBatches:
    """A map-style dataset of ready batches, cycled (``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i % len(self.batches)]


def _identity(x: Any) -> Any:
    return x


def add_step_options(p: argparse.ArgumentParser, bench: str) -> None:
    p.add_argument("--size", nargs="+", default=None, help="model sizes (default: base on CUDA, tiny on CPU)")
    if bench != "mrefm":
        p.add_argument("--task", nargs="+", default=["rec"], choices=["rec", "res"])
        p.add_argument(
            "--text",
            nargs="+",
            default=["64", "realistic"],
            help="text ids per expression for 'ours': 64, realistic (RefCOCO-like 6-20 pieces) or an int; "
            "the official mode always pads to 64",
        )
        p.add_argument(
            "--text-buckets",
            type=int,
            nargs="*",
            default=None,
            help="pad to these lengths (data.text_buckets)",
        )
    p.add_argument("--batch", type=int, default=None, help=f"per device (default {DEFAULT_BATCH[bench]})")
    p.add_argument("--img-size", type=int, default=None, help="default: 64 for tiny, 384 otherwise")
    p.add_argument("--modes", nargs="+", default=["official", "ours"], choices=["official", "ours"])
    p.add_argument(
        "--precision", default="auto", help="trainer.precision of 'ours' (auto: bf16-mixed on CUDA)"
    )
    p.add_argument("--compile", action="store_true", help="model.runtime.compile=true for 'ours'")
    p.add_argument(
        "--compile-mode", default="default", help="model.runtime.compile_mode (reduce-overhead: CUDA graphs)"
    )
    p.add_argument(
        "--grad-ckpt", action="store_true", help="model.runtime.grad_checkpointing=true for 'ours'"
    )
    p.add_argument(
        "--attention", default="sdpa", choices=["sdpa", "flex"], help="model.runtime.attention for 'ours'"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--batches", type=int, default=4, help="distinct in-memory batches, cycled")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every configuration")


def _mode_overrides(args: argparse.Namespace, mode: str, accelerator: str) -> tuple[list[str], str]:
    from oneref.factory import resolve_precision

    if mode == "official":
        return [
            "trainer.precision=32-true",
            "optim.optimizer.fused=false",
            "model.runtime.compile=false",
            "model.runtime.grad_checkpointing=false",
            "model.runtime.attention=sdpa",
        ], "32-true"
    precision = args.precision
    if precision == "auto":
        precision = resolve_precision("auto") if accelerator == "gpu" else "32-true"
    return [
        f"trainer.precision={precision}",
        f"model.runtime.compile={str(bool(args.compile)).lower()}",
        f"model.runtime.compile_mode={args.compile_mode}",
        f"model.runtime.grad_checkpointing={str(bool(args.grad_ckpt)).lower()}",
        f"model.runtime.attention={args.attention}",
    ], precision


def _compose_for(
    args: argparse.Namespace, bench: str, size: str, task: str, mode: str, out: Path
) -> tuple[Any, str]:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    accelerator = "gpu" if cuda else "cpu"
    overrides, precision = _mode_overrides(args, mode, accelerator)
    img = args.img_size or (64 if size == "tiny" else 384)
    task_name = "mrefm" if bench == "mrefm" else task
    group = [f"task={task_name}", f"model={size}", f"model.img_size={img}", *overrides]
    if bench == "mrefm":
        # its batches come from the real data pipeline with the MRefM fields, on the synthetic set
        group += ["data=synthetic", "data.mrefm.enabled=true", "data.synthetic.num_train=512"]
        group += ["data.pad_to_max_len=true"] if mode == "official" else []
        if size != "tiny":  # a random VQ-KD of the released shape: the same compute without the file
            group += [
                "task.vqkd.checkpoint=null",
                "task.vqkd.codebook_size=8192",
                "task.vqkd.random={seed:0,embed_dim:768,depth:12,num_heads:12,code_dim:32,num_codes:8192}",
            ]
    cfg = compose_bench_config([*group, *args.override], out)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.accelerator = accelerator
        cfg.trainer.devices = 1
        cfg.trainer.num_nodes = 1
        cfg.trainer.max_epochs = 1
        cfg.trainer.max_steps = args.warmup + args.steps
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        cfg.trainer.val_check_interval = None
        cfg.data.num_workers = 0
        cfg.strategy = {"_target_": "oneref.strategies.build_strategy", "name": "auto"}
    return cfg, precision


def _mrefm_batches(cfg: Any, n: int, b: int) -> list[dict[str, Any]]:
    from oneref import factory

    with __import__("omegaconf").open_dict(cfg):
        cfg.data.batch_size = b
    dm = factory.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def run_step_bench(args: argparse.Namespace, bench: str) -> Rows:
    import lightning as L
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.data import DataLoader

    from oneref import factory
    from oneref.tasks.throughput import StepWindow

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    sizes = args.size or (["base"] if cuda else ["tiny"])
    tasks = getattr(args, "task", ["rec"]) if bench != "mrefm" else ["mrefm"]
    texts = getattr(args, "text", ["data"]) if bench != "mrefm" else ["data"]
    device_name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    common = {
        "device": device_name,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_threads": torch.get_num_threads(),
    }
    total = args.warmup + args.steps
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for task in tasks:
                for mode in args.modes:
                    for text in ["64"] if mode == "official" and bench != "mrefm" else texts:
                        cfg, precision = _compose_for(args, bench, size, task, mode, Path(tmp))
                        b = args.batch or DEFAULT_BATCH[bench][size]
                        L.seed_everything(args.seed, verbose=False)
                        # built on the device: the official truncated-normal init is a rejection
                        # loop over every weight, minutes for OneRef-L on a CPU (not timed either way)
                        with torch.device("cuda" if cuda else "cpu"):
                            module = factory.build_module(cfg)
                        mcfg = module.model.cfg
                        if bench == "mrefm":
                            batches = _mrefm_batches(cfg, args.batches, b)
                        else:
                            gen = torch.Generator().manual_seed(args.seed)
                            pad_to = OFFICIAL_TEXT_LEN if mode == "official" else None
                            buckets = args.text_buckets if mode == "ours" else None
                            batches = [
                                synthetic_batch(
                                    b,
                                    mcfg.img_size,
                                    mcfg.vocab_size,
                                    text_lengths(text, b, gen),
                                    pad_to,
                                    buckets,
                                    gen,
                                )
                                for _ in range(args.batches)
                            ]
                        if cuda:  # what pin_memory=true gives the real loader
                            batches = [
                                {
                                    k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                    for k, v in x.items()
                                }
                                for x in batches
                            ]
                        loader = DataLoader(
                            FixedBatches(batches, total), batch_size=None, collate_fn=_identity
                        )
                        window = StepWindow(args.warmup, total, train=bench != "infer")
                        trainer = factory.build_trainer(cfg, callbacks=[window])
                        kernel = (
                            sdpa_kernel(SDPBackend.MATH) if mode == "official" else contextlib.nullcontext()
                        )
                        row: dict[str, Any] = {
                            "bench": bench,
                            "mode": mode,
                            "size": size,
                            "task": task,
                            "img_size": mcfg.img_size,
                            "batch": b,
                            "precision": precision,
                            "compile": bool(cfg.model.runtime.compile),
                            "compile_mode": str(cfg.model.runtime.compile_mode),
                            "grad_ckpt": bool(cfg.model.runtime.grad_checkpointing),
                            "attention": str(cfg.model.runtime.attention),
                            "fused_adamw": bool(cfg.optim.optimizer.get("fused", False)) and cuda,
                            "text": text,
                            "text_buckets": args.text_buckets
                            if mode == "ours" and bench != "mrefm"
                            else None,
                            "steps": args.steps,
                            "warmup": args.warmup,
                        }
                        try:
                            with kernel:
                                if bench == "infer":
                                    module.eval()
                                    trainer.test(module, dataloaders=loader, verbose=False)
                                else:
                                    trainer.fit(module, train_dataloaders=loader)
                        except torch.OutOfMemoryError:
                            rows.append({**row, **common, "error": "out of memory"})
                            log.info("%s", rows[-1])
                            del module, trainer
                            torch.cuda.empty_cache()
                            continue
                        row.update(window.result())
                        if not cuda:
                            # the process's peak so far (CPU runs report it for context only)
                            row["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                        rows.append({**row, **common})
                        log.info("%s", json.dumps(rows[-1]))
                        del module, trainer, batches, loader, window
                        gc.collect()  # the next configuration's memory figure starts clean
                        if cuda:
                            torch.cuda.empty_cache()
    ref = {
        (r["size"], r["task"], r["batch"]): r["samples_per_s"]
        for r in rows
        if r["mode"] == "official" and "samples_per_s" in r
    }
    for r in rows:
        base = ref.get((r["size"], r["task"], r["batch"]))
        if base and "samples_per_s" in r:
            r["speedup_vs_official"] = r["samples_per_s"] / base
    return rows


for _name, _help in (
    ("train", "training samples/s, MFU and peak memory of the real GroundingModule step (Trainer.fit)"),
    ("infer", "evaluation samples/s of the real test step (Trainer.test: forward and metrics)"),
    ("mrefm", "MRefM pretraining step (task=mrefm through the same factory), batches from its data"),
):
    register(
        Runner(
            _name,
            _help,
            functools.partial(add_step_options, bench=_name),
            functools.partial(run_step_bench, bench=_name),
        )
    )


def run_all(args: argparse.Namespace) -> Rows:
    """The data runner, then the train runner, each with its defaults."""
    rows: Rows = []
    for name in ("data", "train"):
        parser = argparse.ArgumentParser()
        RUNNERS[name].add_arguments(parser)
        rows += RUNNERS[name].run(parser.parse_args([]))
    return rows


register(Runner("all", "data, then train", lambda p: None, run_all))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, runner in RUNNERS.items():
        sp = sub.add_parser(name, help=runner.help)
        sp.add_argument(
            "--out",
            type=Path,
            default=None,
            help=f"JSON lines, one per configuration (default bench_{name}.jsonl)",
        )
        runner.add_arguments(sp)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("oneref", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = RUNNERS[args.command].run(args)
    out = args.out or Path(f"bench_{args.command}.jsonl")
    machine = machine_info()
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({"command": args.command, **r, "machine": machine}) + "\n")
    log.info("%s\nappended %d rows to %s", format_table(rows), len(rows), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
