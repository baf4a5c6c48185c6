"""Official split-file formats read through RefDataModule, bad inputs, and the data checker."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask

from oneref.data.baseline import mean_train_box
from oneref.data.config import DataConfig
from oneref.data.datamodule import RefDataModule
from oneref.data.datasets import RefCollate, RefDataset, SampleError
from oneref.data.records import OFFICIAL_NAMES, RecordError, load_split_file, parse_record
from oneref.data.tokenizer import train_sentencepiece
from oneref.data.transforms import letterbox_box
from oneref.data.verify import main as verify_main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

COCO_DIR = "other/images/mscoco/images/train2014"
SIZES = {  # file -> (w, h)
    "COCO_train2014_000000000001.jpg": (120, 90),
    "COCO_train2014_000000000002.jpg": (100, 140),
    "1000.jpg": (90, 70),
    "1001.jpg": (64, 96),
    "2000.jpg": (110, 80),
}
POLY = [[20.0, 10.0, 70.0, 12.0, 60.0, 60.0, 25.0, 55.0]]

# (file, size dict, xywh float, phrase, polygons): the COCO family and the COCO part of the mixups
COCO_RECORDS = [
    (
        "COCO_train2014_000000000001.jpg",
        {"height": 90, "width": 120},
        [10.7, 20.2, 30.9, 40.5],
        "The Red Car",
        POLY,
    ),
    (
        "COCO_train2014_000000000002.jpg",
        {"height": 140, "width": 100},
        [5.0, 6.0, 50.0, 70.0],
        "man on the left",
        POLY,
    ),
    ("COCO_train2014_000000000001.jpg", {"height": 90, "width": 120}, [60.2, 30.0, 40.9, 50.0], "dog", POLY),
]
REFERIT_RECORDS = [
    ("1000.jpg", "1000_1.mat", [3.9, 4.2, 50.7, 60.1], "sky top", None),
    ("1001.jpg", "1001_2.mat", [0, 0, 64, 96], "the whole thing", None),
]
FLICKR_RECORDS = [("2000.jpg", [10.0, 15.5, 90.9, 70.2], "a tall man"), ("2000.jpg", [0, 0, 40, 40], "a dog")]
MIXUP_RECORDS = [
    COCO_RECORDS[0],
    ("1000.jpg", "referit", [3.9, 4.2, 46.8, 55.9], "sky top", "1000_1.mat"),
    ("2000.jpg", "flickr", [10.0, 15.5, 80.9, 54.7], "a tall man", "placeholder"),
]


def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)


def _split(root: Path, dataset: str, split: str, records: list, flat: bool = False) -> Path:
    """Write a split file in the released annotation layout (or the flat one), named as released."""
    ds = OFFICIAL_NAMES[dataset]
    if flat:
        path = root / ds / f"{ds}_{split}.pth"
    elif ds.startswith("mixup"):
        path = root / ds / "mixup" / f"mixup_{split}.pth"
    else:
        path = root / "single_dataset" / ds / f"{ds}_{split}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(records, path)
    return path


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refdata")
    data, splits = root / "data", root / "splits"
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        sub = (
            COCO_DIR
            if name.startswith("COCO")
            else "referit/images"
            if name.startswith("1")
            else "Flickr30k/flickr30k-images"
        )
        _jpeg(data / sub / name, w, h, k)
    for ds in ("refcoco", "refcoco_plus", "refcocog_umd"):
        for split in ("train", "val", "testA", "testB", "test"):
            _split(splits, ds, split, COCO_RECORDS)
    for split in ("train", "val", "test", "trainval"):
        _split(splits, "referit", split, REFERIT_RECORDS)
        _split(splits, "flickr", split, FLICKR_RECORDS)
    for ds in ("mixup_refc", "mixup_refc_referit"):
        for split in ("train", "val", "test"):
            _split(splits, ds, split, MIXUP_RECORDS)
    phrases = [r[3] for r in COCO_RECORDS + REFERIT_RECORDS] + [r[2] for r in FLICKR_RECORDS]
    tok = train_sentencepiece([p.lower() for p in phrases] * 3, root / "tok.model", vocab_size=40)
    return {"data": data, "splits": splits, "tok": tok}


def _dm(paths: dict[str, Path], dataset: str, **kw) -> RefDataModule:
    args = dict(
        dataset=dataset,
        data_root=paths["data"],
        split_root=paths["splits"],
        tokenizer=paths["tok"],
        img_size=64,
        max_query_len=12,
        batch_size=2,
        eval_batch_size=3,
        num_workers=0,
        pin_memory=False,
    )
    return RefDataModule(DataConfig(**{**args, **kw}))


def _ds(
    dataset: str, split: str, data_root: Path, split_root: Path, *, train: bool = False, **kw
) -> RefDataset:
    """One split, the other options as DataConfig fields."""
    config = DataConfig(dataset=dataset, data_root=data_root, split_root=split_root, **kw)
    return RefDataset(config, split, train=train)


def test_record_formats_and_box_truncation() -> None:
    r = parse_record("refcoco", COCO_RECORDS[0])
    assert (r.source, r.box, r.size, r.phrase) == ("coco", (10, 20, 40, 60), (90, 120), "the red car")
    assert r.box_xywh == (10.7, 20.2, 30.9, 40.5) and r.segmentation == POLY
    r = parse_record("referit", REFERIT_RECORDS[0])
    assert (r.source, r.box, r.size) == ("referit", (3, 4, 50, 60), None)
    assert r.box_xywh == pytest.approx((3.9, 4.2, 46.8, 55.9))
    r = parse_record("flickr", FLICKR_RECORDS[0])
    assert (r.source, r.box) == ("flickr", (10, 15, 90, 70))
    kinds = [parse_record("mixup_refc_referit", m) for m in MIXUP_RECORDS]
    assert [k.source for k in kinds] == ["coco", "referit", "flickr"]
    assert kinds[1].box == (3, 4, 49, 59) and kinds[1].segmentation is None  # xywh in mixups
    assert kinds[2].box == (10, 15, 90, 69)
    with pytest.raises(RecordError, match="5 fields"):
        parse_record("refcoco", COCO_RECORDS[0][:4], "unc_train.pth record 3")
    with pytest.raises(RecordError, match="image folder"):
        parse_record("mixup_refc", ("x.jpg", "imagenet", [0, 0, 1, 1], "a", None))
    with pytest.raises(RecordError, match="is not 4 finite numbers"):
        parse_record("flickr", ("a.jpg", [1, 2, 3], "x"))


@pytest.mark.parametrize(
    "dataset",
    ["refcoco", "refcoco_plus", "refcocog_umd", "referit", "flickr", "mixup_refc", "mixup_refc_referit"],
)
def test_datamodule_reads_every_format(fake_root: dict[str, Path], dataset: str) -> None:
    dm = _dm(fake_root, dataset, augment={"aug_crop": True, "aug_translate": True})
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {
        "image", "image_mask", "text_ids", "text_padding_mask", "text_padded", "box", "obj_mask", "index",
        "valid", "orig_size", "letterbox", "orig_box", "phrase", "image_file",
    }  # fmt: skip
    assert train["text_padded"] == bool(train["text_padding_mask"].any())
    assert train["image"].shape == (2, 3, 64, 64) and train["image"].dtype == torch.float32
    assert train["image_mask"].dtype == torch.bool and train["obj_mask"].shape == (2, 1, 64, 64)
    assert train["obj_mask"].dtype == torch.bool and train["text_ids"].dtype == torch.int64
    assert (train["text_ids"][:, 0] == 0).all() and train["box"].shape == (2, 4)
    dm.setup("test")
    names = dm.test_split_names
    loaders = dm.test_dataloader()
    assert len(loaders) == len(names) >= 2
    val = next(iter(loaders[0]))
    ds = dm.test_sets[0]
    for b, idx in enumerate(val["index"].tolist()):
        rec = ds.record(idx)
        w, h = SIZES[rec.image_file]
        assert val["orig_size"][b].tolist() == [h, w]
        assert val["orig_box"][b].tolist() == list(rec.box)
        want = letterbox_box(rec.box, h, w, 64)
        torch.testing.assert_close(val["box"][b], torch.from_numpy(want))
        assert val["phrase"][b] == rec.phrase == rec.phrase.lower()
        lens = (~val["text_padding_mask"][b]).sum()
        assert val["text_ids"][b, lens - 1] == 2  # eos right after the last piece
    assert val["text_ids"].shape[1] == (~val["text_padding_mask"]).sum(1).max()  # longest in batch


def test_flat_split_layout_is_read_too(fake_root: dict[str, Path], tmp_path: Path) -> None:
    """The flat {dataset}/{dataset}_{split}.pth layout is the alternative to the released one."""
    for split in ("train", "val", "test"):
        _split(tmp_path, "mixup_refc", split, MIXUP_RECORDS[:2], flat=True)
        _split(tmp_path, "refcocog_umd", split, COCO_RECORDS[:1], flat=True)
    dm = _dm(fake_root, "mixup_refc", split_root=tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 64, 64)
    assert len(_ds("refcocog_umd", "test", fake_root["data"], tmp_path)) == 1
    # both layouts present: the released file wins
    _split(tmp_path, "refcocog_umd", "test", COCO_RECORDS)
    assert len(_ds("refcocog_umd", "test", fake_root["data"], tmp_path)) == len(COCO_RECORDS)
    assert verify_main(["--data-root", str(fake_root["data"]), "--split-root", str(tmp_path)]) == 0


def test_seg_masks_are_the_decoded_polygons(fake_root: dict[str, Path]) -> None:
    dm = _dm(fake_root, "refcoco", seg_masks=True, test_splits=["val"])
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    i = batch["index"].tolist().index(0)
    full = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(POLY, 90, 120))).astype(np.float32)
    small = F.interpolate(torch.from_numpy(full)[None, None], size=(48, 64), mode="nearest")[0, 0] > 0.5
    want = torch.zeros(64, 64, dtype=torch.bool)
    want[8:56] = small  # 120x90 -> 64x48, padded top round(16/2 - 0.1) = 8
    assert torch.equal(batch["obj_mask"][i, 0], want)
    # without seg masks: the box rectangle
    dm = _dm(fake_root, "refcoco", seg_masks=False, test_splits=["val"])
    dm.setup("test")
    b2 = next(iter(dm.test_dataloader()[0]))
    ys, xs = torch.nonzero(b2["obj_mask"][i, 0], as_tuple=True)
    cx, cy, bw, bh = (b2["box"][i] * 64).tolist()
    # the mask comes from the float xywh box, the target from the truncated one (official): <= 2 px
    assert abs(xs.min() - (cx - bw / 2)) <= 2 and abs(xs.max() + 1 - (cx + bw / 2)) <= 2
    assert abs(ys.min() - (cy - bh / 2)) <= 2 and abs(ys.max() + 1 - (cy + bh / 2)) <= 2


def test_trainval_padding_and_epochs(fake_root: dict[str, Path]) -> None:
    common = dict(data_root=fake_root["data"], split_root=fake_root["splits"], img_size=64)
    assert len(_ds("refcoco", "trainval", **common)) == 2 * len(COCO_RECORDS)  # train + val
    assert len(_ds("referit", "trainval", **common)) == len(REFERIT_RECORDS)  # own file
    dm = _dm(fake_root, "flickr", pad_to_max_len=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_ids"].shape == (2, 12) and batch["text_padding_mask"][:, -1].all()
    # augmentation: a function of (seed, epoch, index)
    ds = dm.train_set
    collate = RefCollate(12)
    ds.set_epoch(0)
    a = collate([ds[0]])["image"]
    assert torch.equal(a, collate([ds[0]])["image"])
    ds.set_epoch(1)
    assert not torch.equal(a, collate([ds[0]])["image"])
    assert mean_train_box(dm).shape == (4,)
    boxes = [letterbox_box(parse_record("flickr", r).box, 80, 110, 64) for r in FLICKR_RECORDS]
    torch.testing.assert_close(mean_train_box(dm), torch.tensor(np.mean(boxes, 0), dtype=torch.float32))


def test_cache_samples_serves_the_same_samples_without_decoding(
    fake_root: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = dict(data_root=fake_root["data"], split_root=fake_root["splits"], img_size=64)
    with pytest.raises(ValueError, match="augmentation is on"):
        _ds("refcoco", "train", train=True, cache_samples=True, **common)
    plain = _ds("refcoco", "val", **common)
    cached = _ds("refcoco", "val", cache_samples=True, **common)
    first = [cached[i] for i in range(len(cached))]
    # a second pass reads nothing from disk
    monkeypatch.setattr("oneref.data.datasets.Image.open", lambda *a, **k: pytest.fail("decoded again"))
    for i, sample in enumerate(first):
        assert cached[i] is sample
    monkeypatch.undo()
    for i in range(len(plain)):
        a, b = plain[i]["result"], cached[i]["result"]
        assert torch.equal(a.image(), b.image()) and torch.equal(a.obj_mask(), b.obj_mask())
    train = _ds("refcoco", "train", train=True, augment={"enabled": False}, cache_samples=True, **common)
    assert train[0] is train[0]


def test_missing_root_and_split_file(fake_root: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data root not found") as err:
        _dm(fake_root, "refcoco", data_root=tmp_path / "nowhere").setup("fit")
    assert "Expected layout" in str(err.value) and "other/images/mscoco" in str(err.value)
    with pytest.raises(
        FileNotFoundError, match="split file not found .*'refcoco', split 'val'.*tried"
    ) as err:
        _dm(fake_root, "refcoco", split_root=tmp_path).setup("test")
    msg = str(err.value)
    assert (
        str(tmp_path / "single_dataset/unc/unc_val.pth") in msg and str(tmp_path / "unc/unc_val.pth") in msg
    )
    assert "<split_root>/single_dataset/<name>/<name>_<split>.pth" in msg and "refcoco: unc" in msg
    assert "<split_root>/<name>/<name>_<split>.pth" in msg
    with pytest.raises(FileNotFoundError) as err:
        _dm(fake_root, "mixup_refc", split_root=tmp_path).setup("fit")
    assert str(tmp_path / "mixup_with_refc/mixup/mixup_train.pth") in str(err.value)
    assert str(tmp_path / "mixup_with_refc/mixup_with_refc_train.pth") in str(err.value)
    with pytest.raises(ValueError, match="valid splits"):
        _ds("refcocog_google", "testA", fake_root["data"], fake_root["splits"])


@pytest.fixture()
def bad_root(tmp_path: Path, fake_root: dict[str, Path]) -> Path:
    """unc records: good, missing image, corrupt JPEG, empty phrase, degenerate box, box outside."""
    coco = tmp_path / COCO_DIR
    _jpeg(coco / "COCO_good.jpg", 60, 50, 0)
    _jpeg(coco / "COCO_trunc.jpg", 60, 50, 1)
    data = (coco / "COCO_trunc.jpg").read_bytes()
    (coco / "COCO_trunc.jpg").write_bytes(data[: len(data) // 2])
    size = {"height": 50, "width": 60}
    records = [
        ("COCO_good.jpg", size, [5, 5, 20, 20], "good one", POLY),
        ("COCO_missing.jpg", size, [5, 5, 20, 20], "missing", POLY),
        ("COCO_trunc.jpg", size, [5, 5, 20, 20], "corrupt", POLY),
        ("COCO_good.jpg", size, [5, 5, 20, 20], "   ", POLY),
        ("COCO_good.jpg", size, [5, 5, 0.5, 20], "thin", POLY),
        ("COCO_good.jpg", size, [50, 5, 20, 20], "outside", POLY),
    ]
    _split(tmp_path / "splits", "refcoco", "train", records)
    return tmp_path


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (1, "COCO_missing.jpg.*No such file"),
        (2, "COCO_trunc.jpg.*(truncated|OSError)"),
        (3, "empty phrase"),
        (4, "degenerate box"),
    ],
)
def test_bad_samples_raise_naming_the_sample(bad_root: Path, index: int, match: str) -> None:
    ds = _ds("refcoco", "train", bad_root, bad_root / "splits", img_size=32, train=True)
    with pytest.raises(SampleError, match=f"refcoco/train sample {index} .*{match}"):
        ds[index]


def test_skip_mode_counts_and_reports(bad_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = _ds("refcoco", "train", bad_root, bad_root / "splits", img_size=32, bad_samples="skip")
    with caplog.at_level(logging.WARNING, logger="oneref.data.datasets"):
        got = [ds[i]["phrase"] for i in range(len(ds))]
    assert got == ["good one", "outside", "outside", "outside", "outside", "outside"]
    assert ds.bad_indices() == [1, 2, 3, 4]
    rep = ds.bad_sample_report()
    assert rep["skipped"] == 4 and "COCO_missing.jpg" in rep["examples"][0]
    assert sum("skipping bad sample" in r.getMessage() for r in caplog.records) == 4


def test_epoch_end_callback_reports_skipped_samples(
    bad_root: Path, fake_root: dict[str, Path], caplog
) -> None:
    from types import SimpleNamespace

    from oneref.tasks.callbacks import BadSampleReport

    dm = _dm(
        {"data": bad_root, "splits": bad_root / "splits", "tok": fake_root["tok"]},
        "refcoco", data_root=bad_root, split_root=bad_root / "splits", tokenizer=fake_root["tok"],
        img_size=32, max_query_len=12, batch_size=2, num_workers=0, pin_memory=False,
        bad_samples="skip", augment={"enabled": False}, val_split=[], test_splits=["train"],
    )  # fmt: skip
    dm.setup("fit")
    for i in range(len(dm.train_set)):
        dm.train_set[i]
    logged = {}
    module = SimpleNamespace(log_dict=lambda d, **kw: logged.update(d, **{"_kw": kw}))
    with caplog.at_level(logging.WARNING, logger="oneref.data.datamodule"):
        BadSampleReport().on_train_epoch_end(SimpleNamespace(datamodule=dm), module)
    assert logged["data/skipped/refcoco/train"] == 4.0 and logged["_kw"]["reduce_fx"] == "sum"
    assert any(
        "4 samples skipped" in r.getMessage() and "COCO_missing.jpg" in r.getMessage() for r in caplog.records
    )


def test_unparsable_records_raise_or_skip(tmp_path: Path, fake_root: dict[str, Path]) -> None:
    _split(tmp_path / "splits", "flickr", "train", [FLICKR_RECORDS[0], ("2000.jpg", "no box")])
    with pytest.raises(RecordError, match="flickr_train.pth record 1"):
        _ds("flickr", "train", fake_root["data"], tmp_path / "splits")
    ds = _ds("flickr", "train", fake_root["data"], tmp_path / "splits", bad_samples="skip")
    assert len(ds) == 1 and ds.num_unparsable == 1


def test_worker_error_names_the_sample(bad_root: Path) -> None:
    ds = _ds("refcoco", "train", bad_root, bad_root / "splits", img_size=32)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, [1]), batch_size=1, num_workers=1, collate_fn=RefCollate(8)
    )
    with pytest.raises(SampleError, match="COCO_missing.jpg"):
        next(iter(loader))


def test_split_files_with_numpy_fall_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.pth"
    torch.save([("a.jpg", np.array([1.0, 2.0, 3.0, 4.0]), "x")], path)
    with caplog.at_level(logging.WARNING, logger="oneref.data.records"):
        data = load_split_file(path)
    assert np.array_equal(data[0][1], [1, 2, 3, 4]) and "trusted source" in caplog.text
    torch.save([("a.jpg", [1.0, 2.0, 3.0, 4.0], "x")], path)  # plain containers: no warning
    caplog.clear()
    assert load_split_file(path)[0][0] == "a.jpg" and not caplog.records


def test_verify_cli(
    fake_root: dict[str, Path], bad_root: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    assert verify_main(["--data-root", str(fake_root["data"]), "--split-root", str(fake_root["splits"])]) == 0
    out = tmp_path / "report.json"
    rc = verify_main(
        ["--data-root", str(bad_root), "--split-root", str(bad_root / "splits"), "--json", str(out)]
    )
    assert rc == 1
    import json

    rep = json.loads(out.read_text())
    row = rep["splits"][0]
    assert (row["dataset"], row["split"], row["records"]) == ("refcoco", "train", 6)
    assert (row["missing_image"], row["empty_phrase"], row["degenerate_box"], row["box_outside"]) == (
        1,
        1,
        1,
        1,
    )
    splits = bad_root / "splits"
    assert rep["problems"] == [
        f"refcoco: missing split file {splits}/single_dataset/unc/unc_{s}.pth or {splits}/unc/unc_{s}.pth"
        for s in ("val", "testA", "testB")
    ]
    rc = verify_main(
        [
            "--data-root",
            str(bad_root),
            "--split-root",
            str(bad_root / "splits"),
            "--decode",
            "--splits",
            "train",
        ]
    )
    assert rc == 1
    assert verify_main(["--data-root", str(tmp_path / "none"), "--split-root", str(tmp_path)]) == 1
