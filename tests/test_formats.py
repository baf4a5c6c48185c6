"""Annotation formats: each reader against records computed by hand, the same annotations giving the
same records and batches in every format, conversion round trips, leakage, and bad input."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from tests.helpers import annotations as A

from oneref.data import formats
from oneref.data.config import DataConfig
from oneref.data.convert import TARGETS, convert
from oneref.data.convert import main as convert_main
from oneref.data.datamodule import RefDataModule
from oneref.data.datasets import RefCollate, RefDataset
from oneref.data.formats.common import FormatError
from oneref.data.leakage import LeakageError, check_leakage
from oneref.data.records import RecordError, RefRecord, load_records
from oneref.data.tokenizer import train_sentencepiece
from oneref.errors import UserError

needs_pyarrow = pytest.mark.skipif(
    not A.HAVE_PYARROW, reason="the Hugging Face reader needs pyarrow (pip install 'oneref[formats]')"
)

FORMATS = tuple(A.WRITERS)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    os.environ.setdefault("ONEREF_CACHE", str(base / "cache"))
    out = A.write_all(base)
    phrases = [s for *_, sents in A.REFS for s in sents]
    out["tok"] = train_sentencepiece(phrases * 4, base / "tok.model", vocab_size=24)
    return out


def _load(root: Path, split: str, **kw):
    return load_records(root, A.DATASET, split, cache_dir=root.parent / "cache", **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_reader_gives_the_records_computed_by_hand(
    roots: dict[str, Path], fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert formats.detect(roots[fmt], A.DATASET) == fmt
    for split in A.SPLITS:
        recs, problems = _load(roots[fmt], split)  # format=auto
        assert recs == A.expected_records(split) and not problems, (fmt, split)
        assert _load(roots[fmt], split, format=fmt)[0] == recs
    # the fractional box of ann 101: x1y1x2y2 truncates x, y, w, h first (3+20, 4+18)
    assert _load(roots[fmt], "train")[0][0].box == (3, 4, 23, 22)


def test_trainval_is_train_plus_val(roots: dict[str, Path]) -> None:
    for fmt in ("refer", "seqtr"):
        recs, _ = _load(roots[fmt], "trainval", format=fmt)
        assert recs == A.expected_records("train") + A.expected_records("val")


@needs_pyarrow
def test_lmms_lab_evaluation_splits_with_embedded_images(roots: dict[str, Path], tmp_path: Path) -> None:
    for split in ("val", "testA", "testB"):
        recs, _ = load_records(roots["lmms"], A.DATASET, split, cache_dir=tmp_path)
        want = A.expected_records(split)
        strip = [(r.box, r.box_xywh, r.phrase, r.size) for r in recs]
        assert strip == [(r.box, r.box_xywh, r.phrase, r.size) for r in want]
        for r, w in zip(recs, want):  # the image written from the parquet is the image file
            assert Path(r.image_file).read_bytes() == (roots["data"] / A.COCO_DIR / w.image_file).read_bytes()
    with pytest.raises(FormatError, match="lmms-lab evaluation set: it has no 'train' split"):
        load_records(roots["lmms"], A.DATASET, "train", cache_dir=tmp_path)


def _batch(roots: dict[str, Path], fmt: str, split: str) -> dict:
    from oneref.data.tokenizer import Tokenizer

    tok = Tokenizer(roots["tok"], 12)
    cfg = DataConfig(
        dataset=A.DATASET,
        data_root=roots["data"],
        split_root=roots[fmt],
        img_size=32,
        seg_masks=True,
        format=fmt,
    )
    ds = RefDataset(cfg, split)
    return RefCollate(12, tokenizer=tok)([ds[i] for i in range(len(ds))])


def test_same_annotations_give_identical_batches_in_every_format(roots: dict[str, Path]) -> None:
    for split in ("train", "testA"):  # polygons and an RLE mask
        ref = _batch(roots, "oneref", split)
        for fmt in FORMATS[1:]:
            got = _batch(roots, fmt, split)
            assert got.keys() == ref.keys()
            for k, v in ref.items():
                assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, (fmt, split, k)


@pytest.mark.parametrize("to", TARGETS)
def test_convert_round_trips(roots: dict[str, Path], tmp_path: Path, to: str) -> None:
    for src in ("refer", "oneref"):
        dst = tmp_path / f"{src}-{to}"
        convert(roots[src], dst, to, cache_dir=tmp_path / "cache")
        assert formats.detect(dst, A.DATASET) == to
        back = tmp_path / f"{src}-{to}-oneref"
        assert convert_main([str(dst), str(back), "--to", "oneref", "--from", to]) == 0
        for split in A.SPLITS:
            for root in (dst, back):
                assert load_records(root, A.DATASET, split, cache_dir=tmp_path / "c")[
                    0
                ] == A.expected_records(split)
    # the official split files: plain tuples that torch.load(weights_only=True) reads
    if to == "oneref":
        (f,) = list((tmp_path / "refer-oneref").rglob("*_testA.pth"))
        raw = torch.load(f, weights_only=True)
        assert isinstance(raw[0], tuple) and raw[0][2] == [10.0, 10.0, 30.0, 35.0] and len(raw[0]) == 5


def test_leakage_warn_raise_off(roots: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    train = A.expected_records("train") + A.expected_records("val")  # a mix holding val's images
    evals = {"val": A.expected_records("val"), "testA": A.expected_records("testA")}
    with caplog.at_level(logging.WARNING):
        assert check_leakage(train, evals, "warn") == {"val": 1}
    assert "val: 1 images also in train, e.g. COCO_train2014_000000000025.jpg" in caplog.text
    with pytest.raises(LeakageError, match="data.leakage=raise"):
        check_leakage(train, evals, "raise")
    assert check_leakage(train, evals, "off") == {}
    with pytest.raises(UserError, match="data.leakage must be one of"):
        check_leakage(train, evals, "maybe")


def test_datamodule_reports_leakage_once_at_setup(
    roots: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = json.loads((roots["seqtr"] / "refcoco-unc" / "instances.json").read_text())
    data["val"].append(data["train"][0])  # a validation object on a training image
    (tmp_path / "refcoco-unc").mkdir()
    (tmp_path / "refcoco-unc" / "instances.json").write_text(json.dumps(data))
    kw = dict(
        dataset=A.DATASET,
        data_root=roots["data"],
        split_root=tmp_path,
        tokenizer=roots["tok"],
        img_size=32,
        num_workers=0,
        pin_memory=False,
        test_splits=["testA"],
    )
    with caplog.at_level(logging.WARNING):
        RefDataModule.from_config(**kw).setup("fit")
    assert "val/val: 1 images also in train, e.g. COCO_train2014_000000000009.jpg" in caplog.text
    with pytest.raises(LeakageError):
        RefDataModule.from_config(**kw, leakage="raise").setup("fit")
    with pytest.raises(UserError, match="data.format must be one of"):
        RefDataModule.from_config(**kw, format="coco")
    with pytest.raises(UserError, match="data.leakage must be one of"):
        RefDataModule.from_config(**kw, leakage="sometimes")


# --- bad input ---------------------------------------------------------------------------------------
class _Code:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_carrying_code_is_refused_by_name(roots: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Code(marker)], protocol=2))
    (tmp_path / "refcoco" / "instances.json").write_text("{}")
    with pytest.raises(FormatError, match=r"refs\(unc\).p: refused: the pickle refers to (posix|os)\.system"):
        load_records(tmp_path, A.DATASET, "train", format="refer", cache_dir=tmp_path)
    assert not marker.exists()  # nothing ran


def test_referit_comes_from_refclef_and_seqtr(tmp_path: Path) -> None:
    """ReferItGame: REFER's refclef (berkeley split) and SeqTR's referitgame-berkeley, SAIAPR file
    names read by base name from the ReferIt image folder; x, y, w, h as everywhere."""
    refs = [
        {
            "ref_id": 7,
            "ann_id": 70,
            "image_id": 25,
            "split": "test",
            "sentences": [{"raw": "Sky", "sent": "sky", "tokens": ["sky"], "sent_id": 0}],
        }
    ]
    inst = {
        "images": [{"id": 25, "file_name": "25/images/25.jpg", "height": 360, "width": 480}],
        "annotations": [{"id": 70, "image_id": 25, "bbox": [0.5, 1.5, 479.0, 120.25], "segmentation": []}],
    }
    (tmp_path / "refclef").mkdir()
    (tmp_path / "refclef" / "refs(berkeley).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "refclef" / "instances.json").write_text(json.dumps(inst))
    item = {
        "image_id": 25,
        "bbox": [0.5, 1.5, 479.0, 120.25],
        "expressions": ["sky"],
        "height": 360,
        "width": 480,
    }
    (tmp_path / "s" / "referitgame-berkeley").mkdir(parents=True)
    (tmp_path / "s" / "referitgame-berkeley" / "instances.json").write_text(json.dumps({"test": [item]}))
    want = [
        RefRecord("25.jpg", "referit", (0, 1, 479, 121), (0.5, 1.5, 479.0, 120.25), "sky", (360, 480), None)
    ]
    assert load_records(tmp_path, "referit", "test", cache_dir=tmp_path / "c")[0] == want
    assert load_records(tmp_path / "s", "referit", "test", cache_dir=tmp_path / "c")[0] == want


def test_refs_without_instances(roots: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(
        (roots["refer"] / "refcoco" / "refs(unc).p").read_bytes()
    )
    with pytest.raises(FormatError, match=r"has no instances.json beside it"):
        load_records(tmp_path, A.DATASET, "train", cache_dir=tmp_path)


def _seqtr_with(tmp_path: Path, roots: dict[str, Path], edit) -> Path:
    data = json.loads((roots["seqtr"] / "refcoco-unc" / "instances.json").read_text())
    edit(data["train"])
    (tmp_path / "refcoco-unc").mkdir(exist_ok=True)
    (tmp_path / "refcoco-unc" / "instances.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[0].update(bbox=[3, 4, 0, 18]), r"train\[0\] expression 0: box .* has no area"),
        (
            lambda t: t[0].update(bbox=[50, 4, 30, 18]),
            r"train\[0\] expression 0: box .* lies outside its 64x48 image",
        ),
        (
            lambda t: t[1].update(expressions=[" ?! "]),
            r"train\[1\] expression 0: sentence ' \?! ' is empty after tokenisation",
        ),
    ],
)
def test_bad_records_raise_naming_file_and_record_or_are_skipped(
    roots: dict[str, Path], tmp_path: Path, edit, match: str
) -> None:
    root = _seqtr_with(tmp_path, roots, edit)
    with pytest.raises(RecordError, match=match):
        load_records(root, A.DATASET, "train", cache_dir=tmp_path)
    recs, problems = load_records(root, A.DATASET, "train", "skip", cache_dir=tmp_path)
    assert len(problems) == (2 if "no area" in match or "outside" in match else 1)
    assert len(recs) == 3 - len(problems)


def test_ann_id_missing_from_instances(roots: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    refs = pickle.loads((roots["refer"] / "refcoco" / "refs(unc).p").read_bytes())
    refs[1]["ann_id"] = 999
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "refcoco" / "instances.json").write_bytes(
        (roots["refer"] / "refcoco" / "instances.json").read_bytes()
    )
    with pytest.raises(RecordError, match=r"refs\(unc\).p ref_id 1: ann_id 999 is not in .*instances.json"):
        load_records(tmp_path, A.DATASET, "train", cache_dir=tmp_path)
    recs, problems = load_records(tmp_path, A.DATASET, "train", "skip", cache_dir=tmp_path)
    assert len(recs) == 2 and len(problems) == 1


@needs_pyarrow
def test_parquet_without_the_expected_columns_names_its_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "refcoco").mkdir()
    pq.write_table(
        pa.table({"text": ["a"], "box": [[1.0, 2.0, 3.0, 4.0]]}), tmp_path / "refcoco" / "val-0.parquet"
    )
    with pytest.raises(
        FormatError, match=r"val-0.parquet: not a known RefCOCO parquet; it has the columns \['text', 'box'\]"
    ):
        load_records(tmp_path, A.DATASET, "val", format="hf", cache_dir=tmp_path)


def test_unknown_format_and_cache_is_reused(roots: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.format must be one of"):
        load_records(roots["refer"], A.DATASET, "train", format="coco")
    formats.forget()
    load_records(roots["refer"], A.DATASET, "val", format="refer", cache_dir=tmp_path)
    (cached,) = list((tmp_path / "records").glob("refer-*-val-*.pkl"))
    formats.forget()
    assert load_records(roots["refer"], A.DATASET, "val", format="refer", cache_dir=tmp_path)[
        0
    ] == A.expected_records("val")
    assert list((tmp_path / "records").glob("refer-*-val-*.pkl")) == [cached]


def test_mrefm_asks_for_oneref_split_files(roots: dict[str, Path]) -> None:
    dm = RefDataModule.from_config(
        dataset=A.DATASET,
        data_root=roots["data"],
        split_root=roots["refer"],
        tokenizer=roots["tok"],
        num_workers=0,
        mrefm={"enabled": True, "spacy_model": None},
    )
    with pytest.raises(
        UserError, match=r"holds refer annotations; convert them first: python -m oneref.data.convert"
    ):
        dm.prepare_data()


def test_the_real_config_trains_from_refer_files(roots: dict[str, Path], make_cfg) -> None:
    """data=refcoco with data.split_root at a REFER folder: the composed DataModule reads it (auto)."""
    from oneref import factory

    cfg = make_cfg(
        "data=refcoco",
        f"data.data_root={roots['data']}",
        f"data.split_root={roots['refer']}",
        f"data.tokenizer={roots['tok']}",
        "data.img_size=32",
        "data.leakage=raise",
    )
    assert cfg.data.format == "auto"
    dm = factory.build_datamodule(cfg)
    dm.setup("fit")
    assert list(dm.train_set.records) == A.expected_records("train")
    assert [list(d.records) for d in dm.val_sets] == [A.expected_records("val")]
