"""Map-style referring-expression dataset over the official split files, and its collate function.

A sample is decoded, transformed (official eval transform, or the seeded training augmentations),
tokenised and checked here; it stays compact (the resized uint8 image and its placement).
`RefCollate` normalises and letterboxes straight into the batch tensors of the shared batch dict:

    image float32 (B,3,S,S), image_mask bool (B,S,S), text_ids int64 (B,L), text_padding_mask bool (B,L),
    box float32 (B,4) cxcywh normalised, obj_mask bool (B,1,S,S), index int64 (B,), orig_size int64 (B,2),
    letterbox float32 (B,3) (ratio, left, top), orig_box float32 (B,4) x1y1x2y2, phrase, image_file

With MRefM on (``data.mrefm.enabled``; training and validation splits) the batch also holds the fields of
`oneref.data.mrefm.collate_mrefm` and ``vqkd_image`` uint8 (B,3,S,S), the same letterbox before
normalisation with black padding (``vqkd_image.float() / 255`` is the official VQ-KD input).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from oneref.data.anchors import Anchors
from oneref.data.config import DataConfig, check_text_buckets
from oneref.data.mrefm import MIM_NUM_SCALES, MRefMBuilder, MRefMConfig, collate_mrefm
from oneref.data.records import (
    RecordStore,
    RefRecord,
    check_root,
    image_folders,
    load_records,
    record_problem,
    split_files,
)
from oneref.data.tokenizer import PAD_ID, Tokenizer
from oneref.data.transforms import ObjMask, TrainTransform, eval_transform

log = logging.getLogger(__name__)

# Errors that mean "this sample's data is bad" (missing/corrupt file, bad record); others are bugs.
DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_MAX_LOGGED_BAD = 20
_MAX_SKIP_TRIES = 100


class SampleError(RuntimeError):
    """A sample that cannot be loaded, named by dataset, split, index, image and record."""


def carries_mrefm(config: DataConfig, split: str, train: bool) -> bool:
    """Whether a split's samples carry the MRefM fields: training and validation, with data.mrefm on."""
    return config.mrefm.enabled and (train or split in config.val_split)


class RefDataset(Dataset):
    """One split of one dataset (official split files and image folders), as ``config`` says
    (`DataConfig`: dataset, roots, image size, augmentation, masks, bad samples, seed, ...).

    Args:
        config: the data options.
        split: e.g. "train", "val", "testA", "trainval".
        train: draw training augmentations (``config.augment``) instead of the evaluation transform;
            the per-sample generator is `default_rng([seed, epoch, index])`.
        tokenizer: tokenise the phrase per sample (ids in the sample); None leaves it to the collate.
        anchors: phrase -> subject/object words (`oneref.data.anchor_cache`), needed when the split
            carries the MRefM fields (`carries_mrefm`); an evaluation split draws them with epoch 0
            (the same masks every time).

    ``config.cache_samples`` keeps every loaded sample (the resized uint8 image, mask and ids) in
    memory, so later epochs decode nothing; it needs deterministic samples (evaluation, or training
    with augmentation off). Each process (main or loader worker) holds its own cache.
    ``config.orig_masks`` also returns the object mask at the image's own size (``orig_mask``, bool
    (h, w)) for RES metrics at the original resolution, on evaluation splits only.
    ``config.bad_samples``: "raise" (error naming the sample) or "skip" (use the next good sample,
    count it).
    """

    def __init__(
        self,
        config: DataConfig,
        split: str,
        *,
        train: bool = False,
        tokenizer: Tokenizer | None = None,
        anchors: Mapping[str, Anchors] | None = None,
    ) -> None:
        if not isinstance(config, DataConfig):
            raise TypeError(f"RefDataset takes a DataConfig, got {type(config).__name__}")
        self.config, self.split = config, split
        dataset, data_root, split_root = config.dataset, config.data_root, config.resolved_split_root
        check_root(data_root, "data root", data_root, split_root)
        records, problems = load_records(
            split_root, dataset, split, config.bad_samples, data_root, format=config.format
        )
        if not records:
            raise ValueError(
                f"{dataset}/{split}: no usable records in {split_files(split_root, dataset, split)}"
            )
        self.records = RecordStore(records)
        self.num_unparsable = len(problems)
        self.image_dirs = image_folders(data_root, config.image_dirs)
        self.train = bool(train)
        use_mrefm = carries_mrefm(config, split, self.train)
        num_scales = MIM_NUM_SCALES if use_mrefm and config.mrefm.mim_scales else 7
        self.transform = TrainTransform(config.img_size, config.augment, num_scales) if self.train else None
        if config.cache_samples and self.train and config.augment.enabled:
            raise ValueError(
                f"{dataset}/{split}: cache_samples needs the same sample every epoch, but training "
                "augmentation is on; set data.augment.enabled=false or data.cache_samples=false"
            )
        self._cache: dict[int, dict[str, Any]] = {}
        self.orig_masks = config.orig_masks and not self.train
        self.tokenizer = tokenizer
        self._mrefm: MRefMBuilder | None = None
        self._anchors: RecordStore | None = None
        if use_mrefm:
            self._setup_mrefm(tokenizer, anchors)
        # Shared with worker processes: the epoch (set by the sampler) and which samples were bad.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._bad = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()
        self._logged_bad = 0
        log.info(
            "%s/%s: %d samples (train=%s, seg_masks=%s)", dataset, split, len(self), train, config.seg_masks
        )

    def _setup_mrefm(self, tokenizer: Tokenizer | None, anchors: Mapping[str, Anchors] | None) -> None:
        if tokenizer is None:
            raise ValueError(f"{self.name}: data.mrefm needs the dataset to tokenise (pass tokenizer=)")
        if anchors is None:
            raise ValueError(
                f"{self.name}: data.mrefm needs the subject/object anchors of the split "
                "(RefDataModule.prepare_data parses them, oneref.data.anchor_cache; or pass anchors=)"
            )
        missing = [(i, r.phrase) for i, r in enumerate(self.records) if r.phrase not in anchors]
        if missing:
            i, phrase = missing[0]
            raise ValueError(
                f"{self.name}: {len(missing)} phrases have no parsed anchors, e.g. sample {i} {phrase!r}; "
                "the anchor cache does not belong to this split file (delete it to parse again)"
            )
        self._anchors = RecordStore([anchors[r.phrase] for r in self.records])
        self._mrefm = MRefMBuilder(
            self.config.mrefm, self.config.img_size, tokenizer.mask_id, tokenizer.vocab_size
        )

    @property
    def name(self) -> str:
        return f"{self.config.dataset}/{self.split}"

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def image_path(self, rec: RefRecord) -> Path:
        return self.image_dirs[rec.source] / rec.image_file

    def record(self, index: int) -> RefRecord:
        return self.records[index]

    # bad samples -------------------------------------------------------------------------------------
    def bad_indices(self) -> list[int]:
        return torch.nonzero(self._bad).flatten().tolist()

    def bad_sample_report(self, max_names: int = 5) -> dict[str, Any]:
        idx = self.bad_indices()
        names = [f"{i}: {self.image_path(self.records[i])}" for i in idx[:max_names]]
        return {
            "dataset": self.name,
            "skipped": len(idx),
            "unparsable": self.num_unparsable,
            "examples": names,
        }

    # loading -----------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:  # a padding repeat of an evaluation shard: counts zero (ShardSampler)
            return {**self[unpad_index(index)], "valid": False}
        if not (self.config.bad_samples == "skip" and self._bad[index]):  # known bad: straight to a stand-in
            try:
                return self.load(index)
            except DATA_ERRORS as e:
                if self.config.bad_samples == "raise":
                    raise SampleError(self._describe(index, e)) from e
                self._mark_bad(index, e)
        # Skip mode: the next good sample stands in, so batches keep their size.
        for k in range(1, _MAX_SKIP_TRIES + 1):
            j = (index + k) % len(self)
            if self._bad[j]:
                continue
            try:
                return self.load(j)
            except DATA_ERRORS as e:
                self._mark_bad(j, e)
        raise SampleError(f"{self.name}: {_MAX_SKIP_TRIES} consecutive bad samples after index {index}")

    def _describe(self, index: int, err: BaseException) -> str:
        try:
            rec = self.records[index]
            where = f"image {self.image_path(rec)}, record {rec!r:.300}"
        except Exception:  # the description itself must never fail
            where = "record unavailable"
        return f"{self.name} sample {index} ({where}): {type(err).__name__}: {err}"

    def _mark_bad(self, index: int, err: BaseException) -> None:
        if self._bad[index]:
            return
        self._bad[index] = 1
        self._logged_bad += 1
        if self._logged_bad <= _MAX_LOGGED_BAD:
            log.warning("skipping bad sample: %s", self._describe(index, err))
            if self._logged_bad == _MAX_LOGGED_BAD:
                log.warning("%s: further bad samples are counted but not logged", self.name)

    def load(self, index: int) -> dict[str, Any]:
        """Load and transform one sample; raises on bad data (no skipping)."""
        if self.config.cache_samples:
            sample = self._cache.get(index)
            if sample is None:
                sample = self._cache[index] = self._load(index)
        else:
            sample = self._load(index)
        if self._mrefm is not None:  # drawn per epoch, also for cached samples
            sample = {**sample, "mrefm": self._mrefm_fields(sample)}
        return sample

    def _mrefm_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        index = sample["index"]
        return self._mrefm(
            sample["result"].box,
            sample["text_ids"],
            self.tokenizer.tokenize(sample["phrase"]),
            self._anchors[index],
            self.config.seed,
            self.epoch,
            index,
        )

    def _load(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        problem = record_problem(rec)
        if problem:
            raise ValueError(problem)
        text_ids = None
        if self.tokenizer is not None:
            text_ids = np.asarray(
                self.tokenizer.encode(rec.phrase, name=f"{self.name}[{index}]"), dtype=np.int64
            )
        path = self.image_path(rec)
        with Image.open(path) as img:
            w, h = img.size
            mask = self._object_mask(rec, h, w)
            orig_mask = None
            if self.orig_masks:  # before the transform resizes the mask
                orig_mask = np.empty((h, w), dtype=bool)
                mask.paste(orig_mask, 0, 0)
            box = np.asarray(rec.box, dtype=np.float32)
            if self.transform is not None:
                rng = np.random.default_rng([self.config.seed, self.epoch, index])
                out = self.transform(img, box, mask, rec.phrase, rng)
            else:
                out = eval_transform(img, box, mask, self.config.img_size)
        return {
            "result": out,
            "orig_mask": orig_mask,
            "text_ids": text_ids,
            "index": index,
            "phrase": rec.phrase,
            "image_file": rec.image_file,
        }

    def _object_mask(self, rec: RefRecord, h: int, w: int) -> ObjMask:
        if self.config.seg_masks and rec.segmentation is not None:
            mh, mw = rec.size if rec.size is not None else (h, w)
            if (mh, mw) != (h, w):
                raise ValueError(f"size in the record ({mw}x{mh}) differs from the image ({w}x{h})")
            try:
                return ObjMask.from_segmentation(rec.segmentation, h, w)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed input
                raise ValueError(f"cannot decode the segmentation polygons: {e}") from e
        return ObjMask.from_box_xywh(*rec.box_xywh, h, w)


def pad_index(index: int) -> int:
    """The dataset index of a repeat of sample ``index`` that carries ``valid=False`` (it pads an
    evaluation shard so that every rank runs the same number of batches; metrics count it zero)."""
    return -1 - int(index)


def unpad_index(index: int) -> int:
    return -1 - int(index)


class RefCollate:
    """Stack samples into the shared batch dict; pad text to the batch's longest, to the smallest
    of ``text_buckets`` that holds it, or to max_query_len (``pad_to_max_len``, official).

    Padding to a few fixed lengths keeps compiled shapes static (no recompiles, CUDA graphs); the
    outputs of the real tokens do not change, since padded keys are masked.

    Samples carrying MRefM fields (training with ``data.mrefm``) add those of `collate_mrefm` and
    ``vqkd_image``; ``mrefm`` sets their layout (default: `MRefMConfig()`).
    """

    def __init__(
        self,
        max_query_len: int = 64,
        pad_to_max_len: bool = False,
        tokenizer: Tokenizer | None = None,
        mrefm: MRefMConfig | None = None,
        text_buckets: Sequence[int] | None = None,
    ):
        self.max_query_len = int(max_query_len)
        self.pad_to_max_len = bool(pad_to_max_len)
        self.text_buckets = check_text_buckets(text_buckets, self.max_query_len)
        if self.pad_to_max_len and self.text_buckets:
            raise ValueError(
                "data.pad_to_max_len=true and data.text_buckets both fix the text length: set one"
            )
        self.tokenizer = tokenizer
        self.mrefm = mrefm if mrefm is not None else MRefMConfig()

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pad_to = self.max_query_len if self.pad_to_max_len else None
        if samples[0]["text_ids"] is None:
            if self.tokenizer is None:
                raise ValueError("samples carry no token ids and RefCollate has no tokenizer")
            ids, pad = self.tokenizer.encode_batch(
                [s["phrase"] for s in samples], pad_to=pad_to, names=[s["index"] for s in samples]
            )
        else:
            ids, pad = pad_token_ids([s["text_ids"] for s in samples], pad_to)
        if self.text_buckets:
            ids, pad = pad_to_bucket(ids, pad, self.text_buckets)
        results = [s["result"] for s in samples]
        b, size = len(results), results[0].size
        image = _batch_buffer((b, 3, size, size), torch.float32)
        image_mask = _batch_buffer((b, size, size), torch.bool)
        obj_mask = _batch_buffer((b, 1, size, size), torch.bool)
        im, pm, om = image.numpy(), image_mask.numpy(), obj_mask.numpy()
        for k, r in enumerate(results):
            r.write(im[k], pm[k], om[k, 0])
        mrefm: dict[str, Any] = {}
        if samples[0].get("mrefm") is not None:
            vqkd_image = _batch_buffer((b, 3, size, size), torch.uint8)
            vi = vqkd_image.numpy()
            for k, r in enumerate(results):
                r.write_uint8(vi[k])
            mrefm = {
                "vqkd_image": vqkd_image,
                **collate_mrefm(samples, ids.shape[1], self.mrefm, self.max_query_len),
            }
        return {
            "image": image,
            "image_mask": image_mask,
            "text_ids": ids,
            "text_padding_mask": pad,
            # decided here, on the CPU, so that the model never branches on the mask's content
            "text_padded": bool(pad.any()),
            "box": torch.from_numpy(np.stack([r.box for r in results]).astype(np.float32, copy=False)),
            "obj_mask": obj_mask,
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            # False for the padding repeats of an evaluation shard: they count zero in every metric
            "valid": torch.tensor([s.get("valid", True) for s in samples], dtype=torch.bool),
            "orig_size": torch.tensor([r.orig_size for r in results], dtype=torch.int64),
            "letterbox": torch.tensor([r.letterbox for r in results], dtype=torch.float32),
            "orig_box": torch.from_numpy(
                np.stack([r.orig_box for r in results]).astype(np.float32, copy=False)
            ),
            "phrase": [s["phrase"] for s in samples],
            "image_file": [s["image_file"] for s in samples],
            # original-resolution object masks (datasets built with orig_masks=True), sizes differ
            **(
                {"orig_mask": [torch.from_numpy(s["orig_mask"]) for s in samples]}
                if samples[0].get("orig_mask") is not None
                else {}
            ),
            **mrefm,
        }


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised batch tensor; in a DataLoader worker it lives in shared memory (as in
    `default_collate`), so sending the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(numel, device="cpu")
    return proto.new(storage).resize_(shape)


def pad_to_bucket(
    ids: torch.Tensor, pad: torch.Tensor, buckets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, padding mask) to the smallest bucket length >= their width."""
    width = ids.shape[1]
    target = next((b for b in buckets if b >= width), None)
    if target is None:
        raise ValueError(f"{width} text ids exceed the largest of data.text_buckets {list(buckets)}")
    if target == width:
        return ids, pad
    extra = target - width
    return (
        torch.nn.functional.pad(ids, (0, extra), value=PAD_ID),
        torch.nn.functional.pad(pad, (0, extra), value=True),
    )


def pad_token_ids(rows: Sequence[np.ndarray], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id rows with the pad id: (ids int64 (B, L), padding mask bool (B, L))."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    width = int(lengths.max())
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest expression ({width} ids)")
        width = int(pad_to)
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    pad = np.arange(width)[None, :] >= lengths[:, None]
    return torch.from_numpy(out), torch.from_numpy(pad)
