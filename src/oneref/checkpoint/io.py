"""Safe reading of checkpoint files.

Every ``.pth``/``.ckpt`` is read with ``torch.load(weights_only=True)``: PyTorch's restricted
unpickler, which only rebuilds tensors, plain containers and the classes on an explicit allow-list.
Official OneRef checkpoints pickle an ``argparse.Namespace`` under ``args`` (official
``train_oneref.py`` saves its parsed arguments), which is
the only class they need beyond the defaults; numpy scalar types are allowed too because training
scripts commonly store metrics such as ``val_accu`` as numpy floats. Nothing is ever loaded with
full unpickling: a file that needs another class is refused with the class named.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from oneref.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file, folder or state dict that cannot be used; the message says what to do
    (a :class:`~oneref.errors.UserError`: entry points exit 2 with the message)."""


def _numpy_safe_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        return []
    core = getattr(np, "_core", None) or np.core
    found: list[Any] = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                found.append(getattr(dtypes, name))
    return found


# The allow-list: classes a checkpoint may contain besides tensors and plain containers.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace, *_numpy_safe_globals())

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = 0x80  # protocol >= 2 opcode that starts a legacy torch.save file


def load_checkpoint_file(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> Any:
    """Load a ``torch.save`` file safely (``weights_only=True`` + :data:`SAFE_GLOBALS`).

    ``mmap=True`` memory-maps zip-format files (everything saved by torch >= 1.6), so the
    optimizer state of an 8 GB official checkpoint is never read; the tensors then read the file
    lazily, so copy what you keep before anything rewrites that file (the loaders here copy into
    the model at once). Raises :class:`CheckpointError` naming the file for a missing, empty,
    truncated or non-checkpoint file, or one that needs a class outside the allow-list.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint file {path} does not exist; check the path (it is relative to {Path.cwd()})"
        )
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; load a converted checkpoint folder with "
            "oneref.checkpoint.Checkpoint.open (ckpt_format=folder or auto)"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes); download or copy it again")
    with path.open("rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint file {path} is truncated or corrupt ({size} bytes, no zip central directory); "
                "the download or copy was probably interrupted: fetch it again and compare its size or checksum"
            )
        pass
    elif head[0] == _PICKLE_MAGIC:
        mmap = False  # legacy (pre-1.6) torch.save format cannot be memory-mapped
    else:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with bytes {head!r}, expected a zip archive "
            "written by torch.save); check that you passed the .pth/.ckpt file itself, not a text or HTML page"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_unsafe_message(path, e)) from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"cannot read checkpoint file {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is probably truncated or corrupt: fetch it again"
        ) from e


def _unsafe_message(path: Path, err: Exception) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing itself may fail on odd files; fall back to the raw error
        names = []
    allowed = sorted(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
    unknown = [n for n in names if n not in allowed]
    what = ", ".join(unknown) if unknown else str(err).splitlines()[0]
    return (
        f"checkpoint file {path} contains pickled objects outside the safe allow-list: {what}. oneref only "
        f"loads checkpoints with torch.load(weights_only=True) (allowed classes: {', '.join(allowed)}) and "
        "never executes arbitrary pickled code. If you trust the file, re-save just its weights once, e.g. "
        "`torch.save({'model': torch.load(PATH, weights_only=False)['model']}, 'clean.pth')`, and load that."
    )


class ExtractedStateDict(NamedTuple):
    state_dict: dict[str, Tensor]
    model_key: str | None  # the sub-dict it came from, None for a bare state dict
    stripped_prefix: str | None  # e.g. "module." when saved from a DDP wrapper


def extract_state_dict(obj: Any, model_key: str = "model|module", source: str = "") -> ExtractedStateDict:
    """Pick the state dict out of a loaded checkpoint, as the official ``--model_key``.

    Tries each ``|``-separated key in order (default ``checkpoint['model']``, else
    ``checkpoint['module']``); a mapping of tensors without those keys is taken as the state dict
    itself. A ``module.`` prefix on every key (DDP) is stripped and reported.
    """
    where = f" in {source}" if source else ""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict checkpoint{where}, got {type(obj).__name__}")
    used = None
    for key in model_key.split("|"):
        if key in obj:
            obj, used = obj[key], key
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint[{used!r}]{where} is a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors or not obj:
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointError(
            f"no state dict found{where}: none of the keys {model_key.split('|')} is present and the top level "
            f"is not a dict of tensors (its keys: {keys}{', ...' if len(obj) > 8 else ''}); "
            "name the right entry with model_key= (--model-key)"
        )
    state = dict(obj)
    stripped = None
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
        stripped = "module."
        log.info("stripped the DDP prefix 'module.' from every key%s", where)
    return ExtractedStateDict(state, used, stripped)


def is_lightning_checkpoint(obj: Any) -> bool:
    """A Lightning ``.ckpt`` is unambiguous: it carries these two top-level entries."""
    return isinstance(obj, Mapping) and "state_dict" in obj and "pytorch-lightning_version" in obj
