"""Subject and object anchors of referring-aware MLM: which words MRefM masks first.

The official model parses every expression with spaCy ``en_core_web_md`` inside its forward
(``models/OneRef_model.py``: ``get_subject_phrase``, ``get_object_phrase``, ``_find_index``):

- subject: the first token whose dependency label is in :data:`SUBJECT_DEPS`, else the first token
  whose label contains ``ROOT``, else none (so 'who', 'there' or the 'by' of an agent win over the
  head noun, and verb-rooted expressions anchor on the verb);
- object: the first token whose label is in :data:`OBJECT_DEPS` ('left' in "on the left" too);
- the anchor's piece index: the FIRST piece exactly equal to ``'▁' + word`` among the expression's
  pieces before truncation (a word of several pieces, or after a hyphen, is never found; a repeated
  word maps to its first occurrence).

Here parsing runs once per split file, in ``RefDataModule.prepare_data`` (rank 0), and the result,
one (subject, object) pair of words per distinct phrase, is cached as JSON keyed by the split file's
content hash and the parser (backend, model name and version). Loader workers only read it. Two
backends:

- ``spacy`` (optional extra ``oneref[nlp]``): a spaCy pipeline by package name or folder, as the
  official ``en_core_web_md``; spaCy is imported only when a parse or the model's identity is needed.
- ``rules``: a dependency-free guess used when no spaCy model is configured. NOT the official
  parse: subject = the last word before the first preposition, relative pronoun, auxiliary,
  '-ing' verb or relation word followed by of/to ('right of') (the head noun of the leading noun
  phrase); object = the last word of the first noun phrase after such a word (determiners skipped). It agrees with spaCy on simple "noun prep noun"
  and "noun verb-ing noun" expressions and differs elsewhere (relative pronouns, expletives,
  agents, verb roots).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from oneref.atomic import atomic_write_text

log = logging.getLogger(__name__)

# official models/OneRef_model.py: SUBJECTS and OBJECTS
SUBJECT_DEPS = ("subj", "xsubj", "npsubj", "nsubj", "nsubjpass", "csubj", "csubjpass", "agent", "expl")
OBJECT_DEPS = ("dobj", "pobj", "dative", "oprd")
WORD_START = "\u2581"  # sentencepiece's '▁', the space before a word

CACHE_FORMAT = 1
SPACY_MODEL_HELP = (
    "Install the official parser with `pip install 'oneref[nlp]'` and "
    "`python -m spacy download en_core_web_md`, or set data.mrefm.spacy_model to the folder of a "
    "spaCy pipeline, or to null to use the rule-based fallback (not the official parses; docs/data.md)."
)


@dataclass(frozen=True, slots=True)
class Anchors:
    """The subject and object words of one expression (None where there is none)."""

    subject: str | None
    object: str | None


def anchors_from_parse(words: Sequence[str], deps: Sequence[str]) -> Anchors:
    """Official ``get_subject_phrase`` / ``get_object_phrase`` on a parse's words and labels."""
    subject = next((w for w, d in zip(words, deps) if d in SUBJECT_DEPS), None)
    if subject is None:
        subject = next((w for w, d in zip(words, deps) if "ROOT" in d), None)
    obj = next((w for w, d in zip(words, deps) if d in OBJECT_DEPS), None)
    return Anchors(subject, obj)


def anchors_from_doc(doc: Any) -> Anchors:
    """:func:`anchors_from_parse` of a spaCy ``Doc``."""
    return anchors_from_parse([t.text for t in doc], [t.dep_ for t in doc])


def find_piece(pieces: Sequence[str], word: str | None) -> int | None:
    """Official ``_find_index``: index of the first piece equal to '▁' + word, or None."""
    if word is None:
        return None
    target = WORD_START + word
    for i, piece in enumerate(pieces):
        if piece == target:
            return i
    return None


def anchor_piece_indices(pieces: Sequence[str], anchors: Anchors) -> tuple[int | None, int | None]:
    """(subject, object) piece indices among the untruncated pieces, as the official lookup."""
    return find_piece(pieces, anchors.subject), find_piece(pieces, anchors.object)


# -- parsers ---------------------------------------------------------------------------------------
class AnchorParser(Protocol):
    backend: str

    @property
    def identity(self) -> dict[str, str]:
        """What the parses depend on (backend, model, versions): part of the cache key."""

    def parse(self, texts: Sequence[str]) -> list[Anchors]: ...


_PREPOSITIONS = frozenset(
    "about above across after against along alongside among around at atop behind below beneath beside "
    "besides between beyond by down from in inside into near next of off on onto opposite outside over "
    "past through toward towards under underneath up upon with within without".split()
)
_CLAUSE_WORDS = frozenset("who whom whose which that where while".split())
_AUXILIARIES = frozenset("is are was were be been being has have had does do did can could".split())
_DETERMINERS = frozenset(
    "a an the this that these those his her its their my your our some any each every another".split()
)
# "shape right of the triangle", "man in front of": a relation word that opens a phrase
_RELATION_WORDS = frozenset("left right front top bottom side back middle center centre".split())
_WORD_RE = re.compile(r"\w+")


class RuleAnchorParser:
    """Dependency-free subject/object guess (see the module docstring); deterministic."""

    backend = "rules"
    VERSION = "1"  # bump when the rules change: cached parses are keyed by it

    @property
    def identity(self) -> dict[str, str]:
        return {"backend": self.backend, "rules_version": self.VERSION}

    @staticmethod
    def _is_boundary(words: Sequence[str], i: int) -> bool:
        w = words[i]
        if w in _PREPOSITIONS or w in _CLAUSE_WORDS or w in _AUXILIARIES:
            return True
        after = words[i + 1] if i + 1 < len(words) else None
        if w in _RELATION_WORDS and after in ("of", "to") and any(v not in _DETERMINERS for v in words[:i]):
            return True
        # an '-ing' verb ("man holding a bat") once a content word came before it ("the building")
        return len(w) > 4 and w.endswith("ing") and any(v not in _DETERMINERS for v in words[:i])

    def parse_one(self, text: str) -> Anchors:
        words = _WORD_RE.findall(text.lower())
        cuts = [i for i in range(len(words)) if self._is_boundary(words, i)]
        head = words[: cuts[0]] if cuts else words
        content = [w for w in head if w not in _DETERMINERS]
        subject = content[-1] if content else None
        obj = None
        for k, cut in enumerate(cuts):
            stop = cuts[k + 1] if k + 1 < len(cuts) else len(words)
            span = [w for w in words[cut + 1 : stop] if w not in _DETERMINERS]
            if span:
                obj = span[-1]
                break
        return Anchors(subject, obj)

    def parse(self, texts: Sequence[str]) -> list[Anchors]:
        return [self.parse_one(t) for t in texts]


def _import_spacy() -> Any:
    try:
        import spacy
    except ImportError as e:
        raise ImportError(
            f"data.mrefm.spacy_model is set but spaCy is not installed. {SPACY_MODEL_HELP}"
        ) from e
    return spacy


class SpacyAnchorParser:
    """The official parser: a spaCy pipeline (package name such as ``en_core_web_md``, or a folder).

    Components that never set dependency labels (``ner``, ``lemmatizer``) are left out for speed;
    the labels do not depend on them.
    """

    backend = "spacy"
    SKIPPED = ("ner", "lemmatizer")

    def __init__(self, model: str | os.PathLike, batch_size: int = 512, n_process: int = 1) -> None:
        self.model = str(model)
        self.batch_size = int(batch_size)
        self.n_process = int(n_process)
        self._nlp: Any = None
        self._identity: dict[str, str] | None = None

    def _missing(self, err: BaseException) -> OSError:
        return OSError(
            f"spaCy model {self.model!r} (data.mrefm.spacy_model) cannot be loaded: {err}\n{SPACY_MODEL_HELP}"
        )

    @property
    def identity(self) -> dict[str, str]:
        """Backend, pipeline name and version, spaCy version, read from the model's meta.json
        (without loading the pipeline)."""
        if self._identity is None:
            spacy = _import_spacy()
            path = Path(self.model).expanduser()
            try:
                if not path.is_dir():
                    path = spacy.util.get_package_path(self.model)
                meta = spacy.util.get_model_meta(path)
            except (OSError, ImportError, ValueError) as e:
                raise self._missing(e) from e
            self._identity = {
                "backend": self.backend,
                "model": f"{meta.get('lang', '?')}_{meta.get('name', '?')}",
                "model_version": str(meta.get("version", "?")),
                "spacy_version": spacy.__version__,
            }
        return self._identity

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            spacy = _import_spacy()
            try:
                self._nlp = spacy.load(self.model, exclude=list(self.SKIPPED))
            except OSError as e:
                raise self._missing(e) from e
        return self._nlp

    def parse(self, texts: Sequence[str]) -> list[Anchors]:
        docs = self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process)
        return [anchors_from_doc(doc) for doc in docs]


def make_parser(spacy_model: str | os.PathLike | None, **spacy_kwargs: Any) -> AnchorParser:
    """spaCy when a model is configured, else the rule-based fallback."""
    if spacy_model is None or str(spacy_model) == "":
        return RuleAnchorParser()
    return SpacyAnchorParser(spacy_model, **spacy_kwargs)


# -- cache -----------------------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a split file (memoised per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", value).strip("-")


def anchor_cache_path(
    cache_dir: str | os.PathLike, split_file: str | os.PathLike, parser: AnchorParser
) -> Path:
    """``<cache_dir>/<split file name>-<content hash>-<parser identity>.json``."""
    ident = parser.identity
    tag = "-".join(_slug(v) for k, v in sorted(ident.items()) if k != "backend")
    name = f"{Path(split_file).stem}-{file_sha256(split_file)[:16]}-{ident['backend']}-{tag}.json"
    return Path(cache_dir).expanduser() / name


def write_anchor_cache(
    path: str | os.PathLike, split_file: str | os.PathLike, parser: AnchorParser, phrases: Iterable[str]
) -> Path:
    """Parse the distinct phrases and write the cache atomically."""
    path = Path(path)
    unique = sorted(set(phrases))
    t0 = time.perf_counter()
    parsed = parser.parse(unique)
    if len(parsed) != len(unique):
        raise RuntimeError(f"{type(parser).__name__} returned {len(parsed)} parses for {len(unique)} phrases")
    content = {
        "format": CACHE_FORMAT,
        "split_file": str(split_file),
        "sha256": file_sha256(split_file),
        **parser.identity,
        "anchors": {p: [a.subject, a.object] for p, a in zip(unique, parsed)},
    }
    atomic_write_text(path, json.dumps(content, ensure_ascii=False, separators=(",", ":")))
    log.info(
        "MRefM anchors: parsed %d distinct phrases of %s with %s in %.1f s; cache %s",
        len(unique),
        split_file,
        parser.identity,
        time.perf_counter() - t0,
        path,
    )
    return path


def read_anchor_cache(path: str | os.PathLike) -> dict[str, Anchors]:
    """phrase -> Anchors from a cache file written by :func:`write_anchor_cache`."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        if content.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {content.get('format')!r}, expected {CACHE_FORMAT}")
        return {p: Anchors(s, o) for p, (s, o) in content["anchors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable MRefM anchor cache {path} ({e}); delete it to parse again") from e


def ensure_anchor_cache(
    cache_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    parser: AnchorParser,
    phrases: Iterable[str] | None = None,
    read_phrases: Any = None,
) -> Path:
    """The cache file of ``split_file``, parsed now if it does not exist yet.

    ``phrases`` (or the callable ``read_phrases()``, called only when parsing is needed) gives the
    split file's phrases.
    """
    path = anchor_cache_path(cache_dir, split_file, parser)
    if path.is_file():
        log.info("MRefM anchors of %s (%s): cached in %s", split_file, parser.identity, path)
        return path
    if phrases is None:
        if read_phrases is None:
            raise ValueError(f"no MRefM anchor cache {path} and no phrases to parse")
        phrases = read_phrases()
    return write_anchor_cache(path, split_file, parser, phrases)


def merge_anchor_maps(maps: Iterable[Mapping[str, Anchors]]) -> dict[str, Anchors]:
    out: dict[str, Anchors] = {}
    for m in maps:
        out.update(m)
    return out
