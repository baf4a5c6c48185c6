"""The training entry point: the default path shrunk, resume, loggers, multirun, RES, and the
validation-image panel."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf, open_dict
from PIL import Image

from oneref.config import config_dir
from oneref.drawing import GT_COLOUR, PRED_COLOUR, draw_sample
from oneref.tasks.callbacks import ValidationImages
from oneref.tasks.grounding import GroundingModule
from oneref.train import train

# A few steps of everything, on the session's small synthetic set.
SHORT = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


def with_logger(cfg, name: str) -> None:
    """Put a logger back (the make_cfg fixture switches them off), as `logger=<name>` would."""
    with open_dict(cfg):
        cfg.logger = OmegaConf.load(Path(config_dir()) / "logger" / f"{name}.yaml")


def spy_on(monkeypatch, owner, name: str) -> list:
    """Record (self, args, kwargs) of every call of owner.name and still call it."""
    calls: list = []
    real = getattr(owner, name)

    def spy(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_default_path_checkpoints_tests_best_and_logs_csv(make_cfg, tmp_path, monkeypatch, capsys):
    cfg = make_cfg("trainer.max_epochs=2", *SHORT[1:], "trainer.log_every_n_steps=1")
    assert (cfg.task.name, cfg.model.size, cfg.data.dataset) == ("rec", "tiny", "synthetic")
    with_logger(cfg, "csv")
    test_calls = spy_on(monkeypatch, L.Trainer, "test")

    metrics = train(cfg)

    # what to try next: a predict command on a test image copied next to the export, and eval
    out = capsys.readouterr().out
    hint = next(line for line in out.splitlines() if "python -m oneref.predict" in line)
    image = Path(hint.split("image=")[1].split(" ")[0])
    text = hint.split("text='")[1].rsplit("'", 1)[0]
    assert image == Path(cfg.export_best).with_name("example.jpg") and image.is_file() and text
    assert f"python -m oneref.eval ckpt_path={cfg.export_best} data=synthetic" in out
    import oneref

    (pred,) = oneref.load(cfg.export_best, device="cpu").predict(str(image), [text])
    assert pred.box_xyxy is not None

    ckpts = tmp_path / "checkpoints"
    best = sorted(ckpts.glob("best_*.ckpt"))
    assert len(best) == 1 and (ckpts / "last.ckpt").is_file()
    assert [c[2]["ckpt_path"] for c in test_calls] == [str(best[0])], (
        "test did not run on the best checkpoint"
    )
    exported = Path(cfg.export_best)
    assert exported.read_bytes() == best[0].read_bytes()
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    for split in ("val", "test"):
        assert 0 <= metrics[f"test/synthetic/{split}/acc@0.5"] <= 1
        assert 0 <= metrics[f"baseline/synthetic/{split}/acc@0.5"] <= 1
    assert "val/acc@0.5" in metrics and np.isfinite(metrics["train/loss"])

    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss", "val/acc@0.5", "val/miou", "epoch", "step"} <= columns
    assert any(c.startswith("lr-") for c in columns), columns
    assert sum(1 for r in rows if r["val/acc@0.5"]) == 2  # one validation per epoch
    assert "effective_batch_size: 32" in (tmp_path / "csv" / "hparams.yaml").read_text()
    # CSV-only run: the validation panel of epoch 0 is a PNG in the run folder (every 5 epochs)
    panels = sorted((tmp_path / "val_images").glob("*.png"))
    assert [p.name for p in panels] == ["epoch000_step000002.png"]
    assert Image.open(panels[0]).size == (4 * 128 + 3 * 2, 2 * (128 + 14) + 2)


def test_resume_continues_from_the_saved_step(make_cfg, tmp_path, monkeypatch):
    first = make_cfg(*SHORT, "test=false")
    train(first)
    resume = tmp_path / "resume.ckpt"
    resume.write_bytes((tmp_path / "checkpoints" / "last.ckpt").read_bytes())
    saved = torch.load(resume, weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (2, 0)

    seen: list[tuple[int, int]] = []
    real_step = GroundingModule.training_step
    monkeypatch.setattr(
        GroundingModule,
        "training_step",
        lambda self, batch, idx: (
            seen.append((self.trainer.current_epoch, self.global_step)) or real_step(self, batch, idx)
        ),
    )
    second = make_cfg(*SHORT, "trainer.max_epochs=2", "test=false", f"ckpt_path={resume}")
    train(second)
    assert seen == [(1, 2), (1, 3)], "the resumed run did not start at epoch 1, step 2"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (4, 1)


def test_wandb_offline_no_network_and_finished(make_cfg, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network use would fail
    cfg = make_cfg(*SHORT, "test=false")
    with_logger(cfg, "wandb")
    assert cfg.logger.wandb.offline is True
    images = spy_on(monkeypatch, WandbLogger, "log_image")

    with mock.patch("builtins.input", side_effect=AssertionError("W&B prompted for input")):
        train(cfg)

    assert wandb.run is None, "wandb.finish() did not run"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert len(images) == 1 and images[0][2]["key"] == "val/images" and len(images[0][2]["images"]) == 8


def test_hydra_multirun_writes_one_subfolder_per_job(tmp_path, cache_dir):
    env = {
        **os.environ,
        "ONEREF_ROOT": str(tmp_path),
        "ONEREF_CACHE": str(cache_dir),
        "WANDB_MODE": "disabled",
    }
    cmd = [
        sys.executable, "-m", "oneref.train", "-m",
        "model=tiny", "optim.lr=1e-4,3e-4", "trainer.max_steps=5", "debug=default",
        # the session's small synthetic set (conftest.TINY_SYNTHETIC), so the cache is reused
        "data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "callbacks.rich_progress_bar=null",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "rec_tiny_synthetic" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [OmegaConf.load(job / ".hydra" / "config.yaml").optim.lr for job in jobs]
    assert lrs == [1e-4, 3e-4]
    for job in jobs:
        last = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 3  # 96 samples / 32 per batch, one epoch (debug=default)
    # each job exports its own best checkpoint, named after its job number
    exported = sorted(p.name for p in (tmp_path / "logs" / "rec_tiny_synthetic").glob("best*.ckpt"))
    assert exported == ["best.job0.ckpt", "best.job1.ckpt"]
    arch = torch.load(tmp_path / "logs" / "rec_tiny_synthetic" / "best.job0.ckpt", weights_only=True)
    assert arch["hyper_parameters"]["architecture"]["embed_dim"] == 128


def test_console_has_no_third_party_noise_but_keeps_our_warnings(tmp_path, cache_dir):
    env = {
        **os.environ,
        "ONEREF_ROOT": str(tmp_path),
        "ONEREF_CACHE": str(cache_dir),
        "WANDB_MODE": "disabled",
    }
    cmd = [
        sys.executable, "-m", "oneref.train", "debug=fdr",
        "data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "Tip:" not in console and "litlogger" not in console and "LeafSpec" not in console
    # our own warning still shows (fast_dev_run saves no best checkpoint)
    assert "no best checkpoint was saved" in console


def test_res_fast_run(make_cfg, tmp_path):
    cfg = make_cfg("task=res", *SHORT)
    assert cfg.task.monitor == "val/miou" and cfg.data.seg_masks
    metrics = train(cfg)
    assert len(list((tmp_path / "checkpoints").glob("best_*.ckpt"))) == 1
    for split in ("val", "test"):
        prefix = f"test/synthetic/{split}"
        for name in ("miou", "oiou", "prec@0.5", "prec@0.9", "box_acc@0.5"):
            assert 0 <= metrics[f"{prefix}/{name}"] <= 1, name
    assert "val/miou" in metrics and "val/oiou" in metrics and "val/box_acc@0.5" in metrics
    assert not any("box_val" in k for k in metrics)
    assert not any(k.startswith("baseline/") for k in metrics)  # the mean-box baseline is REC only
    assert len(list((tmp_path / "val_images").glob("*.png"))) == 1  # the mask panel


# -- the validation panel ---------------------------------------------------------------------
def test_draw_sample_colours_boxes_and_masks():
    img = np.zeros((32, 32, 3), np.uint8)
    tile = draw_sample(img, "x", gt_box=np.array([2, 2, 12, 12]), pred_box=np.array([16, 16, 30, 30]))
    assert tile.shape == (32 + 14, 32, 3)
    assert tuple(tile[2, 6]) == GT_COLOUR and tuple(tile[16, 20]) == PRED_COLOUR
    assert tuple(tile[7, 7]) == (0, 0, 0)  # boxes are outlines
    gt = np.zeros((32, 32), bool)
    gt[4:10, 4:10] = True
    tile = draw_sample(img, "x", gt_mask=gt, pred_mask=np.zeros_like(gt))
    assert tuple(tile[4, 4]) == GT_COLOUR  # outline
    assert tile[6, 6, 1] > 0 and tile[6, 6, 0] == 0  # green tint inside
    assert tuple(tile[20, 20]) == (0, 0, 0)


def _panel_inputs(k: int = 3, size: int = 32):
    batch = {
        "image": torch.zeros(k, 3, size, size),
        "box": torch.tensor([[0.5, 0.5, 0.5, 0.5]]).expand(k, 4),
        "obj_mask": torch.zeros(k, 1, size, size, dtype=torch.bool),
        "phrase": [f"thing {i}" for i in range(k)],
    }
    out = {"pred_box": torch.tensor([[0.25, 0.25, 0.2, 0.2]]).expand(k, 4)}
    return batch, out


@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "none"])
def test_panel_goes_to_image_loggers_else_png(tmp_path, kind):
    batch, out = _panel_inputs()
    loggers = {
        "tensorboard": [mock.MagicMock(spec=TensorBoardLogger)],
        "wandb": [mock.MagicMock(spec=WandbLogger)],
        "none": [],
    }[kind]
    trainer = mock.MagicMock(loggers=loggers, default_root_dir=str(tmp_path), global_step=7, current_epoch=5)
    cb = ValidationImages(every_n_epochs=5, num_images=8)
    cb._log_panel(trainer, mock.MagicMock(is_res=False), batch, out)
    pngs = list((tmp_path / "val_images").glob("*.png"))
    if kind == "tensorboard":
        ((args, kwargs),) = loggers[0].experiment.add_image.call_args_list
        assert args[0] == "val/images" and args[1].shape == (128 + 14, 3 * 128 + 2 * 2, 3)
        assert kwargs == {"global_step": 7, "dataformats": "HWC"}
    elif kind == "wandb":
        kwargs = loggers[0].log_image.call_args.kwargs
        assert kwargs["key"] == "val/images" and kwargs["step"] == 7
        assert len(kwargs["images"]) == 3 and kwargs["caption"] == ["thing 0", "thing 1", "thing 2"]
    if kind == "none":
        assert [p.name for p in pngs] == ["epoch005_step000007.png"]
    else:
        assert not pngs


def test_panel_schedule():
    cb = ValidationImages(every_n_epochs=3)
    due = []
    for epoch in range(7):
        trainer = mock.MagicMock(sanity_checking=False, fast_dev_run=False, current_epoch=epoch)
        due.append(cb._is_due(trainer))
    assert due == [True, False, False, True, False, False, True]
    assert not ValidationImages(every_n_epochs=0)._is_due(
        mock.MagicMock(sanity_checking=False, fast_dev_run=False)
    )
    sanity = mock.MagicMock(sanity_checking=True, fast_dev_run=False, current_epoch=0)
    assert not cb._is_due(sanity)


# -- learning ---------------------------------------------------------------------------------
def trivial_res_miou(datamodule) -> dict[str, float]:
    """mIoU of two mask predictions that ignore the image: all foreground, and the mean training
    mask (pixels that are object in at least half of the training samples)."""
    from oneref.tasks.metrics import RESMetrics

    mean = None
    n = 0
    for batch in datamodule.train_dataloader():
        m = batch["obj_mask"].float().sum(0)
        mean, n = (m if mean is None else mean + m), n + batch["obj_mask"].shape[0]
    mean_mask = (mean / n) >= 0.5
    out = {}
    for name, pred in (("all", None), ("mean", mean_mask)):
        metric = RESMetrics()
        for batch in datamodule.test_dataloader()[-1]:
            gt = batch["obj_mask"]
            p = torch.ones_like(gt) if pred is None else pred.expand_as(gt)
            # as logits: +inf where foreground, -inf elsewhere
            metric.update(torch.where(p, 20.0, -20.0), gt)
        out[name] = float(metric.compute()["miou"])
    return out


@pytest.mark.slow
def test_res_beats_trivial_baselines(make_cfg, tmp_path):
    """The tiny RES recipe for 800 steps from scratch (8 epochs of a 3,200-sample set), tested on
    the best checkpoint and on the last one: the last must not have collapsed to empty masks
    (with the official mask logits, cosines in [-1, 1], it did after ~300 steps)."""
    cfg = make_cfg(
        "task=res",
        "trainer.max_epochs=8",
        "trainer.max_time=null",
    )
    with open_dict(cfg):
        # its own, larger synthetic set (make_cfg shrinks data.synthetic to the session's tiny one)
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.data.synthetic.update(num_train=3200, num_val=128, num_test=256)
    metrics = train(cfg)
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    dm.setup("test")
    baseline = trivial_res_miou(dm)
    best_trivial = max(baseline.values())
    bar = max(2 * best_trivial, best_trivial + 0.05)
    miou = metrics["test/synthetic/test/miou"]
    assert miou > bar, (miou, baseline)

    from oneref.tasks.grounding import GroundingModule
    from oneref.tasks.metrics import RESMetrics

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    model = GroundingModule.load_from_checkpoint(last, map_location="cpu", weights_only=True).model.eval()
    metric = RESMetrics()
    with torch.no_grad():
        for batch in dm.test_dataloader()[-1]:
            out = model(batch["image"], batch["text_ids"], batch.get("text_padding_mask"))
            metric.update(out["seg_mask"], batch["obj_mask"])
    last_miou = float(metric.compute()["miou"])
    assert last_miou > bar, (last_miou, miou, baseline)
