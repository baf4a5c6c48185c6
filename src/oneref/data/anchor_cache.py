"""The MRefM anchors of a dataset's splits: parsed once per split file into the anchor cache
(`oneref.data.anchors`, rank 0 in ``RefDataModule.prepare_data``), then read by the datasets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from oneref.data import formats
from oneref.data.anchors import (
    AnchorParser,
    Anchors,
    ensure_anchor_cache,
    make_parser,
    merge_anchor_maps,
    read_anchor_cache,
)
from oneref.data.config import DataConfig
from oneref.data.records import RecordError, load_records, load_split_file, parse_record, split_files
from oneref.errors import UserError

log = logging.getLogger(__name__)


class SplitAnchors:
    """phrase -> (subject, object) words of each split that carries the MRefM fields."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self._parser: AnchorParser | None = None
        self._warned_rules = False

    @property
    def parser(self) -> AnchorParser:
        if self._parser is None:
            m = self.config.mrefm  # make_parser: the rule-based fallback when no spaCy model is named
            self._parser = make_parser(
                m.spacy_model, batch_size=m.spacy_batch_size, n_process=m.spacy_processes
            )
        return self._parser

    @property
    def cache_dir(self) -> Path:
        if self.config.mrefm.cache_dir:
            return Path(self.config.mrefm.cache_dir).expanduser()
        return Path(os.environ.get("ONEREF_CACHE", ".cache")).expanduser() / "anchors"

    def splits(self) -> list[str]:
        """Splits that carry the MRefM fields: training, and validation (MIM/MLM loss and accuracy)."""
        return list(dict.fromkeys([self.config.train_split, *self.config.val_split]))

    def prepare(self) -> None:
        """Parse every such split not cached yet."""
        for split in self.splits():
            self.cache_files(split)

    def cache_files(self, split: str) -> list[Path]:
        """One cache file per split file of ``split``, parsed here when missing."""
        c = self.config
        fmt = formats.resolve(c.format, c.resolved_split_root, c.dataset)
        if fmt != "oneref":  # the anchor cache is named by split file
            raise UserError(
                f"data.mrefm reads OneRef split files, but {c.resolved_split_root} holds {fmt} "
                f"annotations; convert them first: python -m oneref.data.convert "
                f"{c.resolved_split_root} DST --to oneref, then data.split_root=DST"
            )
        parser = self.parser
        if parser.backend == "rules" and not self._warned_rules:
            self._warned_rules = True
            log.warning(
                "MRefM anchors: no spaCy model configured (data.mrefm.spacy_model), using the rule-based "
                "fallback; its subjects/objects differ from the official en_core_web_md parses"
            )
        paths = []
        for f in split_files(c.resolved_split_root, c.dataset, split):
            if not f.is_file():  # the same error as the dataset's, before any parsing
                load_records(c.resolved_split_root, c.dataset, split, data_root=c.data_root, format=c.format)
            paths.append(
                ensure_anchor_cache(self.cache_dir, f, parser, read_phrases=lambda f=f: self._phrases(f))
            )
        return paths

    def _phrases(self, path: Path) -> list[str]:
        phrases = []
        for k, raw in enumerate(load_split_file(path)):
            try:
                phrases.append(parse_record(self.config.dataset, raw, where=f"{path} record {k}").phrase)
            except RecordError:  # reported (or raised) when the dataset loads the split
                continue
        return phrases

    def __call__(self, split: str) -> dict[str, Anchors]:
        """phrase -> Anchors of a split (parsed first if not cached)."""
        return merge_anchor_maps(read_anchor_cache(p) for p in self.cache_files(split))
