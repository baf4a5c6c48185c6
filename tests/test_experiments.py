"""Every official recipe (train_and_eval_script/**/*.sh) is a Hydra experiment that composes to the official numbers,
runs end to end (fast_dev_run, tiny model, synthetic data), and stage 2 starts from stage 1."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import oneref.factory as factory_mod
from oneref.config import config_dir
from oneref.factory import build_module
from oneref.train import train

EXPERIMENT_DIR = Path(config_dir()) / "experiment"
ALL_EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml") if not p.stem.startswith("_"))
# transfer recipes (REC/RES fine-tuning); the MRefM pretraining ones are tested in test_mrefm.py
EXPERIMENTS = [n for n in ALL_EXPERIMENTS if not n.startswith("mrefm_pretrain_")]

# The dataset of an experiment name's data part (the same name, but for the RefCOCO/+/g mix).
DATASETS = {"mixup": "mixup_refc"}
NAME = re.compile(
    r"^(?P<task>rec|res)_(?P<mrefm>mrefm_)?(?P<data>refcoco_plus|refcocog_umd|refcoco|referit|flickr|mixup)"
    r"_(?P<size>base|large)_stage(?P<stage>[12])$"
)

# Shrink any experiment to a one-batch CPU run of the tiny model on the synthetic data.
TINY = ("model=tiny", "data=synthetic", "trainer=cpu", "strategy=auto", "init_from=null", "debug=fdr")


def expected(name: str) -> dict:
    """The official recipe of an experiment, transcribed from the official scripts."""
    m = NAME.match(name)
    assert m, f"experiment {name!r} does not follow <task>_[mrefm_]<data>_<size>_stage<n>"
    task, data, size, stage = m["task"], m["data"], m["size"], int(m["stage"])
    from_mrefm = data == "mixup" or m["mrefm"] is not None
    if stage == 1:
        batch = 64
    elif size == "large":
        batch = 8
    else:
        batch = 32 if from_mrefm or data in ("referit", "flickr") else 24
    return {
        "task": task,
        "dataset": DATASETS.get(data, data),
        "size": size,
        "stage": stage,
        "epochs": 10 if stage == 1 else 20,
        "lr": 2.5e-4 if stage == 1 else 3e-5,
        "batch": batch,
        "frozen": stage == 1,
        "from_mrefm": from_mrefm,
    }


def test_every_official_recipe_has_an_experiment():
    families = {
        "rec": [
            "refcoco",
            "refcoco_plus",
            "refcocog_umd",
            "referit",
            "flickr",
            "mixup",
            "mrefm_referit",
            "mrefm_flickr",
        ],
        "res": ["refcoco", "refcoco_plus", "refcocog_umd", "mixup"],
    }
    wanted = {
        f"{task}_{data}_{size}_stage{stage}"
        for task, datas in families.items()
        for data in datas
        for size in ("base", "large")
        for stage in (1, 2)
    }
    assert set(EXPERIMENTS) == wanted
    for name in EXPERIMENTS:  # each file carries the command that runs it
        assert f"python -m oneref.train experiment={name}" in (EXPERIMENT_DIR / f"{name}.yaml").read_text()


def test_experiment_table_lists_every_experiment():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    missing = [name for name in ALL_EXPERIMENTS if f"experiment={name}`" not in doc]
    assert not missing, f"docs/experiments.md lacks {missing}"


def compose_unshrunk(overrides: list[str]) -> DictConfig:
    """The config exactly as the CLI composes it (make_cfg would move it to the CPU)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)  # for ${hydra:...} interpolations
    finally:
        GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_the_official_recipe(name):
    exp = expected(name)
    cfg = compose_unshrunk([f"experiment={name}"])
    assert cfg.run_name == name
    assert cfg.export_best == f"{cfg.paths.log_dir}/{name}/best.ckpt"
    assert cfg.task.name == exp["task"] and cfg.data.dataset == exp["dataset"]
    assert cfg.model.size == exp["size"] and cfg.model.img_size == 384 and cfg.data.max_query_len == 64
    assert cfg.model.drop_path_rate == pytest.approx(0.1) and cfg.model.similarity_temperature is None
    assert cfg.trainer.max_epochs == exp["epochs"]
    assert cfg.data.batch_size == exp["batch"]
    assert cfg.optim.lr == pytest.approx(exp["lr"])
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and not cfg.optim.no_weight_decay_groups
    assert cfg.optim.layer_decay is None
    sched = cfg.optim.scheduler
    assert (sched._target_, sched.interval, sched.warmup_steps) == (
        "oneref.tasks.optim.cosine_schedule",
        "epoch",
        0,
    )
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and list(cfg.optim.optimizer.betas) == [
        0.9,
        0.999,
    ]
    assert cfg.task.frozen_backbone is exp["frozen"]
    augment = cfg.data.augment
    assert augment.aug_crop and augment.aug_scale and augment.aug_translate and not augment.aug_blur
    losses = cfg.task.losses
    assert not losses.use_contrastive_loss
    if exp["task"] == "rec":  # --use_regress_box, plus --use_box_mask_constraints in stage 2
        assert losses.use_regress_box and not losses.use_mask_loss
        assert losses.use_box_mask_constraints is (exp["stage"] == 2)
        assert cfg.task.monitor == "val/acc@0.5"
    else:  # --use_mask_loss --enable_seg_mask, never box losses
        assert losses.use_mask_loss and cfg.data.seg_masks
        assert not losses.use_regress_box and not losses.use_box_mask_constraints
        assert cfg.task.monitor == "val/miou"
    # 8 GPUs, one node, DDP; bf16 is our (faster) default, trainer.precision=32-true is official
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1 and cfg.trainer.num_nodes == 1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.strategy.name == "ddp"
    data_dir = cfg.paths.data_dir
    if exp["stage"] == 1 and exp["from_mrefm"]:
        assert cfg.init_format == "mrefm"
        assert cfg.init_from == f"{data_dir}/checkpoints/mrefm_{exp['task']}_{exp['size']}.pth"
    elif exp["stage"] == 1:
        assert cfg.init_format == "beit3"
        assert cfg.init_from == f"{data_dir}/checkpoints/beit3_{exp['size']}_indomain_patch16_224.pth"
    else:  # stage 1's exported best checkpoint, of the same model size
        stage1 = name.replace("_stage2", "_stage1")
        assert stage1 in EXPERIMENTS
        assert cfg.init_format is None
        assert cfg.init_from == f"{cfg.paths.log_dir}/{stage1}/best.ckpt"


# About 1 s each on 2 idle cores (48 in all), so every experiment runs by default.
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_fast_dev_run(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", *TINY)
    assert cfg.model.size == "tiny" and cfg.data.dataset == "synthetic" and cfg.init_from is None
    metrics = train(cfg)
    monitor = "miou" if name.startswith("res") else "acc@0.5"
    for split in cfg.data.test_splits:
        assert 0.0 <= metrics[f"test/synthetic/{split}/{monitor}"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_stage1_to_stage2_chaining(make_cfg, monkeypatch):
    tiny = ("model=tiny", "data=synthetic", "trainer=cpu", "strategy=auto")
    short = (
        "debug=default",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
    )
    cfg1 = make_cfg(
        "experiment=rec_refcoco_base_stage1",
        *tiny,
        *short,
        "data.batch_size=8",
        "test=false",
        "init_from=null",
    )
    assert cfg1.task.frozen_backbone
    train(cfg1)
    best = Path(cfg1.export_best)
    assert best.is_file(), "stage 1 did not export its best checkpoint"
    stage1 = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]

    loaded = {}
    real_init = factory_mod.init_weights

    def spy(module, source, ckpt_format, **kwargs):
        real_init(module, source, ckpt_format, **kwargs)
        loaded.update({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        loaded["__source__"] = source

    monkeypatch.setattr(factory_mod, "init_weights", spy)
    # same output folder as stage 1, so ${paths.log_dir}/rec_refcoco_base_stage1/best.ckpt resolves to it
    cfg2 = make_cfg("experiment=rec_refcoco_base_stage2", *tiny, "debug=fdr")
    assert cfg2.init_from == str(best) and not cfg2.task.frozen_backbone
    train(cfg2)
    assert loaded.pop("__source__") == str(best)
    # a head weight that stage 1 trained: loaded exactly, and not what a fresh init gives
    key = "bbox_embed.layers.2.weight"
    L.seed_everything(int(cfg2.seed))  # the init stage 2 would have without init_from
    fresh = build_module(cfg2).model.state_dict()[key]
    assert torch.equal(loaded[key], stage1[f"model.{key}"])
    assert not torch.equal(loaded[key], fresh)
    assert all(torch.equal(v, stage1[f"model.{k}"]) for k, v in loaded.items())
    assert OmegaConf.select(cfg2, "init_format") is None
