"""CUDA paths: bf16 autocast, fused AdamW, compile, activation checkpointing, FlexAttention, no host
syncs in the training step. Skipped without a GPU (run with `pytest -m gpu` on a GPU machine;
scripts/device_check.sh does; CI has none)."""

from __future__ import annotations

from pathlib import Path

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
        "model.runtime.compile=true",
        "model.runtime.grad_checkpointing=true",
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


def test_flex_attention_matches_sdpa_on_cuda_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **TINY).cuda()
    image, ids, pad = _inputs()
    grads, outs = [], []
    for kind in ("sdpa", "flex"):  # flex: the compiled FlexAttention kernel, its backward included
        model.beit3.set_attention(kind)
        model.zero_grad()
        out = model(image, ids, pad)
        out["pred_box"].sum().backward()
        outs.append(out["text_tokens"].detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_training_step_syncs_the_host_only_at_the_logging_cadence(make_cfg, monkeypatch) -> None:
    """Through the Trainer with the real callbacks (progress bar, throughput, lr monitor, CSV
    logger): every synchronising CUDA call after warm-up must come from Lightning turning logged
    tensors into numbers, at a logging step; none from the forward, loss, backward or optimizer."""
    import traceback
    import warnings

    import lightning as L

    every, warmup, steps = 3, 2, 9
    allowed = {"metrics_to_scalars", "convert_tensors_to_scalars"}
    syncs: list[tuple[int, list[str]]] = []

    class Recorder(L.Callback):
        step = -1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = batch_idx
            torch.cuda.set_sync_debug_mode("warn" if batch_idx >= warmup else "default")

        def on_train_epoch_end(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode("default")  # validation and checkpoints are not steps

    recorder = Recorder()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and torch.cuda.get_sync_debug_mode():
            stack = [f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in traceback.extract_stack()]
            syncs.append((recorder.step, stack))
        else:
            show(message, category, filename, lineno, file, line)

    cfg = make_cfg(
        "logger=csv",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={steps}",
        "trainer.limit_val_batches=1",
        f"trainer.log_every_n_steps={every}",
        "data.batch_size=8",
        "test=false",
    )
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu"
        cfg.trainer.precision = "auto"  # bf16-mixed, fused AdamW
        cfg.data.pin_memory = True
        cfg.callbacks.rich_progress_bar = {"_target_": "oneref.tasks.throughput.RichProgressBar"}
    cfg.logger = {
        "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": cfg.paths.output_dir}
    }
    from oneref import factory

    trainer = factory.build_trainer(cfg)
    trainer.callbacks.append(recorder)
    monkeypatch.setattr(warnings, "showwarning", record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            trainer.fit(factory.build_module(cfg), datamodule=factory.build_datamodule(cfg))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    logging_steps = {i for i in range(steps) if (i + 1) % every == 0}
    bad = [
        (step, stack[-12:])
        for step, stack in syncs
        if step not in logging_steps or not any(name.split(" ")[0] in allowed for name in stack)
    ]
    assert not bad, "host syncs in the training step:\n" + "\n\n".join(
        f"step {s}:\n  " + "\n  ".join(st) for s, st in bad[:3]
    )
    assert {s for s, _ in syncs} <= logging_steps


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
def test_fsdp_step_save_and_reload_on_one_device(make_cfg, tmp_path, state_dict_type) -> None:
    """strategy=fsdp on one GPU (auto-wrap per Multiway layer, activation checkpointing, bf16):
    two steps and a checkpoint; the full checkpoint loads back on one device with the official
    keys, the sharded one after Lightning's consolidation."""
    from oneref.checkpoint import load_model, official_keys

    cfg = make_cfg(
        "strategy=fsdp",
        "strategy.activation_checkpointing_layers=true",
        f"strategy.state_dict_type={state_dict_type}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "test=false",
    )
    cfg.trainer.accelerator = "gpu"
    cfg.trainer.precision = "auto"
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    if state_dict_type == "sharded":  # a folder of shards: consolidate it into one file first
        import subprocess
        import sys

        subprocess.run(
            [sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(last)],
            check=True,
        )
        last = last.with_suffix(".ckpt.consolidated")
    model, report = load_model(last, ckpt_format="lightning")
    assert not report.missing and not report.unexpected
    assert list(model.state_dict()) == list(official_keys(model.cfg))
