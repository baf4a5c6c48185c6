"""REC/RES metrics against the official golden set, DDP state merging and the original-resolution option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oneref.tasks.metrics import RECMetrics, RESMetrics, pad_masks, rec_box_iou, res_pred_mask


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> tuple[dict, dict]:
    return torch.load(golden_dir / "metrics.pt"), json.loads((golden_dir / "metrics.json").read_text())


def test_rec_matches_official(golden) -> None:
    m, j = golden
    iou = rec_box_iou(m["pred_boxes"], m["gt_boxes"])
    assert torch.equal(iou, m["test.box_iou"])  # same float32 operation order: bit-identical
    metric = RECMetrics()
    metric.update(m["pred_boxes"], m["gt_boxes"])
    assert metric.correct[metric.thresholds.index(0.5)] == m["test.accu_num"]
    assert metric.correct[metric.thresholds.index(0.5)] == j["official"]["rec_accu_num"]["value"]
    out = metric.compute()
    assert out["acc@0.5"].item() == j["official"]["rec_accuracy@0.5"]["value"]
    assert out["miou"].item() == pytest.approx(
        j["official"]["validate_stats_rec"]["value"]["box_miou"], rel=1e-6
    )
    iou64 = m["test.box_iou"].double()
    assert out["acc@0.25"].item() == (iou64 >= 0.25).double().mean().item()
    assert out["acc@0.75"].item() == (iou64 >= 0.75).double().mean().item()


def test_res_matches_official(golden) -> None:
    m, j = golden
    metric = RESMetrics()
    inter, union = metric.intersection_union(m["pred_mask_logits"], m["gt_masks"])
    assert torch.equal(inter.float(), m["test.I_list"])
    assert torch.equal(union.float(), m["test.U_list"])
    torch.testing.assert_close(
        inter.double() / union.double(), m["test.mask_iou_list"].double(), rtol=1e-6, atol=0
    )
    metric.update(m["pred_mask_logits"], m["gt_masks"])
    out = metric.compute()
    assert out["miou"].item() == pytest.approx(j["official"]["res_mIoU"]["value"], rel=1e-6)
    assert out["oiou"].item() == pytest.approx(j["official"]["res_oIoU"]["value"], rel=1e-6)
    derived = j["derived_not_in_official_code"]
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert out[f"prec@{t:g}"].item() == pytest.approx(derived[f"precision@{t:g}_ge"], rel=1e-6), t
    # the IoU-exactly-0.5 sample separates >= from >
    assert derived["precision@0.5_ge"] != derived["precision@0.5_gt"]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_states_merge_exactly_like_ddp(golden) -> None:
    m, _ = golden
    for make, args in (
        (RECMetrics, (m["pred_boxes"], m["gt_boxes"])),
        (RESMetrics, (m["pred_mask_logits"], m["gt_masks"])),
    ):
        single = make()
        single.update(*args)
        # uneven shards, several updates on one "rank"
        ranks = [make(), make()]
        ranks[0].update(*(a[:5] for a in args))
        ranks[0].update(*(a[5:7] for a in args))
        ranks[1].update(*(a[7:] for a in args))
        expected = single.compute()

        # the all-reduce a DDP sync performs: element-wise sums of every state
        summed = make()
        for name in summed._defaults:
            setattr(summed, name, getattr(ranks[0], name) + getattr(ranks[1], name))
        for key, value in summed.compute().items():
            assert value.item() == pytest.approx(expected[key].item(), rel=1e-12, abs=1e-15), key

        ranks[0].merge_state(ranks[1])
        for key, value in ranks[0].compute().items():
            assert value.item() == pytest.approx(expected[key].item(), rel=1e-12, abs=1e-15), key


def test_states_are_sum_reduced_integers() -> None:
    rec, res = RECMetrics(), RESMetrics()
    for metric in (rec, res):
        assert all(
            fx == "sum" or getattr(fx, "__name__", "") == "dim_zero_sum" for fx in metric._reductions.values()
        )
    assert rec.count.dtype == rec.correct.dtype == torch.long
    assert res.inter_sum.dtype == res.union_sum.dtype == torch.long


def test_empty_masks_nan_policy() -> None:
    logits = torch.full((2, 1, 4, 4), -5.0)  # empty predictions
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[1, 0, :4, :4] = True
    official = RESMetrics()
    official.update(logits, gt)
    out = official.compute()
    assert torch.isnan(out["miou"])  # 0/0 in sample 0, as the official code
    assert out["oiou"].item() == 0.0
    one = RESMetrics(nan_policy="one")
    one.update(logits, gt)
    out = one.compute()
    assert out["miou"].item() == 0.5 and out["prec@0.9"].item() == 0.5
    with pytest.raises(ValueError, match="nan_policy"):
        RESMetrics(nan_policy="skip")


def test_rec_original_resolution_hand_built() -> None:
    # image h=100, w=200 letterboxed into S=64: ratio 0.32, resized 64x32, top 16, left 0
    s = 64
    letterbox = torch.tensor([[0.32, 0.0, 16.0], [0.32, 0.0, 16.0]])
    orig_size = torch.tensor([[100, 200], [100, 200]])
    orig_box = torch.tensor([[20.0, 10.0, 120.0, 60.0], [20.0, 10.0, 120.0, 60.0]])
    # sample 0: the exact gt; sample 1: shifted right by 50 px and extending 40 px into the padding
    # below the image (clamped to the image: y2 = 100)
    pix = torch.tensor([[20.0, 10.0, 120.0, 60.0], [70.0, 10.0, 170.0, 140.0]])
    padded = pix * 0.32 + torch.tensor([0.0, 16.0, 0.0, 16.0])
    xyxy = padded / s
    pred = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    metric = RECMetrics(original_resolution=True, img_size=s)
    metric.update(pred, letterbox=letterbox, orig_size=orig_size, orig_box=orig_box)
    inter = 50 * 50
    expected = [1.0, inter / (100 * 50 + 100 * 90 - inter)]
    out = metric.compute()
    assert out["miou"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)  # float32 boxes in
    assert out["acc@0.5"].item() == 0.5 and out["acc@0.25"].item() == 0.5
    with pytest.raises(ValueError, match="img_size"):
        RECMetrics(original_resolution=True)


def test_res_original_resolution_hand_built() -> None:
    # S=8. Sample 0: h=4, w=8, ratio 1, top 2. Sample 1: h=2, w=3, ratio 2, resized 4x6, top 2, left 1.
    s = 8
    logits = torch.full((2, 1, s, s), -5.0)
    logits[0, 0, 2:4, :] = 5.0  # the first two image rows
    logits[0, 0, 0:2, :] = 5.0  # padding above the image: a false positive only in the letterbox
    logits[1, 0, 2:4, 1:5] = 5.0  # image rows 0, cols 0..1 after the x2 resize
    letterbox = torch.tensor([[1.0, 0.0, 2.0], [2.0, 1.0, 2.0]])
    orig_size = torch.tensor([[4, 8], [2, 3]])
    gt0 = torch.zeros(4, 8, dtype=torch.bool)
    gt0[:2] = True
    gt1 = torch.tensor([[True, True, False], [False, False, False]])
    metric = RESMetrics(original_resolution=True, img_size=s)
    inter, union = metric.intersection_union(
        logits, letterbox=letterbox, orig_size=orig_size, orig_mask=[gt0, gt1.unsqueeze(0)]
    )
    assert inter.tolist() == [16, 2] and union.tolist() == [16, 2]

    # The same samples in the official letterbox protocol: the padding rows count against sample 0.
    gt_lb = torch.zeros(2, 1, s, s, dtype=torch.bool)
    gt_lb[0, 0, 2:4] = True
    gt_lb[1, 0, 2:4, 1:5] = True
    i_lb, u_lb = RESMetrics().intersection_union(logits, gt_lb)
    assert i_lb.tolist() == [16, 8] and u_lb.tolist() == [32, 8]

    # A padded canvas (with junk outside each (h, w)) gives the same counts as a list.
    canvas = torch.ones(2, 5, 9, dtype=torch.bool)
    canvas[0, :4, :8], canvas[1, :2, :3] = gt0, gt1
    canvas[1, :2, 3:], canvas[1, 2:, :] = True, True
    i_c, u_c = metric.intersection_union(logits, letterbox=letterbox, orig_size=orig_size, orig_mask=canvas)
    assert i_c.tolist() == [16, 2] and u_c.tolist() == [16, 2]
    with pytest.raises(ValueError, match="canvas"):
        metric.intersection_union(logits, letterbox=letterbox, orig_size=orig_size, orig_mask=canvas[:, :3])


def test_res_original_resolution_equals_crop_and_resize_reference() -> None:
    """Random sizes: our batched tap rule equals a per-sample crop + F.interpolate reference."""
    gen = torch.Generator().manual_seed(0)
    s, seg = 64, 16
    sizes = [(37, 64), (64, 50), (13, 29), (64, 64), (80, 120), (200, 90)]
    b = len(sizes)
    logits = torch.randn(b, 1, seg, seg, generator=gen) * 2
    letterbox, masks, refs = [], [], []
    for i, (h, w) in enumerate(sizes):
        ratio = s / max(h, w)
        rh, rw = round(h * ratio), round(w * ratio)
        top, left = round((s - rh) / 2 - 0.1), round((s - rw) / 2 - 0.1)
        letterbox.append([ratio, left, top])
        masks.append(torch.rand(h, w, generator=gen) > 0.5)
        prob = (logits[i : i + 1].sigmoid() - 0.5).relu()
        up = F.interpolate(prob, size=(s, s), mode="bilinear", align_corners=False)
        crop = up[:, :, top : top + rh, left : left + rw]
        refs.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0)
    letterbox = torch.tensor(letterbox, dtype=torch.float32)
    orig_size = torch.tensor(sizes)
    metric = RESMetrics(original_resolution=True, img_size=s)
    inter, union = metric.intersection_union(
        logits, letterbox=letterbox, orig_size=orig_size, orig_mask=masks
    )
    for i, (ref, gt) in enumerate(zip(refs, masks)):
        assert inter[i] == (ref & gt).sum(), i
        assert union[i] == (ref | gt).sum(), i
    metric.update(logits, letterbox=letterbox, orig_size=orig_size, orig_mask=pad_masks(masks))
    assert metric.count == b


def test_res_pred_mask_is_dilated_official_threshold() -> None:
    # one positive logit at seg resolution spreads to its bilinear neighbours after upsampling
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, 1, 1] = 1.0
    pred = res_pred_mask(logits, (8, 8))
    assert pred[0, 2:4, 2:4].all()
    assert pred.sum() > 4  # dilated compared with thresholding the upsampled logits


@pytest.mark.parametrize("in_size,out_size", [(5, 45), (64, 607), (7, 3), (24, 24), (10, 37), (33, 100)])
def test_bilinear_taps_equal_interpolate(in_size: int, out_size: int) -> None:
    """Which source pixels a bilinear resize touches, incl. positions falling exactly on a pixel
    (5 -> 45 is such a case: it needs PyTorch's single-rounding source index)."""
    from oneref.tasks.metrics import _linear_taps

    i0, i1, use1 = _linear_taps(torch.tensor([out_size]), torch.tensor([in_size]), out_size)
    impulses = torch.eye(in_size).view(in_size, 1, in_size, 1)
    touched = (
        F.interpolate(impulses, size=(out_size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0] > 0
    )
    k = torch.arange(in_size)[:, None]
    ours = (i0[0][None] == k) | ((i1[0][None] == k) & use1[0][None])
    assert torch.equal(ours, touched)
