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
    # the from-scratch recipe (conf/recipe/rec_tiny.yaml) applies to the default only
    assert (cfg.model.patch_size, cfg.model.depth, cfg.model.position_init) == (8, 3, "sincos")
    assert cfg.model.similarity_temperature == 0.1 and cfg.data.cache_samples
    for model in ("base", "large"):
        official = make_cfg(f"model={model}")
        assert official.model.position_init == "normal" and official.model.similarity_temperature is None
    # eval and predict build the same tiny architecture
    for name in ("eval", "predict"):
        other = make_cfg("ckpt_path=x", name=name)
        assert (other.model.patch_size, other.model.position_init) == (8, "sincos")


@pytest.mark.parametrize("model", sorted(SIZES))
@pytest.mark.parametrize("task", ["rec", "res", "rec_mixup", "res_mixup"])
def test_task_model_grid_composes(make_cfg, task, model):
    cfg = make_cfg(f"task={task}", f"model={model}")
    assert cfg.task.name in ("rec", "res")
    assert cfg.model.size == model


def test_rec_mixup_large_is_the_official_recipe(make_cfg):
    cfg = make_cfg("task=rec_mixup", "model=large")
    assert cfg.data.dataset == "mixup_with_refc"
    assert cfg.task.losses.use_regress_box and cfg.task.losses.use_box_mask_constraints
    assert not cfg.task.losses.use_mask_loss
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.data.batch_size == 8  # official large stage 2: 8 per GPU
    assert cfg.model.img_size == 384 and cfg.data.max_query_len == 64


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
    assert "mixup_with_refc" in out.stdout and "size: large" in out.stdout
