"""Golden parity with the official code (issue 2 item 5) through the real converter, strictly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneref.checkpoint import load_checkpoint_file
from oneref.convert import main as convert_main
from oneref.parity import PARITY_TOL, golden_config, parity_rows

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "official-tiny"
pytestmark = pytest.mark.skipif(
    not GOLDEN.is_dir(), reason=f"{GOLDEN} (golden set from the official code) is absent"
)

EVAL = {
    "encoder_out",
    "encoder_states",
    "encoder_embedding",
    "pred_box",
    "seg_mask",
    "vision_cls",
    "language_cls",
}
TRAIN_NOMIM = {"pred_box", "visu_token_similarity", "seg_mask"} | {
    f"bn_state_after.bn{i}.{k}"
    for i in (1, 2, 3)
    for k in ("running_mean", "running_var", "num_batches_tracked")
}


def test_golden_config_reads_the_architecture() -> None:
    cfg = golden_config(GOLDEN)
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.ffn_dim, cfg.img_size) == (64, 4, 2, 256, 64)
    assert (cfg.vocab_size, cfg.seg_head, cfg.mim_codebook_size, cfg.mlm_head) == (1000, True, 64, False)


def test_golden_parity_eval_and_train(one_thread) -> None:
    rows, _ = parity_rows(GOLDEN)
    seen = {(file, name) for name, file, _, _ in rows}
    assert {("outputs_eval.pt", n) for n in EVAL} <= seen
    assert {("outputs_train_nomim.pt", n) for n in TRAIN_NOMIM} <= seen
    bad = [(name, file, err, note) for name, file, err, note in rows if err is None or err > PARITY_TOL]
    assert not bad, bad


def test_parity_cli_exit_code() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "oneref.convert", "parity", str(GOLDEN)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "encoder_states" in run.stdout and "FAIL" not in run.stdout


def _copy_golden(dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "checkpoint.pth", "inputs.pt", "outputs_eval.pt", "outputs_train_nomim.pt"):
        shutil.copyfile(GOLDEN / name, dst / name)
    return dst


def test_parity_cli_fails_on_a_tampered_output(tmp_path: Path, capsys, one_thread) -> None:
    g = _copy_golden(tmp_path / "golden")
    ev = torch.load(g / "outputs_eval.pt", weights_only=True)
    ev["pred_box"] = ev["pred_box"] + 1e-3
    torch.save(ev, g / "outputs_eval.pt")
    assert convert_main(["parity", str(g)]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("pred_box") and "outputs_eval.pt" in ln)
    assert "FAIL" in line and "1.000e-03" in line
    assert "outputs_train.pt" not in out  # absent from this copy: skipped, not an error


def test_parity_cli_fails_when_a_key_does_not_load(tmp_path: Path, capsys) -> None:
    g = _copy_golden(tmp_path / "golden")
    ckpt = load_checkpoint_file(g / "checkpoint.pth")
    del ckpt["model"]["visu_proj.bias"]
    torch.save(ckpt, g / "checkpoint.pth")
    assert convert_main(["parity", str(g)]) == 1
    out = capsys.readouterr().out
    assert "FAILED to load" in out and "visu_proj.bias" in out
