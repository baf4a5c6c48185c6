"""VQ-KD visual tokenizer (MRefM MIM targets) against the official code (the golden vqkd/)."""

from __future__ import annotations

import json

import pytest
import torch

from oneref.checkpoint.io import CheckpointError
from oneref.checkpoint.vqkd import load_vqkd


@pytest.fixture(scope="module")
def vqkd_dir(golden_dir):
    d = golden_dir / "vqkd"
    if not (d / "vqkd_checkpoint.pth").is_file():
        pytest.skip(f"{d} is absent")
    return d


def test_codebook_indices_match_the_official_tokenizer(vqkd_dir, one_thread) -> None:
    info = json.loads((vqkd_dir / "info.json").read_text())
    expected = torch.load(vqkd_dir / "expected.pt", weights_only=True)
    model, report = load_vqkd(vqkd_dir / "vqkd_checkpoint.pth", num_heads=info["encoder_config"]["num_heads"])
    assert model.cfg.img_size == info["encoder_img_size"] and model.cfg.num_codes == info["n_code"]
    assert any(k.startswith("decoder.") for k in report.dropped)
    assert "quantize.embedding.embed_avg" in report.dropped and not report.unexpected
    assert "quantize.embedding.weight" in report.mapped
    image = expected["image"]
    assert image.shape[-1] == info["input_size"] != info["encoder_img_size"]  # the position resize runs
    torch.testing.assert_close(model.quantizer_input(image), expected["quantizer_input"], atol=1e-5, rtol=0)
    assert torch.equal(model.get_codebook_indices(image), expected["codebook_indices"])
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training  # stays frozen in eval mode inside a training module


def test_bad_checkpoints_are_clear_errors(vqkd_dir, golden_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="VQ-KD checkpoint not found.*BEiT v2"):
        load_vqkd(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a VQ-KD state dict: encoder.cls_token"):
        load_vqkd(golden_dir / "checkpoint.pth")  # a OneRef checkpoint
    sd = torch.load(vqkd_dir / "vqkd_checkpoint.pth", weights_only=True)["model"]
    del sd["encoder.blocks.1.attn.q_bias"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing: encoder.blocks.1.attn.q_bias"):
        load_vqkd(tmp_path / "broken.pth", num_heads=2)
