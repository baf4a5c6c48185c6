"""Check every input a run names before anything is built or started, and report every problem
at once: the tokenizer, the split files of every split the run touches, a sample of the images
they reference, each stage's initial weights (present, readable, the right format and size: read
from the keys and shapes, memory-mapped, without building the model), MRefM's VQ-KD tokenizer
and spaCy parser, ``paper_row`` and the output folders.

    from oneref import preflight
    preflight.check([stage1_cfg, stage2_cfg])   # training: one composed config per stage
    preflight.check_eval(cfg)                   # python -m oneref.eval

A failed check raises one :class:`PreflightError` (a :class:`~oneref.errors.UserError`: exit 2, no
traceback) that lists each problem with the key to set and where the file is published.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from oneref.errors import UserError

log = logging.getLogger(__name__)

# Records whose images are looked for, spread over a dataset's smallest split file.
IMAGE_SAMPLE = 16
# At most this many example paths per problem.
EXAMPLES = 3

ONEREF_README = "the official OneRef README (github.com/linhuixiao/OneRef)"
PUBLISHED: dict[str, str] = {
    "tokenizer": (
        "beit3.spm, the BEiT-3 release: github.com/microsoft/unilm, folder beit3, README section "
        "'Text Tokenizer'"
    ),
    "split_files": (
        f"the authors' annotations (text_box_annotation, about 400 MB), linked from {ONEREF_README}; "
        "unpack them as downloaded (docs/data.md)"
    ),
    "coco": "COCO train2014 images, cocodataset.org ('2014 Train images')",
    "referit": "the ReferIt (SAIAPR TC-12) images, linked from the TransVG / CLIP-VG data instructions",
    "flickr": "the Flickr30K Entities images (flickr30k-images)",
    "beit3": (
        "beit3_{size}_indomain_patch16_224.pth, the BEiT-3 release: github.com/microsoft/unilm, folder "
        "beit3, README section 'Pretrained Models'"
    ),
    "mrefm": f"the MRefM pretrained checkpoints listed in {ONEREF_README}",
    "official": f"the released OneRef checkpoints listed in {ONEREF_README}",
    "ours": "a checkpoint of an earlier oneref run (run that stage first)",
    "vqkd": (
        "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth, the BEiT v2 release: github.com/microsoft/"
        "unilm, beit2/README.md, 'visual tokenizer'"
    ),
}


@dataclass(frozen=True)
class Problem:
    """One thing that would stop the run: what, the details, the key(s) to set, where to get it."""

    what: str
    detail: str
    fix: str
    source: str = ""
    stages: tuple[str, ...] = ()

    def format(self, number: int) -> str:
        where = f" [{', '.join(self.stages)}]" if self.stages else ""
        lines = [f"{number}. {self.what}{where}: " + self.detail.replace("\n", "\n     ")]
        lines.append(f"     set: {self.fix}")
        if self.source:
            lines.append(f"     published: {self.source}")
        return "\n".join(lines)


class PreflightError(UserError):
    """Every problem the checks found; ``problems`` holds them one by one."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"preflight found {n} problem{'s' if n != 1 else ''}; nothing was built or started:"
        super().__init__("\n".join([head, *(p.format(i + 1) for i, p in enumerate(self.problems))]))


# -- small helpers ------------------------------------------------------------------------------
def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg.a.b``, or ``default`` when absent, null or not resolvable (e.g. ``${hydra:...}`` outside
    a Hydra run)."""
    node = cfg
    try:
        for part in dotted.split("."):
            if node is None:
                return default
            node = node.get(part)
    except (OmegaConfBaseException, ValueError, AttributeError):
        return default
    return default if node is None else node


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _shown(path: Path) -> str:
    """A path as given, with its absolute form when it is relative (the cwd is not obvious)."""
    return str(path) if path.is_absolute() else f"{path} (that is {path.absolute()})"


def _listing(items: Sequence[Any], limit: int = EXAMPLES) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


class _SplitCache:
    """Split files read during one check: each file is loaded at most once."""

    def __init__(self) -> None:
        self._data: dict[Path, list | Exception] = {}

    def load(self, path: Path) -> list:
        from oneref.data.records import load_split_file

        key = path.resolve()
        if key not in self._data:
            try:
                self._data[key] = load_split_file(path)
            except Exception as e:  # reported as a problem, not raised
                self._data[key] = e
        value = self._data[key]
        if isinstance(value, Exception):
            raise value
        return value


# -- data -------------------------------------------------------------------------------------
def touched_splits(cfg: DictConfig, *, train: bool | None = None, test: bool | None = None) -> list[str]:
    """The splits a run reads: train and validation when it trains (and train for the mean-box
    baseline), the test splits when it tests."""
    from oneref.data.records import DEFAULT_TEST_SPLITS

    train = bool(_get(cfg, "train", True)) if train is None else train
    test = bool(_get(cfg, "test", True)) if test is None else test
    dataset = str(_get(cfg, "data.dataset"))
    out: list[str] = []
    if train or (test and _get(cfg, "report_baseline", False)):
        out.append(str(_get(cfg, "data.train_split", "train")))
    if train:
        out += _names(_get(cfg, "data.val_split", "val"))
    if test:
        out += _names(_get(cfg, "data.test_splits")) or list(DEFAULT_TEST_SPLITS.get(dataset, ()))
    return list(dict.fromkeys(out))


def check_split_files(
    split_root: Path, dataset: str, splits: Iterable[str]
) -> tuple[dict[str, list[Path]], list[Problem]]:
    """The files of each split (``trainval`` = train + val where the official loader says so) and
    the problems: unknown split names, and missing files grouped by the folders looked in.

    The one place that knows where split files are; another annotation format adds its layout here
    (through ``oneref.data.records.split_file_candidates``)."""
    from oneref.data.records import SPLITS, split_file_candidates, split_files

    splits = list(splits)
    fix_root = "data.split_root=DIR (or paths.data_dir=DIR, which holds split/data)"
    problems: list[Problem] = []
    found: dict[str, list[Path]] = {}
    unknown = [s for s in splits if s not in SPLITS[dataset]]
    if unknown:
        problems.append(
            Problem(
                "split names",
                f"dataset {dataset!r} has no split {_listing(unknown, 10)}; its splits: {', '.join(SPLITS[dataset])}",
                "data.train_split= / data.val_split= / data.test_splits=[...]",
            )
        )
    # folders looked in -> missing file names, in the order the splits were asked for
    missing: dict[tuple[Path, ...], list[tuple[str, ...]]] = {}
    for split in splits:
        if split in unknown:
            continue
        files = split_files(split_root, dataset, split)
        found[split] = [f for f in files if f.is_file()]
        for f in files:
            if f.is_file():
                continue
            part = f.stem.rsplit("_", 1)[-1]  # every layout names its files <name>_<split>.pth
            candidates = split_file_candidates(split_root, dataset, part)
            folders = tuple(c.parent for c in candidates)
            names = tuple(c.name for c in candidates)
            if names not in missing.setdefault(folders, []):
                missing[folders].append(names)
    for folders, names in missing.items():
        lines = [f"{folder}/: {_listing([n[i] for n in names], 20)}" for i, folder in enumerate(folders)]
        where = "none of" if len(folders) > 1 else "not in"
        problems.append(
            Problem(
                "split files",
                f"{dataset}: {where} these places (split_root = {split_root}):\n  " + "\n  ".join(lines),
                fix_root,
                PUBLISHED["split_files"],
            )
        )
    return found, problems


def _check_tokenizer(cfg: DictConfig, checkpoint: Any = None) -> list[Problem]:
    """``data.tokenizer``, or, where the ``checkpoint`` run carries its own (the data then tokenise
    with that one), that a ``data.tokenizer`` given beside it is the same model
    (oneref.factory.follow_checkpoint_tokenizer)."""
    from oneref.checkpoint import CheckpointError

    value = _get(cfg, "data.tokenizer")
    path = _path(value) if value else None
    if checkpoint is not None and checkpoint.carried_tokenizer is not None:
        if path is None or not path.is_file():  # no claim against the checkpoint's own
            return []
        try:
            checkpoint.choose_tokenizer(path, _get(cfg, "data.max_query_len"), knob="data.tokenizer")
        except (CheckpointError, ValueError) as e:
            return [Problem("tokenizer", str(e), "data.tokenizer=null (the checkpoint's own is used)")]
        return []
    fix = "data.tokenizer=PATH/beit3.spm (or paths.data_dir=DIR holding beit3.spm)"
    if path is None:
        return [Problem("tokenizer", "data.tokenizer is not set", fix, PUBLISHED["tokenizer"])]
    if not path.is_file():
        return [Problem("tokenizer", f"{_shown(path)} does not exist", fix, PUBLISHED["tokenizer"])]
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
        return [
            Problem("tokenizer", f"{path} is not a sentencepiece model ({e})", fix, PUBLISHED["tokenizer"])
        ]
    return []


def _image_dirs(cfg: DictConfig, data_root: Path) -> dict[str, Path]:
    from oneref.data.records import image_folders

    return image_folders(data_root, _get(cfg, "data.image_dirs"))


def image_sources(dataset: str) -> tuple[str, ...]:
    """The image folders (keys of ``oneref.data.records.IMAGE_DIRS``) a dataset's records use."""
    from oneref.data.records import COCO_DATASETS

    if dataset in COCO_DATASETS or dataset == "mixup_refc":
        return ("coco",)
    if dataset == "mixup_refc_referit":
        return ("coco", "referit")
    return (dataset,)


def _check_images(cfg: DictConfig, dataset: str, files: Iterable[Path], cache: _SplitCache) -> list[Problem]:
    """A few records of each of ``files`` (spread over it): do their images exist? Also: does each
    image folder of the dataset exist?"""
    from oneref.data.records import RecordError, parse_record

    data_root = _path(_get(cfg, "data.data_root", "."))
    dirs = _image_dirs(cfg, data_root)
    fix = "data.data_root=DIR (or paths.data_dir=DIR, which holds image_data)"
    problems: list[Problem] = []
    # the dataset's image folders, whether or not its split files could be read
    absent_dirs = {dirs[s]: s for s in image_sources(dataset) if s in dirs and not dirs[s].is_dir()}
    for path in dict.fromkeys(files):
        try:
            records = cache.load(path)
        except Exception as e:
            problems.append(
                Problem(
                    "split files", f"cannot read {path}: {e}", "data.split_root=DIR", PUBLISHED["split_files"]
                )
            )
            continue
        if not records:
            problems.append(
                Problem(
                    "split files", f"{path} holds no records", "data.split_root=DIR", PUBLISHED["split_files"]
                )
            )
            continue
        step = max(1, len(records) // IMAGE_SAMPLE)
        missing: dict[Path, list[str]] = {}
        sampled = 0
        for k in range(0, len(records), step)[:IMAGE_SAMPLE]:
            sampled += 1
            try:
                rec = parse_record(dataset, records[k], where=f"{path} record {k}")
            except RecordError as e:
                problems.append(
                    Problem("split files", str(e), "data.split_root=DIR", PUBLISHED["split_files"])
                )
                continue
            folder = dirs.get(rec.source)
            if folder is None:
                continue
            if not folder.is_dir():
                absent_dirs.setdefault(folder, rec.source)
            elif not (folder / rec.image_file).is_file():
                missing.setdefault(folder, []).append(rec.image_file)
        for folder, names in missing.items():
            problems.append(
                Problem(
                    "images",
                    f"{len(names)} of {sampled} sampled images of {path.name} are not in {folder}, e.g. "
                    + _listing(names),
                    fix,
                    PUBLISHED.get(next(s for s, d in dirs.items() if d == folder), ""),
                )
            )
    for folder, source in absent_dirs.items():
        problems.append(
            Problem(
                "images",
                f"image folder {folder} does not exist (data_root = {data_root})",
                fix if source in ("coco", "referit", "flickr") else f"data.image_dirs.{source}=DIR",
                PUBLISHED.get(source, ""),
            )
        )
    return problems


def check_data(
    cfg: DictConfig,
    splits: Sequence[str],
    cache: _SplitCache | None = None,
    *,
    checkpoint: Any = None,
) -> list[Problem]:
    """Tokenizer (see :func:`_check_tokenizer`: the ``checkpoint`` run may carry its own), the
    annotations of ``splits`` and a sample of their images (nothing for synthetic data: it is
    generated on first use)."""
    from oneref.data import formats
    from oneref.data.formats.common import FormatError
    from oneref.data.records import DATASETS, unknown_dataset_message

    dataset = str(_get(cfg, "data.dataset"))
    if dataset == "synthetic":
        return []
    if dataset not in DATASETS:
        return [Problem("dataset", unknown_dataset_message(dataset), f"data={' | '.join(DATASETS)}")]
    cache = cache or _SplitCache()
    problems = _check_tokenizer(cfg, checkpoint)
    split_root = _get(cfg, "data.split_root")
    split_root = _path(split_root) if split_root else _path(_get(cfg, "data.data_root", ".")) / "splits"
    try:  # data.format: auto picks the first format whose files exist (oneref when none does)
        fmt = formats.resolve(str(_get(cfg, "data.format", "auto")), split_root, dataset)
    except FormatError as e:
        return [*problems, Problem("annotation format", str(e), f"data.format={' | '.join(formats.FORMATS)}")]
    if fmt != "oneref":
        return problems + _check_other_format(cfg, fmt, split_root, dataset, splits)
    found, split_problems = check_split_files(split_root, dataset, splits)
    problems += split_problems
    files = list(dict.fromkeys(f for fs in found.values() for f in fs))
    unreadable = {f: p for f in files if (p := _unreadable_split_file(f))}
    problems += unreadable.values()
    files = [f for f in files if f not in unreadable]
    # Images: a sample of the smallest split file (a whole train file takes ~45 s to unpickle
    # safely; every file of a dataset points into the same image folders, checked whole above).
    sample = [min(files, key=lambda f: f.stat().st_size)] if files else []
    problems += _check_images(cfg, dataset, sample, cache)
    return problems


def _check_other_format(
    cfg: DictConfig, fmt: str, split_root: Path, dataset: str, splits: Sequence[str]
) -> list[Problem]:
    """Annotations in another format (oneref.data.formats): the splits it holds, and the image
    folders (its files are not parsed here: some hold every split in one file)."""
    from oneref.data import formats
    from oneref.data.formats.common import FormatError

    problems: list[Problem] = []
    try:
        held = set(formats.available_splits(fmt, split_root, dataset))
    except FormatError as e:
        held, problems = set(), [Problem("annotations", str(e), "data.split_root=DIR / data.format=")]
    wanted = [
        p for s in splits for p in (["train", "val"] if s == "trainval" and "trainval" not in held else [s])
    ]
    missing = [s for s in dict.fromkeys(wanted) if s not in held]
    if missing and not problems:
        problems.append(
            Problem(
                "annotations",
                f"{dataset} in format {fmt} under {split_root} has no split {_listing(missing, 10)} "
                f"(it has: {', '.join(sorted(held)) or 'none'})",
                "data.split_root=DIR / data.format= / data.train_split= / data.test_splits=[...]",
                "docs/data.md, 'Other annotation formats'",
            )
        )
    return problems + _check_images(cfg, dataset, [], _SplitCache())


def _unreadable_split_file(path: Path) -> Problem | None:
    """A split file that is no ``torch.save`` archive (e.g. an HTML error page), from its header."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and zipfile.is_zipfile(path):
        return None
    if head[:1] == b"\x80":  # a legacy (pre-1.6) torch.save pickle
        return None
    return Problem(
        "split files",
        f"{path} is not a torch.save file (it starts with {head!r}); the download may have failed",
        "data.split_root=DIR",
        PUBLISHED["split_files"],
    )


# -- weights ----------------------------------------------------------------------------------
def model_config(cfg: DictConfig):
    """The :class:`~oneref.models.oneref.OneRefConfig` the run would build (its task's heads),
    without building anything."""
    from oneref.config import to_container
    from oneref.models.registry import config_from_options
    from oneref.tasks.grounding import GroundingModule
    from oneref.tasks.mrefm import MRefMModule

    task = to_container(cfg.task)
    kind = MRefMModule if task.get("name") == "mrefm" else GroundingModule
    return config_from_options(to_container(cfg.model), **kind.heads(None, task))  # reads only the task


def _weights_source(fmt: str | None, path: Path) -> str:
    if fmt in ("beit3", "mrefm", "official"):
        return PUBLISHED[fmt]
    if path.suffix == ".ckpt" or fmt in ("lightning", "folder"):
        return PUBLISHED["ours"]
    return PUBLISHED["official"]


def open_checkpoint(path: Path, fmt: str | None, what: str, fix: str) -> tuple[Any, list[Problem]]:
    """(the :class:`~oneref.checkpoint.Checkpoint` description, problems): present and readable in
    the given format; the file is memory-mapped, not read."""
    from oneref.checkpoint import Checkpoint, CheckpointError

    source = _weights_source(fmt, path)
    if not path.exists():
        return None, [Problem(what, f"{_shown(path)} does not exist", fix, source)]
    try:
        return Checkpoint.open(path, fmt), []
    except CheckpointError as e:
        return None, [Problem(what, f"{path}: {e}", f"{fix} (and its format: ckpt_format=)", source)]


def check_fits(checkpoint: Any, cfg: DictConfig, what: str, fix: str) -> list[Problem]:
    """Do the checkpoint's keys and shapes fit the model the config builds? (No model is built,
    no weight is read.)"""
    from oneref.checkpoint import CheckpointError

    source = _weights_source(checkpoint.format, checkpoint.path)
    try:
        model_cfg = model_config(cfg)
    except (TypeError, ValueError, CheckpointError, UserError) as e:
        return [Problem("model", f"model={_get(cfg, 'model.size')}: {e}", "model=base | large | tiny")]
    issues = checkpoint.check_fits(model_cfg)
    if not issues:
        return []
    detail = f"(format {checkpoint.format}; model={_get(cfg, 'model.size')}, task={_get(cfg, 'task.name')}) "
    return [Problem(what, detail + "\n".join(issues), f"{fix} / model= / task=", source)]


def _check_spacy(cfg: DictConfig) -> list[Problem]:
    """MRefM's subject/object parser: installed and found (its meta only; nothing is loaded)."""
    name = _get(cfg, "data.mrefm.spacy_model")
    if not _get(cfg, "data.mrefm.enabled", False) or not name:
        return []
    from oneref.data.anchors import make_parser

    try:
        _ = make_parser(str(name)).identity  # reads the pipeline's meta.json only
    except (ImportError, OSError) as e:
        return [
            Problem(
                "spaCy parser",
                str(e).split("\n")[0],
                "data.mrefm.spacy_model=NAME|DIR (or null: the rule-based fallback, not the official parses)",
                "pip install 'oneref[nlp]', then python -m spacy download en_core_web_md",
            )
        ]
    return []


def _check_vqkd(cfg: DictConfig) -> list[Problem]:
    if str(_get(cfg, "task.name")) != "mrefm":
        return []
    value = _get(cfg, "task.vqkd.checkpoint")
    if not value:  # a seeded random tokenizer (task.vqkd.random)
        return []
    path = _path(value)
    fix = "task.vqkd.checkpoint=PATH (or task.vqkd.checkpoint=null: a random tokenizer, demonstrations only)"
    if not path.is_file():
        return [Problem("VQ-KD tokenizer", f"{_shown(path)} does not exist", fix, PUBLISHED["vqkd"])]
    from oneref.checkpoint import CheckpointError, load_checkpoint_file
    from oneref.checkpoint.vqkd import vqkd_config_from_state_dict

    try:
        obj = load_checkpoint_file(path, mmap=True)
        sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
        if not isinstance(sd, Mapping):
            raise CheckpointError("it holds no state dict")
        vq = vqkd_config_from_state_dict(sd)
    except CheckpointError as e:
        return [Problem("VQ-KD tokenizer", f"{path}: {e}", fix, PUBLISHED["vqkd"])]
    patch = int(_get(cfg, "model.patch_size", 16))
    if vq.patch_size != patch:
        return [
            Problem(
                "VQ-KD tokenizer",
                f"{path} has {vq.patch_size} px patches but the model has {patch} px patches",
                fix,
                PUBLISHED["vqkd"],
            )
        ]
    return []


# -- output -----------------------------------------------------------------------------------
def check_writable(path: Path, fix: str, what: str = "output folder") -> list[Problem]:
    """Can ``path`` be created (or written into)? Probed with a temporary file in the nearest
    existing folder; nothing is left behind."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [Problem(what, f"{path} cannot be created: {probe} is a file, not a folder", fix)]
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return [Problem(what, f"{path} is not writable ({probe}: {e.strerror or e})", fix)]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [Problem(what, f"{path} is not writable ({probe})", fix)]
    return []


def _outputs(cfg: DictConfig) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    output_dir = _get(cfg, "paths.output_dir")
    if output_dir:
        out.append((_path(output_dir), "hydra.run.dir=DIR (the run's output folder)"))
    for key in ("export_best", "export_last"):
        value = _get(cfg, key)
        if value:
            out.append((_path(value).parent, f"paths.log_dir=DIR (or {key}=PATH)"))
    return out


# -- entry points -----------------------------------------------------------------------------
def _stage_name(cfg: DictConfig, index: int, total: int) -> str:
    if total == 1:
        return ""
    name = _get(cfg, "run_name")
    return f"stage {index + 1}" + (f" ({name})" if name else "")


def _merge(found: Iterable[tuple[str, Problem]]) -> list[Problem]:
    """One entry per distinct problem, naming every stage it concerns."""
    merged: dict[tuple[str, str, str], Problem] = {}
    for stage, p in found:
        key = (p.what, p.detail, p.fix)
        old = merged.get(key)
        stages = (*(old.stages if old else ()), *((stage,) if stage else ()))
        merged[key] = Problem(p.what, p.detail, p.fix, p.source, tuple(dict.fromkeys(stages)))
    return list(merged.values())


def _init_format(cfg: DictConfig) -> str | None:
    """The format of ``init_from``: ``ckpt_format``."""
    fmt = _get(cfg, "ckpt_format")
    return None if fmt in (None, "auto") else str(fmt)


def stage_problems(cfg: DictConfig, produced: set[Path], cache: _SplitCache) -> list[Problem]:
    """Every problem of one training stage; ``produced``: files an earlier stage writes."""
    problems: list[Problem] = []
    checkpoint = None  # the initial weights, described (they may bring their tokenizer)
    init = _get(cfg, "init_from")
    if init and str(init) != "scratch" and _path(init).absolute() not in produced:
        fix = "init_from=PATH"
        checkpoint, problems = open_checkpoint(_path(init), _init_format(cfg), "initial weights", fix)
        if checkpoint is not None:
            problems += check_fits(checkpoint, cfg, "initial weights", fix)
    problems += check_data(cfg, touched_splits(cfg), cache, checkpoint=checkpoint)
    problems += _check_vqkd(cfg)
    problems += _check_spacy(cfg)
    problems += _check_paper_row(cfg)
    for path, fix in _outputs(cfg):
        problems += check_writable(path, fix)
    return problems


def check(stage_cfgs: Sequence[DictConfig]) -> None:
    """Check every input of a run (one fully composed config per stage) before anything is built;
    raise one :class:`PreflightError` listing every problem.

    A stage's ``init_from`` that an earlier stage writes (its ``export_best``/``export_last``) is
    not looked for. Each split file is read once, whichever stages use it."""
    cache = _SplitCache()
    produced: set[Path] = set()
    found: list[tuple[str, Problem]] = []
    for i, cfg in enumerate(stage_cfgs):
        stage = _stage_name(cfg, i, len(stage_cfgs))
        found += [(stage, p) for p in stage_problems(cfg, produced, cache)]
        for key in ("export_best", "export_last"):
            value = _get(cfg, key)
            if value:
                produced.add(_path(value).absolute())
    problems = _merge(found)
    if problems:
        raise PreflightError(problems)
    log.info("preflight: every input of %d stage(s) is in place", len(stage_cfgs))


def check_eval(cfg: DictConfig) -> None:
    """``python -m oneref.eval``: the checkpoint (present, readable, fits the composed model for
    an official file), the test data and the output folder."""
    problems: list[Problem] = []
    checkpoint = None
    ckpt = _get(cfg, "ckpt_path")
    fix = "ckpt_path=PATH (ckpt_format=official for an official .pth)"
    if ckpt in (None, "???"):
        problems.append(Problem("checkpoint", "ckpt_path is not set", fix, PUBLISHED["official"]))
    else:
        checkpoint, found = _check_eval_checkpoint(cfg, _path(ckpt), fix)
        problems += found
    problems += check_data(cfg, touched_splits(cfg, train=False, test=True), checkpoint=checkpoint)
    problems += _check_paper_row(cfg)
    out_json = _get(cfg, "output_json")
    if out_json:
        problems += check_writable(_path(out_json).parent, "output_json=PATH")
    elif _get(cfg, "paths.output_dir"):
        problems += check_writable(_path(cfg.paths.output_dir), "hydra.run.dir=DIR")
    if problems:
        raise PreflightError(_merge(("", p) for p in problems))


def _check_eval_checkpoint(cfg: DictConfig, path: Path, fix: str) -> tuple[Any, list[Problem]]:
    from oneref.models.registry import size_of

    checkpoint, problems = open_checkpoint(path, _get(cfg, "ckpt_format"), "checkpoint", fix)
    if checkpoint is None:
        return None, problems
    if checkpoint.format == "folder":  # brings its architecture (the data's image size follows)
        return checkpoint, []
    if checkpoint.format != "lightning" or checkpoint.task not in ("rec", "res"):
        return checkpoint, check_fits(checkpoint, cfg, "checkpoint", fix)
    arch = checkpoint.config  # our .ckpt brings its architecture; the data are prepared for cfg.model
    img_size = _get(cfg, "data.img_size")
    if arch is not None and img_size is not None and int(img_size) != arch.img_size:
        size = size_of(arch)
        return checkpoint, [
            Problem(
                "checkpoint",
                f"{path} holds a model for {arch.img_size} px images but the data are prepared at "
                f"data.img_size={img_size}",
                f"model={size} (its img_size follows), or model.img_size={arch.img_size}"
                if size
                else f"model.img_size={arch.img_size}",
            )
        ]
    return checkpoint, []


def _check_paper_row(cfg: DictConfig) -> list[Problem]:
    """A misspelt ``paper_row`` is found now, not when the run has finished."""
    from oneref import paper

    name = _get(cfg, "paper_row", "auto")
    if name == "auto" or name in paper.rows():
        return []
    return [
        Problem(
            "paper row",
            f"paper_row={name!r} is not a published row",
            f"paper_row=auto or one of {', '.join(paper.rows())}",
        )
    ]


__all__ = [
    "IMAGE_SAMPLE",
    "PUBLISHED",
    "PreflightError",
    "Problem",
    "check",
    "check_data",
    "check_eval",
    "check_split_files",
    "check_fits",
    "open_checkpoint",
    "check_writable",
    "model_config",
    "touched_splits",
]
