"""LightningDataModule for every dataset: official split files and the embedded synthetic data."""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from oneref.data.anchors import (
    AnchorParser,
    Anchors,
    ensure_anchor_cache,
    make_parser,
    merge_anchor_maps,
    read_anchor_cache,
)
from oneref.data.datasets import RefCollate, RefDataset, configure_worker_process, pad_index
from oneref.data.mrefm import MRefMConfig
from oneref.data.records import (
    DATASETS,
    DEFAULT_TEST_SPLITS,
    RecordError,
    load_records,
    load_split_file,
    parse_record,
    split_files,
)
from oneref.data.synthetic import SyntheticConfig, SyntheticPaths, ensure_synthetic
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import AugmentConfig, letterbox_box

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # omegaconf is a dependency, but the data code does not need it
        pass
    return value


def _splits(value: str | Sequence[str] | None) -> list[str]:
    value = _plain(value)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


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


def _init_worker(worker_id: int) -> None:
    configure_worker_process()
    # Library RNGs in workers (augmentations use their own per-sample generator).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class RefDataModule(L.LightningDataModule):
    """REC/RES data for one dataset: train split, one or more val splits, one loader per test split.

    Args:
        dataset: unc, unc+, gref, gref_umd, referit, flickr, mixup_with_refc, mixup_with_refc_referit
            or synthetic.
        data_root: image folders (records.IMAGE_DIRS); for synthetic, the cache folder it is generated into.
        split_root: the released annotations as downloaded (`single_dataset/<name>/<name>_<split>.pth`,
            `mixup_with_refc/mixup/mixup_<split>.pth`, ...) or the flat `{dataset}/{dataset}_{split}.pth`
            layout (`records.split_file_candidates`); default `{data_root}/splits` (where the
            synthetic generator writes them).
        tokenizer: sentencepiece model path (`beit3.spm` for official weights); None for synthetic
            uses the model generated with the data.
        img_size, max_query_len: letterbox side S, text ids per expression (with bos/eos).
        train_split, val_split, test_splits: split names; val_split may be a list; test_splits
            default per dataset (records.DEFAULT_TEST_SPLITS).
        batch_size, eval_batch_size: per device; eval_batch_size defaults to batch_size.
        num_workers, pin_memory: DataLoader settings (workers are persistent and seeded);
            num_workers ``auto`` = the CPUs per device minus one, at most MAX_AUTO_WORKERS.
        pad_to_max_len: pad text to max_query_len (official) instead of the batch's longest.
        text_buckets: pad text to the smallest of these lengths that holds the batch's longest
            (static shapes for torch.compile / CUDA graphs); None = the batch's longest.
        seg_masks: RES object masks from COCO polygons; otherwise box rectangles.
        augment: AugmentConfig fields (enabled, aug_crop, aug_scale, aug_translate, aug_blur,
            color_jitter, ...).
        bad_samples: "raise" or "skip".
        synthetic: SyntheticConfig fields, used when dataset == "synthetic".
        seed: base seed of sampling order and augmentations.
        drop_last: drop the last incomplete training batch (official).
        image_dirs: override image folders per record source (coco, referit, flickr, synthetic).
        mean_box_samples: training records used by `mean_train_box` (None = all).
        cache_samples: keep loaded samples in memory (RefDataset; deterministic samples only).
        orig_masks: evaluation batches also carry the object masks at each image's own size
            (``orig_mask``, a list), for RES metrics at the original resolution.
        mrefm: `oneref.data.mrefm.MRefMConfig` fields: training batches also carry the MRefM inputs
            (off by default). `prepare_data` then parses the training phrases once per split file
            into the anchor cache (`oneref.data.anchors`).
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        data_root: str | Path = "data/synthetic",
        split_root: str | Path | None = None,
        tokenizer: str | Path | None = None,
        img_size: int = 384,
        max_query_len: int = 64,
        train_split: str = "train",
        val_split: str | Sequence[str] = "val",
        test_splits: Sequence[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = 4,
        pin_memory: bool = True,
        pad_to_max_len: bool = False,
        text_buckets: Sequence[int] | None = None,
        seg_masks: bool = False,
        augment: Mapping[str, Any] | AugmentConfig | None = None,
        bad_samples: str = "raise",
        synthetic: Mapping[str, Any] | SyntheticConfig | None = None,
        seed: int = 0,
        drop_last: bool = True,
        image_dirs: Mapping[str, str] | None = None,
        mean_box_samples: int | None = 20000,
        cache_samples: bool = False,
        orig_masks: bool = False,
        mrefm: Mapping[str, Any] | MRefMConfig | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        self.dataset = dataset
        self.data_root = Path(data_root).expanduser()
        self.split_root = Path(split_root).expanduser() if split_root else None
        self.tokenizer_path = Path(tokenizer).expanduser() if tokenizer else None
        self.img_size = int(img_size)
        self.max_query_len = int(max_query_len)
        self.train_split = train_split
        self.val_split_names = _splits(val_split)
        self.test_split_names = _splits(test_splits) or list(DEFAULT_TEST_SPLITS[dataset])
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        resolve_num_workers(num_workers)  # a bad value fails here, not when the first loader starts
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.pad_to_max_len = bool(pad_to_max_len)
        buckets = _plain(text_buckets)
        RefCollate(self.max_query_len, self.pad_to_max_len, text_buckets=buckets)  # validates them
        self.text_buckets = list(buckets) if buckets else None
        self.seg_masks = bool(seg_masks)
        self.augment = AugmentConfig.from_any(_plain(augment))
        self.bad_samples = bad_samples
        self.synthetic = SyntheticConfig.from_any(_plain(synthetic)) if dataset == "synthetic" else None
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.image_dirs = dict(_plain(image_dirs) or {})
        self.mean_box_samples = mean_box_samples
        self.cache_samples = bool(cache_samples)
        self.orig_masks = bool(orig_masks)
        self.mrefm = MRefMConfig.from_any(_plain(mrefm))
        self._anchor_parser: AnchorParser | None = None
        self._warned_rules = False
        self._tokenizer: Tokenizer | None = None
        self.train_set: RefDataset | None = None
        self.val_sets: list[RefDataset] = []
        self.test_sets: list[RefDataset] = []
        self._loaders: dict[str, Any] = {}
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "dataset": dataset,
                "data_root": str(self.data_root),
                "split_root": str(self.split_root) if self.split_root else None,
                "tokenizer": str(self.tokenizer_path) if self.tokenizer_path else None,
                "img_size": self.img_size,
                "max_query_len": self.max_query_len,
                "train_split": train_split,
                "val_split": list(self.val_split_names),
                "test_splits": list(self.test_split_names),
                "batch_size": self.batch_size,
                "eval_batch_size": self.eval_batch_size,
                "pad_to_max_len": self.pad_to_max_len,
                **({"text_buckets": self.text_buckets} if self.text_buckets else {}),
                "seg_masks": self.seg_masks,
                "augment": self.augment.as_dict(),
                "bad_samples": bad_samples,
                "synthetic": self.synthetic.as_dict() if self.synthetic else None,
                "seed": self.seed,
                "drop_last": self.drop_last,
                # only when on, so that runs without MRefM keep their hyperparameters unchanged
                **({"mrefm": self.mrefm.as_dict()} if self.mrefm.enabled else {}),
            }
        )

    # --- data preparation ---------------------------------------------------------------------------
    def _ensure_synthetic(self) -> SyntheticPaths | None:
        if self.dataset != "synthetic":
            return None
        return ensure_synthetic(self.data_root, self.synthetic)

    def prepare_data(self) -> None:
        """Generates the synthetic dataset if it is missing; with MRefM, parses the training and
        validation phrases into the anchor cache if not cached yet (rank 0)."""
        self._ensure_synthetic()
        if self.mrefm.enabled:
            for split in self._mrefm_splits():
                self._anchor_cache_files(split)

    # --- MRefM anchors ------------------------------------------------------------------------------
    @property
    def anchor_parser(self) -> AnchorParser:
        if self._anchor_parser is None:
            m = self.mrefm
            if m.spacy_model is None:
                kwargs: dict[str, Any] = {}
            else:
                kwargs = {"batch_size": m.spacy_batch_size, "n_process": m.spacy_processes}
            self._anchor_parser = make_parser(m.spacy_model, **kwargs)
        return self._anchor_parser

    @property
    def anchor_cache_dir(self) -> Path:
        if self.mrefm.cache_dir:
            return Path(self.mrefm.cache_dir).expanduser()
        return Path(os.environ.get("ONEREF_CACHE", ".cache")).expanduser() / "anchors"

    def _mrefm_splits(self) -> list[str]:
        """Splits that carry the MRefM fields: training, and validation (MIM/MLM loss and accuracy)."""
        return list(dict.fromkeys([self.train_split, *self.val_split_names]))

    def _anchor_cache_files(self, split: str) -> list[Path]:
        """One cache file per split file of ``split``, parsed here when missing."""
        parser = self.anchor_parser
        if parser.backend == "rules" and not self._warned_rules:
            self._warned_rules = True
            log.warning(
                "MRefM anchors: no spaCy model configured (data.mrefm.spacy_model), using the rule-based "
                "fallback; its subjects/objects differ from the official en_core_web_md parses"
            )
        paths = []
        for f in split_files(self.resolved_split_root, self.dataset, split):
            if not f.is_file():  # the same error as the dataset's, before any parsing
                load_records(self.resolved_split_root, self.dataset, split, data_root=self.data_root)
            paths.append(
                ensure_anchor_cache(
                    self.anchor_cache_dir, f, parser, read_phrases=lambda f=f: self._split_phrases(f)
                )
            )
        return paths

    def _split_phrases(self, path: Path) -> list[str]:
        phrases = []
        for k, raw in enumerate(load_split_file(path)):
            try:
                phrases.append(parse_record(self.dataset, raw, where=f"{path} record {k}").phrase)
            except RecordError:  # reported (or raised) when the dataset loads the split
                continue
        return phrases

    def split_anchors(self, split: str) -> dict[str, Anchors]:
        """phrase -> Anchors of a split (parsed first if not cached)."""
        return merge_anchor_maps(read_anchor_cache(p) for p in self._anchor_cache_files(split))

    @property
    def resolved_split_root(self) -> Path:
        if self.split_root is not None:
            return self.split_root
        return self.data_root / "splits"

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = self.tokenizer_path
            if path is None:
                synth = self._ensure_synthetic()
                if synth is None:
                    raise ValueError(
                        f"dataset {self.dataset!r} needs a tokenizer: set data.tokenizer to the path of "
                        "beit3.spm (BEiT-3 release, microsoft/unilm on GitHub, beit3 README)"
                    )
                path = synth.tokenizer
            self._tokenizer = Tokenizer(path, self.max_query_len)
        return self._tokenizer

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenise with ``tokenizer`` instead of ``tokenizer_path`` (the one a checkpoint carries:
        oneref.factory.follow_checkpoint_tokenizer)."""
        self._tokenizer = tokenizer

    def _make(self, split: str, train: bool) -> RefDataset:
        mrefm = self.mrefm.enabled and (train or split in self.val_split_names)
        return RefDataset(
            self.dataset,
            split,
            self.data_root,
            self.resolved_split_root,
            img_size=self.img_size,
            train=train,
            augment=self.augment,
            seg_masks=self.seg_masks,
            tokenizer=self.tokenizer,
            bad_samples=self.bad_samples,
            seed=self.seed,
            image_dirs=self.image_dirs,
            cache_samples=self.cache_samples,
            orig_masks=self.orig_masks,  # the dataset applies it to evaluation splits only
            mrefm=self.mrefm if mrefm else None,
            anchors=self.split_anchors(split) if mrefm else None,
        )

    def setup(self, stage: str | None = None) -> None:
        self._ensure_synthetic()  # idempotent; covers setup() without prepare_data()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._make(self.train_split, train=True)
        if stage in (None, "fit", "validate") and not self.val_sets:
            self.val_sets = [self._make(s, train=False) for s in self.val_split_names]
        if stage in (None, "test") and not self.test_sets:
            self.test_sets = [self._make(s, train=False) for s in self.test_split_names]
        sizes = {
            "train": len(self.train_set) if self.train_set else None,
            **{f"val/{d.split}": len(d) for d in self.val_sets},
            **{f"test/{d.split}": len(d) for d in self.test_sets},
        }
        log.info(
            "%s data (stage %s): %s",
            self.dataset,
            getattr(stage, "value", stage),
            {k: v for k, v in sizes.items() if v is not None},
        )

    # --- loaders ------------------------------------------------------------------------------------
    def _collate(self) -> RefCollate:
        return RefCollate(
            self.max_query_len, self.pad_to_max_len, self.tokenizer, self.mrefm, self.text_buckets
        )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return _world()

    def _loader(
        self,
        ds: RefDataset,
        sampler: DistributedSampler,
        batch_size: int,
        drop_last: bool,
        loader: type[DataLoader] = DataLoader,
        **extra: Any,
    ) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        workers = resolve_num_workers(self.num_workers, trainer.num_devices if trainer is not None else 1)
        return loader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self._collate(),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=workers > 0,
            worker_init_fn=_init_worker if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        world, rank = self._rank()
        sampler = EpochSampler(self.train_set, world, rank, shuffle=True, seed=self.seed)
        loader = self._loader(self.train_set, sampler, self.batch_size, self.drop_last, ResumableLoader)
        if self._resume is not None:  # mid-epoch resume: skip what the checkpoint had trained on
            epoch, done = self._resume
            if 0 < done < len(loader):
                sampler.skip(epoch, done * self.batch_size)
                log.info("resuming epoch %d after its first %d batches", epoch, done)
            self._resume = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Where the training epoch stands (saved in every checkpoint, read back on resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(trainer.current_epoch), "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "batches_done" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def _eval_loaders(self, sets: list[RefDataset]) -> list[DataLoader]:
        world, rank = self._rank()
        return [self._loader(d, ShardSampler(d, world, rank), self.eval_batch_size, False) for d in sets]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_sets:
            self.setup("validate")
        loaders = self._eval_loaders(self.val_sets)
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test_sets:
            self.setup("test")
        return self._eval_loaders(self.test_sets)

    # --- reporting ----------------------------------------------------------------------------------
    def bad_sample_report(self) -> list[dict[str, Any]]:
        """Skipped/unparsable sample counts per loaded split (also logged)."""
        reports = []
        for ds in [self.train_set, *self.val_sets, *self.test_sets]:
            if ds is None:
                continue
            rep = ds.bad_sample_report()
            reports.append(rep)
            if rep["skipped"] or rep["unparsable"]:
                log.warning(
                    "%s: %d samples skipped, %d records unparsable, e.g. %s",
                    rep["dataset"],
                    rep["skipped"],
                    rep["unparsable"],
                    rep["examples"],
                )
        return reports

    def teardown(self, stage: str) -> None:
        self.bad_sample_report()

    def mean_train_box(self) -> torch.Tensor:
        """Mean normalised (cx, cy, w, h) training box after the evaluation letterbox.

        The trivial baseline predicts it for every sample. Records without a size (ReferIt, Flickr)
        read their image header; at most `mean_box_samples` evenly spaced records are used.
        """
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        n = len(ds)
        k = n if self.mean_box_samples is None else min(n, int(self.mean_box_samples))
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
            boxes.append(letterbox_box(rec.box, h, w, self.img_size))
        if not boxes:
            raise ValueError(f"{ds.name}: no readable training record to average")
        mean = np.mean(np.stack(boxes), axis=0, dtype=np.float64)
        return torch.tensor(mean, dtype=torch.float32)
