"""`python -m oneref.convert export`: any checkpoint to ONNX or a torch.export program, checked
against the eager model by the command itself.

The checkpoint is a folder of the tiny model at random init (no training needed for export).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from oneref.checkpoint import save_folder
from oneref.convert import main
from oneref.models.registry import create_model


@functools.cache
def _weights() -> tuple[dict, object]:
    torch.manual_seed(0)
    model = create_model("tiny", img_size=64, patch_size=8, vocab_size=1000)
    return model.state_dict(), model.cfg


@pytest.fixture
def folder(tmp_path) -> Path:
    sd, cfg = _weights()
    return save_folder(tmp_path / "tiny", sd, cfg, task="rec")


def test_export_torch_program(folder, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", str(folder), str(out), "--text-lengths", "2", "24"]) == 0
    report = capsys.readouterr().out
    assert out.is_file() and f"wrote {out}" in report
    assert (
        "torch_export" in report and "text length 2..24" in report and "max |exported - eager| = " in report
    )
    meta = json.loads(_extra(out))
    assert meta["format"] == "torch_export" and meta["text_len"] == [2, 24]


def _extra(path: Path) -> str:
    files = {"oneref.json": ""}
    torch.export.load(path, extra_files=files)
    return files["oneref.json"]


@pytest.mark.slow
def test_export_onnx(folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(folder), str(out), "--to", "onnx", "--batch", "2"]) == 0
    report = capsys.readouterr().out
    assert out.is_file() and "onnx:" in report and "batch 2" in report and "max |exported - eager|" in report


def test_export_bad_input(folder, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["export", *args]) == 2
        return capsys.readouterr().err

    assert "cannot tell the export format from 'model.bin': pass --to onnx|torch_export" in error(
        str(folder), str(tmp_path / "model.bin")
    )
    assert "checkpoint nope does not exist" in error("nope", str(tmp_path / "m.pt2"))
    (tmp_path / "taken.pt2").write_bytes(b"")
    assert "taken.pt2 exists; choose another name or pass --overwrite" in error(
        str(folder), str(tmp_path / "taken.pt2")
    )
    assert "need 2 <= min <= max" in error(str(folder), str(tmp_path / "m.pt2"), "--text-lengths", "1", "5")
    assert not (tmp_path / "m.pt2").exists()
