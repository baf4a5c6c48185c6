"""MRefM subject/object anchors: the official rules on golden parses (anchors.json), the spaCy
backend end to end (a saved pipeline loaded by path), the rule-based fallback, the parse cache."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.golden import GOLDEN_ROOT
from oneref.data.anchors import (
    Anchors,
    RuleAnchorParser,
    SpacyAnchorParser,
    anchor_cache_path,
    anchor_piece_indices,
    anchors_from_parse,
    ensure_anchor_cache,
    find_piece,
    make_parser,
    read_anchor_cache,
)
from oneref.data.tokenizer import Tokenizer

# resources of the tests that are not golden parity (a tokenizer, real-looking expressions)
GOLDEN = GOLDEN_ROOT / "official-tiny" / "mlm"
CASES = json.loads((GOLDEN / "anchors.json").read_text())["cases"]
PIPELINE_COMPONENT = "oneref_test_golden_parse"  # registered below when spaCy is importable


def _word(entry: dict | None) -> str | None:
    return None if entry is None else entry["text"]


@pytest.fixture(scope="session")
def golden_anchors(golden_mlm_dir: Path) -> tuple[list[dict], Tokenizer]:
    """A golden set's anchor cases and its tokenizer."""
    meta = json.loads((golden_mlm_dir / "anchors.json").read_text())
    return meta["cases"], Tokenizer(golden_mlm_dir / "spm.model", max_query_len=meta["max_query_len"])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(GOLDEN / "spm.model", max_query_len=12)


def test_official_rules_on_the_golden_parses(golden_anchors) -> None:
    cases, tok = golden_anchors
    for case in cases:
        doc = case["doc"]
        anchors = anchors_from_parse(doc["words"], doc["deps"])
        assert anchors == Anchors(_word(case["subject"]), _word(case["object"])), case["name"]
        pieces = tok.tokenize(case["text"])  # before truncation, as the official lookup
        assert pieces == case["pieces"], case["name"]
        assert anchor_piece_indices(pieces, anchors) == (case["sbj_idx"], case["obj_idx"]), case["name"]


def test_golden_docs_built_with_spacy(golden_anchors) -> None:
    """The same through spaCy Docs built exactly as anchors.json describes them."""
    spacy = pytest.importorskip("spacy")
    from oneref.data.anchors import anchors_from_doc

    vocab = spacy.vocab.Vocab()
    for case in golden_anchors[0]:
        d = case["doc"]
        doc = spacy.tokens.Doc(
            vocab, words=d["words"], spaces=d["spaces"], heads=d["heads"], deps=d["deps"], pos=d["pos"]
        )
        assert doc.text == case["text"]
        assert anchors_from_doc(doc) == Anchors(_word(case["subject"]), _word(case["object"])), case["name"]


def test_find_piece_is_an_exact_first_match() -> None:
    pieces = ["▁a", "▁dog", "▁next", "▁snow", "man", "▁dog"]
    assert find_piece(pieces, "dog") == 1  # first occurrence
    assert find_piece(pieces, "man") is None  # a word-internal piece never matches
    assert find_piece(pieces, None) is None and find_piece(pieces, "cat") is None


# -- spaCy backend, end to end ---------------------------------------------------------------------
_PARSES: dict[str, dict] = {}  # text -> golden parse, read by the registered component


def _golden_pipeline(tmp_path: Path, cases: list[dict] = CASES) -> Path:
    """A blank English pipeline plus a component that sets the golden dependency parse, on disk."""
    spacy = pytest.importorskip("spacy")
    from spacy.language import Language
    from spacy.tokens import Doc

    _PARSES.update({c["text"]: c["doc"] for c in cases})
    if PIPELINE_COMPONENT not in Language.factories:

        @Language.component(PIPELINE_COMPONENT)
        def golden_parse(doc: Doc) -> Doc:
            d = _PARSES[doc.text]
            return Doc(doc.vocab, words=d["words"], spaces=d["spaces"], heads=d["heads"], deps=d["deps"])

    nlp = spacy.blank("en")
    nlp.add_pipe(PIPELINE_COMPONENT)
    nlp.meta["name"] = "golden_parse"
    nlp.meta["version"] = "1.2.3"
    path = tmp_path / "golden_pipeline"
    nlp.to_disk(path)
    return path


def test_spacy_backend_loads_a_pipeline_by_path(tmp_path: Path, golden_anchors) -> None:
    cases, tok = golden_anchors
    parser = make_parser(str(_golden_pipeline(tmp_path, cases)), batch_size=4)
    assert isinstance(parser, SpacyAnchorParser)
    ident = parser.identity
    assert (ident["backend"], ident["model"], ident["model_version"]) == ("spacy", "en_golden_parse", "1.2.3")
    parsed = parser.parse([c["text"] for c in cases])
    for case, anchors in zip(cases, parsed):
        assert anchors == Anchors(_word(case["subject"]), _word(case["object"])), case["name"]
        assert anchor_piece_indices(tok.tokenize(case["text"]), anchors) == (case["sbj_idx"], case["obj_idx"])


def test_missing_spacy_model_says_how_to_install() -> None:
    pytest.importorskip("spacy")
    parser = make_parser("en_core_web_md_not_installed")
    with pytest.raises(OSError, match=r"python -m spacy download en_core_web_md.*spacy_model") as err:
        _ = parser.identity
    assert "null" in str(err.value) and "rule-based fallback" in str(err.value)
    with pytest.raises(OSError, match="python -m spacy download"):
        parser.parse(["a dog"])


def test_missing_spacy_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(ImportError, match=r"oneref\[nlp\]"):
        _ = make_parser("en_core_web_md").identity


def test_spacy_is_not_imported_by_the_data_modules() -> None:
    code = (
        "import sys; import oneref.data.anchors; "
        "make = oneref.data.anchors.make_parser; make('en_core_web_md'); make(None).parse(['a dog']); "
        "assert 'spacy' not in sys.modules"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


# -- the rule-based fallback -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "subject", "obj"),
    [
        ("man in red shirt", "man", "shirt"),
        ("the woman holding an umbrella", "woman", "umbrella"),
        ("the giraffe on the left", "giraffe", "left"),
        ("a dog next to the other dog", "dog", "dog"),
        ("the small green shape right of the purple triangle", "shape", "triangle"),
        ("the building on the left", "building", "left"),  # '-ing' noun at the start, not a verb
        ("left elephant", "elephant", None),
        ("the cat, sleeping.", "cat", None),
        ("on the left", None, "left"),
        ("", None, None),
    ],
)
def test_rule_fallback_guesses_head_noun_and_object(text: str, subject: str | None, obj: str | None) -> None:
    parser = make_parser(None)
    assert isinstance(parser, RuleAnchorParser) and parser.identity["backend"] == "rules"
    assert parser.parse([text]) == [Anchors(subject, obj)]


# -- cache -----------------------------------------------------------------------------------------
def test_cache_is_keyed_by_content_and_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = tmp_path / "unc_train.pth"
    torch.save([("a.jpg", {}, [0, 0, 1, 1], "man in red shirt", None)], split)
    rules = RuleAnchorParser()
    path = ensure_anchor_cache(
        tmp_path / "cache", split, rules, phrases=["man in red shirt", "left elephant"]
    )
    assert path == anchor_cache_path(tmp_path / "cache", split, rules) and path.name.startswith("unc_train-")
    assert read_anchor_cache(path) == {
        "man in red shirt": Anchors("man", "shirt"),
        "left elephant": Anchors("elephant", None),
    }
    # cached: no second parse
    monkeypatch.setattr(RuleAnchorParser, "parse", lambda self, texts: pytest.fail("parsed again"))
    assert ensure_anchor_cache(tmp_path / "cache", split, rules, phrases=["x"]) == path
    monkeypatch.undo()
    # other content: another cache file
    torch.save([("a.jpg", {}, [0, 0, 1, 1], "left elephant", None)], split)
    assert anchor_cache_path(tmp_path / "cache", split, rules) != path
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable MRefM anchor cache .*delete it"):
        read_anchor_cache(path)


def test_datamodule_parses_once_with_spacy_and_logs_the_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare_data parses the training split with the configured pipeline and caches it; setup and
    loaders only read the cache; the batch's anchors are the official ones."""
    from oneref.data.datamodule import RefDataModule

    pipeline = _golden_pipeline(tmp_path)
    data, splits = tmp_path / "data", tmp_path / "splits"
    img_dir = data / "other/images/mscoco/images/train2014"
    img_dir.mkdir(parents=True)
    arr = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(img_dir / "COCO_1.jpg", "JPEG")
    usable = [c for c in CASES if c["name"] != "truncated_subject_index_error"]
    records = [("COCO_1.jpg", {"height": 40, "width": 50}, [5, 5, 20, 20], c["text"], None) for c in usable]
    (splits / "single_dataset/unc").mkdir(parents=True)
    torch.save(records, splits / "single_dataset/unc/unc_train.pth")
    dm = RefDataModule.from_config(
        dataset="refcoco", data_root=data, split_root=splits, tokenizer=GOLDEN / "spm.model", img_size=64,
        max_query_len=12, batch_size=len(records), num_workers=0, pin_memory=False, val_split=[],
        mrefm={"enabled": True, "patch_size": 16, "spacy_model": str(pipeline), "cache_dir": str(tmp_path / "c")},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="oneref.data.anchors"):
        dm.prepare_data()
    cache = list((tmp_path / "c").glob("unc_train-*-spacy-*.json"))
    assert len(cache) == 1 and "golden" in cache[0].name and "1.2.3" in cache[0].name
    assert any("parsed" in r.getMessage() and "'spacy'" in r.getMessage() and str(cache[0]) in r.getMessage()
               for r in caplog.records)  # fmt: skip
    monkeypatch.setattr(SpacyAnchorParser, "parse", lambda self, texts: pytest.fail("parsed in setup"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    want = [[-1 if c[k] is None else c[k] for k in ("sbj_idx", "obj_idx")] for c in usable]
    assert batch["mlm_anchor_index"].tolist() == [want[i] for i in batch["index"].tolist()]
