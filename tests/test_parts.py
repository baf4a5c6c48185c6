"""The map of the model's parts (oneref.models.oneref.PARTS) and everything that reads it: freezing
what no enabled loss reaches, weight-decay groups, layer ids, checkpoint key groups."""

from __future__ import annotations

import pytest
from torch import nn

import oneref.models.oneref as oneref_model
from oneref.checkpoint import LoadError, convert_state_dict, key_group, load_into, official_keys
from oneref.checkpoint.keys import _official_keys
from oneref.factory import build_datamodule, build_module
from oneref.models.oneref import PARTS, OneRef, Part, part_row
from oneref.models.registry import model_config
from oneref.tasks.losses import LOSS_REACH
from oneref.tasks.optim import param_groups

TINY = dict(embed_dim=32, num_heads=2, depth=2, ffn_dim=64, img_size=32, patch_size=8, vocab_size=50)
EVERY_HEAD = dict(seg_head=True, mim_codebook_size=16, mlm_head=True)


def test_every_tensor_is_in_exactly_one_part():
    model = OneRef(model_config("tiny", **TINY, **EVERY_HEAD))
    for name in model.state_dict():
        rows = [row for row in PARTS if row.matches(name)]
        assert len(rows) == 1, (name, rows)
    assert set(model.part_names().values()) == {row.part for row in PARTS}
    # the mask token is its own part: only masked image modelling reads it
    assert part_row("beit3.vision_embed.mask_token").part == "mask_token"
    assert key_group("beit3.vision_embed.mask_token") == "backbone"
    assert {key_group(k) for k in model.state_dict()} == {"backbone", "grounding", "seg", "mim", "mlm"}


def test_no_decay_and_layer_ids_come_from_the_map():
    model = OneRef(model_config("tiny", **TINY))
    assert model.no_weight_decay() == {
        "logit_scale",
        "beit3.vision_embed.mask_token",
        "beit3.vision_embed.cls_token",
        "beit3.encoder.embed_positions.A.weight",
        "beit3.encoder.embed_positions.B.weight",
    }
    assert model.layer_id("beit3.text_embed.weight") == 0
    assert model.layer_id("beit3.encoder.layers.1.ffn.A.fc1.weight") == 2
    assert (
        model.layer_id("beit3.encoder.layer_norm.B.bias") == model.layer_id("bbox_embed.layers.0.weight") == 3
    )


# -- every task trains exactly what its losses reach ------------------------------------------------------
TASKS = [
    ("task=rec",),
    ("task=rec", "task.frozen_backbone=true", "task.losses.use_box_mask_constraints=false"),  # stage 1
    ("task=rec", "task.losses.use_contrastive_loss=true"),
    ("task=res",),
    ("task=res", "task.frozen_backbone=true"),
    ("task=rec_mixup", "data=synthetic"),
    ("task=res_mixup", "data=synthetic"),
]


@pytest.mark.parametrize("overrides", TASKS, ids=lambda o: " ".join(o))
def test_one_step_reaches_every_trainable_parameter(make_cfg, overrides):
    """What DDP needs without find_unused_parameters: every trainable parameter gets a gradient
    (before the fix, mask_token was trainable and unused in every REC/RES run)."""
    cfg = make_cfg(*overrides, "data.batch_size=4")
    module = build_module(cfg)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss = module.criterion(module(batch), batch, logit_scale=module.model.logit_scale)["loss"]
    loss.backward()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    unreached = sorted(n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None)
    assert trainable and not unreached, unreached
    frozen_parts = module.model.parts() - {part_row(n).part for n in trainable}
    assert {"mask_token", "text_proj"} <= frozen_parts
    if cfg.task.frozen_backbone:
        assert "backbone" in frozen_parts


def test_loss_reach_names_real_parts():
    parts = {row.part for row in PARTS}
    for flag, reached in LOSS_REACH.items():
        assert reached <= parts, (flag, reached - parts)


# -- a head added to the map alone -------------------------------------------------------------------------
@pytest.fixture
def extra_head(monkeypatch):
    """OneRef with one more head, declared only by its module and one PARTS row."""
    real_init = OneRef.__init__

    def init(self, cfg):
        real_init(self, cfg)
        self.extra_head = nn.Linear(cfg.embed_dim, 3)

    monkeypatch.setattr(OneRef, "__init__", init)
    monkeypatch.setattr(
        oneref_model, "PARTS", (*PARTS, Part(prefix="extra_head.", part="extra_head", key_group="grounding"))
    )
    _official_keys.cache_clear()
    yield
    _official_keys.cache_clear()


def test_a_head_added_to_the_map_alone_is_frozen_decayed_and_converted(extra_head):
    cfg = model_config("tiny", **TINY)
    model = OneRef(cfg)
    assert model.part_names()["extra_head.weight"] == "extra_head"
    # frozen: no loss reaches it
    model.set_trainable(set().union(*LOSS_REACH.values()))
    assert not model.extra_head.weight.requires_grad and model.beit3.text_embed.weight.requires_grad
    # decayed like any other matrix (its bias is 1-D)
    model.extra_head.requires_grad_(True)
    groups = param_groups(model, 0.05, no_weight_decay_groups=True)
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert id(model.extra_head.weight) in decay and id(model.extra_head.bias) not in decay
    # converted: in the official key table, its group may be allowed missing like any head
    assert "extra_head.weight" in official_keys(cfg) and key_group("extra_head.bias") == "grounding"
    sd = OneRef(cfg).state_dict()
    out, report = convert_state_dict(sd, cfg)
    assert "extra_head.weight" in report.mapped and not report.unexpected
    partial = {k: v for k, v in sd.items() if not k.startswith("extra_head.")}
    with pytest.raises(LoadError, match="extra_head.weight"):
        load_into(model, partial)
    load_into(model, partial, strict=False, allow_missing=("heads",))


def test_set_trainable_refuses_unknown_parts():
    with pytest.raises(ValueError, match="unknown model parts"):
        OneRef(model_config("tiny", **TINY)).set_trainable({"box"})


def test_unmapped_tensor_is_named():
    model = OneRef(model_config("tiny", **TINY))
    model.stray = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="stray.weight is in no row"):
        model.part_names()
