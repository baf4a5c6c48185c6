"""Every official training run (train_and_eval_script/**/*.sh) is one stage of one command, composed
from the groups (task, model, data, recipe), with the official values; docs/experiments.md lists
exactly those commands; and a few of them run end to end on the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from helpers.compose import RECIPE_SHRINK
from oneref.config import config_dir
from oneref.data import OFFICIAL_NAMES
from oneref.stages import make_plan
from oneref.train import train

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("experiments_table", REPO / "scripts" / "experiments_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

# Our data choice -> the official dataset name (official datasets/data_loader.py).
DATASETS = {
    "refcoco": "unc",
    "refcoco_plus": "unc+",
    "refcocog_umd": "gref_umd",
    "referit": "referit",
    "flickr": "flickr",
    "mixup_refc": "mixup_with_refc",
    "mixup_refc_referit": "mixup_with_refc_referit",
}


def official(task: str, size: str, data: str, stage: int) -> dict:
    """A training run of the official scripts, transcribed from them (spec section 8)."""
    if task == "mrefm":
        return {
            "epochs": (10, 100)[stage - 1],
            "lr": (2.5e-4, {"base": 5e-5, "large": 3e-5}[size])[stage - 1],
            "batch": (64, {"base": 32, "large": 8}[size])[stage - 1],
            "init": f"beit3_{size}_indomain_patch16_224.pth" if stage == 1 else "stage1/last.ckpt",
            "format": "beit3" if stage == 1 else None,
        }
    mixup = task.endswith("_mixup")
    kind = task.removesuffix("_mixup")
    if stage == 1:
        batch = 64
    elif size == "large":
        batch = 8
    else:
        batch = 32 if mixup or data in ("referit", "flickr") else 24
    if stage == 2:
        init, fmt = "stage1/best.ckpt", None
    elif mixup:
        init, fmt = f"mrefm_{kind}_{size}.pth", "mrefm"
    else:
        init, fmt = f"beit3_{size}_indomain_patch16_224.pth", "beit3"
    return {
        "epochs": (10, 20)[stage - 1],
        "lr": (2.5e-4, 3e-5)[stage - 1],
        "batch": batch,
        "init": init,
        "format": fmt,
        # REC: --use_regress_box (+ --use_box_mask_constraints in stage 2); RES: --use_mask_loss
        # --enable_seg_mask, never box losses
        "losses": {
            "use_regress_box": kind == "rec",
            "use_box_mask_constraints": kind == "rec" and stage == 2,
            "use_mask_loss": kind == "res",
            "use_contrastive_loss": False,
        },
    }


def test_every_official_script_line_is_one_command():
    """The official scripts' training lines (spec section 8): REC single-dataset on 5 datasets,
    REC mixup (the mix, and ReferIt and Flickr30K from MRefM), RES single-dataset on 3, RES mixup,
    MRefM for REC and RES, each for base and large, two stages each; the 4 x 8 MRefM variant."""
    runs = [overrides for _, overrides in table.RUNS]
    assert len(runs) == len(set(runs))
    two_stage = [r for r in runs if not r[0].startswith("experiment=")]
    assert len(two_stage) == 2 * (5 + 3 + 3 + 1 + 2)
    assert {r[0] for r in runs if r[0].startswith("experiment=")} == {
        "experiment=mrefm_pretrain_rec_base_multinode",
        "experiment=mrefm_pretrain_rec_large_multinode",
    }
    experiments = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
    assert experiments == ["mrefm_pretrain_rec_base_multinode", "mrefm_pretrain_rec_large_multinode"]


def parse(overrides: tuple[str, ...]) -> tuple[str, str, str]:
    given = dict(o.split("=", 1) for o in overrides)
    task = given["task"]
    default_data = "mixup_refc" if task.endswith("_mixup") else None
    return task, given["model"], given.get("data", default_data)


@pytest.mark.parametrize(
    "overrides", [o for _, o in table.RUNS if not o[0].startswith("experiment=")], ids=" ".join
)
def test_official_run_composes_to_the_official_values(overrides):
    task, size, data = parse(overrides)
    cfg = table.compose_run(overrides)
    assert cfg.run_name == f"{task}_{size}_{data}"
    plan = make_plan(cfg)
    assert [s.index for s in plan.stages] == [1, 2] and plan.to_run == plan.stages
    log_dir = f"{cfg.paths.log_dir}/{cfg.run_name}"
    for stage in plan.stages:
        exp, c = official(task, size, data, stage.index), stage.cfg
        assert c.data.dataset == data and OFFICIAL_NAMES[data] == DATASETS[data]
        assert c.model.size == size and c.model.img_size == 384 and c.data.max_query_len == 64
        assert c.model.drop_path_rate == pytest.approx(0.1)
        assert c.trainer.max_epochs == exp["epochs"]
        assert c.optim.lr == pytest.approx(exp["lr"])
        assert c.data.batch_size == exp["batch"]
        assert c.task.frozen_backbone is (stage.index == 1)
        init_dir = f"{cfg.paths.data_dir}/checkpoints" if stage.index == 1 else log_dir
        assert c.init_from == f"{init_dir}/{exp['init']}"
        assert c.ckpt_format == exp["format"]
        assert c.optim.weight_decay == pytest.approx(1e-4) and not c.optim.no_weight_decay_groups
        assert c.optim.layer_decay is None and c.optim.scheduler.warmup_steps == 0
        assert c.optim.scheduler.interval == "epoch" and list(c.optim.optimizer.betas) == [0.9, 0.999]
        augment = c.data.augment
        assert augment.aug_crop and augment.aug_scale and augment.aug_translate and not augment.aug_blur
        if task == "mrefm":
            assert c.data.mrefm.enabled and c.task.losses.use_box_mask_constraints
            assert c.export_last == (
                f"{log_dir}/stage1/last.ckpt" if stage.index == 1 else f"{log_dir}/last.ckpt"
            )
        else:
            assert {k: c.task.losses[k] for k in exp["losses"]} == exp["losses"]
            assert bool(c.data.seg_masks) is task.startswith("res")  # --enable_seg_mask
            assert c.export_best == (
                f"{log_dir}/stage1/best.ckpt" if stage.index == 1 else f"{log_dir}/best.ckpt"
            )
            assert c.task.monitor == ("val/miou" if task.startswith("res") else "val/acc@0.5")
    # the mixup models are tested on the single-dataset splits too (official eval of the mix)
    mix = data == "mixup_refc" and task != "mrefm"
    assert list(cfg.test_data) == (["refcoco", "refcoco_plus", "refcocog_umd"] if mix else [])
    # stage 2 starts from stage 1's export, also when run alone (stage=2)
    assert plan.stages[1].cfg.init_from == plan.stages[0].export == cfg.previous_stage_ckpt
    (alone,) = make_plan(table.compose_run((*overrides, "stage=2"))).to_run
    assert alone.cfg.init_from == plan.stages[0].export and alone.index == 2


@pytest.mark.parametrize("size", ["base", "large"])
def test_multinode_mrefm_is_one_official_stage(size):
    cfg = table.compose_run((f"experiment=mrefm_pretrain_rec_{size}_multinode",))
    (stage,) = make_plan(cfg).stages
    c = stage.cfg
    assert (c.trainer.max_epochs, c.data.batch_size, c.global_batch_size) == (200, 32, 1024)
    assert c.optim.lr == pytest.approx(1e-3) and c.data.seg_masks and not c.task.frozen_backbone
    assert c.data.dataset == "mixup_refc_referit" and c.model.size == size
    assert c.init_from is None  # the official finetune path is commented out


def test_data_wins_over_the_task_default(make_cfg):
    assert make_cfg("task=rec_mixup", "model=base").data.dataset == "mixup_refc"
    cfg = make_cfg("task=rec_mixup", "model=base", "data=referit")
    assert cfg.data.dataset == "referit" and cfg.run_name == "rec_mixup_base_referit"


def test_docs_list_every_official_run():
    doc = (REPO / "docs" / "experiments.md").read_text()
    generated = "\n".join(table.rows())
    assert f"{table.BEGIN}\n{generated}\n{table.END}" in doc, (
        "docs/experiments.md is out of date: run python scripts/experiments_table.py --write"
    )


# -- a few official recipes end to end, shrunk to the tiny model on the synthetic data ---------------
SHRINK = ("model=tiny", "data=synthetic", *RECIPE_SHRINK)


def test_more_test_data_composes_with_the_run_s_task_and_paths(make_cfg):
    from oneref.config import with_data

    cfg = make_cfg("task=res_mixup", "model=base")
    other = with_data(cfg, "refcocog_umd")
    assert other.data.dataset == "refcocog_umd" and other.data.test_splits == ["val", "test"]
    assert other.data.seg_masks and other.data.img_size == 384  # RES masks, the model's size
    assert other.data.data_root.startswith(cfg.paths.data_dir) and other.model == cfg.model


@pytest.mark.parametrize("recipe", ["rec_mixup_base", "res_large"])
def test_official_recipe_runs_both_stages(make_cfg, recipe, monkeypatch):
    """The recipe's two stages (the tiny model in place of the released one), then the test (and a
    second test set: the synthetic one again, for the mixup recipe)."""
    import oneref.train as train_mod

    cfg = make_cfg(f"recipe={recipe}", f"task={recipe.rsplit('_', 1)[0]}", *SHRINK)
    with open_dict(cfg):
        cfg.report_baseline = False
        cfg.test_data = ["synthetic"] if "mixup" in recipe else []
    tested = []
    monkeypatch.setattr(train_mod, "with_data", lambda c, option: tested.append(option) or c)
    metrics = train(cfg)
    assert tested == list(cfg.test_data)
    plan = make_plan(cfg)
    assert all(Path(s.export).is_file() for s in plan.stages)
    monitor = "miou" if recipe.startswith("res") else "acc@0.5"
    for split in cfg.data.test_splits:
        assert 0.0 <= metrics[f"test/synthetic/{split}/{monitor}"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
