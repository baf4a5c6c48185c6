"""Multi-stage recipes (oneref.stages): stage 1 on a frozen backbone, stage 2 from stage 1's best;
one stage alone; finished stages recorded and never run again; a killed stage 2 resumed; bad
values refused by name. The official two-stage recipe on the tiny model and the synthetic data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import oneref.factory as factory_mod
from helpers.cli import cli_env, run_cli
from helpers.compose import RECIPE_SHRINK
from oneref.errors import UserError
from oneref.factory import build_datamodule, build_module
from oneref.stages import STATE_FILE, StageState, make_plan
from oneref.train import train

# the official REC base recipe (two stages), shrunk to a few batches of the tiny model
TWO_STAGES = ("recipe=rec_base", *RECIPE_SHRINK, "report_baseline=false")
BACKBONE = "beit3.encoder.layers.0.ffn.A.fc1.weight"
HEAD = "bbox_embed.layers.2.weight"


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def spy_init(monkeypatch) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Every init_weights call: its source and the weights it loaded."""
    calls = []
    real = factory_mod.init_weights

    def spy(module, source, source_format, **kwargs):
        real(module, source, source_format, **kwargs)
        calls.append((source, {k: v.detach().clone() for k, v in module.model.state_dict().items()}))

    monkeypatch.setattr(factory_mod, "init_weights", spy)
    return calls


def test_stage1_frozen_then_stage2_from_stage1_best(make_cfg, monkeypatch):
    cfg = make_cfg(*TWO_STAGES)
    calls = spy_init(monkeypatch)
    metrics = train(cfg)
    plan = make_plan(cfg)
    stage1, stage2 = plan.stages
    assert stage1.cfg.task.frozen_backbone and not stage2.cfg.task.frozen_backbone
    assert (
        not stage1.cfg.task.losses.use_box_mask_constraints
        and stage2.cfg.task.losses.use_box_mask_constraints
    )
    first, final = weights(stage1.export), weights(stage2.export)
    # stage 1 starts from random weights (init_from=scratch) and trains only the heads
    L.seed_everything(int(cfg.seed), workers=True)  # as run_stage: seed, data, then the model
    build_datamodule(stage1.cfg)
    fresh = build_module(stage1.cfg).model.state_dict()
    assert torch.equal(first[BACKBONE], fresh[BACKBONE]) and not torch.equal(first[HEAD], fresh[HEAD])
    # stage 2 is initialised with exactly stage 1's best weights, then trains the backbone too
    ((source, loaded),) = calls
    assert source == stage1.export == str(Path(cfg.paths.log_dir) / cfg.run_name / "stage1" / "best.ckpt")
    assert loaded.keys() == first.keys() and all(torch.equal(loaded[k], first[k]) for k in first)
    assert not torch.equal(final[BACKBONE], first[BACKBONE])
    assert stage2.export == str(Path(cfg.paths.log_dir) / cfg.run_name / "best.ckpt")
    # each stage in its own folder; both recorded as finished; the final test ran
    for k in (1, 2):
        assert list((Path(cfg.paths.output_dir) / f"stage{k}" / "checkpoints").glob("best*.ckpt"))
    state = json.loads((Path(cfg.paths.output_dir) / STATE_FILE).read_text())
    assert sorted(state["finished"]) == ["1", "2"]
    assert "test/synthetic/test/acc@0.5" in metrics


def test_one_stage_alone_then_the_rest(make_cfg, monkeypatch):
    cfg = make_cfg(*TWO_STAGES, "stage=1")
    metrics = train(cfg)
    assert not any(k.startswith("test/") for k in metrics)  # stage 1 is not the recipe's last
    run_dir = Path(cfg.paths.output_dir)
    assert StageState.load(run_dir).finished(1) and not StageState.load(run_dir).finished(2)
    assert not (run_dir / "stage2").exists()
    stage1_ckpts = {p: p.stat().st_mtime_ns for p in (run_dir / "stage1").rglob("*.ckpt")}
    # the same run again with every stage: stage 1 is finished, so only stage 2 runs, from its export
    calls = spy_init(monkeypatch)
    metrics = train(make_cfg(*TWO_STAGES))
    assert [source for source, _ in calls] == [make_plan(cfg).stages[0].export]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "stage1").rglob("*.ckpt")} == stage1_ckpts
    assert StageState.load(run_dir).finished(2) and "test/synthetic/test/acc@0.5" in metrics


def test_stage2_alone_takes_stage1_export_or_init_from(make_cfg, tmp_path):
    recipe = [o for o in TWO_STAGES if not o.startswith("init_from=")]  # the recipe's own weights
    (stage,) = make_plan(make_cfg(*recipe, "stage=2")).to_run
    assert stage.index == 2 and stage.cfg.init_from.endswith("/stage1/best.ckpt")
    (stage,) = make_plan(make_cfg(*recipe, "stage=2", f"init_from={tmp_path}/mine.ckpt")).to_run
    assert stage.cfg.init_from == f"{tmp_path}/mine.ckpt"
    # with both stages, init_from is stage 1's; stage 2 always continues from stage 1
    first, second = make_plan(make_cfg(*recipe, f"init_from={tmp_path}/mine.ckpt")).to_run
    assert first.cfg.init_from == f"{tmp_path}/mine.ckpt" and second.cfg.init_from == first.export


def test_the_synthetic_default_is_one_stage_from_scratch(make_cfg):
    cfg = make_cfg()
    (stage,) = make_plan(cfg).stages
    assert stage.last and stage.cfg.init_from is None and not stage.cfg.task.frozen_backbone
    assert stage.cfg.paths.output_dir == cfg.paths.output_dir  # no stage folder
    assert stage.export == f"{cfg.paths.log_dir}/rec_tiny_synthetic/best.ckpt"


@pytest.mark.parametrize("value", ["3", "0", "first"])
def test_a_bad_stage_is_refused_by_name(make_cfg, value):
    with pytest.raises(UserError, match=f"stage={value!r}|stage='{value}'|stage={value}"):
        make_plan(make_cfg(*TWO_STAGES, f"stage={value}"))


def test_random_weights_need_scratch_and_warn(make_cfg, caplog):
    with pytest.raises(UserError, match="init_from=scratch"):
        make_plan(make_cfg("task=rec", "model=base", "data=refcoco", "init_from=null"))
    make_plan(make_cfg("task=rec", "model=base", "data=refcoco", "init_from=scratch"))
    assert "RANDOM weights" in caplog.text


def test_preflight_only_prints_the_plan_and_trains_nothing(make_cfg, capsys):
    cfg = make_cfg(*TWO_STAGES, "preflight=only")
    assert train(cfg) == {}
    out = capsys.readouterr().out
    assert "stage 1 of 2" in out and "stage 2 of 2" in out and "frozen" in out
    assert "stage1/best.ckpt" in out
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


def test_a_bad_stage_exits_2_without_traceback(tmp_path, cache_dir):
    out = run_cli(
        "oneref.train", [*TWO_STAGES, "stage=3", "preflight=only"], tmp_path, cache_dir, check=False
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "stage=3" in out.stderr and "Traceback" not in out.stderr


def test_a_killed_stage2_resumes_and_stage1_is_not_run_again(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = [*TWO_STAGES, f"hydra.run.dir={run_dir}", "callbacks.rich_progress_bar=null"]
    common += ["data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32"]
    # stage 2 long enough to be killed after its first epoch's checkpoint
    cmd = [sys.executable, "-m", "oneref.train", *common, "trainer.max_epochs=${oneref.stage:1,200}"]
    errors = tmp_path / "first.err"
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=cli_env(tmp_path, cache_dir), stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    last = run_dir / "stage2" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 500
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert last.is_file(), errors.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = StageState.load(run_dir)
    assert state.finished(1) and not state.finished(2)
    stage1 = {p: p.stat().st_mtime_ns for p in (run_dir / "stage1").rglob("*.ckpt")}
    # the rerun (a requeued job: same command, same folder) with a shorter stage 2
    out = run_cli("oneref.train", [*common, "trainer.max_epochs=${oneref.stage:1,2}"], tmp_path, cache_dir)
    log = out.stdout + out.stderr
    assert "stage 1 is finished" in log
    assert f"resuming from {last}" in log
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "stage1").rglob("*.ckpt")} == stage1
    assert StageState.load(run_dir).finished(2)


def test_a_stage_recorded_with_other_settings_is_not_finished(make_cfg):
    stage, _ = make_plan(make_cfg(*TWO_STAGES)).stages
    state = StageState.load(make_cfg(*TWO_STAGES).paths.output_dir)
    state.mark_finished(stage, {"val/acc@0.5": 0.5})
    again = StageState.load(state.path.parent)
    assert again.finished(1, stage) and again.metrics(1) == {"val/acc@0.5": 0.5}
    other, _ = make_plan(make_cfg(*TWO_STAGES, "optim.weight_decay=0.5")).stages
    assert not again.finished(1, other)  # another run written into the same folder


def test_a_broken_stage_record_is_one_error_naming_it(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{STATE_FILE}.*delete it"):
        StageState.load(tmp_path)
