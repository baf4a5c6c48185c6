"""Checkpoints on the Hugging Face Hub, through ``huggingface_hub`` (the ``hf`` extra).

    oneref.load("user/oneref-base-refcoco")                 # a repository id: the Hub's cache
    python -m oneref.train init_from=hf://user/name@v1.0    # hf:// + id, @ a branch, tag or commit
    python -m oneref.convert push CKPT user/name            # the checkpoint folder + model card, uploaded

A repository holds one checkpoint folder (``oneref.checkpoint.folder``: model.safetensors,
config.yaml, the tokenizer) and a model card (README.md). :func:`resolve` turns an id into that
folder inside the library's cache (``snapshot_download``: ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``
for no network, ``HF_TOKEN`` for private repositories); anything else is returned unchanged, so
every loader can call it on whatever it was given.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneref.checkpoint.folder import CONFIG_FILE, FOLDER_FORMAT, validate_folder
from oneref.checkpoint.io import CheckpointError

PREFIX = "hf://"
# owner/name[@revision]: the Hub's own id rules (letters, digits, - _ .), a revision without spaces
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<rev>[^\s@]+))?$")
# a missing local file, never a repository id: what our loaders are usually given
_FILE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".onnx", ".pt2", ".yaml", ".json")
_HEAD_FILES = [CONFIG_FILE, "config.json", "README.md"]  # what says what a repository is
INSTALL_HINT = "install the Hub client with pip install -e '.[hf]' (huggingface_hub)"


class HubError(CheckpointError):
    """A repository id that cannot be resolved, or a repository that holds no usable checkpoint (a
    :class:`~oneref.errors.UserError`, as every CheckpointError)."""


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse(text: str) -> HubId | None:
    """``hf://owner/name[@rev]`` or ``owner/name[@rev]`` as a :class:`HubId`; None for anything else
    (a path with a file suffix, more than one slash, ...)."""
    explicit = text.startswith(PREFIX)
    body = text[len(PREFIX) :] if explicit else text
    m = _ID.match(body)
    if m is None:
        if explicit:
            raise HubError(f"{text!r} is not a Hub id: write hf://owner/name or hf://owner/name@revision")
        return None
    if not explicit and m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return HubId(m["repo"], m["rev"])


def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    """Whether :func:`resolve` goes to the Hub: ``hf://...``, or ``owner/name`` that is no local path."""
    text = os.fspath(path_or_id)
    if text.startswith(PREFIX):
        return True
    return not Path(text).expanduser().exists() and parse(text) is not None


def resolve(path_or_id: str | os.PathLike) -> str | os.PathLike:
    """The local checkpoint ``path_or_id`` names: a local path unchanged; a Hub id (``hf://...``,
    or ``owner/name[@revision]`` that is no local path) as the checkpoint folder of that
    repository's snapshot in the Hub's cache, downloaded when missing and allowed."""
    if not is_hub_id(path_or_id):
        return path_or_id
    hub_id = parse(os.fspath(path_or_id))
    assert hub_id is not None  # is_hub_id checked it (an explicit bad hf:// raises there)
    folder = download(hub_id)
    check_repository(folder, hub_id, weights=True)
    return str(folder)


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubError(
            f"loading a checkpoint from the Hub needs huggingface_hub ({e}); {INSTALL_HINT}"
        ) from e
    return huggingface_hub


def download(hub_id: HubId) -> Path:
    """The snapshot folder of ``hub_id`` in the Hub's cache (downloaded when missing and allowed),
    checked to be a oneref checkpoint folder."""
    hf = _hf()
    from huggingface_hub import constants, errors

    where = f"{hub_id} (the Hugging Face Hub)"
    try:
        # the small files first: a repository of another library is refused before its weights come
        head = Path(
            hf.snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=_HEAD_FILES)
        )
        check_repository(head, hub_id)
        return Path(hf.snapshot_download(hub_id.repo_id, revision=hub_id.revision))
    except errors.LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{hub_id} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and HF_HUB_OFFLINE=1 forbids downloading it: download it once with "
                f"`hf download {hub_id.repo_id}{f' --revision {hub_id.revision}' if hub_id.revision else ''}`, "
                "point HF_HUB_CACHE at the cache that holds it, or unset HF_HUB_OFFLINE"
            ) from e
        raise HubError(
            f"{hub_id} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the "
            f"Hub cannot be reached ({_first_line(e)}); check the path, or the network (HF_ENDPOINT)"
        ) from e
    except errors.GatedRepoError as e:
        raise HubError(f"{where} is gated: accept its terms on the Hub, then log in (hf auth login)") from e
    except errors.RepositoryNotFoundError as e:
        raise HubError(
            f"{where} does not exist, or is private: check the id (owner/name), or log in (hf auth login / "
            "HF_TOKEN); a local path that does not exist is also taken for a Hub id"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise HubError(
            f"{where} has no revision {hub_id.revision!r}: give a branch, a tag or a commit"
        ) from e


def check_repository(folder: Path, hub_id: HubId, *, weights: bool = False) -> None:
    """Refuse a repository that is no oneref checkpoint folder, or (``weights``: once every file is
    there) one whose architecture, task or weights this version cannot use, naming every problem."""
    if not (folder / CONFIG_FILE).is_file():
        held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise HubError(
            f"{hub_id} is not a oneref checkpoint: it has no {CONFIG_FILE} (it holds {', '.join(held) or 'nothing'}"
            f"{'; config.json is the mark of a transformers model' if 'config.json' in held else ''}); choose a "
            "repository written by `python -m oneref.convert push`"
        )
    try:
        import yaml

        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"{hub_id}: {CONFIG_FILE} cannot be read ({e})") from e
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if fmt != FOLDER_FORMAT:
        raise HubError(
            f"{hub_id} is not a oneref checkpoint: its {CONFIG_FILE} has format {fmt!r}, not {FOLDER_FORMAT!r} "
            "(a repository of another library or model); choose a repository written by "
            "`python -m oneref.convert push`"
        )
    if not weights:
        return
    check = validate_folder(folder)
    if not check.ok:
        raise HubError(
            f"{hub_id} holds a checkpoint this version of oneref cannot use:\n"
            + "\n".join(f"  {p}" for p in check.problems)
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# -- pushing ----------------------------------------------------------------------------------------------
def best_metric(checkpoint: Any) -> dict[str, Any]:
    """The best monitored validation metric our Lightning checkpoints record (ModelCheckpoint's
    state), as ``monitor`` and ``best_score``; empty for other checkpoints."""
    from oneref.checkpoint import load_checkpoint_file

    if checkpoint.format != "lightning":
        return {}
    callbacks = load_checkpoint_file(checkpoint.path, mmap=True).get("callbacks") or {}
    for key, state in callbacks.items():
        if str(key).startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            return {"monitor": state.get("monitor"), "best_score": float(state["best_model_score"])}
    return {}


def write_folder(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    ckpt_format: str | None = None,
    overwrite: bool = False,
    repo_id: str = "OWNER/NAME",
) -> Path:
    """The self-describing checkpoint folder of ``ckpt`` (any checkpoint oneref.load takes) in
    ``out_dir``, with its tokenizer copied in and a model card (README.md)."""
    from oneref.checkpoint import Checkpoint, save_folder
    from oneref.predictor import load

    checkpoint = Checkpoint.open(ckpt, ckpt_format)
    # loading it as a predictor is the check that the folder will run (weights, tokenizer)
    tok = load(checkpoint, tokenizer=tokenizer, device="cpu", workers=0).tokenizer
    sd, cfg, report, _ = checkpoint.read_weights()
    if report.missing or report.unexpected:
        raise CheckpointError(f"{ckpt} does not fill the model exactly:\n{report.summary()}")
    task = checkpoint.task or ("res" if cfg.seg_head else "rec")
    with tempfile.TemporaryDirectory() as tmp:
        spm = Path(tmp) / "tokenizer.spm"
        spm.write_bytes(tok.serialized())
        out = save_folder(
            out_dir,
            sd,
            cfg,
            task=task,
            max_query_len=tok.max_query_len,
            tokenizer=spm,
            report=report,
            overwrite=overwrite,
        )
    facts = {k: v for k, v in checkpoint.training.items() if v is not None}
    facts.update(best_metric(checkpoint), task=task, source=str(ckpt), source_format=checkpoint.format)
    facts["repo_id"] = repo_id
    (out / "README.md").write_text(model_card(cfg, facts))
    check = validate_folder(out)
    if not check.ok:  # cannot happen for a folder save_folder wrote; never upload a broken one
        raise CheckpointError(str(check))
    return out


TASK_NAMES = {
    "rec": "referring expression comprehension (a box per expression)",
    "res": "referring expression segmentation (a mask per expression)",
    "mrefm": "Mask Referring Modeling pretraining (no grounding head trained)",
}


def model_card(cfg: Any, facts: Mapping[str, Any]) -> str:
    """README.md of a pushed folder: the Hub's metadata header, then architecture, training data,
    metrics and how to load it."""
    hf = _hf()
    task = facts.get("task", "rec")
    data = hf.ModelCardData(
        library_name="oneref",
        license="mit",
        tags=["oneref", "visual-grounding", "referring-expression-comprehension", "beit-3"]
        + (["referring-expression-segmentation"] if task == "res" else []),
    )
    arch = cfg.to_dict()
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in arch.items())
    metrics = "No metric is recorded in the checkpoint."
    if "best_score" in facts:
        metrics = (
            f"Best `{facts['monitor']}` during training: **{facts['best_score']:.4f}** "
            f"(epoch {facts.get('epoch', '?')}, step {facts.get('global_step', '?')}; the validation split of "
            f"the training data)."
        )
    dataset = facts.get("dataset") or "not recorded in the checkpoint"
    published = published_numbers(cfg, task, facts.get("dataset"))
    card = f"""---
{data.to_yaml()}
---

# OneRef ({task.upper()}, {arch["embed_dim"]} wide, {arch["depth"]} layers, {arch["img_size"]} px)

A [OneRef](https://github.com/linhuixiao/OneRef) model (NeurIPS 2024, *Unified One-tower Expression
Grounding and Segmentation with Mask Referring Modeling*) for {TASK_NAMES.get(task, task)}, in the
checkpoint folder format of the `oneref` library: `model.safetensors` (the official key names),
`config.yaml` (architecture, task, preprocessing) and the sentencepiece tokenizer.

```python
import oneref

model = oneref.load("OWNER/NAME")  # this repository, through the Hugging Face cache
pred = model.predict("photo.jpg", "the man in red on the left")
print(pred.box_xyxy)  # x1, y1, x2, y2 in the photo's pixels
```

or `python -m oneref.predict ckpt_path=OWNER/NAME image=photo.jpg "text='the dog'"`,
`python -m oneref.demo ckpt_path=OWNER/NAME`, `python -m oneref.train init_from=hf://OWNER/NAME`.

## Training data

{dataset}

## Metrics

{metrics}

{published}## Architecture

| field | value |
|---|---|
{rows}

Written by `python -m oneref.convert push` from `{Path(str(facts.get("source", "?"))).name}`
({facts.get("source_format", "?")}).
"""
    return card.replace("OWNER/NAME", str(facts.get("repo_id", "OWNER/NAME")))


def published_numbers(cfg: Any, task: str, dataset: str | None) -> str:
    """The card's section quoting the paper's row for a checkpoint of this task, size and training
    setting (:func:`oneref.paper.select_row`), or "" when the paper has none: of a single-dataset
    row only the training dataset's numbers (each is another model's), of a mixup row all."""
    from oneref import paper
    from oneref.models.registry import size_of

    size = size_of(cfg)
    row = paper.select_row(task, size, dataset) if size else None
    if row is None:
        return ""
    lines = []
    only = paper.official_dataset(dataset) if row.setting == "single" else None
    for metric, per_dataset in row.results.items():
        for ds, splits in per_dataset.items():
            if only is None or ds == only:
                lines += [f"| {metric} | {ds} | {split} | {value:.2f} |" for split, value in splits.items()]
    if not lines:
        return ""
    src = paper.source()
    return (
        f"## Published numbers\n\nThe paper's row for this kind of model: {row.label}, {row.table} "
        f"({src['venue']}; {src['tables']}). They are the published model's, not measured on this "
        "checkpoint.\n\n| metric | dataset | split | % |\n|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
    )


def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload a oneref checkpoint",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it (needs a token: hf auth login or
    HF_TOKEN); returns the commit's URL."""
    hf = _hf()
    api = hf.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=commit_message
        )
    except hf.errors.HfHubHTTPError as e:
        raise HubError(f"uploading to {repo_id} failed: {_first_line(e)} (logged in? hf auth login)") from e
    return str(getattr(info, "commit_url", info))


def describe(folder: str | Path) -> str:
    """One line on a written folder (for the CLI): its files and size."""
    files = sorted(Path(folder).iterdir())
    size = sum(p.stat().st_size for p in files) / 1e6
    return f"{folder}: {', '.join(p.name for p in files)} ({size:.1f} MB)"
