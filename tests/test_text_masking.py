"""Referring-aware text masking against every official draw of the golden set (masking.json)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from oneref.data.text_masking import mask_text, mask_token, masked_token_count, sample_rng

# Golden-independent tests use the layout of the BEiT-3 tokenizer's scaled-down golden copy.
MASK_ID, VOCAB, P = 991, 992, 0.4


@pytest.fixture(scope="session")
def masking(golden_mlm_dir: Path) -> dict:
    return json.loads((golden_mlm_dir / "masking.json").read_text())


def _ids(draw: dict) -> list[int]:
    return draw["language_token"][: draw["num_tokens"]]  # our ids carry no padding


def test_every_official_draw(masking: dict) -> None:
    mask_id, vocab, p = masking["mask_token_id"], masking["tokenizer_vocab_size"], masking["mask_prob"]
    for name, draw in masking["draws"].items():
        _check_draws(name, draw, mask_id, vocab, p)


def _check_draws(name: str, draw: dict, mask_id: int, vocab: int, p: float) -> None:
    n = draw["num_tokens"]
    for res in draw["results"]:
        got = mask_text(
            _ids(draw), random.Random(res["seed"]), mask_id, vocab, p, draw["sbj_idx"], draw["obj_idx"]
        )
        if "error" in res:  # official IndexError: the anchor past the ids is ignored (see below)
            continue
        assert got.ids.tolist() == res["masked_token"][:n], (name, res["seed"])
        assert res["masked_token"][n:] == [1] * (len(res["masked_token"]) - n)  # pads untouched
        assert got.positions.tolist() == res["positions"] and got.labels.tolist() == res["labels"]
        kinds = ["mask" if t == mask_id else "kept" if t == lab else "random"
                 for t, lab in zip(got.ids[got.positions].tolist(), res["labels"])]  # fmt: skip
        assert kinds == res["kinds"], (name, res["seed"])


def test_count_table_in_float64(masking: dict) -> None:
    table = masking["count_table"]
    for p, counts in table["counts"].items():
        assert [masked_token_count(n, float(p)) for n in table["n"]] == counts, p
    assert masked_token_count(46, 0.7) == 31  # 45 * 0.7 = 31.499999999999996, as officially


def test_get_mask_token_sequence_and_statistics(masking: dict) -> None:
    g, mask_id, vocab = masking["get_mask_token"], masking["mask_token_id"], masking["tokenizer_vocab_size"]
    rng = random.Random(g["seed_sequence"])
    assert [mask_token(g["token"], rng, mask_id, vocab) for _ in g["sequence"]] == g["sequence"]
    rng = random.Random(g["seed_stats"])
    out = [mask_token(g["token"], rng, mask_id, vocab) for _ in range(g["draws"])]
    kinds = Counter("mask" if t == mask_id else "kept" if t == g["token"] else "random" for t in out)
    assert dict(kinds) == g["counts"]
    randoms = [t for t in out if t not in (mask_id, g["token"])]
    assert (min(randoms), max(randoms)) == (g["random_min_seen"], g["random_max_seen"])


def test_anchor_on_the_eos_slot_masks_eos_as_officially(masking: dict) -> None:
    draw = masking["draws"]["truncated_subject_eos"]
    n = draw["num_tokens"]
    assert draw["sbj_idx"] + 1 == n - 1  # the subject piece was truncated away: its slot holds eos
    for res in draw["results"]:
        got = mask_text(_ids(draw), random.Random(res["seed"]), MASK_ID, VOCAB, P, draw["sbj_idx"], None)
        assert n - 1 in got.positions.tolist() and got.labels[-1] == 2


def test_anchor_past_the_truncation_is_ignored_instead_of_crashing(masking: dict) -> None:
    """Official: IndexError (training stops). Here the anchor is skipped without drawing, so the
    draws equal those of an expression without that anchor."""
    draw = masking["draws"]["truncated_subject_index_error"]
    ids = _ids(draw)
    assert draw["sbj_idx"] + 1 == len(ids)
    for res in draw["results"]:
        assert "IndexError" in res["error"]
        got = mask_text(ids, random.Random(res["seed"]), MASK_ID, VOCAB, P, draw["sbj_idx"], None)
        plain = mask_text(ids, random.Random(res["seed"]), MASK_ID, VOCAB, P, None, None)
        assert got.ids.tolist() == plain.ids.tolist() and got.positions.tolist() == plain.positions.tolist()
        assert len(got.positions) == masked_token_count(len(ids), P) and got.positions.max() < len(ids)


def test_one_token_and_anchorless_expressions() -> None:
    one = [0, 57, 2]  # bos, one piece, eos
    for seed in range(50):
        got = mask_text(one, random.Random(seed), MASK_ID, VOCAB, P)
        assert len(got.positions) == 1 and got.positions[0] in (1, 2)  # the piece or eos, never bos
    seen = set()
    ids = [0, *range(10, 30), 2]
    for seed in range(200):
        got = mask_text(ids, random.Random(seed), MASK_ID, VOCAB, P)  # no subject, no object
        pos = got.positions.tolist()
        assert len(pos) == masked_token_count(len(ids), P) == 8 and pos == sorted(set(pos))
        assert got.ids[0] == 0 and min(pos) >= 1
        assert got.labels.tolist() == [ids[i] for i in pos]
        seen.update(pos)
    assert seen == set(range(1, len(ids)))  # every non-bos position, eos included
    # subject and object take the first slots; the same index is masked once
    got = mask_text(ids, random.Random(0), MASK_ID, VOCAB, P, 4, 4)
    assert 5 in got.positions.tolist() and len(got.positions) == 8


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bos \\+ at least one piece \\+ eos"):
        mask_text([0, 2], random.Random(0), MASK_ID, VOCAB)
    with pytest.raises(ValueError, match="mask_prob must be in"):
        mask_text([0, 5, 2], random.Random(0), MASK_ID, VOCAB, 1.5)


def test_sample_generator_depends_on_seed_epoch_index_only() -> None:
    a = [sample_rng(13, 0, 7).random() for _ in range(2)]
    assert a[0] == a[1]
    assert len({sample_rng(13, e, i).random() for e in range(3) for i in range(3)}) == 9
    assert sample_rng(13, 0, 7).random() != sample_rng(14, 0, 7).random()
