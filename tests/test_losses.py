"""Losses against the official golden set and against independent reference formulas."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oneref.checkpoint import load_checkpoint_file
from oneref.models.oneref import OneRef
from oneref.parity import golden_config
from oneref.tasks.losses import (
    GroundingCriterion,
    LossFlags,
    box_giou,
    box_l1,
    box_mask_constraint,
    clip_loss,
    contrastive_loss,
    dice_loss,
    downsample_mask_nearest,
    mim_loss,
    mim_vts_loss,
    seg_loss,
    sigmoid_focal_loss,
)


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict:
    return {
        "cases": json.loads((golden_dir / "losses.json").read_text())["cases"],
        "inputs": torch.load(golden_dir / "inputs.pt"),
        "outputs_train.pt": torch.load(golden_dir / "outputs_train.pt"),
        "outputs_train_nomim.pt": torch.load(golden_dir / "outputs_train_nomim.pt"),
    }


@pytest.fixture(scope="session")
def model(golden_dir: Path) -> OneRef:
    m = OneRef(golden_config(golden_dir))
    m.load_state_dict(load_checkpoint_file(golden_dir / "checkpoint.pth")["model"], strict=True)
    return m.train()


def run_model(model: OneRef, inputs: dict, mim: bool) -> dict:
    # A fresh copy per call: train-mode BatchNorm updates its running stats.
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        return m(
            inputs["image"],
            inputs["text_ids"],
            inputs["text_padding_mask"],
            inputs["mim_masked_pos"] if mim else None,
            mim_vts=mim,
        )


def criterion_for(case: dict) -> GroundingCriterion:
    return GroundingCriterion(LossFlags.from_official_args(case["relevant_args"]))


def targets_for(case: dict, inputs: dict) -> dict:
    return {
        "box": inputs["gt_boxes"],
        "obj_mask": inputs[case["target_mask"]],
        "mim_codes": inputs["mim_codebook_ids"],
        "mim_mask": inputs["mim_masked_pos"],
        "mim_vts": inputs["mim_vts_labels"],
    }


def check_case(result: dict, case: dict, rtol: float = 0.0, atol: float = 1e-5) -> None:
    expected = dict(case["terms"], loss=case["total"])
    assert set(result) == set(expected), (sorted(result), sorted(expected))
    assert list(result)[:-1] == list(case["terms"]), "terms must come in the official order"
    for key, value in expected.items():
        torch.testing.assert_close(result[key], torch.tensor(value), rtol=rtol, atol=atol, msg=key)


CASES = [
    "rec",
    "res",
    "rec_with_contrastive",
    "rec_nomim_forward",
    "res_nomim_forward",
    "mrefm_official",
    "mrefm_with_vts",
]


@pytest.mark.parametrize("name", CASES)
def test_golden_case_from_stored_outputs(golden: dict, model: OneRef, name: str) -> None:
    """Every losses.json case from the stored official outputs (contrastive: from our model)."""
    case, inputs = golden["cases"][name], golden["inputs"]
    stored = golden[case["outputs_from"]]
    b, n = inputs["mim_masked_pos"].shape
    outputs = {
        "pred_box": stored["pred_box"],
        "visu_sim": stored["visu_token_similarity"],
        "seg_mask": stored["seg_mask"],
    }
    if "mim_pred" in stored and case["relevant_args"]["enable_ref_mim"]:
        # The official stores logits of the masked patches only; the visible ones must not matter.
        full = (
            torch.randn(b, n, stored["mim_pred"].shape[-1], generator=torch.Generator().manual_seed(0)) * 10
        )
        full[inputs["mim_masked_pos"]] = stored["mim_pred"]
        outputs["mim_logits"] = full
        outputs["mim_vts_pred"] = stored["mim_vts_pred"]
    logit_scale = None
    if case["relevant_args"]["use_contrastive_loss"]:
        ours = run_model(model, inputs, mim=case["outputs_from"] == "outputs_train.pt")
        outputs["vision_cls"], outputs["language_cls"] = ours["vision_cls"], ours["language_cls"]
        logit_scale = model.logit_scale.detach()
    check_case(criterion_for(case)(outputs, targets_for(case, inputs), logit_scale=logit_scale), case)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_end_to_end(golden: dict, model: OneRef, name: str) -> None:
    """The same cases straight from our model's outputs (mim_logits for all patches)."""
    case, inputs = golden["cases"][name], golden["inputs"]
    outputs = run_model(model, inputs, mim=case["outputs_from"] == "outputs_train.pt")
    result = criterion_for(case)(outputs, targets_for(case, inputs), logit_scale=model.logit_scale.detach())
    # Model outputs match the golden ones to ~5e-6; the x20 focal term amplifies that slightly.
    check_case(result, case, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored_name,mim", [("outputs_train.pt", True), ("outputs_train_nomim.pt", False)])
def test_contrastive_equals_official_contrast_loss(
    golden: dict, model: OneRef, stored_name: str, mim: bool
) -> None:
    inputs, stored = golden["inputs"], golden[stored_name]
    out = run_model(model, inputs, mim=mim)
    scale = model.logit_scale.detach()
    torch.testing.assert_close(
        clip_loss(out["vision_cls"], out["language_cls"], scale), stored["contrast_loss"], rtol=0, atol=1e-5
    )
    b = inputs["image"].shape[0]
    torch.testing.assert_close(
        contrastive_loss(out["vision_cls"], out["language_cls"], scale),
        stored["contrast_loss"] / b,
        rtol=0,
        atol=1e-5,
    )


# -- independent references ------------------------------------------------------------------------
def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cxcy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.8 + 0.02
    return torch.cat([cxcy, wh], dim=1)


def test_box_losses_match_detr_all_pairs_reference() -> None:
    pred, gt = _random_boxes(7, 1), _random_boxes(7, 2)
    gt[3] = pred[3]  # identical pair: GIoU 1

    def xyxy(b: torch.Tensor) -> torch.Tensor:
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)

    a, b = xyxy(pred), xyxy(gt)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    enc = (torch.max(a[:, None, 2:], b[:, 2:]) - torch.min(a[:, None, :2], b[:, :2])).clamp(min=0)
    enc_area = enc[..., 0] * enc[..., 1]
    giou = inter / union - (enc_area - union) / enc_area
    expected = (1 - torch.diag(giou)).sum() / 7
    torch.testing.assert_close(box_giou(pred, gt), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(box_l1(pred, gt), (pred - gt).abs().sum() / 7)
    assert box_giou(gt, gt).abs() < 1e-6


def test_focal_and_dice_match_formulas() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(4, 50, generator=g) > 0.6).double()
    p = x.sigmoid()
    ce = -(t * p.log() + (1 - t) * (1 - p).log())
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean(1).sum() / 4
    dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / 4
    torch.testing.assert_close(sigmoid_focal_loss(x, t), focal)
    torch.testing.assert_close(dice_loss(x, t), dice)


@pytest.mark.parametrize("size,grid", [(64, 4), (384, 24), (10, 6), (100, 7), (48, 48)])
def test_nearest_downsampling_equals_interpolate(size: int, grid: int) -> None:
    g = torch.Generator().manual_seed(size + grid)
    mask = torch.rand(2, 1, size, size, generator=g) > 0.5
    expected = F.interpolate(mask.float(), (grid, grid), mode="nearest")[:, 0] > 0.5
    assert torch.equal(downsample_mask_nearest(mask, grid), expected.flatten(1))
    # int64 0/1 masks (the official collate) give the same target
    assert torch.equal(downsample_mask_nearest(mask.long(), grid), expected.flatten(1))


def test_box_mask_constraint_samples_top_left_pixel_and_temperature() -> None:
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 4, 4] = True  # top-left pixel of patch (1,1) of a 2x2 grid
    mask[0, 0, 1, 1] = True  # inside patch (0,0) but not its top-left pixel
    assert downsample_mask_nearest(mask, 2).tolist() == [[False, False, False, True]]
    sim = torch.randn(1, 4)
    with_t = box_mask_constraint(sim, mask, temperature=0.1)
    scaled = box_mask_constraint(sim / 0.1, mask)
    for k in with_t:
        torch.testing.assert_close(with_t[k], scaled[k])
    assert not torch.allclose(with_t["loss_mrm_focal"], box_mask_constraint(sim, mask)["loss_mrm_focal"])


def test_seg_loss_upsamples_bilinear() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g) > 0.5
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False).flatten(1)
    t = mask.flatten(1).float()
    out = seg_loss(logits, mask)
    torch.testing.assert_close(out["loss_seg_focal"], sigmoid_focal_loss(up, t) * 20)
    torch.testing.assert_close(out["loss_seg_dice"], dice_loss(up, t) * 2)


def test_mim_losses_equal_gathered_reference() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, 17, generator=g)
    codes = torch.randint(0, 17, (3, 10), generator=g)
    masked = torch.rand(3, 10, generator=g) > 0.5
    masked[:, 0] = True
    expected = F.cross_entropy(logits[masked], codes[masked])
    torch.testing.assert_close(mim_loss(logits, codes, masked), expected)
    pred, target = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 4, generator=g)
    torch.testing.assert_close(
        mim_vts_loss(pred, target), F.l1_loss(pred, target, reduction="none").sum(-1).mean()
    )


def _synthetic_outputs(b: int = 3, g: int = 4, c: int = 11, d: int = 8, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_box": torch.rand(b, 4, generator=gen) * 0.5 + 0.25,
        "visu_sim": torch.rand(b, g * g, generator=gen) * 2 - 1,
        "seg_mask": torch.rand(b, 1, 8 * g, 8 * g, generator=gen) * 2 - 1,
        "vision_cls": F.normalize(torch.randn(b, d, generator=gen), dim=-1),
        "language_cls": F.normalize(torch.randn(b, d, generator=gen), dim=-1),
        "mim_logits": torch.randn(b, g * g, c, generator=gen),
        "mim_vts_pred": torch.randn(b, g * g, 4, generator=gen),
    }
    masked = torch.rand(b, g * g, generator=gen) > 0.5
    masked[:, 0] = True
    targets = {
        "box": torch.rand(b, 4, generator=gen) * 0.5 + 0.25,
        "obj_mask": torch.rand(b, 1, 16 * g, 16 * g, generator=gen) > 0.5,
        "mim_codes": torch.randint(0, c, (b, g * g), generator=gen),
        "mim_mask": masked,
        "mim_vts": torch.randn(b, g * g, 4, generator=gen),
    }
    return outputs, targets


ALL_ON = dict(
    use_regress_box=True,
    use_box_mask_constraints=True,
    use_mask_loss=True,
    use_contrastive_loss=True,
    enable_mim=True,
    enable_mim_vts=True,
)


def test_gradients_flow_and_are_finite() -> None:
    outputs, targets = _synthetic_outputs()
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    scale = torch.tensor(2.6593, requires_grad=True)
    losses = GroundingCriterion(LossFlags(**ALL_ON))(outputs, targets, logit_scale=scale)
    assert len(losses) == 10
    losses["loss"].backward()
    for key, value in outputs.items():
        assert value.grad is not None and torch.isfinite(value.grad).all(), key
        assert value.grad.abs().sum() > 0, key
    assert scale.grad is not None and torch.isfinite(scale.grad)
    # Visible patches get no MIM gradient.
    assert outputs["mim_logits"].grad[~targets["mim_mask"]].abs().max() == 0


def test_gradcheck_float64() -> None:
    # The criterion works in float32; gradcheck needs float64, so it checks the pure functions.
    outputs, targets = _synthetic_outputs(b=2, g=2, c=3, d=4, seed=1)
    args64 = {k: v.double().requires_grad_() for k, v in outputs.items()}
    t64 = {k: (v.double() if v.is_floating_point() else v) for k, v in targets.items()}
    assert torch.autograd.gradcheck(
        lambda p: box_giou(p, t64["box"]) + box_l1(p, t64["box"]), (args64["pred_box"],)
    )
    assert torch.autograd.gradcheck(
        lambda s: sum(box_mask_constraint(s, targets["obj_mask"]).values()), (args64["visu_sim"],)
    )
    assert torch.autograd.gradcheck(
        lambda v, t: contrastive_loss(v, t, torch.tensor(1.0, dtype=torch.float64)),
        (args64["vision_cls"], args64["language_cls"]),
    )
    assert torch.autograd.gradcheck(
        lambda m: mim_loss(m, targets["mim_codes"], targets["mim_mask"]), (args64["mim_logits"],)
    )


def test_bf16_autocast_inputs_give_fp32_losses() -> None:
    outputs, targets = _synthetic_outputs(seed=2)
    bf16 = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    criterion = GroundingCriterion(LossFlags(**ALL_ON))
    scale = torch.tensor(2.6593)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(bf16, targets, logit_scale=scale)
    reference = criterion({k: v.float() for k, v in bf16.items()}, targets, logit_scale=scale)
    for key, value in mixed.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_criterion_errors_name_the_missing_key() -> None:
    outputs, targets = _synthetic_outputs()
    del outputs["seg_mask"]
    with pytest.raises(KeyError, match="seg_mask"):
        GroundingCriterion(LossFlags(use_mask_loss=True))(outputs, targets)
    with pytest.raises(KeyError, match="logit_scale"):
        GroundingCriterion(LossFlags(use_contrastive_loss=True))(outputs, targets)
    del targets["mim_codes"]
    with pytest.raises(KeyError, match="mim_codes"):
        GroundingCriterion(LossFlags(enable_mim=True))(outputs, targets)
    with pytest.raises(ValueError, match="enable_mim"):
        LossFlags(enable_mim_vts=True)


def test_mim_terms_only_on_mim_steps() -> None:
    outputs, targets = _synthetic_outputs()
    outputs.pop("mim_logits")
    outputs.pop("mim_vts_pred")
    losses = GroundingCriterion(
        LossFlags(use_box_mask_constraints=True, enable_mim=True, enable_mim_vts=True)
    )(outputs, targets)
    assert list(losses) == ["loss_mrm_focal", "loss_mrm_dice", "loss"]


# -- distributed contrastive loss --------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        v = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
        t = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
        rows = slice(rank * 2, rank * 2 + 2)
        v_r, t_r = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
        loss = clip_loss(v_r, t_r, torch.tensor(1.5))
        loss.backward()
        torch.save({"loss": loss.detach(), "gv": v_r.grad, "gt": t_r.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_loss_gathers_across_ranks_with_gradients() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # spawn, not fork: forking after torch has run its OpenMP pool can deadlock the children.
        ctx = mp.start_processes(
            _ddp_worker, args=(2, f"{tmp}/init", tmp), nprocs=2, join=False, start_method="spawn"
        )
        # a stuck rendezvous must fail the test, never hang the suite
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the 2-process gloo group did not finish within 300 s")
        results = [torch.load(f"{tmp}/rank{r}.pt") for r in range(2)]

    gen = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(1.5).exp()
    total = 0
    for r in range(2):
        rows = slice(r * 2, r * 2 + 2)
        labels = torch.arange(2) + 2 * r
        ref = (
            F.cross_entropy(scale * v[rows] @ t.T, labels) + F.cross_entropy(scale * t[rows] @ v.T, labels)
        ) / 2
        torch.testing.assert_close(results[r]["loss"], ref.detach())
        total = total + ref
    total.backward()  # each rank's gradient = gradient of the sum of all ranks' losses
    for r in range(2):
        rows = slice(r * 2, r * 2 + 2)
        torch.testing.assert_close(results[r]["gv"], v.grad[rows])
        torch.testing.assert_close(results[r]["gt"], t.grad[rows])


# -- the loss flags ----------------------------------------------------------------------------------
def test_loss_flags_from_official_args_are_the_golden_cases_flags(golden: dict) -> None:
    for name, case in golden["cases"].items():
        a = case["relevant_args"]
        flags = LossFlags.from_official_args(a)
        assert flags == LossFlags(
            use_regress_box=a["use_regress_box"],
            use_box_mask_constraints=a["use_box_mask_constraints"] or a["enable_dynamic_mim"],
            use_mask_loss=a["use_mask_loss"],
            use_contrastive_loss=a["use_contrastive_loss"],
            enable_mim=a["enable_ref_mim"],
            enable_mim_vts=a["enable_mim_vts"],
            enable_mlm=a["enable_ref_mlm"],
            enable_mlm_sts=a["enable_mlm_sts"],
        ), name
    # an argparse Namespace reads the same; a switch it lacks is off, as under store_true
    import argparse

    a = golden["cases"]["rec"]["relevant_args"]
    assert LossFlags.from_official_args(argparse.Namespace(**a)) == LossFlags.from_official_args(a)
    assert LossFlags.from_official_args({}) == LossFlags()


@pytest.mark.parametrize(
    ("task", "official"),
    [  # the switches of the official scripts of each stage
        ("rec", {"use_regress_box": True, "use_box_mask_constraints": True}),
        ("res", {"use_mask_loss": True, "enable_seg_mask": True}),
        ("mrefm", {"enable_dynamic_mim": True, "enable_ref_mim": True, "enable_ref_mlm": True}),
    ],
)
def test_the_task_configs_run_the_official_losses(make_cfg, task: str, official: dict) -> None:
    cfg = make_cfg(f"task={task}")
    forced = {"enable_mim": True, "enable_mlm": True} if task == "mrefm" else {}
    assert LossFlags.from_config(cfg.task.losses, **forced) == LossFlags.from_official_args(official)


def test_loss_flags_bad_config_is_a_user_error() -> None:
    from oneref.errors import UserError

    with pytest.raises(UserError, match=r"unknown loss flag\(s\) \['use_regress_boxes'\]"):
        LossFlags.from_config({"use_regress_boxes": True})
    with pytest.raises(UserError, match="enable_mlm_sts=True needs enable_mlm=True"):
        LossFlags.from_config({"enable_mlm_sts": True})
    with pytest.raises(UserError, match="unknown MLM loss option"):
        GroundingCriterion(LossFlags(enable_mlm=True), mlm={"smoothing": 0.1})
