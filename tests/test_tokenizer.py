"""XLM-R id convention on top of sentencepiece (official XLMRobertaTokenizer), checked against hand-written ids."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from oneref.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece

# A word model orders pieces by frequency after <unk> 0, <s> 1, </s> 2, so the sentencepiece ids are
# known by construction: red 3, circle 4, blue 5, square 6, green 7 -> XLM-R ids 4, 5, 6, 7, 8.
CORPUS = ["red"] * 9 + ["circle"] * 7 + ["blue"] * 5 + ["square"] * 3 + ["green"] * 2
PIECES = {"▁red": 4, "▁circle": 5, "▁blue": 6, "▁square": 7, "▁green": 8}


@pytest.fixture(scope="module")
def word_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(
        CORPUS, tmp_path_factory.mktemp("spm") / "words.model", vocab_size=16, model_type="word"
    )


@pytest.fixture()
def tok(word_model: Path) -> Tokenizer:
    return Tokenizer(word_model, max_query_len=6)


def test_piece_ids_follow_the_fairseq_offset(tok: Tokenizer) -> None:
    assert tok.num_pieces == 8  # <unk> <s> </s> + 5 words
    for piece, want in PIECES.items():
        assert tok.piece_to_id(piece) == want
        assert tok.id_to_piece(want) == piece
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id == 9  # len(spm) + 1, as <mask> = 64001 for beit3.spm
    assert tok.vocab_size == 10  # len(spm) + 2
    assert [tok.piece_to_id(p) for p in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 9]
    assert tok.piece_to_id("▁never-seen") == UNK_ID


def test_encode_hand_written(tok: Tokenizer) -> None:
    assert tok.encode("red circle") == [0, 4, 5, 2]
    assert tok.encode("green square blue") == [0, 8, 7, 6, 2]
    assert tok.encode("red purple circle") == [0, 4, 3, 5, 2]  # spm unk (0) -> 3
    assert tok.encode("red <mask> circle") == [0, 4, 9, 5, 2]  # literal special tokens stay whole
    assert tok.encode("<s>red</s>") == [0, 0, 4, 2, 2]
    assert tok.tokenize("blue  square") == ["▁blue", "▁square"]
    # piece strings as XLMRobertaTokenizer.tokenize: an unknown piece keeps its string (its id is <unk>)
    assert tok.tokenize("red purple circle") == ["▁red", "▁purple", "▁circle"]
    assert tok.tokenize("red <mask> circle") == ["▁red", "<mask>", "▁circle"]
    assert tok.decode([0, 4, 5, 2, 1, 1]) == "red circle"


def test_truncation_to_max_query_len_minus_two(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    text = "red circle blue square green red"  # 6 pieces, room for 4
    with caplog.at_level(logging.WARNING, logger="oneref.data.tokenizer"):
        assert tok.encode(text, name="s1") == [0, 4, 5, 6, 7, 2]
        assert tok.encode(text, name="s2") == [0, 4, 5, 6, 7, 2]
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "s1" in warnings[0].getMessage()  # once, naming the first sample


def test_encode_batch_pads_to_longest_or_to_max_len(tok: Tokenizer) -> None:
    ids, pad = tok.encode_batch(["red", "green square blue", "circle red"])
    assert ids.dtype == torch.int64 and pad.dtype == torch.bool
    assert ids.tolist() == [[0, 4, 2, 1, 1], [0, 8, 7, 6, 2], [0, 5, 4, 2, 1]]
    assert pad.tolist() == [[False] * 3 + [True] * 2, [False] * 5, [False] * 4 + [True]]
    ids, pad = tok.encode_batch(["red"], pad_to=6)
    assert ids.tolist() == [[BOS_ID, 4, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert pad.sum().item() == 3
    ids, _ = tok.encode_batch(["red circle blue square green red"])  # truncated in the batch too
    assert ids.tolist() == [[0, 4, 5, 6, 7, 2]]
    with pytest.raises(ValueError, match="shorter"):
        tok.encode_batch(["green square blue"], pad_to=3)


def test_subword_model_matches_sentencepiece_plus_one(tmp_path: Path) -> None:
    sentences = ["the small red circle left of the blue square", "a big green triangle at the top"] * 20
    path = train_sentencepiece(sentences, tmp_path / "uni.model", vocab_size=40)
    tok = Tokenizer(path, max_query_len=64)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    text = "the tiny red circle Zebra"
    want = [0] + [i + 1 if i else 3 for i in sp.encode(text)] + [2]
    assert tok.encode(text) == want
    assert 3 in want  # 'Z' is unknown to this model


def test_empty_expression_names_the_sample(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="empty referring expression in sample unc/val\\[7\\]"):
        tok.encode("   ", name="unc/val[7]")
    with pytest.raises(ValueError, match="sample 1"):
        tok.encode_batch(["red", ""])


def test_missing_model_explains_beit3_spm(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer(tmp_path / "beit3.spm")
    msg = str(err.value)
    assert "beit3.spm" in msg and "microsoft/unilm" in msg and str(tmp_path) in msg
    bad = tmp_path / "not_a_model.spm"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_pickles_for_dataloader_workers(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("blue square") == tok.encode("blue square") == [0, 6, 7, 2]


def test_training_is_deterministic(tmp_path: Path) -> None:
    sentences = [f"the {c} {k}" for c in ("red", "blue", "green") for k in ("circle", "square")] * 5
    a = train_sentencepiece(sentences, tmp_path / "a.model", vocab_size=30)
    b = train_sentencepiece(sentences, tmp_path / "b.model", vocab_size=30)
    assert a.read_bytes() == b.read_bytes()
