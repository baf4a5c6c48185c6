"""CUDA paths: bf16 autocast, fused AdamW, compile, activation checkpointing. Skipped without a GPU
(run with `pytest -m gpu` on a GPU machine; CI has none)."""

from __future__ import annotations

import pytest
import torch

from oneref.models.registry import create_model
from oneref.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = dict(embed_dim=64, num_heads=4, depth=2, ffn_dim=128, img_size=64, patch_size=8, vocab_size=100)


def _inputs(device: str = "cuda"):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 64, 64, generator=g)
    ids = torch.randint(4, 100, (4, 9), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[2:, 6:] = True
    ids[pad] = 1
    return image.to(device), ids.to(device), pad.to(device)


def test_bf16_autocast_stays_close_to_fp32_and_to_the_cpu() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **TINY, seg_head=True).eval()
    image, ids, pad = _inputs("cpu")
    with torch.no_grad():
        ref = model(image, ids, pad)
        model.cuda()
        fp32 = model(image.cuda(), ids.cuda(), pad.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(image.cuda(), ids.cuda(), pad.cuda())
    torch.testing.assert_close(fp32["pred_box"].cpu(), ref["pred_box"], atol=1e-4, rtol=0)
    assert (bf16["pred_box"].float() - fp32["pred_box"]).abs().max() < 0.02
    assert (bf16["seg_mask"].float() - fp32["seg_mask"]).abs().max() < 0.05


def test_gpu_training_run_bf16_fused_compile_checkpointing(make_cfg) -> None:
    cfg = make_cfg(
        "model.compile=true",
        "model.grad_checkpointing=true",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    cfg.trainer.accelerator = "gpu"
    cfg.trainer.precision = "auto"  # resolves to bf16-mixed on CUDA
    metrics = train(cfg)
    assert 0 <= metrics["test/synthetic/test/acc@0.5"] <= 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
