"""MRefM pretraining (oneref.tasks.mrefm): the step alternation, what each step updates, the frozen
tokenizer, checkpoints in and out, the recipes, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from helpers.compose import TINY_SYNTHETIC
from helpers.golden import KEY_FILE
from oneref.checkpoint import load_checkpoint_file, load_model, load_pretrained, to_official
from oneref.config import config_dir
from oneref.factory import build_module
from oneref.models.registry import model_config
from oneref.parity import golden_config
from oneref.tasks.mrefm import MRefMModule, build_vqkd, step_kind
from oneref.train import train

SHORT = ("task=mrefm", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "data.batch_size=16")
PRETRAIN = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("mrefm_pretrain_*.yaml"))


def test_official_alternation(golden_mlm_dir):
    """Even global steps MIM, odd MLM, as the official loop (golden alternation.json)."""
    table = json.loads((golden_mlm_dir / "alternation.json").read_text())
    assert [step_kind(int(s)) for s in table["global_steps_0_to_9"]] == [
        v.lower() for v in table["global_steps_0_to_9"].values()
    ]
    for run in table["runs"]:
        for it in run["iterations"]:
            assert step_kind(it["global_step"]) == it["branch"].lower()
    assert [step_kind(s, period=3, mim_first=False) for s in range(4)] == ["mlm", "mim", "mim", "mlm"]


def _seen_kinds(monkeypatch) -> list[tuple[int, str]]:
    seen: list[tuple[int, str]] = []
    real = MRefMModule.training_step

    def spy(self, batch, idx):
        seen.append((self.global_step, self.step_kind()))
        return real(self, batch, idx)

    monkeypatch.setattr(MRefMModule, "training_step", spy)
    return seen


def test_steps_alternate_update_only_what_they_reach_and_resume_on_the_right_kind(
    make_cfg, tmp_path, monkeypatch
):
    """Step 0 (MIM) leaves the MLM head untouched, step 1 (MLM) the MIM head; a resumed run goes
    on with the kind of its global step. The VQ-KD tokenizer is in no checkpoint."""
    seen = _seen_kinds(monkeypatch)
    cfg = make_cfg(
        *SHORT, "trainer.max_steps=1", "test=false", "callbacks.step_checkpoint.every_n_train_steps=1"
    )
    torch.manual_seed(int(cfg.seed))
    init = build_module(cfg).model.state_dict()
    train(cfg)
    step1 = torch.load(tmp_path / "checkpoints" / "step.ckpt", weights_only=True)
    sd1 = {k[len("model.") :]: v for k, v in step1["state_dict"].items()}
    assert not any(k.startswith("vqkd") or "_frozen" in k for k in step1["state_dict"])
    assert torch.equal(sd1["mlm_head.weight"], init["mlm_head.weight"])  # MIM step: no MLM gradient
    assert not torch.equal(sd1["mim_head.weight"], init["mim_head.weight"])
    assert torch.equal(sd1["mim_vts_head.layers.0.weight"], init["mim_vts_head.layers.0.weight"])  # VTS off
    assert step1["optimizer_states"][0]["state"], "AdamW took a step"
    resumed = make_cfg(
        *SHORT, "trainer.max_steps=2", "test=false", f"ckpt_path={tmp_path / 'checkpoints' / 'step.ckpt'}"
    )
    with open_dict(resumed):
        resumed.paths.output_dir = str(tmp_path / "resumed")
    train(resumed)
    assert seen == [(0, "mim"), (1, "mlm")]
    step2 = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(step2["model.mim_head.weight"], step1["state_dict"]["model.mim_head.weight"])
    assert not torch.equal(step2["model.mlm_head.weight"], step1["state_dict"]["model.mlm_head.weight"])


def test_frozen_backbone_is_unchanged(make_cfg, tmp_path):
    cfg = make_cfg(*SHORT, "trainer.max_steps=2", "test=false", "task.frozen_backbone=true")
    torch.manual_seed(int(cfg.seed))
    init = build_module(cfg).model.state_dict()
    train(cfg)
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in init.items():
        if key.startswith("beit3."):  # mask_token included, as the official --frozen_backbone
            assert torch.equal(sd[f"model.{key}"], value), key
    assert not torch.equal(sd["model.mlm_head.weight"], init["mlm_head.weight"])


def test_validation_metrics_export_and_fine_tuning_loads_strictly(make_cfg, tmp_path):
    cfg = make_cfg(*SHORT, "trainer.limit_train_batches=2", "test=false")
    metrics = train(cfg)
    for key in ("val/mim_loss", "val/mim_acc", "val/mlm_loss", "val/mlm_acc", "val/acc", "val/loss"):
        assert key in metrics and metrics[key] == metrics[key], key
    assert 0 <= metrics["val/acc"] <= 1
    exported = Path(cfg.export_last)
    assert (
        exported.is_file() and exported.read_bytes() == (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    )
    # the next stage: REC and RES fine-tuning from it, strictly; the MRefM heads dropped with a report
    for task in ("rec", "res"):
        rec = build_module(make_cfg(f"task={task}"))
        report = load_pretrained(rec.model, exported)
        assert report.source_format == "lightning (MRefM pretraining)"
        assert any(k.startswith("mlm_head") for k in report.dropped) and any(
            k.startswith("mim_head") for k in report.dropped
        )
        assert set(report.missing) == (
            {f"seg_conv{i}.weight" for i in (1, 2, 3)}
            | {
                f"bn{i}.{n}"
                for i in (1, 2, 3)
                for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            }
            if task == "res"
            else set()
        )
        pre = torch.load(exported, weights_only=True)["state_dict"]
        assert torch.equal(
            rec.model.state_dict()["beit3.text_embed.weight"], pre["model.beit3.text_embed.weight"]
        )
    # and the official MRefM layout: the backbone, grounding, MIM and MLM heads, no seg head
    module = MRefMModule.load_from_checkpoint(exported, weights_only=True)
    official, _ = to_official(module.model.state_dict(), module.model.cfg)
    assert set(official["model"]) == set(module.model.state_dict())
    assert "mlm_sts_head.layers.2.weight" in official["model"] and "seg_conv1.weight" not in official["model"]


def test_released_mrefm_files_load_strictly(golden_mlm_dir):
    """The golden MRefM checkpoint (the official pretrain_oneref_with_mrefm.py layout) loads into
    our MRefM model strictly, and so does a random base-384 MRefM checkpoint of the official keys."""
    cfg = golden_config(golden_mlm_dir)
    model, report = load_model(golden_mlm_dir / "checkpoint.pth", cfg, "official")
    raw = load_checkpoint_file(golden_mlm_dir / "checkpoint.pth")["model"]
    assert not report.missing and not report.unexpected and len(report.mapped) == len(raw)
    # the official base-384 MRefM layout (the key list's sections A and C): 520 tensors
    keys, section = {}, None
    for line in KEY_FILE.read_text().splitlines():
        if line.startswith("## SECTION"):
            section = line.split()[2]
        elif line and not line.startswith("#") and section in ("A", "C"):
            key, shape, _ = line.split("\t")
            keys[key] = json.loads(shape)
    base = model_config("base", mim_codebook_size=8192, mlm_head=True)
    from oneref.checkpoint import official_keys

    ours = official_keys(base)
    assert len(ours) == 520 and {k: list(s) for k, (s, _) in ours.items() if k in keys} == keys


def test_vqkd_errors_name_the_release_and_the_shapes(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth.*microsoft/unilm"
    ):
        build_vqkd({"checkpoint": str(tmp_path / "missing.pth")}, 384, 16)
    with pytest.raises(ValueError, match="16 px patches.*8 px patches"):
        build_vqkd(
            {"checkpoint": None, "random": {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 16}},
            64,
            8,
        )


def test_a_batch_without_mrefm_fields_is_a_clear_error(make_cfg):
    module = build_module(make_cfg("task=mrefm"))
    with pytest.raises(KeyError, match="data.mrefm.enabled=true"):
        module({"image": torch.zeros(1, 3, 64, 64)}, "mim")


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretraining_experiments_compose_and_fast_dev_run(make_cfg, name):
    from helpers.compose import compose_config

    real = compose_config("train", [f"experiment={name}"], shrink=False)
    assert real.task.name == "mrefm" and real.data.mrefm.enabled and real.test is False
    assert real.data.dataset == ("mixup_refc" if "_res_" in name else "mixup_refc_referit")
    assert real.task.vqkd.codebook_size == 8192 and real.task.vqkd.checkpoint.endswith("d5036aa7.pth")
    # the 4 x 8 GPUs variant (the two-stage MRefM recipes: tests/test_experiments.py)
    assert (
        real.trainer.max_epochs == 200
        and real.global_batch_size == 1024
        and real.optim.lr == pytest.approx(1e-3)
    )
    assert real.data.seg_masks
    assert (
        f"experiment={name}" in (Path(config_dir()) / "experiment" / f"{name}.yaml").read_text()
    )  # its command
    cfg = make_cfg(
        f"experiment={name}",
        "model=tiny",
        "data=synthetic",
        "trainer=cpu",
        "strategy=auto",
        "init_from=null",
        "debug=fdr",
        "global_batch_size=null",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


LOSSES: dict[str, list[float]] = {"mim": [], "mlm": []}


class RecordLosses(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LOSSES[pl_module.step_kind(trainer.global_step - 1)].append(float(outputs["loss"]))


@pytest.mark.slow
def test_a_few_hundred_steps_lower_both_losses(make_cfg):
    cfg = make_cfg(
        "task=mrefm", "trainer.max_steps=300", "trainer.limit_val_batches=2", "test=false", "data.batch_size=16",
        "+callbacks.record._target_=test_mrefm.RecordLosses",
    )  # fmt: skip
    with open_dict(cfg):
        cfg.data.synthetic.update(num_train=2400)
    train(cfg)
    for kind, values in LOSSES.items():
        first, last = sum(values[:20]) / 20, sum(values[-20:]) / 20
        assert last < 0.9 * first, (kind, first, last)


def test_ddp_sim_mrefm(tmp_path, cache_dir):
    """Two CPU processes: the heads of the other step kind get no gradient, which DDP is told of."""
    env = {
        **os.environ,
        "ONEREF_ROOT": str(tmp_path),
        "ONEREF_CACHE": str(cache_dir),
        "WANDB_MODE": "disabled",
    }
    cmd = [
        sys.executable, "-m", "oneref.train", "task=mrefm", "trainer=ddp_sim", "trainer.max_steps=3",
        "data.batch_size=8", "trainer.limit_val_batches=1", "callbacks.rich_progress_bar=null",
        *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()],
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = (tmp_path / "logs" / "mrefm_tiny_synthetic" / "runs").iterdir()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (tmp_path / "logs" / "mrefm_tiny_synthetic" / "last.ckpt").is_file()


@pytest.mark.slow
def test_synthetic_chain_script_runs_every_condition(tmp_path, cache_dir):
    """scripts/synthetic_mrefm_chain.py (the README's MRefM -> REC comparison), a few steps each."""
    env = {**os.environ, "ONEREF_CACHE": str(cache_dir), "WANDB_MODE": "disabled"}
    out_json = tmp_path / "chain.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "synthetic_mrefm_chain.py"),
        "--steps", "4", "--seeds", "0", "--out", str(out_json), "--work", str(tmp_path / "work"),
        "data.num_workers=0", "data.batch_size=16",
        *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()],
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    records = json.loads(out_json.read_text())
    assert [(r["condition"], r["steps"]) for r in records] == [("rec", 4), ("mrefm+rec", 4), ("rec-short", 2)]
    assert records[1]["mrefm_steps"] == 2
    assert all(0 <= r["test/synthetic/test/acc@0.5"] <= 1 for r in records)
