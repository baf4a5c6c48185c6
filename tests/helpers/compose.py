"""The real Hydra config, composed as the CLI composes it, and shrunk for a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from oneref.config import config_dir

# Small synthetic dataset shared by the whole session (generated once).
TINY_SYNTHETIC = {"num_train": 96, "num_val": 32, "num_test": 32}
SYNTHETIC_OVERRIDES = [f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
# An official recipe run end to end on a 2-core CPU: random weights, a few batches per stage.
RECIPE_SHRINK = (
    "init_from=scratch",
    "debug=default",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=8",
)


def compose_config(
    name: str,
    overrides: list[str],
    output_dir: Path | None = None,
    cache: Path | None = None,
    *,
    shrink: bool = True,
) -> DictConfig:
    """Compose conf/<name>.yaml like the CLI does (the ``hydra`` node set aside in HydraConfig, for
    ``${hydra:...}`` interpolations); with ``shrink``, move it to one CPU process, no loggers, no
    workers and the tiny synthetic set, writing under ``output_dir`` and caching under ``cache``."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")  # as on the CLI: the job's config has no `hydra` node (HydraConfig holds it)
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(Path(output_dir) / "logs")
        if cache is not None:
            cfg.paths.cache_dir = str(cache)
        if shrink and "trainer" in cfg:  # predict has none
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.precision = "32-true"
            cfg.trainer.num_sanity_val_steps = 0
        if shrink:
            cfg.data.num_workers = 0
            cfg.data.pin_memory = False
            if cfg.data.dataset == "synthetic":
                cfg.data.synthetic = {**cfg.data.get("synthetic", {}), **TINY_SYNTHETIC}
            cfg.logger = {}
            if cfg.get("callbacks"):
                cfg.callbacks.pop("rich_progress_bar", None)
                cfg.callbacks.pop("model_summary", None)
    return cfg


def train_tiny_checkpoint(task: str, out_dir: Path, cache: Path, *overrides: str) -> Path:
    """Train the tiny model for two steps (no test); return its exported best checkpoint."""
    from oneref.train import train

    base = [
        f"task={task}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    cfg = compose_config("train", [*base, "test=false", *overrides], out_dir, cache)
    train(cfg)
    ckpt = Path(cfg.export_best)
    assert ckpt.is_file(), ckpt
    return ckpt
