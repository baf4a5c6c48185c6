"""Model behaviour beyond golden parity: shapes, padding, options, init and bad input."""

from __future__ import annotations

import pytest
import torch

from oneref.models.beit3 import POSITION_OFFSET, sincos_2d
from oneref.models.oneref import OneRef
from oneref.models.registry import create_model, model_config

TINY = dict(embed_dim=32, num_heads=2, depth=2, ffn_dim=64, img_size=32, patch_size=8, vocab_size=50)


def _inputs(b: int = 2, n_text: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(4, 50, (b, n_text), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(b, n_text, dtype=torch.bool)
    pad[1, 3:] = True  # the second expression is shorter
    ids[pad] = 1
    return image, ids, pad


def test_output_shapes_with_every_head() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **TINY, seg_head=True).eval()
    out = model(*_inputs())
    g = 4
    assert out["pred_box"].shape == (2, 4) and ((out["pred_box"] > 0) & (out["pred_box"] < 1)).all()
    assert out["visu_sim"].shape == (2, g * g) and out["visu_sim"].abs().max() <= 1 + 1e-6
    assert out["seg_mask"].shape == (2, 1, 8 * g, 8 * g)
    assert out["vision_tokens"].shape == (2, g * g + 1, 32) and out["text_tokens"].shape == (2, 5, 32)
    torch.testing.assert_close(out["language_cls"].norm(dim=-1), torch.ones(2))


def test_extra_padding_changes_no_output() -> None:
    """Padding to the batch's longest or to max_query_len gives the same boxes (pads are key-masked and zeroed)."""
    torch.manual_seed(0)
    model = create_model("tiny", **TINY).eval()
    image, ids, pad = _inputs()
    longer_ids = torch.cat([ids, torch.ones(2, 4, dtype=ids.dtype)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(2, 4, dtype=torch.bool)], dim=1)
    a, b = model(image, ids, pad), model(image, longer_ids, longer_pad)
    torch.testing.assert_close(a["pred_box"], b["pred_box"], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["vision_tokens"], b["vision_tokens"], atol=1e-5, rtol=0)


def test_grad_checkpointing_gives_the_same_outputs_and_grads() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **TINY)
    ckpt = create_model("tiny", **TINY)
    ckpt.load_state_dict(model.state_dict())
    ckpt.set_grad_checkpointing(True)
    inputs = _inputs()
    outs = [m(*inputs)["pred_box"] for m in (model, ckpt)]
    torch.testing.assert_close(outs[0], outs[1])
    for out in outs:
        out.sum().backward()
    g0 = model.beit3.encoder.layers[0].self_attn.q_proj.A.weight.grad
    g1 = ckpt.beit3.encoder.layers[0].self_attn.q_proj.A.weight.grad
    torch.testing.assert_close(g0, g1)


def test_similarity_temperature_changes_only_the_pooling() -> None:
    torch.manual_seed(0)
    plain = create_model("tiny", **TINY).eval()
    sharp = create_model("tiny", **TINY, similarity_temperature=0.1).eval()
    sharp.load_state_dict(plain.state_dict())
    inputs = _inputs()
    a, b = plain(*inputs), sharp(*inputs)
    torch.testing.assert_close(a["visu_sim"], b["visu_sim"])  # raw cosines either way
    assert not torch.allclose(a["pred_box"], b["pred_box"])


def test_seg_temperature_scales_the_mask_logits_not_the_prediction() -> None:
    from oneref.tasks.metrics import res_pred_mask

    torch.manual_seed(0)
    plain = create_model("tiny", **TINY, seg_head=True).eval()
    sharp = create_model("tiny", **TINY, seg_head=True, seg_temperature=0.1).eval()
    sharp.load_state_dict(plain.state_dict())
    inputs = _inputs()
    a, b = plain(*inputs), sharp(*inputs)
    assert a["seg_mask"].abs().max() <= 1 + 1e-6  # official: cosines
    torch.testing.assert_close(b["seg_mask"], a["seg_mask"] / 0.1)
    torch.testing.assert_close(a["pred_box"], b["pred_box"])
    assert torch.equal(res_pred_mask(a["seg_mask"], (32, 32)), res_pred_mask(b["seg_mask"], (32, 32)))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="seg_temperature must be a positive number"):
            model_config("tiny", **TINY, seg_temperature=bad)


def test_sincos_position_init() -> None:
    code = sincos_2d(4, 16)
    assert code.shape == (16, 16)
    # patch (row 1, col 2): the first half encodes the row, the second the column
    torch.testing.assert_close(code[1 * 4 + 2, 0], torch.tensor(1.0).sin())
    torch.testing.assert_close(code[1 * 4 + 2, 8], torch.tensor(2.0).sin())
    torch.testing.assert_close(code[1 * 4 + 2, 4], torch.tensor(1.0).cos())
    torch.manual_seed(0)
    model = create_model("tiny", **TINY, position_init="sincos")
    table = model.beit3.encoder.embed_positions.A.weight
    assert table.requires_grad  # initialised, still learned
    torch.testing.assert_close(table[POSITION_OFFSET], torch.zeros(32))
    torch.testing.assert_close(table[POSITION_OFFSET + 1 :], sincos_2d(4, 32))
    with pytest.raises(ValueError, match="position_init"):
        model_config("tiny", **TINY, position_init="learned")


def test_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        model_config("huge")
    with pytest.raises(ValueError, match="not divisible"):
        model_config("tiny", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model_config("tiny", img_size=36, patch_size=8)


def test_text_longer_than_the_position_table_is_an_error() -> None:
    model = OneRef(model_config("tiny", **{**TINY, "max_source_positions": 6}))
    image, _, _ = _inputs()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed"):
        model(image, ids, torch.zeros(2, 8, dtype=torch.bool))


# -- model.runtime: how the model runs, apart from what it is ----------------------------------------
def test_model_runtime_split_round_trips_and_reads_old_checkpoints(make_cfg) -> None:
    from oneref.config import to_container
    from oneref.models.registry import config_from_options
    from oneref.models.runtime import ModelRuntime, join_model_options, split_model_options

    model = to_container(make_cfg("model=base", "model.runtime.attention=flex").model)
    size, arch, runtime = split_model_options(model)
    assert size == "base" and runtime == ModelRuntime(attention="flex")
    assert "runtime" not in arch and set(arch) <= set(config_from_options(model).to_dict())
    assert join_model_options(size, arch, runtime) == model
    # our .ckpt files written before model.runtime carry its keys at the top level of `model`
    old = {k: v for k, v in model.items() if k != "runtime"} | runtime.to_dict()
    assert split_model_options(old) == (size, arch, runtime)
    assert config_from_options(old) == config_from_options(model)


def test_model_runtime_bad_keys_are_user_errors() -> None:
    from oneref.errors import UserError
    from oneref.models.runtime import split_model_options

    with pytest.raises(UserError, match=r"model.runtime: unknown key\(s\) \['compiled'\]"):
        split_model_options({"size": "tiny", "runtime": {"compiled": True}})
    with pytest.raises(UserError, match=r"model: unknown key\(s\) \['embed_dims'\]"):
        split_model_options({"size": "tiny", "embed_dims": 8})
    with pytest.raises(UserError, match="model.runtime.attention must be one of"):
        split_model_options({"size": "tiny", "runtime": {"attention": "flash"}})
    with pytest.raises(UserError, match="disagree"):
        split_model_options({"size": "tiny", "compile": True, "runtime": {"compile": False}})


def test_module_hyperparameters_keep_runtime_and_training_facts_nested(make_cfg, tmp_path) -> None:
    from oneref.config import to_container
    from oneref.factory import build_module
    from oneref.tasks.grounding import GroundingModule

    cfg = make_cfg("model.runtime.grad_checkpointing=true")
    module = build_module(cfg)
    # no top-level `dataset`: Lightning merges these with the DataModule's for the loggers
    assert "dataset" not in module.hparams and module.hparams.training == {"dataset": "synthetic"}
    assert module.hparams.model["runtime"]["grad_checkpointing"] and module.model.beit3.grad_checkpointing
    # a .ckpt written before model.runtime and training: runtime keys and dataset at the top level
    old_model = {k: v for k, v in to_container(cfg.model).items() if k != "runtime"}
    old_model |= to_container(cfg.model.runtime)
    hparams = {"model": old_model, "task": to_container(cfg.task), "optim": to_container(cfg.optim)}
    hparams |= {"dataset": "refcoco", "architecture": dict(module.hparams.architecture)}
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": "2.5.0",
        },
        path,
    )
    old = GroundingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert old.dataset_name == "refcoco" and old.hparams.training == {"dataset": "refcoco"}
    assert old.hparams.model == module.hparams.model and "dataset" not in old.hparams
    assert old.model.beit3.grad_checkpointing
    for key, value in module.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
    # the checkpoint descriptor reads the training set from either layout
    from oneref.checkpoint import Checkpoint

    new = tmp_path / "new.ckpt"
    torch.save({**torch.load(path, weights_only=True), "hyper_parameters": dict(module.hparams)}, new)
    assert Checkpoint.open(new, "lightning").dataset == "synthetic"
    assert Checkpoint.open(path, "lightning").dataset == "refcoco"
