"""Running an entry point in a subprocess, as a user does (Lightning's DDP launcher re-executes
the command line, so distributed runs need this too)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def cli_env(root: Path | None = None, cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: outputs under ``root``, caches under ``cache``, W&B
    off, and this checkout's package first on the path (whatever is installed)."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
        **extra,
    }
    if root is not None:
        env["ONEREF_ROOT"] = str(root)
    if cache is not None:
        env["ONEREF_CACHE"] = str(cache)
    return env


def run_cli(
    module: str,
    args: Sequence[str],
    root: Path,
    cache: Path | None = None,
    *,
    timeout: int = 600,
    check: bool = True,
    quiet: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``root``; with ``check`` a non-zero exit fails the test with
    the end of both streams. ``quiet`` drops the training progress bar."""
    extra = ["callbacks.rich_progress_bar=null"] if quiet and module == "oneref.train" else []
    cmd = [sys.executable, "-m", module, *args, *extra]
    out = subprocess.run(
        cmd, cwd=root, env=env or cli_env(root, cache), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    return out
