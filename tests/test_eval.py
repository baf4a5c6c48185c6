"""``python -m oneref.eval``: every split in one run, metric names, JSON, and the same numbers
from our checkpoint, an official-layout .pth and a converted checkpoint folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import open_dict

from helpers.cli import run_cli
from helpers.compose import train_tiny_checkpoint
from helpers.released import write_released_data
from oneref.checkpoint import Checkpoint, save_folder, to_official
from oneref.eval import evaluate, training_of
from oneref.paper import CSV_NAME
from oneref.tasks.grounding import GroundingModule
from oneref.tasks.metrics import rec_box_iou


@pytest.fixture(scope="module", params=["rec", "res"])
def tiny_ckpt(request, tmp_path_factory, cache_dir) -> tuple[str, Path]:
    """A tiny model trained for two steps; its exported best checkpoint. No temperature, so that
    an official-layout copy (which cannot carry one) evaluates to the same numbers."""
    task = request.param
    out = tmp_path_factory.mktemp(f"train_{task}")
    ckpt = train_tiny_checkpoint(task, out, cache_dir, "model.similarity_temperature=null")
    return task, ckpt


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A fake copy of the released data (paths.data_dir)."""
    return write_released_data(tmp_path_factory.mktemp("released"))


def _eval(make_cfg, tmp_path, task: str, ckpt: Path | str, *extra: str) -> dict[str, float]:
    out = tmp_path / f"metrics_{Path(ckpt).name}.json"
    cfg = make_cfg(f"task={task}", f"ckpt_path={ckpt}", f"output_json={out}", *extra, name="eval")
    metrics = evaluate(cfg)
    written = json.loads(out.read_text())
    assert written["checkpoint"] == str(ckpt)
    assert written["metrics"] == pytest.approx(metrics)
    return metrics


def test_evaluate_every_split_with_paper_metric_names(make_cfg, tmp_path, tiny_ckpt):
    task, ckpt = tiny_ckpt
    metrics = _eval(make_cfg, tmp_path, task, ckpt)
    names = (
        ["miou", "oiou", "prec@0.5", "prec@0.9", "box_acc@0.5", "box_miou"]
        if task == "res"
        else ["acc@0.5", "acc@0.25", "acc@0.75", "miou"]
    )
    for split in ("val", "test"):  # data.test_splits of the synthetic set: one dataloader each
        for name in names:
            assert 0 <= metrics[f"test/synthetic/{split}/{name}"] <= 1, (split, name)
    assert all(k.startswith("test/synthetic/") for k in metrics)

    # the numbers are the official metric over the whole split
    module = GroundingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    cfg = make_cfg(f"task={task}", f"ckpt_path={ckpt}", name="eval")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("test")
    ious = []
    with torch.no_grad():
        for batch in dm.test_dataloader()[dm.test_split_names.index("test")]:
            ious.append(rec_box_iou(module(batch)["pred_box"], batch["box"]))
    iou = torch.cat(ious)
    assert len(iou) == 32  # every test sample, not a limited number of batches
    prefix = "test/synthetic/test/" + ("box_" if task == "res" else "")
    assert metrics[prefix + "miou"] == pytest.approx(iou.mean().item(), abs=1e-6)
    assert metrics[prefix + "acc@0.5"] == pytest.approx((iou >= 0.5).float().mean().item(), abs=1e-6)


def test_the_data_follows_the_checkpoints_task_not_the_composed_one(make_cfg, tmp_path, tiny_ckpt):
    """``python -m oneref.eval ckpt_path=RES.ckpt`` (task=rec composed by default) scores the RES
    model against the object masks, as with task=res; a REC model against boxes either way."""
    task, ckpt = tiny_ckpt
    other = "rec" if task == "res" else "res"
    metrics = _eval(make_cfg, tmp_path, other, ckpt)
    written = json.loads((tmp_path / f"metrics_{Path(ckpt).name}.json").read_text())
    assert written["config"]["data"]["seg_masks"] is (task == "res")
    assert metrics == pytest.approx(_eval(make_cfg, tmp_path, task, ckpt))


def test_official_layout_and_folder_give_the_same_numbers(make_cfg, tmp_path, tiny_ckpt, one_thread):
    task, ckpt = tiny_ckpt
    ours = _eval(make_cfg, tmp_path, task, ckpt)

    module = GroundingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    state_dict, cfg = module.model.state_dict(), module.model.cfg
    official, _ = to_official(state_dict, cfg)
    # the official file layout: weights under 'model', training state, an argparse Namespace
    official.update(
        optimizer={},
        lr_scheduler={},
        args=argparse.Namespace(model="beit3_tiny", imsize=cfg.img_size, max_query_len=20, task=task),
        val_accu=0.0,
    )
    pth = tmp_path / "official_tiny.pth"
    torch.save(official, pth)
    from_official = _eval(
        make_cfg, tmp_path, task, pth, "ckpt_format=official", "model.similarity_temperature=null"
    )
    assert from_official == ours

    folder = save_folder(tmp_path / "converted", state_dict, cfg, task=task, max_query_len=20)
    from_folder = _eval(make_cfg, tmp_path, task, folder)
    assert from_folder == ours


@pytest.mark.parametrize("tiny_ckpt", ["rec"], indirect=True)  # one task is enough
def test_wrong_format_is_a_clear_error(make_cfg, tmp_path, tiny_ckpt):
    task, ckpt = tiny_ckpt
    cfg = make_cfg(f"ckpt_path={ckpt}", "ckpt_format=official", name="eval")
    with pytest.raises(Exception, match="Lightning checkpoint"):
        evaluate(cfg)


def test_original_resolution_metrics(make_cfg, tmp_path, tiny_ckpt):
    """task.original_resolution=true: boxes mapped back through the letterbox and compared with the
    original annotations (checked by hand here); RES masks against original-size gt masks."""
    task, ckpt = tiny_ckpt
    letterbox = _eval(make_cfg, tmp_path, task, ckpt)
    original = _eval(make_cfg, tmp_path, task, ckpt, "task.original_resolution=true")
    prefix = "test/synthetic/test/" + ("box_" if task == "res" else "")
    module = GroundingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    cfg = make_cfg(f"task={task}", f"ckpt_path={ckpt}", "task.original_resolution=true", name="eval")
    assert cfg.data.orig_masks == (task == "res")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("test")
    ious = []
    with torch.no_grad():
        for batch in dm.test_dataloader()[dm.test_split_names.index("test")]:
            cx, cy, w, h = module(batch)["pred_box"].double().clamp(0, 1).unbind(-1)
            s = module.model.cfg.img_size
            ratio, left, top = batch["letterbox"].double().unbind(-1)
            x1, x2 = ((cx - w / 2) * s - left) / ratio, ((cx + w / 2) * s - left) / ratio
            y1, y2 = ((cy - h / 2) * s - top) / ratio, ((cy + h / 2) * s - top) / ratio
            ih, iw = batch["orig_size"].double().unbind(-1)
            x1, x2 = x1.clamp(0).minimum(iw), x2.clamp(0).minimum(iw)
            y1, y2 = y1.clamp(0).minimum(ih), y2.clamp(0).minimum(ih)
            gx1, gy1, gx2, gy2 = batch["orig_box"].double().unbind(-1)
            inter = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(0) * (
                torch.minimum(y2, gy2) - torch.maximum(y1, gy1)
            ).clamp(0)
            union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
            ious.append(inter / union)
            if task == "res":
                assert len(batch["orig_mask"]) == len(batch["index"])
                assert [list(m.shape) for m in batch["orig_mask"]] == batch["orig_size"].tolist()
    iou = torch.cat(ious)
    assert original[prefix + "miou"] == pytest.approx(iou.mean().item(), abs=1e-4)
    # IoU is scale invariant: REC changes only where a predicted box reaches into the padding
    assert original[prefix + "miou"] == pytest.approx(letterbox[prefix + "miou"], abs=0.05)
    if task == "res":
        for name in ("miou", "oiou", "prec@0.5"):
            assert 0 <= original[f"test/synthetic/test/{name}"] <= 1
        with pytest.raises(ValueError, match="data.orig_masks=true"):
            _eval(make_cfg, tmp_path, task, ckpt, "task.original_resolution=true", "data.orig_masks=false")


@pytest.mark.parametrize("tiny_ckpt", ["rec"], indirect=True)
@pytest.mark.parametrize("data", ["refcoco", "refcoco_plus", "refcocog_umd"])
def test_eval_on_other_data_under_the_default_csv_logger(make_cfg, tmp_path, tiny_ckpt, released, data):
    """A checkpoint trained on one dataset evaluated on another with the CSV logger on: the module's
    and the DataModule's logged hyperparameters do not collide (Lightning refuses to merge a key
    with two values: once ``dataset`` in both)."""
    task, ckpt = tiny_ckpt
    out = tmp_path / "metrics.json"
    cfg = make_cfg(
        f"ckpt_path={ckpt}",
        f"data={data}",
        f"paths.data_dir={released}",
        "data.tokenizer=null",  # the checkpoint's own
        f"output_json={out}",
        name="eval",
    )
    with open_dict(cfg):
        cfg.logger = {
            "csv": {
                "_target_": "lightning.pytorch.loggers.CSVLogger",
                "save_dir": str(tmp_path),
                "name": "csv",
                "version": "",
            }
        }
    metrics = evaluate(cfg)
    written = json.loads(out.read_text())
    splits = list(cfg.data.test_splits)
    assert sorted(written["metrics"]) == sorted(
        f"test/{data}/{s}/{m}" for s in splits for m in ("acc@0.5", "acc@0.25", "acc@0.75", "miou")
    )
    assert written["metrics"] == pytest.approx(metrics)
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["data"]["dataset"] == data  # the evaluated data
    assert hparams["training"]["dataset"] == "synthetic"  # the module's own training data
    # a tiny synthetic model has no published row
    assert written["paper"] == [] and not (tmp_path / CSV_NAME).exists()


@pytest.mark.parametrize("tiny_ckpt", ["rec"], indirect=True)
def test_eval_prints_and_writes_the_paper_row(make_cfg, tmp_path, tiny_ckpt, released, capsys):
    task, ckpt = tiny_ckpt
    out = tmp_path / "metrics.json"
    cfg = make_cfg(
        f"ckpt_path={ckpt}",
        "data=refcoco",
        f"paths.data_dir={released}",
        "data.tokenizer=null",  # the checkpoint's own
        f"output_json={out}",
        "paper_row=rec_single_base",
        name="eval",
    )
    metrics = evaluate(cfg)
    written = json.loads(out.read_text())
    rows = written["paper"]
    assert [(r["dataset"], r["split"], r["metric"], r["published"]) for r in rows] == [
        ("refcoco", "val", "acc@0.5", 88.75),
        ("refcoco", "testA", "acc@0.5", 90.95),
        ("refcoco", "testB", "acc@0.5", 85.34),
    ]
    for r in rows:
        ours = 100 * metrics[f"test/refcoco/{r['split']}/acc@0.5"]
        assert r["ours"] == pytest.approx(ours, abs=1e-3)
        assert r["difference"] == pytest.approx(ours - r["published"], abs=1e-3)
    assert written["paper_source"]["venue"] == "NeurIPS 2024"
    assert (tmp_path / CSV_NAME).read_text().splitlines()[0].startswith("row,model,table,dataset,split")
    assert "88.75" in capsys.readouterr().out


def test_training_facts_of_an_official_file(tmp_path):
    """The paper row follows how the checkpoint was trained: an official file's saved args (the
    dataset) and shapes (task, size)."""
    from helpers.released import write_official_weights

    pth = write_official_weights(tmp_path / "official.pth", "official")
    obj = torch.load(pth, weights_only=False)
    obj["args"] = argparse.Namespace(dataset="unc", model="beit3_tiny")
    torch.save(obj, pth)
    facts = training_of(Checkpoint.open(pth, "official"))
    assert facts == {"task": "rec", "size": "tiny", "train_dataset": "unc"}
    del obj["args"]
    torch.save(obj, pth)
    assert training_of(Checkpoint.open(pth, "official"))["train_dataset"] is None


@pytest.mark.parametrize("tiny_ckpt", ["rec"], indirect=True)
def test_our_checkpoint_says_how_it_was_trained(tiny_ckpt):
    task, ckpt = tiny_ckpt
    facts = training_of(Checkpoint.open(ckpt))
    assert facts == {"task": "rec", "size": "tiny", "train_dataset": "synthetic"}


def test_eval_cli_checks_inputs_first(tmp_path):
    """Every missing input at once, exit 2, no traceback, before anything is built."""
    out = run_cli(
        "oneref.eval",
        [
            f"ckpt_path={tmp_path}/none.pth",
            "ckpt_format=official",
            "data=refcoco",
            f"paths.data_dir={tmp_path}/data",
        ],
        tmp_path,
        tmp_path / "cache",
        check=False,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    for key in ("ckpt_path=", "data.tokenizer=", "data.split_root=", "data.data_root="):
        assert key in out.stderr, key
