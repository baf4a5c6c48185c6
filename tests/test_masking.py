"""MRefM referring-aware image masking and VTS targets against the official generator's
statistics (the golden masking.json) and golden VTS labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oneref.data.masking import ReferringMaskGenerator, visual_target_relation_scores


@pytest.fixture(scope="module")
def masking(golden_dir) -> dict:
    return json.loads((golden_dir / "masking.json").read_text())


def _raw_box(box, g: int) -> np.ndarray:
    """Patches whose centre lies inside the un-expanded box (masking.json's 'raw_box')."""
    cx, cy, w, h = box
    centres = (np.arange(g) + 0.5) / g
    rows = (centres > cy - h / 2) & (centres < cy + h / 2)
    cols = (centres > cx - w / 2) & (centres < cx + w / 2)
    return rows[:, None] & cols[None, :]


def test_generator_matches_the_official_statistics(masking) -> None:
    p = masking["params"]
    g = p["input_size"][0]
    gen = ReferringMaskGenerator(g, p["mim_mask_ratio"], p["dynamic_mask_ratio"])
    draws = masking["draws_per_box"]
    for name, case in masking["boxes"].items():
        r0, r1, c0, c1 = gen.region(case["box_cxcywh"])
        assert [r0, r1] == case["region_rows"] and [c0, c1] == case["region_cols"], name
        region = np.zeros((g, g), dtype=bool)
        region[r0:r1, c0:c1] = True
        raw = _raw_box(case["box_cxcywh"], g)
        assert raw.sum() == case["raw_box_patches"], name
        rng = np.random.default_rng(case["seed"])
        masks = np.stack([gen(case["box_cxcywh"], rng) for _ in range(draws)])
        inside = masks[:, region].sum(1)
        assert (inside == case["expected_inside_region"]).all(), name  # exact on every draw
        for key, counts in {
            "masked_outside_region": masks[:, ~region].sum(1),
            "masked_total": masks.reshape(draws, -1).sum(1),
            "masked_inside_raw_box": masks[:, raw].sum(1),
            "masked_outside_raw_box": masks[:, ~raw].sum(1),
        }.items():
            want = case[key]
            # two independent samples of `draws` each: the means differ by ~sqrt(2) standard errors
            se = max(want["std"], 1e-9) * np.sqrt(2 / draws)
            assert abs(counts.mean() - want["mean"]) <= 5 * se + 1e-9, (name, key, counts.mean(), want)
            assert counts.std() == pytest.approx(want["std"], rel=0.15, abs=1e-9), (name, key)


def test_vts_targets_equal_the_golden_labels(golden_dir) -> None:
    inputs = torch.load(golden_dir / "inputs.pt", weights_only=True)
    grid = int(round(inputs["mim_vts_labels"].shape[1] ** 0.5))
    for box, want in zip(inputs["gt_boxes"], inputs["mim_vts_labels"]):
        got = visual_target_relation_scores(box.tolist(), grid)
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-6, rtol=0)


def test_bad_ratios_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="dynamic_mask_ratio must be in"):
        ReferringMaskGenerator(24, dynamic_mask_ratio=1.5)
    with pytest.raises(ValueError, match="grid must be"):
        ReferringMaskGenerator(0)
