"""Writing files and folders so that a reader never sees half of one: write to a unique temporary
sibling, then rename it into place (atomic on POSIX). A killed job leaves the old file or the new
one, never a truncated one, and two processes writing the same path at once do not collide.

Every file the package writes for later runs to read (checkpoints, exports, caches, tokenizers)
goes through here.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A name next to ``path`` that no other process or call uses (pid + random suffix)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{tag}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``; the temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_copy(src: str | Path, dest: str | Path) -> Path:
    """Copy ``src`` to ``dest`` atomically (a stable export of a checkpoint)."""
    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def atomic_folder(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp_dir)`` into a fresh temporary folder, then swap it in place of ``path`` (an old
    folder there is renamed away first and deleted after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.mkdir()
        write(tmp)
        if path.exists():
            old = temporary_sibling(path, "old")
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
