"""Shared fixtures: the golden folder, and the real Hydra config composed and shrunk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from oneref.config import config_dir
from oneref.train import train

os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
# Golden sets from the official code (tests/golden/README.md): the copy in the repository, the sets
# of the development workspace next to the checkout, and any named by ONEREF_GOLDEN (a set, or a
# folder of sets).
GOLDEN_ROOT = REPO / "tests" / "golden"
SHARED_GOLDEN = REPO.parent / "shared" / "golden"
KEY_FILE = GOLDEN_ROOT / "official-keys-base384.txt"  # the official base-384 state-dict keys


def _sets_in(root: Path) -> list[Path]:
    if (root / "config.json").is_file():
        return [root]
    return sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []


def find_golden_sets() -> list[tuple[str, Path]]:
    """(id, folder) of every golden set to test. A set in ../shared/golden with the name of an
    in-repo set is not run twice: test_parity checks that the two are identical."""
    found = [(f"{p.name}@repo", p) for p in _sets_in(GOLDEN_ROOT)]
    names = {p.name for _, p in found}
    found += [(f"{p.name}@shared", p) for p in _sets_in(SHARED_GOLDEN) if p.name not in names]
    if os.environ.get("ONEREF_GOLDEN"):
        found += [(f"{p.name}@env", p) for p in _sets_in(Path(os.environ["ONEREF_GOLDEN"]).expanduser())]
    return found


GOLDEN_SETS = find_golden_sets()
# The MLM side of MRefM lives in a set's mlm/ folder (its own checkpoint and tokenizer).
GOLDEN_MLM_SETS = [(f"{i}/mlm", p / "mlm") for i, p in GOLDEN_SETS if (p / "mlm" / "config.json").is_file()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``golden_dir`` runs once per golden set found."""
    for name, sets in (("golden_dir", GOLDEN_SETS), ("golden_mlm_dir", GOLDEN_MLM_SETS)):
        if name in metafunc.fixturenames:
            ids, dirs = zip(*sets) if sets else ((), ())
            metafunc.parametrize(name, dirs, ids=ids, indirect=True, scope="session")


# Small synthetic dataset shared by the whole session (generated once).
TINY_SYNTHETIC = {"num_train": 96, "num_val": 32, "num_test": 32}


@pytest.fixture(scope="session")
def golden_dir(request: pytest.FixtureRequest) -> Path:
    """One golden set (parametrized over GOLDEN_SETS by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def golden_mlm_dir(request: pytest.FixtureRequest) -> Path:
    """The mlm/ folder of one golden set (parametrized over GOLDEN_MLM_SETS)."""
    return request.param


def golden_part(golden_dir: Path, name: str) -> Path:
    """A sub-folder or file of a golden set; sets of other sizes may lack one (skipped by name)."""
    path = golden_dir / name
    if not path.exists():
        pytest.skip(f"golden set {golden_dir} has no {name}")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oneref-cache")


def compose_config(name: str, overrides: list[str], output_dir: Path, cache: Path) -> DictConfig:
    """Compose conf/<name>.yaml like the CLI does, then shrink it for a 2-core CPU."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")  # as on the CLI: the job's config has no `hydra` node (HydraConfig holds it)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.cache_dir = str(cache)
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.precision = "32-true"
        cfg.trainer.num_sanity_val_steps = 0
        cfg.data.num_workers = 0
        cfg.data.pin_memory = False
        if cfg.data.dataset == "synthetic":
            cfg.data.synthetic = {**cfg.data.get("synthetic", {}), **TINY_SYNTHETIC}
        cfg.logger = {}
        if cfg.get("callbacks"):
            cfg.callbacks.pop("rich_progress_bar", None)
            cfg.callbacks.pop("model_summary", None)
    return cfg


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


def train_tiny_checkpoint(task: str, out_dir: Path, cache: Path, *overrides: str) -> Path:
    """Train the tiny model for two steps (no test); return its exported best checkpoint."""
    base = [
        f"task={task}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    cfg = compose_config("train", [*base, "test=false", *overrides], out_dir, cache)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    ckpt = Path(cfg.export_best)
    assert ckpt.is_file(), ckpt
    return ckpt
