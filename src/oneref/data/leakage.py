"""Images shared by a run's training split and its evaluation splits (`data.leakage`).

RefCOCOg's google split shares images between train and val, and a training mix can hold images
of the evaluation sets (the OneRef mixes leave RefCOCOg-google out for that reason); scores on
such images are inflated. `check_leakage` counts them once at setup: `warn` logs the count and a
few file names, `raise` stops with a UserError, `off` skips the check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from oneref.data.records import RefRecord, load_records
from oneref.errors import UserError

if TYPE_CHECKING:
    from oneref.data.config import DataConfig

log = logging.getLogger(__name__)

LEAKAGE_MODES = ("warn", "raise", "off")


class LeakageError(UserError):
    """Training images appear in an evaluation split and data.leakage=raise."""


def _image(rec: RefRecord) -> tuple[str, str]:
    # by base name: the same image may be given as a file name or an absolute path
    return rec.source, Path(rec.image_file).name


def check_leakage(
    train: Iterable[RefRecord],
    evals: Mapping[str, Iterable[RefRecord]],
    mode: str = "warn",
    train_name: str = "train",
    examples: int = 5,
) -> dict[str, int]:
    """Count the training images that each evaluation split also holds; {split: count} (nonzero only)."""
    if mode not in LEAKAGE_MODES:
        raise UserError(f"data.leakage must be one of {list(LEAKAGE_MODES)}, got {mode!r}")
    if mode == "off":
        return {}
    seen = {_image(r) for r in train}
    found: dict[str, list[str]] = {}
    for name, recs in evals.items():
        shared = sorted({_image(r) for r in recs} & seen)
        if shared:
            found[name] = [f for _, f in shared]
    if not found:
        return {}
    lines = [
        f"{name}: {len(files)} images also in {train_name}, e.g. {', '.join(files[:examples])}"
        for name, files in found.items()
    ]
    msg = (
        "evaluation images also used for training (scores on them are inflated): "
        + "; ".join(lines)
        + ". Evaluate on splits without them, or set data.leakage=off to accept it"
    )
    if mode == "raise":
        raise LeakageError(msg + " (data.leakage=raise)")
    log.warning("%s", msg)
    return {name: len(files) for name, files in found.items()}


def check_run(
    config: DataConfig, train: Iterable[RefRecord], loaded: Mapping[str, Iterable[RefRecord]]
) -> dict[str, int]:
    """`check_leakage` of a run (the DataModule calls it once, at the setup that loads the training
    split): `loaded` are its evaluation splits built so far ({"val/val": records, ...}); test splits
    not built yet are read for their records only (one that cannot be read is reported when it is
    evaluated)."""
    if config.leakage == "off":
        return {}
    evals = dict(loaded)
    for s in config.test_splits:
        if f"test/{s}" not in evals:
            try:
                evals[f"test/{s}"] = load_records(
                    config.resolved_split_root,
                    config.dataset,
                    s,
                    "skip",
                    config.data_root,
                    format=config.format,
                )[0]
            except (OSError, ValueError, UserError) as e:
                log.debug("leakage check: test split %s not read: %s", s, e)
    return check_leakage(train, evals, config.leakage, config.train_split)
