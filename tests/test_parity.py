"""Golden parity with the official code, through the real converter, strictly, on every golden set
found (tests/conftest.py GOLDEN_SETS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.golden import GOLDEN_ROOT, extra_golden_root
from oneref.checkpoint import load_checkpoint_file
from oneref.convert import main as convert_main
from oneref.parity import PARITY_TOL, golden_config, parity_rows

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


def test_golden_config_reads_the_architecture(golden_dir: Path) -> None:
    a = json.loads((golden_dir / "config.json").read_text())["architecture"]
    cfg = golden_config(golden_dir)
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.ffn_dim, cfg.img_size) == (
        a["embed_dim"],
        a["attention_heads"],
        a["layers"],
        a["ffn_dim"],
        a["img_size"],
    )
    assert (cfg.vocab_size, cfg.mim_codebook_size, cfg.grid_size) == (
        a["vocab_size"],
        a["codebook_size"],
        a["grid"],
    )


def test_in_repo_golden_sets_equal_the_copies_under_oneref_golden() -> None:
    """A set under $ONEREF_GOLDEN named like an in-repo set must be the same set (it is not run
    twice)."""
    extra = extra_golden_root()
    if extra is None or not extra.is_dir():
        pytest.skip("ONEREF_GOLDEN names no folder of golden sets to compare the in-repo sets with")
    compared = 0
    for mine in sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "config.json").is_file()):
        theirs = extra / mine.name
        if not theirs.is_dir():
            continue
        files = {p.relative_to(mine) for p in mine.rglob("*") if p.is_file()}
        files |= {p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()}
        differ = sorted(str(f) for f in files if not _same_file(mine / f, theirs / f))
        assert not differ, f"{mine} and {theirs} differ in: {differ}"
        compared += 1
    if not compared:
        pytest.skip(f"no in-repo set has a counterpart under {extra}")


def _same_file(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()):
        return False
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix not in (".pt", ".pth"):  # torch archives are not byte-stable: compare their content
        return False
    x, y = load_checkpoint_file(a), load_checkpoint_file(b)
    return _same_content(x, y)


def _same_content(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_content(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same_content, x, y))
    return x == y


def test_golden_parity_eval_and_train(golden_dir: Path) -> None:
    rows, _ = parity_rows(golden_dir)
    seen = {(file, name) for name, file, _, _ in rows}
    assert {("outputs_eval.pt", n) for n in EVAL} <= seen
    assert {("outputs_train_nomim.pt", n) for n in TRAIN_NOMIM} <= seen
    bad = [(name, file, err, note) for name, file, err, note in rows if err is None or err > PARITY_TOL]
    assert not bad, bad


def test_parity_cli_exit_code(golden_dir: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "oneref.convert", "parity", str(golden_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "encoder_states" in run.stdout and "FAIL" not in run.stdout


def _copy_golden(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "checkpoint.pth", "inputs.pt", "outputs_eval.pt", "outputs_train_nomim.pt"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_parity_cli_fails_on_a_tampered_output(golden_dir: Path, tmp_path: Path, capsys) -> None:
    g = _copy_golden(golden_dir, tmp_path / "golden")
    ev = torch.load(g / "outputs_eval.pt", weights_only=True)
    ev["pred_box"] = ev["pred_box"] + 1e-3
    torch.save(ev, g / "outputs_eval.pt")
    assert convert_main(["parity", str(g)]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("pred_box") and "outputs_eval.pt" in ln)
    assert "FAIL" in line and "1.000e-03" in line
    assert "outputs_train.pt" not in out  # absent from this copy: skipped, not an error


def test_parity_cli_fails_when_a_key_does_not_load(golden_dir: Path, tmp_path: Path, capsys) -> None:
    g = _copy_golden(golden_dir, tmp_path / "golden")
    ckpt = load_checkpoint_file(g / "checkpoint.pth")
    del ckpt["model"]["visu_proj.bias"]
    torch.save(ckpt, g / "checkpoint.pth")
    assert convert_main(["parity", str(g)]) == 1
    out = capsys.readouterr().out
    assert "FAILED to load" in out and "visu_proj.bias" in out
