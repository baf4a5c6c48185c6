"""MRefM batch fields from the data pipeline: opt-in and otherwise unchanged batches, consistency
with the official rules, the VQ-KD image, per-sample seeding, static slot shapes, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.golden import GOLDEN_ROOT
from oneref.data.anchors import RuleAnchorParser, anchor_piece_indices
from oneref.data.config import DataConfig
from oneref.data.datamodule import RefDataModule
from oneref.data.datasets import RefCollate, RefDataset
from oneref.data.masking import ReferringMaskGenerator, visual_target_relation_scores
from oneref.data.mrefm import MRefMConfig
from oneref.data.text_masking import mask_text, masked_token_count, sample_rng
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform
from oneref.models.vqkd import VQKD

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

GOLDEN = GOLDEN_ROOT / "official-tiny" / "mlm"  # its tokenizer, as a resource
PHRASES = [
    "man in red shirt",
    "the woman holding an umbrella on the left",
    "a dog sits on the couch",
    "the man who is holding a bat",
    "left elephant",
    "person",
    "the big old tall small young little white black brown man",
    "a skateboarder jumping over a ramp",
]
MRefM = {"enabled": True, "patch_size": 16}
AUGMENT = {"aug_crop": True, "aug_scale": True, "aug_translate": True, "color_jitter": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mrefm")
    coco = root / "data/other/images/mscoco/images/train2014"
    coco.mkdir(parents=True)
    records, mixup = [], []
    for k, phrase in enumerate(PHRASES):
        w, h = 90 + 7 * k, 70 + 5 * k
        arr = np.random.default_rng(k).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(coco / f"COCO_{k}.jpg", "JPEG", quality=90)
        rec = (f"COCO_{k}.jpg", {"height": h, "width": w}, [5.5, 6.0, 40.0 + k, 30.0], phrase, None)
        records.append(rec)
        mixup.append(rec)
    for split in ("train", "val"):
        (root / "splits/single_dataset/unc").mkdir(parents=True, exist_ok=True)
        torch.save(records, root / f"splits/single_dataset/unc/unc_{split}.pth")
        (root / "splits/mixup_with_refc/mixup").mkdir(parents=True, exist_ok=True)
        torch.save(mixup, root / f"splits/mixup_with_refc/mixup/mixup_{split}.pth")
    return root


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(GOLDEN / "spm.model", 12)


def _dm(root: Path, mrefm=None, **kw) -> RefDataModule:
    args = dict(
        dataset="refcoco", data_root=root / "data", split_root=root / "splits", tokenizer=GOLDEN / "spm.model",
        img_size=64, max_query_len=12, batch_size=4, num_workers=0, pin_memory=False, augment=AUGMENT,
        seed=5, val_split=[],
    )  # fmt: skip
    if mrefm is not None:
        mrefm = {"cache_dir": str(root / "anchors"), **mrefm}
    dm = RefDataModule(DataConfig(**{**args, **kw}, mrefm=mrefm))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batches(dm: RefDataModule, epoch: int = 0) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _assert_same(a: dict, b: dict, keys) -> None:
    for k in keys:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_off_by_default_and_otherwise_unchanged(root: Path) -> None:
    plain = _batches(_dm(root))
    off = _batches(_dm(root, {"enabled": False, "patch_size": 16}))
    on = _batches(_dm(root, {**MRefM, "mim_scales": False}))  # same augmentation as grounding
    assert len(plain) == len(off) == len(on) == 2
    for p, o, m in zip(plain, off, on):
        assert set(p) == set(o) and "mlm_text_ids" not in p
        _assert_same(p, o, p)
        _assert_same(p, m, p)  # MRefM only adds fields
        assert set(m) - set(p) == {
            "vqkd_image", "mim_mask", "mim_vts", "mim_positions", "mim_valid", "mlm_text_ids",
            "mlm_positions", "mlm_labels", "mlm_valid", "mlm_anchor_index",
        }  # fmt: skip
        # the masked patches as slots, in the official mask order
        assert torch.equal(m["mim_positions"][m["mim_valid"]], m["mim_mask"].nonzero()[:, 1])
        assert m["mim_positions"].shape[1] % 16 == 0 or m["mim_positions"].shape[1] == m["mim_mask"].shape[1]


def test_fields_follow_the_official_rules(root: Path, tok: Tokenizer) -> None:
    dm = _dm(root, MRefM)
    ds, grid = dm.train_set, 64 // 16
    gen = ReferringMaskGenerator(grid)
    parser = RuleAnchorParser()
    for batch in _batches(dm, epoch=3):
        b, width = batch["text_ids"].shape
        k = batch["mlm_positions"].shape[1]
        assert batch["mim_mask"].shape == (b, grid * grid) and batch["mim_mask"].dtype == torch.bool
        assert batch["mim_vts"].shape == (b, grid * grid, 4) and batch["mim_vts"].dtype == torch.float32
        assert batch["mlm_text_ids"].shape == (b, width) and batch["mlm_text_ids"].dtype == torch.int64
        assert k % 8 == 0 or k == masked_token_count(12, 0.4)
        for key, dtype in (
            ("mlm_positions", torch.int64),
            ("mlm_labels", torch.int64),
            ("mlm_valid", torch.bool),
        ):
            assert batch[key].shape == (b, k) and batch[key].dtype == dtype
        for r in range(b):
            index = int(batch["index"][r])
            ids = batch["text_ids"][r]
            n = int((~batch["text_padding_mask"][r]).sum())
            valid = batch["mlm_valid"][r]
            pos = batch["mlm_positions"][r][valid]
            # the official text masking with this sample's anchors and generator
            pieces = tok.tokenize(ds.record(index).phrase)
            sbj, obj = anchor_piece_indices(pieces, parser.parse_one(ds.record(index).phrase))
            want = mask_text(
                ids[:n].tolist(), sample_rng(5, 3, index), tok.mask_id, tok.vocab_size, 0.4, sbj, obj
            )
            assert pos.tolist() == want.positions.tolist() and valid.sum() == masked_token_count(n, 0.4)
            assert batch["mlm_text_ids"][r, :n].tolist() == want.ids.tolist()
            assert (batch["mlm_text_ids"][r, n:] == 1).all()  # padded like text_ids
            assert torch.equal(batch["mlm_labels"][r][valid], ids[pos])
            assert (batch["mlm_labels"][r][~valid] == -100).all() and (
                batch["mlm_positions"][r][~valid] == 0
            ).all()
            assert batch["mlm_anchor_index"][r].tolist() == [-1 if v is None else v for v in (sbj, obj)]
            # MIM: exactly the official count inside the grown box region, VTS of the letterboxed box
            box = batch["box"][r].numpy()
            r0, r1, c0, c1 = gen.region(box)
            inside = batch["mim_mask"][r].view(grid, grid)[r0:r1, c0:c1]
            n_region = (r1 - r0) * (c1 - c0)
            assert inside.sum() == n_region - int(n_region * 0.25)
            assert torch.equal(
                batch["mim_vts"][r], torch.from_numpy(visual_target_relation_scores(box, grid))
            )


def test_vqkd_image_is_the_official_unnormalised_letterbox(root: Path) -> None:
    """uint8 -> float / 255 equals the official to_tensor values of the same augmented letterbox, bit
    for bit, and VQKD.pre_process maps them exactly to u / 127.5 - 1."""
    batch = _batches(_dm(root, MRefM))[0]
    u8, image, pad = batch["vqkd_image"], batch["image"], batch["image_mask"]
    assert u8.dtype == torch.uint8 and u8.shape == image.shape
    assert (u8.permute(1, 0, 2, 3)[:, pad] == 0).all()  # black padding
    as_float = u8.float() / 255  # torchvision to_tensor: uint8 .to(float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    norm = (as_float - mean) / std  # official NormalizeAndPad of the same pixels
    keep = ~pad[:, None].expand_as(image)
    assert torch.equal(norm[keep], image[keep])  # same augmentation and placement, bit for bit
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(VQKD.pre_process(levels.float() / 255), levels.float() / 127.5 - 1)
    # raw uint8 values are read as [0, 255] only when the batch holds a value above 1: divide first
    dark = torch.tensor([0, 1], dtype=torch.uint8)
    assert not torch.equal(VQKD.pre_process(dark.float()), VQKD.pre_process(dark.float() / 255))


def test_fields_depend_on_seed_epoch_index_not_on_workers(root: Path) -> None:
    dm = _dm(root, MRefM)
    ds = dm.train_set
    collate = RefCollate(12, pad_to_max_len=True, mrefm=MRefMConfig(**MRefM, mlm_slots=0))  # fixed shapes
    keys = ("vqkd_image", "mim_mask", "mlm_text_ids", "mlm_positions", "mlm_labels")
    ds.set_epoch(2)
    one = collate([ds[i] for i in range(4)])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(4)), batch_size=2, num_workers=2,
                                         collate_fn=collate)  # fmt: skip
    parts = list(loader)
    for key in keys:
        assert torch.equal(torch.cat([p[key] for p in parts]), one[key]), key
    ds.set_epoch(3)
    other = collate([ds[i] for i in range(4)])
    assert not torch.equal(other["mim_mask"], one["mim_mask"])
    assert not torch.equal(other["mlm_text_ids"], one["mlm_text_ids"])


def test_cached_samples_still_redraw_masks_every_epoch(root: Path) -> None:
    dm = _dm(root, MRefM, augment={"enabled": False}, cache_samples=True)
    ds = dm.train_set
    ds.set_epoch(0)
    a = [ds[i]["mrefm"]["mim_mask"] for i in range(len(ds))]
    assert all(np.array_equal(x, ds[i]["mrefm"]["mim_mask"]) for i, x in enumerate(a))
    ds.set_epoch(1)
    assert any(not np.array_equal(x, ds[i]["mrefm"]["mim_mask"]) for i, x in enumerate(a))


def test_mlm_slots_are_static(root: Path) -> None:
    fixed = _batches(_dm(root, {**MRefM, "mlm_slots": 0}))
    assert {b["mlm_positions"].shape[1] for b in fixed} == {masked_token_count(12, 0.4)}
    cfg = MRefMConfig(mlm_slots=8)
    assert [cfg.slots(n, 64) for n in (1, 8, 9, 24, 25)] == [8, 8, 16, 24, 25]  # capped at the max count
    assert MRefMConfig(mlm_slots=0).slots(3, 64) == masked_token_count(64, 0.4) == 25


def test_six_training_scales_as_the_official_mim_pipeline(root: Path) -> None:
    assert TrainTransform(384, num_scales=6).scales == [384, 352, 320, 288, 256, 224]
    assert TrainTransform(384).scales == [384, 352, 320, 288, 256, 224, 192]
    assert len(_dm(root, MRefM).train_set.transform.scales) == 6
    assert len(_dm(root, {**MRefM, "mim_scales": False}).train_set.transform.scales) == 7
    assert len(_dm(root, {**MRefM, "enabled": False}).train_set.transform.scales) == 7


def test_mixup_and_evaluation_splits(root: Path) -> None:
    """Training and validation batches carry the MRefM inputs (validation with the same masks at
    every epoch, for comparable MIM/MLM metrics); test batches do not."""
    dm = _dm(root, MRefM, dataset="mixup_refc", val_split="val", test_splits=["train"])
    assert "mlm_labels" in next(iter(dm.train_dataloader()))
    first, again = (next(iter(dm.val_dataloader())) for _ in range(2))
    dm.trainer = None
    assert torch.equal(first["mim_mask"], again["mim_mask"]) and torch.equal(
        first["mlm_text_ids"], again["mlm_text_ids"]
    )
    dm.setup("test")
    assert "mlm_labels" not in next(iter(dm.test_dataloader()[0]))


def test_synthetic_default_with_mrefm_on(make_cfg) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg("data.mrefm.enabled=true", "data.batch_size=4")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grid = cfg.data.img_size // cfg.data.mrefm.patch_size
    assert batch["mim_mask"].shape == (4, grid * grid) and batch["mlm_valid"].any(1).all()
    assert list(Path(cfg.data.mrefm.cache_dir).glob("synthetic_train-*-rules-*.json"))


def test_bad_configuration(root: Path, tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"unknown data.mrefm option\(s\) \['mask_ratio'\]"):
        MRefMConfig.from_any({"mask_ratio": 0.3})
    with pytest.raises(ValueError, match="dynamic_mask_ratio must be in"):
        MRefMConfig(dynamic_mask_ratio=2.0)
    with pytest.raises(ValueError, match="img_size 64 is not a multiple of patch_size 24"):
        _dm(root, {**MRefM, "patch_size": 24})
    with pytest.raises(FileNotFoundError, match="split file not found .*tried"):
        _dm(root, MRefM, split_root=root / "data")  # prepare_data: no parse of a missing file
    config = DataConfig(
        dataset="refcoco", data_root=root / "data", split_root=root / "splits", img_size=64, mrefm=MRefM
    )
    with pytest.raises(ValueError, match="needs the dataset to tokenise"):
        RefDataset(config, "train", train=True)
    with pytest.raises(ValueError, match="needs the subject/object anchors"):
        RefDataset(config, "train", train=True, tokenizer=tok)
    with pytest.raises(
        ValueError, match="8 phrases have no parsed anchors, e.g. sample 0 'man in red shirt'"
    ):
        RefDataset(config, "train", train=True, tokenizer=tok, anchors={})
