"""The fast paths and their exactness: FlexAttention against SDPA, torch.compile without graph
breaks, bf16 autocast against the official fp32 outputs, fixed text lengths, loader workers, and
the throughput callback. No timings: scripts/benchmark.py measures speed."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from oneref.checkpoint import load_model
from oneref.data.config import check_text_buckets
from oneref.data.datasets import RefCollate, pad_to_bucket
from oneref.data.workers import MAX_AUTO_WORKERS, resolve_num_workers
from oneref.models.beit3 import key_padding_block_mask
from oneref.models.registry import create_model
from oneref.parity import PARITY_TOL, golden_config, golden_numerics
from oneref.tasks.throughput import FlopModel, RichProgressBar, Throughput, count_forward_flops, peak_flops
from oneref.train import train

# bf16 autocast against the official fp32 outputs on the golden set (measured on official-tiny:
# pred_box 2.0e-3, vision/language cls 3.7e-3 / 2.8e-3, seg_mask 4.4e-3, encoder 0.7% relative);
# documented in docs/benchmarks.md.
BF16_TOL = {"pred_box": 0.01, "vision_cls": 0.02, "language_cls": 0.02, "seg_mask": 0.02}
BF16_ENCODER_REL_TOL = 0.02

# eager FlexAttention on the CPU warns that it is unfused: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("tiny", img_size=32, patch_size=8, vocab_size=100, **kw).eval()


def _inputs(b: int = 3, n: int = 9, padded: bool = True):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(4, 100, (b, n), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(b, n, dtype=torch.bool)
    if padded:
        pad[1:, 5:] = True
        pad[2:, 3:] = True
        ids[pad] = 1
    return image, ids, pad if padded else None


# -- attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [8, 128])
def test_key_padding_block_mask_is_the_key_mask(block_size: int) -> None:
    # 17 vision keys + text of 5, 12 and 20 ids: empty, partial and full blocks at block size 8
    n = 37
    attend = torch.ones(3, n, dtype=torch.bool)
    attend[0, 22:] = False
    attend[1, 29:] = False
    mask = key_padding_block_mask(attend, block_size=block_size)
    dense = mask.to_dense()  # (B, 1, q blocks, kv blocks): 1 where any key of the block is attended
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(attend, (0, blocks * block_size - n))
    expected = padded.view(3, blocks, block_size).any(-1)
    assert dense.shape == (3, 1, blocks, blocks)
    assert torch.equal(dense.bool(), expected[:, None, None, :].expand(3, 1, blocks, blocks))
    # and the mask itself, element by element, through the mask_mod
    b, kv = torch.meshgrid(torch.arange(3), torch.arange(n), indexing="ij")
    zero = torch.zeros_like(b)
    assert torch.equal(mask.mask_mod(b, zero, zero, kv), attend)


def test_flex_attention_equals_sdpa() -> None:
    model = _tiny(seg_head=True)
    image, ids, pad = _inputs()
    with torch.no_grad():
        ref = model(image, ids, pad)
        model.beit3.set_attention("flex")
        out = model(image, ids, pad)
    for key in ("pred_box", "seg_mask", "vision_tokens", "text_tokens"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)


def test_flex_trains_on_the_cpu_through_sdpa() -> None:
    # CPU FlexAttention has no backward: with gradients the CPU keeps SDPA, with the same result
    model = _tiny()
    image, ids, pad = _inputs()
    grads = []
    for kind in ("sdpa", "flex"):
        model.beit3.set_attention(kind)
        model.zero_grad()
        model(image, ids, pad)["pred_box"].sum().backward()
        grads.append(model.beit3.text_embed.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_unknown_attention_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        _tiny().beit3.set_attention("flash")


def test_golden_parity_holds_with_flex(golden_dir: Path) -> None:
    model, _ = load_model(golden_dir / "checkpoint.pth", golden_config(golden_dir), "official")
    model.eval().beit3.set_attention("flex")
    inputs = torch.load(golden_dir / "inputs.pt", weights_only=True)
    ref = torch.load(golden_dir / "outputs_eval.pt", weights_only=True)
    with golden_numerics(), torch.no_grad():
        out = model(inputs["image"], inputs["text_ids"], inputs["text_padding_mask"])
    assert inputs["text_padding_mask"].any(), "the golden inputs must exercise the padding mask"
    for key in ("pred_box", "vision_cls", "language_cls", "seg_mask"):
        if key in ref:
            assert (out[key].double() - ref[key].double()).abs().max() <= PARITY_TOL, key


# -- torch.compile without graph breaks -----------------------------------------------------------
# flex without padding is the sdpa path (no mask), so it is not repeated
@pytest.mark.parametrize(("attention", "padded"), [("sdpa", True), ("sdpa", False), ("flex", True)])
def test_whole_forward_compiles_fullgraph(attention: str, padded: bool) -> None:
    torch._dynamo.reset()
    model = _tiny(seg_head=True)
    model.beit3.set_attention(attention)
    image, ids, pad = _inputs(padded=padded)
    train = attention == "sdpa"  # CPU FlexAttention runs without gradients only
    model.train(train)
    with torch.set_grad_enabled(train):
        ref = model(image, ids, pad)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(image, ids, pad)
    torch.testing.assert_close(out["pred_box"], ref["pred_box"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["seg_mask"], ref["seg_mask"], atol=1e-6, rtol=1e-6)
    if train:
        out["pred_box"].sum().backward()
        assert model.beit3.encoder.layers[0].self_attn.q_proj.B.weight.grad is not None
    torch._dynamo.reset()


def test_compiled_layers_take_a_new_flex_mask_every_step_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _tiny()
    model.beit3.set_attention("flex")
    model.beit3.compile_layers(backend="aot_eager")
    image, ids, _ = _inputs()
    with torch.no_grad():
        for cut in (3, 5, 8):  # a different key mask (and BlockMask object) per step, one shape
            pad = torch.zeros_like(ids, dtype=torch.bool)
            pad[1:, cut:] = True
            model(image, ids, pad)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every layer and step
    torch._dynamo.reset()


def test_compile_layers_keeps_state_dict_keys() -> None:
    torch._dynamo.reset()
    model = _tiny()
    keys = list(model.state_dict())
    model.beit3.compile_layers(backend="aot_eager", fullgraph=True)
    image, ids, pad = _inputs()
    with torch.no_grad():
        model(image, ids, pad)
    assert list(model.state_dict()) == keys
    torch._dynamo.reset()


# -- bf16 against the official fp32 outputs --------------------------------------------------------
def test_bf16_autocast_stays_within_the_documented_tolerance(golden_dir: Path) -> None:
    model, _ = load_model(golden_dir / "checkpoint.pth", golden_config(golden_dir), "official")
    model.eval()
    inputs = torch.load(golden_dir / "inputs.pt", weights_only=True)
    ref = torch.load(golden_dir / "outputs_eval.pt", weights_only=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs["image"], inputs["text_ids"], inputs["text_padding_mask"])
    errors = {k: (out[k].float() - ref[k].float()).abs().max().item() for k in BF16_TOL if k in ref}
    assert max(errors.values()) > 100 * PARITY_TOL  # bf16 did run (fp32 agrees to PARITY_TOL)
    for key, err in errors.items():
        assert err <= BF16_TOL[key], f"{key}: {err} > {BF16_TOL[key]}"
    enc = torch.cat([out["vision_tokens"], out["text_tokens"]], dim=1).float()
    rel = ((enc - ref["encoder_out"]).norm() / ref["encoder_out"].norm()).item()
    assert rel <= BF16_ENCODER_REL_TOL


# -- fixed text lengths -------------------------------------------------------------------------
def test_text_buckets_pad_to_the_smallest_that_holds_the_batch() -> None:
    ids = torch.tensor([[0, 5, 2, 1], [0, 5, 6, 2]])
    pad = ids == 1
    out_ids, out_pad = pad_to_bucket(ids, pad, (3, 8, 16))
    assert out_ids.shape == (2, 8) and out_pad.shape == (2, 8)
    assert torch.equal(out_ids[:, :4], ids) and (out_ids[:, 4:] == 1).all()
    assert torch.equal(out_pad[:, :4], pad) and out_pad[:, 4:].all()
    same_ids, same_pad = pad_to_bucket(ids, pad, (4, 8))
    assert same_ids is ids and same_pad is pad
    with pytest.raises(ValueError, match="exceed the largest of data.text_buckets"):
        pad_to_bucket(ids, pad, (2, 3))


def test_text_buckets_change_no_output_of_the_real_tokens() -> None:
    model = _tiny()
    image, ids, pad = _inputs()
    wide_ids, wide_pad = pad_to_bucket(ids, pad, (16,))
    with torch.no_grad():
        ref, out = model(image, ids, pad), model(image, wide_ids, wide_pad)
    torch.testing.assert_close(out["pred_box"], ref["pred_box"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        out["text_tokens"][:, : ids.shape[1]], ref["text_tokens"], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("buckets", "match"),
    [
        ([16, 32], "must reach data.max_query_len=64"),
        ([0, 64], "positive lengths"),
        (["a"], "list of ints"),
    ],
)
def test_bad_text_buckets_are_clear_errors(buckets, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_text_buckets(buckets, 64)


def test_buckets_are_sorted_and_deduplicated() -> None:
    assert RefCollate(12, text_buckets=[12, 4, 8, 4]).text_buckets == (4, 8, 12)
    assert RefCollate(12, text_buckets=None).text_buckets is None


def test_buckets_and_pad_to_max_len_together_are_an_error() -> None:
    with pytest.raises(ValueError, match="set one"):
        RefCollate(64, pad_to_max_len=True, text_buckets=[32, 64])


def test_text_buckets_reach_the_training_batches(make_cfg) -> None:
    from oneref import factory

    cfg = make_cfg("data.text_buckets=[8,16,20]")
    dm = factory.build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_ids"].shape[1] in (8, 16, 20)
    assert dm.hparams["data"]["text_buckets"] == [8, 16, 20]


# -- loader workers -------------------------------------------------------------------------------
def test_num_workers_auto_uses_the_cpus_per_device(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert resolve_num_workers("auto", devices=8) == 3  # 32 / 8 - 1 for the main process
    assert resolve_num_workers("auto", devices=1) == MAX_AUTO_WORKERS
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_num_workers("auto", devices=1) == 0
    assert resolve_num_workers(3) == 3


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_bad_num_workers_is_a_clear_error(value) -> None:
    with pytest.raises(ValueError, match="data.num_workers must be an int >= 0 or 'auto'"):
        resolve_num_workers(value)


def test_real_datasets_default_to_auto_workers_and_pinned_memory(make_cfg) -> None:
    from omegaconf import OmegaConf

    from oneref.config import config_dir

    real = OmegaConf.load(Path(config_dir()) / "data" / "_real.yaml")
    assert real.num_workers == "auto" and real.pin_memory is True and real.text_buckets is None


# -- FLOPs and the throughput callback -----------------------------------------------------------
def test_flop_model_is_exact_at_every_text_length() -> None:
    model = _tiny(seg_head=True)
    flops = FlopModel(model.cfg)
    for n in (5, 20, 64):
        image, ids, _ = _inputs(b=1, n=n, padded=False)
        # the math kernel: FlopCounterMode does not count the CPU's fused SDPA
        with sdpa_kernel(SDPBackend.MATH):
            assert flops(n) == pytest.approx(count_forward_flops(model, image, ids), rel=1e-12)
    assert flops(64) > flops(20) > 0


def test_peak_flops_is_none_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert peak_flops() is None


def test_bad_throughput_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        Throughput(every_n_steps=0)
    with pytest.raises(ValueError, match="peak_flops must be a number"):
        Throughput(peak_flops="fast")


def test_throughput_is_logged_next_to_the_loss(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "logger=csv",
        "trainer.max_epochs=1",
        "data.batch_size=16",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=2",
        "callbacks.throughput.peak_flops=1e12",  # any number: MFU is logged once a peak is known
        "test=false",
    )
    cfg.logger = {
        "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path / "csv")}
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    (path,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    perf = [r for r in rows if r.get("perf/samples_per_s")]
    # at the steps Lightning logs the loss (2 and 4; the first batch only starts the clock)
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in perf] == loss_steps == [1, 3]
    for r in perf:
        assert float(r["perf/samples_per_s"]) > 0
        assert float(r["perf/samples_per_s_per_device"]) == pytest.approx(float(r["perf/samples_per_s"]))
        assert float(r["perf/tflops_per_s_per_device"]) > 0
        assert 0 < float(r["perf/mfu"]) == pytest.approx(float(r["perf/tflops_per_s_per_device"]) / 1)
    assert any(r.get("train/loss") for r in rows)


def test_progress_bar_refreshes_metrics_at_the_logging_cadence(monkeypatch) -> None:
    bar = RichProgressBar(metrics_every_n_steps=3)
    calls = []
    monkeypatch.setattr(bar, "_update_metrics", lambda trainer, module: calls.append(1))
    monkeypatch.setattr(bar, "_update", lambda *a, **k: None)
    monkeypatch.setattr(bar, "refresh", lambda *a, **k: None)
    bar.train_progress_bar_id = 0

    class FakeTrainer:
        log_every_n_steps = 50

    for i in range(7):
        bar.on_train_batch_end(FakeTrainer(), None, None, None, i)
    assert len(calls) == 2  # after batches 3 and 6
