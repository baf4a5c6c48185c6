"""XLM-R token ids from a sentencepiece model, without `transformers`.

The official code tokenises with `transformers.XLMRobertaTokenizer(beit3.spm)` (official
`models/OneRef_model.py` `get_sentencepiece_model_for_beit3`).
That tokenizer is a thin id mapping on top of sentencepiece (fairseq convention):

    <s> 0 (bos)   <pad> 1   </s> 2 (eos)   <unk> 3
    sentencepiece piece p >= 3  ->  p + 1          sentencepiece unk (0)  ->  3
    <mask> = len(spm) + 1                          vocab_size = len(spm) + 2

The five special tokens written literally in a text are kept whole, as the slow tokenizer does
(`<mask>` also eats the whitespace on its left). Expressions are truncated to `max_query_len - 2`
pieces, then bos/eos are added (official `_get_text_segment`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from oneref.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_FAIRSEQ_OFFSET = 1
_SPECIAL = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
_SPECIAL_RE = re.compile(r"(<s>|<pad>|</s>|<unk>|<mask>)")

BEIT3_SPM_HELP = (
    "beit3.spm is the sentencepiece model of BEiT-3 (an XLM-R style vocabulary of 64,000 pieces) that "
    "every OneRef and BEiT-3 checkpoint expects. It is published with the BEiT-3 release on GitHub: "
    "microsoft/unilm, folder beit3, README section 'Text Tokenizer' (file `beit3.spm`). Download it and "
    "pass its path (e.g. data.tokenizer=/path/to/beit3.spm), or put it in the checkpoint folder."
)


class Tokenizer:
    """Sentencepiece model with the XLM-R id convention and fast batch encoding.

    Args:
        model_path: a sentencepiece `.model` file (`beit3.spm` for official checkpoints).
        max_query_len: ids per expression including bos and eos (official: 64).
    """

    def __init__(self, model_path: str | os.PathLike, max_query_len: int = 64) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}\n{BEIT3_SPM_HELP}")
        self._init(path.read_bytes(), str(path), max_query_len)

    @classmethod
    def from_serialized(cls, proto: bytes, max_query_len: int = 64, name: str = "<serialized>") -> Tokenizer:
        """A tokenizer from the bytes of a sentencepiece model (as :meth:`serialized` returns them;
        our checkpoints embed them). ``name`` is what messages call it."""
        tok = cls.__new__(cls)
        tok._init(bytes(proto), name, max_query_len)
        return tok

    def _init(self, proto: bytes, name: str, max_query_len: int) -> None:
        if max_query_len < 3:
            raise ValueError(f"max_query_len must be >= 3 (bos + 1 piece + eos), got {max_query_len}")
        self.model_path = name
        self.max_query_len = int(max_query_len)
        self._proto = proto
        self._load()

    def serialized(self) -> bytes:
        """The sentencepiece model's bytes."""
        return self._proto

    def _load(self) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"{self.model_path} is not a sentencepiece model ({e})\n{BEIT3_SPM_HELP}") from e
        self._warned_truncation = False

    # Workers get a copy: pickle the model bytes, not the C++ processor.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_sp")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, max_query_len={self.max_query_len})"

    # ids ---------------------------------------------------------------------------------------------
    bos_id, pad_id, eos_id, unk_id = BOS_ID, PAD_ID, EOS_ID, UNK_ID

    @property
    def num_pieces(self) -> int:
        return len(self._sp)

    @property
    def mask_id(self) -> int:
        return len(self._sp) + _FAIRSEQ_OFFSET

    @property
    def vocab_size(self) -> int:
        """`XLMRobertaTokenizer.vocab_size` (the embedding tables may have more rows)."""
        return len(self._sp) + _FAIRSEQ_OFFSET + 1

    def _special_to_id(self, token: str) -> int:
        return self.mask_id if token == "<mask>" else _SPECIAL[token]

    def piece_to_id(self, piece: str) -> int:
        if piece == "<mask>" or piece in _SPECIAL:
            return self._special_to_id(piece)
        p = self._sp.piece_to_id(piece)
        return p + _FAIRSEQ_OFFSET if p else UNK_ID

    def id_to_piece(self, idx: int) -> str:
        if idx == self.mask_id:
            return "<mask>"
        for tok, i in _SPECIAL.items():
            if i == idx:
                return tok
        return self._sp.id_to_piece(idx - _FAIRSEQ_OFFSET)

    def tokenize(self, text: str) -> list[str]:
        """Pieces as `XLMRobertaTokenizer.tokenize` returns them (no bos/eos, no truncation).

        The piece strings of sentencepiece (a piece outside the vocabulary keeps its own string, as
        in the official tokenizer, although its id is `<unk>`); literal special tokens stay whole.
        """
        if "<" not in text:
            return self._sp.encode(text, out_type=str)
        out: list[str] = []
        parts = _SPECIAL_RE.split(text)
        for k, part in enumerate(parts):
            if k % 2 == 1:
                out.append(part)
                continue
            if k + 1 < len(parts) and parts[k + 1] == "<mask>":
                part = part.rstrip()  # <mask> is an lstrip token in XLM-R
            if part.strip():
                out.extend(self._sp.encode(part, out_type=str))
        return out

    def _ids_no_special(self, text: str) -> list[int]:
        if "<" not in text:
            return self._shift(self._sp.encode(text))
        out: list[int] = []
        parts = _SPECIAL_RE.split(text)
        for k, part in enumerate(parts):
            if k % 2 == 1:
                out.append(self._special_to_id(part))
                continue
            if k + 1 < len(parts) and parts[k + 1] == "<mask>":
                part = part.rstrip()  # <mask> is an lstrip token in XLM-R
            if part.strip():
                out.extend(self._shift(self._sp.encode(part)))
        return out

    @staticmethod
    def _shift(ids: list[int]) -> list[int]:
        return [i + _FAIRSEQ_OFFSET if i else UNK_ID for i in ids]

    # encoding ----------------------------------------------------------------------------------------
    def _check_and_truncate(self, ids: list[int], text: str, name: object | None) -> list[int]:
        if not ids:
            where = f" in sample {name}" if name is not None else ""
            raise ValueError(
                f"empty referring expression{where}: {text!r} gives no tokens; fix or drop this record"
            )
        limit = self.max_query_len - 2
        if len(ids) > limit:
            if not self._warned_truncation:
                self._warned_truncation = True
                log.warning(
                    "expression with %d pieces truncated to max_query_len - 2 = %d pieces as the official "
                    "code does (first seen in sample %s: %r); further truncations are not reported",
                    len(ids),
                    limit,
                    name,
                    text[:80],
                )
            ids = ids[:limit]
        return ids

    def encode(self, text: str, name: object | None = None) -> list[int]:
        """[bos] + pieces (truncated to max_query_len - 2) + [eos]."""
        ids = self._check_and_truncate(self._ids_no_special(text), text, name)
        return [BOS_ID, *ids, EOS_ID]

    def encode_batch(
        self,
        texts: Sequence[str],
        pad_to: int | None = None,
        names: Sequence[object] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch: ids int64 (B, L) and padding mask bool (B, L), True = pad.

        L is the longest encoded expression, or `pad_to` (e.g. max_query_len, as the official code
        pads) when given.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("encode_batch needs at least one text")
        # One C++ call for the plain texts; the rare ones with literal special tokens go one by one.
        plain = [i for i, t in enumerate(texts) if "<" not in t]
        raw: list[list[int] | None] = [None] * len(texts)
        if plain:
            for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain])):
                raw[i] = ids
        rows: list[list[int]] = []
        for i, t in enumerate(texts):
            ids = self._shift(raw[i]) if raw[i] is not None else self._ids_no_special(t)
            rows.append(self._check_and_truncate(ids, t, names[i] if names is not None else i))
        lengths = np.fromiter((len(r) + 2 for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        if pad_to is not None:
            if pad_to < width:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded expression ({width})")
            width = int(pad_to)
        out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        out[:, 0] = BOS_ID
        for b, r in enumerate(rows):
            out[b, 1 : 1 + len(r)] = r
        out[np.arange(len(rows)), lengths - 1] = EOS_ID
        pad = np.arange(width)[None, :] >= lengths[:, None]
        return torch.from_numpy(out), torch.from_numpy(pad)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the regular pieces (special ids dropped)."""
        keep = [int(i) - _FAIRSEQ_OFFSET for i in ids if UNK_ID < int(i) < self.mask_id]
        return self._sp.decode(keep)


def train_sentencepiece(
    sentences: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int = 64,
    model_type: str = "unigram",
    user_defined_symbols: Sequence[str] = (),
) -> Path:
    """Train a small sentencepiece model with the XLM-R layout (unk 0, <s> 1, </s> 2, no pad piece).

    Deterministic (one thread, no sentence sampling or shuffling) and quiet. `vocab_size` is an upper
    bound (`hard_vocab_limit=False`), so tiny corpora do not fail. Written atomically to `out_path`.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(user_defined_symbols),
        minloglevel=2,
    )
    return atomic_write_bytes(out, buf.getvalue())
