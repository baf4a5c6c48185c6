"""LightningDataModule for every dataset: official split files and the embedded synthetic data.

It prepares (the synthetic set, the MRefM anchor cache) and loads; every option comes from one
`DataConfig` (``data.*``)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from oneref.data.anchor_cache import SplitAnchors
from oneref.data.config import DataConfig
from oneref.data.datasets import RefCollate, RefDataset, carries_mrefm
from oneref.data.leakage import check_run
from oneref.data.samplers import EpochSampler, ResumableLoader, ShardSampler
from oneref.data.synthetic import SyntheticPaths, ensure_synthetic
from oneref.data.tokenizer import Tokenizer
from oneref.data.workers import init_worker, resolve_num_workers

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class RefDataModule(L.LightningDataModule):
    """REC/RES data for one dataset: train split, one or more val splits, one loader per test split.

    ``config``: every option (`DataConfig`). Hydra builds it from the ``data`` node through
    `from_config` (conf/data: ``_target_: oneref.data.datamodule.RefDataModule.from_config``).
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        if not isinstance(config, DataConfig):
            raise TypeError(f"RefDataModule takes a DataConfig, got {type(config).__name__}")
        self.config = config
        self.anchors = SplitAnchors(config)
        self._tokenizer: Tokenizer | None = None
        self.train_set: RefDataset | None = None
        self.val_sets: list[RefDataset] = []
        self.test_sets: list[RefDataset] = []
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._leakage_checked = False  # oneref.data.leakage.check_run, once
        # One key, so that it never clashes with the LightningModule's hyperparameters (a model
        # trained on one dataset evaluated on another); plain containers for weights_only loading.
        self.save_hyperparameters({"data": config.as_dict()})

    @classmethod
    def from_config(cls, node: Any = None, /, **options: Any) -> RefDataModule:
        """From the ``data`` config node or its options as keywords (Hydra's ``_target_``)."""
        return cls(DataConfig.from_dict(node, **options))

    @property
    def val_split_names(self) -> list[str]:
        return list(self.config.val_split)

    @property
    def test_split_names(self) -> list[str]:
        return list(self.config.test_splits)

    # --- data preparation ---------------------------------------------------------------------------
    def _ensure_synthetic(self) -> SyntheticPaths | None:
        if self.config.dataset != "synthetic":
            return None
        return ensure_synthetic(self.config.data_root, self.config.synthetic)

    def prepare_data(self) -> None:
        """Generates the synthetic dataset if it is missing; with MRefM, parses the training and
        validation phrases into the anchor cache if not cached yet (rank 0)."""
        self._ensure_synthetic()
        if self.config.mrefm.enabled:
            self.anchors.prepare()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = self.config.tokenizer
            if path is None:
                synth = self._ensure_synthetic()
                if synth is None:
                    raise ValueError(
                        f"dataset {self.config.dataset!r} needs a tokenizer: set data.tokenizer to the path "
                        "of beit3.spm (BEiT-3 release, microsoft/unilm on GitHub, beit3 README)"
                    )
                path = synth.tokenizer
            self._tokenizer = Tokenizer(path, self.config.max_query_len)
        return self._tokenizer

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenise with ``tokenizer`` instead of ``config.tokenizer`` (the one a checkpoint carries:
        oneref.factory.follow_checkpoint_tokenizer)."""
        self._tokenizer = tokenizer

    def _make(self, split: str, train: bool) -> RefDataset:
        anchors = self.anchors(split) if carries_mrefm(self.config, split, train) else None
        return RefDataset(self.config, split, train=train, tokenizer=self.tokenizer, anchors=anchors)

    def setup(self, stage: str | None = None) -> None:
        self._ensure_synthetic()  # idempotent; covers setup() without prepare_data()
        c = self.config
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._make(c.train_split, train=True)
        if stage in (None, "fit", "validate") and not self.val_sets:
            self.val_sets = [self._make(s, train=False) for s in c.val_split]
        if stage in (None, "test") and not self.test_sets:
            self.test_sets = [self._make(s, train=False) for s in c.test_splits]
        if self.train_set is not None and not self._leakage_checked:
            self._leakage_checked = True
            evals = {
                f"{k}/{d.split}": d.records
                for k, ds in (("val", self.val_sets), ("test", self.test_sets))
                for d in ds
            }
            check_run(c, self.train_set.records, evals)
        sizes = {
            "train": len(self.train_set) if self.train_set else None,
            **{f"val/{d.split}": len(d) for d in self.val_sets},
            **{f"test/{d.split}": len(d) for d in self.test_sets},
        }
        log.info(
            "%s data (stage %s): %s",
            c.dataset,
            getattr(stage, "value", stage),
            {k: v for k, v in sizes.items() if v is not None},
        )

    # --- loaders ------------------------------------------------------------------------------------
    def _collate(self) -> RefCollate:
        c = self.config
        return RefCollate(c.max_query_len, c.pad_to_max_len, self.tokenizer, c.mrefm, c.text_buckets)

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
        workers = resolve_num_workers(
            self.config.num_workers, trainer.num_devices if trainer is not None else 1
        )
        return loader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self._collate(),
            pin_memory=self.config.pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=workers > 0,
            worker_init_fn=init_worker if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.config.seed),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        world, rank = self._rank()
        c = self.config
        sampler = EpochSampler(self.train_set, world, rank, shuffle=True, seed=c.seed)
        loader = self._loader(self.train_set, sampler, c.batch_size, c.drop_last, ResumableLoader)
        if self._resume is not None:  # mid-epoch resume: skip what the checkpoint had trained on
            epoch, done = self._resume
            if 0 < done < len(loader):
                sampler.skip(epoch, done * c.batch_size)
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
        return [
            self._loader(d, ShardSampler(d, world, rank), self.config.eval_batch_size, False) for d in sets
        ]

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
