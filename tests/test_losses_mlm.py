"""MRefM MLM-step losses against the official BertCaptioningLoss, mlm_acc and loss_mlm_sts
(golden losses_mlm.json, losses_mrefm_steps.json), on flat rows and on the static (B, K) layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from oneref.tasks.losses import mlm_accuracy, mlm_loss, mlm_sts_loss

TOL = dict(rtol=1e-6, atol=1e-6)  # closed-form KL and sort instead of topk: float rounding only


@pytest.fixture(scope="session")
def losses(golden_mlm_dir: Path) -> dict:
    return json.loads((golden_mlm_dir / "losses_mlm.json").read_text())


@pytest.fixture(scope="session")
def sources(golden_mlm_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = torch.load(golden_mlm_dir / "outputs_mlm.pt", weights_only=True)
    syn = torch.load(golden_mlm_dir / "mlm_loss_inputs.pt", weights_only=True)
    return {
        "outputs_mlm.pt: mlm_logits / mlm_labels": (out["mlm_logits"], out["mlm_labels"]),
        "mlm_loss_inputs.pt: synthetic_logits / synthetic_labels": (
            syn["synthetic_logits"],
            syn["synthetic_labels"],
        ),
        "first row of the synthetic input": (syn["synthetic_logits"][:1], syn["synthetic_labels"][:1]),
    }


def _kwargs(case: dict) -> dict:
    return dict(
        step=case["iter"],
        label_smoothing=case["label_smoothing"],
        drop_worst_ratio=case["drop_worst_ratio"],
        drop_worst_after=case["drop_worst_after"],
    )


def _static_layout(logits: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """The N rows scattered into (B, K) slots with garbage in the unused ones."""
    g = torch.Generator().manual_seed(seed)
    n, c = logits.shape
    b, k = 4, n // 2 + 3
    valid = torch.zeros(b * k, dtype=torch.bool)
    valid[torch.randperm(b * k, generator=g)[:n]] = True
    big = torch.randn(b * k, c, generator=g) * 50
    big[valid] = logits
    lab = torch.full((b * k,), -100, dtype=torch.int64)
    lab[valid] = labels
    return big.view(b, k, c), lab.view(b, k), valid.view(b, k)


def test_mlm_loss_matches_every_official_case(losses: dict, sources: dict) -> None:
    for case in losses["cases"]:
        logits, labels = sources[case["inputs"]]
        got = mlm_loss(logits, labels, **_kwargs(case), keep_at_least_one=False)
        if case["value"] == "NaN":
            assert got.isnan(), case["name"]
        else:
            torch.testing.assert_close(got, torch.tensor(case["value"]), **TOL, msg=case["name"])
        # the static (B, K) layout gives the same value
        slots = _static_layout(logits, labels, seed=len(case["name"]))
        again = mlm_loss(*slots, **_kwargs(case), keep_at_least_one=False)
        torch.testing.assert_close(again, got, equal_nan=True, **TOL, msg=case["name"])


def test_empty_drop_keeps_one_row_by_default(losses: dict, sources: dict) -> None:
    """Official: one masked position after step 12000 keeps int(1 * 0.8) = 0 rows: NaN. Ours by
    default: the row is kept (its own loss); keep_at_least_one=False restores the NaN."""
    logits, labels = sources["first row of the synthetic input"]
    case = next(c for c in losses["cases"] if c["name"] == "single_row_default_iter12001")
    assert case["value"] == "NaN"
    single = next(c for c in losses["cases"] if c["name"] == "single_row_default_iter0")["value"]
    torch.testing.assert_close(mlm_loss(logits, labels, **_kwargs(case)), torch.tensor(single), **TOL)
    assert mlm_loss(logits, labels, **_kwargs(case), keep_at_least_one=False).isnan()
    # more rows: the flag changes nothing
    logits, labels = sources["mlm_loss_inputs.pt: synthetic_logits / synthetic_labels"]
    a = mlm_loss(logits, labels, step=12001)
    assert torch.equal(a, mlm_loss(logits, labels, step=12001, keep_at_least_one=False))


def test_drop_worst_keeps_the_official_rows(losses: dict, sources: dict) -> None:
    per_row = losses["per_row_losses_label_smoothing_0_1"]
    for key, name in (("forward", "outputs_mlm.pt: mlm_logits / mlm_labels"),
                      ("synthetic", "mlm_loss_inputs.pt: synthetic_logits / synthetic_labels")):  # fmt: skip
        logits, labels = sources[name]
        rows = torch.stack([mlm_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(len(labels))])
        torch.testing.assert_close(rows, torch.tensor(per_row[key]["values"]), **TOL)
        kept = per_row[key]["kept_rows_after_12000"]
        want = rows[kept].mean()
        torch.testing.assert_close(mlm_loss(logits, labels, step=12001), want, **TOL)


def test_mlm_loss_gradient_flows_only_to_kept_used_rows(sources: dict) -> None:
    logits, labels = sources["outputs_mlm.pt: mlm_logits / mlm_labels"]
    big, lab, valid = _static_layout(logits, labels, seed=0)
    big.requires_grad_(True)
    mlm_loss(big, lab, valid, step=12001).backward()
    touched = big.grad.abs().sum(-1) > 0
    assert not touched[~valid].any()
    assert touched.sum() == int(len(labels) * 0.8)


def test_mlm_accuracy_is_the_official_mlm_acc(golden_mlm_dir: Path, sources: dict) -> None:
    out = torch.load(golden_mlm_dir / "outputs_mlm.pt", weights_only=True)
    logits, labels = sources["outputs_mlm.pt: mlm_logits / mlm_labels"]
    assert torch.equal(mlm_accuracy(logits, labels), out["mlm_acc"])
    assert torch.equal(mlm_accuracy(*_static_layout(logits, labels, seed=1)), out["mlm_acc"])


def test_sts_loss_reproduces_the_official_double_softmax(golden_mlm_dir: Path) -> None:
    out = torch.load(golden_mlm_dir / "outputs_mlm.pt", weights_only=True)
    inputs = torch.load(golden_mlm_dir / "inputs.pt", weights_only=True)
    steps = json.loads((golden_mlm_dir / "losses_mrefm_steps.json").read_text())["cases"]
    want = steps["mlm_step_sts_flag_synthetic_labels"]["terms"]["loss_mlm_sts"]
    scores = out["sts_head_raw"].squeeze(-1)  # the head's raw output at text positions 1 .. L-2
    labels = inputs["mlm_sts_labels_synthetic"]
    got = mlm_sts_loss(scores, labels)
    assert got.dtype == torch.float64  # float64 labels, as officially
    assert math.isclose(got.item(), want, rel_tol=1e-12)
    single = mlm_sts_loss(scores, labels, double_softmax=False)
    assert not math.isclose(single.item(), want, rel_tol=1e-3)  # the double softmax changes numbers
    ref = torch.nn.functional.kl_div(
        scores.log_softmax(-1).double(), labels.softmax(-1), reduction="batchmean"
    )
    torch.testing.assert_close(single, ref)
    with pytest.raises(ValueError, match="one score per text position"):
        mlm_sts_loss(scores, inputs["mlm_sts_labels_released"])  # the released [B, 0] labels


def test_mlm_loss_bad_inputs() -> None:
    logits, labels = torch.randn(4, 7), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="label_smoothing"):
        mlm_loss(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="4 logit rows but 3 labels"):
        mlm_loss(logits, labels[:3])
    with pytest.raises(ValueError, match="valid has"):
        mlm_loss(logits.view(2, 2, 7), labels.view(2, 2), torch.ones(2, 3, dtype=torch.bool))
