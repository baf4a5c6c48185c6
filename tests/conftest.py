"""Fixtures only (helpers live in tests/helpers): the golden sets, the real Hydra config composed
and shrunk, a clean launch environment per test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from helpers.compose import compose_config
from helpers.golden import find_golden_sets

os.environ.setdefault("WANDB_MODE", "disabled")

GOLDEN_SETS = find_golden_sets()
# The MLM side of MRefM lives in a set's mlm/ folder (its own checkpoint and tokenizer).
GOLDEN_MLM_SETS = [(f"{i}/mlm", p / "mlm") for i, p in GOLDEN_SETS if (p / "mlm" / "config.json").is_file()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``golden_dir`` runs once per golden set found."""
    for name, sets in (("golden_dir", GOLDEN_SETS), ("golden_mlm_dir", GOLDEN_MLM_SETS)):
        if name in metafunc.fixturenames:
            ids, dirs = zip(*sets) if sets else ((), ())
            metafunc.parametrize(name, dirs, ids=ids, indirect=True, scope="session")


@pytest.fixture(scope="session")
def golden_dir(request: pytest.FixtureRequest) -> Path:
    """One golden set (parametrized over GOLDEN_SETS by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def golden_mlm_dir(request: pytest.FixtureRequest) -> Path:
    """The mlm/ folder of one golden set (parametrized over GOLDEN_MLM_SETS)."""
    return request.param


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oneref-cache")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, name: str = "train") -> DictConfig:
        return compose_config(name, list(overrides), tmp_path, cache_dir)

    yield make
    GlobalHydra.instance().clear()


# What Lightning writes into os.environ when it sets up a cluster (a faked SLURM test, for one):
# left behind, every later DDP subprocess would try to reach that address.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK")


@pytest.fixture(autouse=True)
def _restore_launch_env():
    # and the process rank Lightning keeps for its rank-zero-only functions: a Trainer built on a
    # faked rank 3 leaves it at 3, and every later run in this process would write no log files
    from lightning_utilities.core.rank_zero import rank_zero_only

    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    rank = getattr(rank_zero_only, "rank", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if rank is not None:
        rank_zero_only.rank = rank


@pytest.fixture
def one_thread():
    """One torch thread, restored afterwards: results that must be bit-identical across runs (the
    golden was computed with one thread; on a loaded machine several threads may split reductions
    differently from run to run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def clear_hydra():
    """Each test starts without a global Hydra context left by the one before."""
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
