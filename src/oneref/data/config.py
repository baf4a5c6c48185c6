"""``DataConfig``: the ``data`` config node (conf/data/*.yaml) as one typed, validated object.

The DataModule, its datasets, the anchor cache and the baseline all read their options from it;
nothing copies them. Unknown keys are an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from oneref.data.formats import FORMATS
from oneref.data.leakage import LEAKAGE_MODES
from oneref.data.mrefm import MRefMConfig
from oneref.data.records import DATASETS, DEFAULT_TEST_SPLITS, unknown_dataset_message
from oneref.data.synthetic.config import SyntheticConfig
from oneref.data.transforms import AugmentConfig
from oneref.data.workers import resolve_num_workers
from oneref.errors import UserError

BAD_SAMPLE_MODES = ("raise", "skip")


class DataConfigError(UserError, ValueError):
    """A ``data`` option that does not exist or has a bad value."""


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    value = _plain(value)
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def check_text_buckets(buckets: Sequence[int] | None, max_query_len: int) -> tuple[int, ...] | None:
    """``data.text_buckets`` as a sorted tuple (None = off), or a clear error."""
    if buckets is None or len(buckets) == 0:
        return None
    try:
        out = tuple(sorted({int(b) for b in buckets}))
    except (TypeError, ValueError):
        raise DataConfigError(f"data.text_buckets must be a list of ints, got {buckets!r}") from None
    if out[0] < 1:
        raise DataConfigError(f"data.text_buckets must be positive lengths, got {list(buckets)}")
    if out[-1] < max_query_len:
        raise DataConfigError(
            f"data.text_buckets {list(out)} must reach data.max_query_len={max_query_len} (the longest "
            f"expression): add {max_query_len} to the list"
        )
    return out


@dataclass(frozen=True)
class DataConfig:
    """REC/RES data of one dataset (``data.*``).

    Args:
        dataset: refcoco, refcoco_plus, refcocog_umd, refcocog_google, referit, flickr, mixup_refc,
            mixup_refc_referit or synthetic (`records.DATASETS`; their split files keep the official
            names, `records.OFFICIAL_NAMES`).
        data_root: image folders (records.IMAGE_DIRS); for synthetic, the cache folder it is generated into.
        split_root: the released annotations as downloaded (`single_dataset/<name>/<name>_<split>.pth`,
            `mixup_with_refc/mixup/mixup_<split>.pth`, ...) or the flat `{name}/{name}_{split}.pth`
            layout (`records.split_file_candidates`); None = `{data_root}/splits` (where the
            synthetic generator writes them).
        tokenizer: sentencepiece model path (`beit3.spm` for official weights); None for synthetic
            uses the model generated with the data.
        format: annotation format under split_root (`oneref.data.formats.FORMATS`): auto (detected
            from the files there), oneref, refer, hf, seqtr or mdetr.
        leakage: training images found in an evaluation split (`oneref.data.leakage`): warn, raise
            or off; checked once, at the first setup that loads the training split.
        img_size, max_query_len: letterbox side S, text ids per expression (with bos/eos).
        train_split, val_split, test_splits: split names; val_split may be a list; test_splits
            default per dataset (records.DEFAULT_TEST_SPLITS).
        batch_size, eval_batch_size: per device; eval_batch_size defaults to batch_size.
        num_workers, pin_memory: DataLoader settings (workers are persistent and seeded);
            num_workers ``auto`` = the CPUs per device minus one (`workers.resolve_num_workers`).
        pad_to_max_len: pad text to max_query_len (official) instead of the batch's longest.
        text_buckets: pad text to the smallest of these lengths that holds the batch's longest
            (static shapes for torch.compile / CUDA graphs); None = the batch's longest.
        seg_masks: RES object masks from COCO polygons; otherwise box rectangles.
        augment: `AugmentConfig` (training augmentations).
        bad_samples: "raise" or "skip".
        synthetic: `SyntheticConfig` generator parameters; None unless dataset == "synthetic".
        seed: base seed of sampling order and augmentations.
        drop_last: drop the last incomplete training batch (official).
        image_dirs: override image folders per record source (coco, referit, flickr, synthetic).
        mean_box_samples: training records averaged by the mean-box baseline (None = all).
        cache_samples: keep loaded samples in memory (RefDataset; deterministic samples only).
        orig_masks: evaluation batches also carry the object masks at each image's own size
            (``orig_mask``, a list), for RES metrics at the original resolution.
        mrefm: `MRefMConfig`: training and validation batches also carry the MRefM inputs (off by
            default); `prepare_data` then parses their phrases into the anchor cache.
    """

    dataset: str = "synthetic"
    data_root: Path = Path("data/synthetic")
    split_root: Path | None = None
    tokenizer: Path | None = None
    format: str = "auto"
    leakage: str = "warn"
    img_size: int = 384
    max_query_len: int = 64
    train_split: str = "train"
    val_split: tuple[str, ...] = ("val",)
    test_splits: tuple[str, ...] = ()
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: int | str = 4
    pin_memory: bool = True
    pad_to_max_len: bool = False
    text_buckets: tuple[int, ...] | None = None
    seg_masks: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    bad_samples: str = "raise"
    synthetic: SyntheticConfig | None = None
    seed: int = 0
    drop_last: bool = True
    image_dirs: Mapping[str, str] = field(default_factory=dict)
    mean_box_samples: int | None = 20000
    cache_samples: bool = False
    orig_masks: bool = False
    mrefm: MRefMConfig = field(default_factory=MRefMConfig)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.dataset not in DATASETS:
            raise DataConfigError(f"data.dataset: {unknown_dataset_message(self.dataset)}")
        if self.format not in FORMATS:
            raise DataConfigError(f"data.format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.leakage not in LEAKAGE_MODES:
            raise DataConfigError(f"data.leakage must be one of {list(LEAKAGE_MODES)}, got {self.leakage!r}")
        if self.bad_samples not in BAD_SAMPLE_MODES:
            raise DataConfigError(
                f"data.bad_samples must be one of {list(BAD_SAMPLE_MODES)}, got {self.bad_samples!r}"
            )
        try:
            resolve_num_workers(self.num_workers)  # a bad value fails here, not in the first loader
        except ValueError as e:
            raise DataConfigError(str(e)) from None
        put("data_root", Path(self.data_root).expanduser())
        for name in ("split_root", "tokenizer"):
            value = getattr(self, name)
            put(name, Path(value).expanduser() if value else None)
        put("img_size", int(self.img_size))
        put("max_query_len", int(self.max_query_len))
        put("val_split", _names(self.val_split))
        put("test_splits", _names(self.test_splits) or DEFAULT_TEST_SPLITS[self.dataset])
        put("batch_size", int(self.batch_size))
        put("eval_batch_size", int(self.eval_batch_size or self.batch_size))
        put("text_buckets", check_text_buckets(_plain(self.text_buckets), self.max_query_len))
        if self.pad_to_max_len and self.text_buckets:
            raise DataConfigError(
                "data.pad_to_max_len=true and data.text_buckets both fix the text length: set one"
            )
        try:  # the nested option groups check themselves; their errors are the user's too
            put("augment", AugmentConfig.from_any(_plain(self.augment)))
            synthetic = _plain(self.synthetic)
            put("synthetic", SyntheticConfig.from_any(synthetic) if self.dataset == "synthetic" else None)
            put("mrefm", MRefMConfig.from_any(_plain(self.mrefm)))
        except ValueError as e:
            raise DataConfigError(str(e)) from None
        put("image_dirs", {str(k): str(v) for k, v in (_plain(self.image_dirs) or {}).items()})
        put("seed", int(self.seed))
        for name in ("pin_memory", "pad_to_max_len", "seg_masks", "drop_last", "cache_samples", "orig_masks"):
            put(name, bool(getattr(self, name)))

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | DictConfig | None = None, /, **overrides: Any) -> DataConfig:
        """From the ``data`` node (Hydra's or a plain mapping; ``_target_`` ignored) and keyword
        overrides. An unknown key is an error naming it and the valid keys."""
        values = {**(_plain(node) or {}), **overrides}
        values.pop("_target_", None)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise DataConfigError(
                f"unknown data option(s) {', '.join(f'data.{k}' for k in unknown)}; valid: {names}"
            )
        return cls(**values)

    @property
    def resolved_split_root(self) -> Path:
        return self.split_root if self.split_root is not None else self.data_root / "splits"

    def as_dict(self) -> dict[str, Any]:
        """Plain containers only (checkpoints load with ``torch.load(weights_only=True)``); feeds
        `from_dict` back to an equal config."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("data_root", "split_root", "tokenizer"):
            out[name] = str(out[name]) if out[name] is not None else None
        for name in ("val_split", "test_splits", "text_buckets"):
            out[name] = list(out[name]) if out[name] is not None else None
        out["augment"] = self.augment.as_dict()
        out["synthetic"] = self.synthetic.as_dict() if self.synthetic is not None else None
        out["mrefm"] = self.mrefm.as_dict()
        out["image_dirs"] = dict(self.image_dirs)
        return out
