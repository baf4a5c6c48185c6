"""The real Hydra config composes for every documented combination."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from oneref.models.registry import SIZES


def test_default_composes(make_cfg):
    cfg = make_cfg()
    assert cfg.task.name == "rec"
    assert cfg.model.size == "tiny"
    assert cfg.data.dataset == "synthetic"
    assert cfg.data.img_size == cfg.model.img_size
    assert cfg.task.monitor == "val/acc@0.5"
    # the tiny model's from-scratch options are part of its description (conf/model/tiny.yaml)
    assert (cfg.model.patch_size, cfg.model.position_init, cfg.model.similarity_temperature) == (
        8,
        "sincos",
        0.1,
    )
    assert cfg.data.cache_samples and cfg.optim.lr == pytest.approx(1e-3)  # the recipe: training only
    for model in ("base", "large"):
        official = make_cfg(f"model={model}")
        assert official.model.position_init == "normal" and official.model.similarity_temperature is None


def _architecture(cfg):
    """The OneRefConfig a composed config builds (heads aside)."""
    from dataclasses import replace

    from oneref.factory import build_module

    return replace(build_module(cfg).model.cfg, seg_head=False)


def test_one_description_per_model(make_cfg):
    """model=tiny builds one model whatever the task, recipe or entry point (the registry holds the
    size's numbers, conf/model the rest; recipes and tasks never touch the architecture)."""
    from oneref.models.registry import SIZES

    tiny = _architecture(make_cfg())
    assert (tiny.embed_dim, tiny.num_heads, tiny.depth, tiny.ffn_dim) == tuple(SIZES["tiny"].values())
    assert (tiny.img_size, tiny.patch_size, tiny.vocab_size) == (64, 8, 1000)
    for task in ("res", "rec_mixup", "res_mixup"):
        assert _architecture(make_cfg(f"task={task}")) == tiny, task
    for name in ("eval", "predict"):
        assert _architecture(make_cfg("ckpt_path=x", name=name)) == tiny, name


def test_recipes_tasks_and_experiments_do_not_set_the_architecture():
    from pathlib import Path

    from omegaconf import OmegaConf

    from oneref.config import config_dir

    runtime = {"runtime"}  # model.runtime: how the model runs, not what it is
    for group in ("recipe", "task", "experiment"):
        for path in sorted((Path(config_dir()) / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            keys = set(node.get("model") or {}) - runtime
            assert not keys, f"{path} sets model architecture keys {sorted(keys)}: they belong in conf/model"


@pytest.mark.parametrize("model", sorted(SIZES))
@pytest.mark.parametrize("task", ["rec", "res", "rec_mixup", "res_mixup"])
def test_task_model_grid_composes(make_cfg, task, model):
    cfg = make_cfg(f"task={task}", f"model={model}")
    assert cfg.task.name in ("rec", "res")
    assert cfg.model.size == model


def test_rec_mixup_large_is_the_official_recipe(make_cfg):
    from oneref.stages import make_plan

    cfg = make_cfg("task=rec_mixup", "model=large")
    assert cfg.run_name == "rec_mixup_large_mixup_refc" and cfg.stages == 2
    stage1, stage2 = make_plan(cfg).stages
    for stage in (stage1, stage2):
        c = stage.cfg
        assert c.data.dataset == "mixup_refc" and c.task.losses.use_regress_box
        assert not c.task.losses.use_mask_loss
        assert c.model.img_size == 384 and c.data.max_query_len == 64
    # stage 1: frozen backbone from the REC MRefM checkpoint; stage 2: everything from stage 1's best
    c = stage1.cfg
    assert c.task.frozen_backbone and not c.task.losses.use_box_mask_constraints
    assert (c.optim.lr, c.trainer.max_epochs, c.data.batch_size) == (2.5e-4, 10, 64)
    assert c.init_from == f"{cfg.paths.data_dir}/checkpoints/mrefm_rec_large.pth" and c.ckpt_format == "mrefm"
    c = stage2.cfg
    assert not c.task.frozen_backbone and c.task.losses.use_box_mask_constraints
    assert (c.optim.lr, c.trainer.max_epochs, c.data.batch_size) == (3e-5, 20, 8)  # 8 per GPU
    assert c.init_from == stage1.export and c.ckpt_format is None


@pytest.mark.parametrize(
    "data",
    [
        "refcoco",
        "refcoco_plus",
        "refcocog_umd",
        "refcocog_google",
        "referit",
        "flickr",
        "mixup_refc",
        "mixup_refc_referit",
    ],
)
def test_every_dataset_composes(make_cfg, data):
    cfg = make_cfg(f"data={data}", "model=base")
    assert cfg.data.img_size == 384
    assert cfg.data.split_root and cfg.data.data_root


def test_unknown_choice_lists_valid_ones(make_cfg):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        make_cfg("model=huge")
    assert "base" in str(err.value) and "large" in str(err.value)


@pytest.mark.parametrize("name", ["eval", "predict"])
def test_eval_and_predict_compose_without_optimiser_and_recipe(make_cfg, name):
    cfg = make_cfg("ckpt_path=x", "model=base", "task=rec_mixup", name=name)
    assert "optim" not in cfg and "stages" not in cfg and "init_from" not in cfg


def test_eval_config_requires_checkpoint(make_cfg):
    cfg = make_cfg(name="eval")
    from omegaconf import MISSING, OmegaConf

    assert OmegaConf.to_container(cfg, resolve=False)["ckpt_path"] == MISSING


def test_cli_cfg_job_composes():
    out = subprocess.run(
        [sys.executable, "-m", "oneref.train", "task=rec_mixup", "model=large", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "dataset: mixup_refc" in out.stdout and "size: large" in out.stdout
    assert "run_name: ${oneref.choice:task}" in out.stdout and "stages: 2" in out.stdout
    assert "mrefm_rec_${model.size}.pth" in out.stdout  # stage 1's weights, never null
