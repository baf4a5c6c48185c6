"""Referring-aware text masking of MRefM's MLM steps, as the official model does it in its forward.

Official ``models/OneRef_model.py`` ``_masking_on_text_tokens_v2`` and ``_get_mask_token``, moved
into the data pipeline (one call per sample, on token ids without padding):

- the count: ``max(min(int((n - 1) * p + 0.5), n - 1), 1)`` with ``n`` ids including bos and eos,
  evaluated in Python floats as the official code (so ``45 * 0.7 = 31.499999999999996`` gives 31);
- the subject's position first, then the object's (if not the same one and the count allows),
  then ``randint(1, n - 1)`` draws until the count is reached: bos never, eos possibly (official),
  padding never;
- every masked position: 80 % the mask id, 10 % kept, 10 % ``randint(3, vocab_size - 1)``
  (which includes ``<unk>`` and the mask id itself); labels are the original ids.

The draws go through one ``random.Random`` in exactly the official call order, so
``random.Random(s)`` reproduces the official ``random.seed(s)`` results id for id.

Deliberate difference: an anchor whose position lies past the (truncated) ids is ignored; the
official code raises ``IndexError`` there and training stops (with 64 tokens: an anchor word that
is piece 63 or later of its expression). An anchor on the last kept slot masks the eos id, as
officially.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MASK_PROB = 0.4  # official --text_mask_prob default (pretrain_oneref_with_mrefm.py)
FIRST_RANDOM_ID = 3  # official _get_mask_token: randint(3, vocab_size - 1)


def masked_token_count(num_tokens: int, mask_prob: float) -> int:
    """Official count of masked positions for ``num_tokens`` ids (bos and eos included)."""
    return max(min(int((num_tokens - 1) * mask_prob + 0.5), num_tokens - 1), 1)


def mask_token(token: int, rng: random.Random, mask_id: int, vocab_size: int) -> int:
    """Official ``_get_mask_token``: the id that replaces a masked ``token``."""
    p = rng.random()
    if p < 0.8:
        return mask_id
    if p < 0.9:
        return token
    return rng.randint(FIRST_RANDOM_ID, vocab_size - 1)


@dataclass(frozen=True)
class MaskedText:
    """One expression after masking: ids (same length as the input), masked positions ascending,
    and the original ids there (the MLM labels)."""

    ids: np.ndarray  # int64 (n,)
    positions: np.ndarray  # int64 (k,), ascending
    labels: np.ndarray  # int64 (k,)


def mask_text(
    ids: Sequence[int],
    rng: random.Random,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = MASK_PROB,
    subject_index: int | None = None,
    object_index: int | None = None,
) -> MaskedText:
    """Mask one expression's ids ([bos] + pieces + [eos], no padding) as the official MLM step.

    ``subject_index`` / ``object_index`` are piece indices (see ``oneref.data.anchors``); the
    masked positions are index + 1 (after bos). Anchors past the ids are ignored (see the module
    docstring).
    """
    tokens = [int(t) for t in ids]
    n = len(tokens)
    if n < 3:
        raise ValueError(f"mask_text needs bos + at least one piece + eos, got {n} ids: {tokens}")
    if not 0 <= mask_prob <= 1:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    to_mask = masked_token_count(n, mask_prob)
    masked = [False] * n
    count = 0

    def take(pos: int) -> None:
        nonlocal count
        masked[pos] = True
        tokens[pos] = mask_token(tokens[pos], rng, mask_id, vocab_size)
        count += 1

    labels = list(tokens)
    for anchor in (subject_index, object_index):
        if anchor is None:
            continue
        pos = int(anchor) + 1
        if pos >= n:  # official: IndexError
            continue
        if not masked[pos] and count < to_mask:
            take(pos)
    while count < to_mask:
        pos = rng.randint(1, n - 1)
        if not masked[pos]:
            take(pos)
    positions = np.flatnonzero(masked).astype(np.int64)
    return MaskedText(
        ids=np.asarray(tokens, dtype=np.int64),
        positions=positions,
        labels=np.asarray(labels, dtype=np.int64)[positions],
    )


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The text-masking generator of one sample, a function of (seed, epoch, index) only, so that
    results do not depend on the number of loader workers. Independent of the augmentation
    stream (``default_rng([seed, epoch, index])``)."""
    # a str seed: CPython hashes it with SHA-512 (deterministic across processes), and it is ~20x
    # cheaper than a numpy SeedSequence; the prefix keeps this stream apart from the others
    return random.Random(f"oneref-mlm/{int(seed)}/{int(epoch)}/{int(index)}")
