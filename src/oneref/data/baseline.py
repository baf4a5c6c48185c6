"""The trivial baseline: always predict the mean training box (its Acc@0.5 on each test split tells
how much of a score the box prior alone earns)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from oneref.data.datasets import RefDataset
from oneref.data.transforms import letterbox_box


def mean_train_box(datamodule: Any) -> torch.Tensor:
    """Mean normalised (cx, cy, w, h) training box after the evaluation letterbox.

    Records without a size (ReferIt, Flickr) read their image header; at most
    ``data.mean_box_samples`` evenly spaced records are used.
    """
    if datamodule.train_set is None:
        datamodule.setup("fit")
    ds: RefDataset = datamodule.train_set
    limit = datamodule.config.mean_box_samples
    n = len(ds)
    k = n if limit is None else min(n, int(limit))
    idx = np.unique(np.linspace(0, n - 1, num=k).round().astype(np.int64))
    boxes = []
    for i in idx:
        rec = ds.record(int(i))
        if rec.size is not None:
            h, w = rec.size
        else:
            try:
                with Image.open(ds.image_path(rec)) as im:
                    w, h = im.size
            except OSError:
                continue
        boxes.append(letterbox_box(rec.box, h, w, ds.config.img_size))
    if not boxes:
        raise ValueError(f"{ds.name}: no readable training record to average")
    mean = np.mean(np.stack(boxes), axis=0, dtype=np.float64)
    return torch.tensor(mean, dtype=torch.float32)


def mean_box_baseline(datamodule: Any, dataset: str, device: torch.device | str = "cpu") -> dict[str, float]:
    """Acc@0.5 of always predicting the mean training box, per test split.

    Call it on every rank of a distributed run: each rank reads its shard of the test loaders and
    the metric sums over all ranks, so the figure covers the whole split exactly (padding repeats
    count zero). ``device``: where the metric states live (the process group's device for NCCL).
    """
    from oneref.tasks.metrics import RECMetrics

    mean_box = torch.as_tensor(mean_train_box(datamodule), dtype=torch.float32, device=device)
    loaders = datamodule.test_dataloader()
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    out = {}
    for split, loader in zip(datamodule.test_split_names, loaders):
        metric = RECMetrics().to(device)
        for batch in loader:
            gt = batch["box"].to(device)
            metric.update(mean_box.expand_as(gt), gt, valid=batch["valid"])
        out[f"baseline/{dataset}/{split}/acc@0.5"] = float(metric.compute()["acc@0.5"])
    return out
