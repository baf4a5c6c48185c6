"""The golden sets: tensors produced by the official implementation (tests/golden/README.md).

The copy in the repository is always tested; ``$ONEREF_GOLDEN`` names more (a set, or a folder of
sets), e.g. sets of other sizes kept outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN_ROOT = REPO / "tests" / "golden"
KEY_FILE = GOLDEN_ROOT / "official-keys-base384.txt"  # the official base-384 state-dict keys


def sets_in(root: Path) -> list[Path]:
    if (root / "config.json").is_file():
        return [root]
    return sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []


def extra_golden_root() -> Path | None:
    value = os.environ.get("ONEREF_GOLDEN")
    return Path(value).expanduser() if value else None


def find_golden_sets() -> list[tuple[str, Path]]:
    """(id, folder) of every golden set to test. A set under $ONEREF_GOLDEN with the name of an
    in-repo set is not run twice: test_parity checks that the two are identical."""
    found = [(f"{p.name}@repo", p) for p in sets_in(GOLDEN_ROOT)]
    names = {p.name for _, p in found}
    extra = extra_golden_root()
    if extra is not None:
        found += [(f"{p.name}@env", p) for p in sets_in(extra) if p.name not in names]
    return found


def golden_part(golden_dir: Path, name: str) -> Path:
    """A sub-folder or file of a golden set; sets of other sizes may lack one (skipped by name)."""
    path = golden_dir / name
    if not path.exists():
        pytest.skip(f"golden set {golden_dir} has no {name}")
    return path
