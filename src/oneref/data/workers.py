"""DataLoader worker processes: how many (``data.num_workers``) and how each starts."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image

# "auto" loader workers: the CPUs of this process per device on the node, one left for the main
# process, at most this many (8 workers at ~150 samples/s each feed one H100 with OneRef-B).
MAX_AUTO_WORKERS = 8


def resolve_num_workers(value: int | str, devices: int = 1) -> int:
    """``data.num_workers``: an int >= 0, or ``auto`` (see MAX_AUTO_WORKERS)."""
    if value == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, min(MAX_AUTO_WORKERS, cpus // max(1, int(devices)) - 1))
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"data.num_workers must be an int >= 0 or 'auto', got {value!r}")
    return n


def configure_worker_process(pillow_blocks: int = 16) -> None:
    """Settings for a data-loading process (called in every DataLoader worker).

    Pillow returns freed image memory to the OS by default, so every decode and resize touches
    fresh pages; keeping a few freed blocks (each at most 16 MB, reused for the next image) avoids
    that. Torch ops in a worker stay on one thread.
    """
    Image.core.set_blocks_max(pillow_blocks)
    torch.set_num_threads(1)


def init_worker(worker_id: int) -> None:
    configure_worker_process()
    # Library RNGs in workers (augmentations use their own per-sample generator).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
