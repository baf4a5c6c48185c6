"""Optimiser and schedule from config (oneref.tasks.optim): parameter groups and every schedule shape."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from oneref.models.oneref import OneRef
from oneref.models.registry import model_config
from oneref.tasks.optim import configure_optimizers, param_groups

TINY = dict(embed_dim=32, num_heads=2, depth=2, ffn_dim=64, img_size=32, patch_size=8, vocab_size=50)


def _model() -> OneRef:
    torch.manual_seed(0)
    model = OneRef(model_config("tiny", **TINY))
    model.text_proj.requires_grad_(False)  # one frozen part: never in a group
    return model


def _names(model: OneRef, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_official_is_one_group_with_every_trainable_parameter():
    model = _model()
    (group,) = param_groups(model, 1e-4)
    assert group["weight_decay"] == 1e-4 and group["lr_scale"] == 1.0
    assert _names(model, group) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_proj") for n in _names(model, group))


def test_no_weight_decay_groups():
    model = _model()
    groups = param_groups(model, 0.05, no_weight_decay_groups=True)
    no_decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0))
    decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0.05))
    params = dict(model.named_parameters())
    assert no_decay == {
        n for n, p in params.items() if p.requires_grad and (p.ndim <= 1 or n in model.no_weight_decay())
    }
    assert decay == {n for n, p in params.items() if p.requires_grad} - no_decay
    assert "beit3.encoder.embed_positions.A.weight" in no_decay and "bbox_embed.layers.0.weight" in decay


@pytest.mark.parametrize("split", [False, True])
def test_layer_decay_scales_follow_the_layer_ids(split):
    model = _model()
    groups = param_groups(model, 0.05, no_weight_decay_groups=split, layer_decay=0.5)
    depth = model.cfg.depth
    seen = set()
    for g in groups:
        for name in _names(model, g):
            assert g["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - model.layer_id(name))), name
            if not split:
                assert g["weight_decay"] == 0.05
            seen.add(name)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    scales = {model.layer_id(n): g["lr_scale"] for g in groups for n in _names(model, g)}
    assert scales == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}  # embeddings, layer 0, layer 1, the rest


def _configure(optim: dict, max_epochs: int = 4, steps: int = 100):
    module = SimpleNamespace(
        device=torch.device("cpu"),
        trainer=SimpleNamespace(max_epochs=max_epochs, estimated_stepping_batches=steps),
    )
    return configure_optimizers(module, _model(), optim)


def _optim(**scheduler) -> dict:
    return {
        "lr": 1.0,
        "weight_decay": 1e-4,
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "fused": True,
        },
        "scheduler": {"_target_": "oneref.tasks.optim.cosine_schedule", "_partial_": True, **scheduler},
    }


def _lrs(conf: dict, n: int) -> list[float]:
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_official_cosine_per_epoch():
    conf = _configure(_optim(interval="epoch", warmup_steps=0, min_lr_ratio=0.0), max_epochs=4)
    assert isinstance(conf["optimizer"], torch.optim.AdamW) and conf["lr_scheduler"]["interval"] == "epoch"
    assert not conf["optimizer"].defaults["fused"]  # fused only on CUDA
    assert conf["optimizer"].defaults["betas"] == (0.9, 0.999)
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]  # train_oneref.py's factor
    assert _lrs(conf, 4) == pytest.approx(expected)


def test_warmup_then_per_step_cosine_to_a_floor():
    conf = _configure(_optim(interval="step", warmup_steps=4, min_lr_ratio=0.1), steps=14)
    lrs = _lrs(conf, 16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    t = [(s - 4) / 10 for s in range(4, 16)]
    assert lrs[4:] == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(x, 1.0))) for x in t])
    assert lrs[-1] == pytest.approx(0.1)


def test_constant_schedule_and_another_optimizer():
    optim = _optim(warmup_steps=2)
    optim["scheduler"]["_target_"] = "oneref.tasks.optim.constant_schedule"
    optim["optimizer"] = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    conf = _configure(optim)
    assert isinstance(conf["optimizer"], torch.optim.SGD)
    assert _lrs(conf, 4) == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_a_torch_scheduler_works_too():
    optim = _optim()
    optim["scheduler"] = {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "gamma": 0.5}
    assert _lrs(_configure(optim), 4) == pytest.approx([1.0, 1.0, 0.5, 0.5])


def test_bad_optim_configs():
    with pytest.raises(ValueError, match="interval must be"):
        _configure(_optim(interval="batch"))
    with pytest.raises(ValueError, match="needs trainer.max_epochs"):
        _configure(_optim(), max_epochs=-1)
    optim = _optim()
    del optim["optimizer"]["_target_"]
    with pytest.raises(ValueError, match="optim.optimizer needs a _target_"):
        _configure(optim)
