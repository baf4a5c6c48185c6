"""Sampling order of the loaders: the seeded (sharded) training sampler that resumes mid-epoch, the
evaluation shards that read each sample once, and the training loader that tells Lightning it resumes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from oneref.data.datasets import RefDataset, pad_index


class EpochSampler(DistributedSampler):
    """Seeded (optionally sharded) sampler that also tells the dataset the epoch.

    A `DistributedSampler`, so Lightning keeps it (no sampler replacement) and calls `set_epoch`; the
    dataset's per-sample augmentation generator is derived from (seed, epoch, index), which makes
    augmentations independent of the number of workers and of persistent worker state.
    """

    def __init__(self, dataset: RefDataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self._skip: tuple[int, int] | None = None  # (epoch, samples) already trained on

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if isinstance(self.dataset, RefDataset):
            # skipped samples are reported by the BadSampleReport callback and at teardown
            self.dataset.set_epoch(epoch)

    def skip(self, epoch: int, samples: int) -> None:
        """In ``epoch``, start after the first ``samples`` of this rank's order (a mid-epoch resume)."""
        self._skip = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()
        if self._skip is None or self._skip[0] != self.epoch:
            return order
        return itertools.islice(order, self._skip[1], None)


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch. After a resume from a step checkpoint the epoch
    continues with the batches it had not trained on yet, in the same order, so a preempted run ends
    where an uninterrupted one does. The position travels in the DataModule's own checkpoint state
    (RefDataModule.state_dict: the trainer's batch progress, since this loader is one batch ahead,
    Lightning prefetches); this class only tells Lightning that the loader resumes (its
    ``state_dict``/``load_state_dict`` protocol), so it does not warn that it cannot."""

    def state_dict(self) -> dict[str, Any]:
        return {"resumed_by": "RefDataModule.state_dict"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ShardSampler(DistributedSampler):
    """Evaluation sharding: rank r reads samples r, r + W, r + 2W, ... of the split, each sample once
    (the official DistributedSampler repeats samples to even the shards, which biases the metrics).

    Every rank still runs the same number of batches, because steps with a collective (FSDP's
    weight gathers, the contrastive loss's feature gather) deadlock otherwise: a short shard is
    padded with a repeat of its last sample marked ``valid=False`` in the batch, which every metric
    counts as zero (``datasets.pad_index``).
    """

    def __init__(self, dataset: RefDataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = math.ceil(len(dataset) / num_replicas)

    def __iter__(self) -> Iterator[int]:
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        pads = [pad_index(own[-1] if own else 0)] * (self.num_samples - len(own))
        return iter(own + pads)

    def __len__(self) -> int:
        return self.num_samples
