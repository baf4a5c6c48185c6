"""Transforms: the official eval transform (golden), mask rasterisation, augmentation invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from pycocotools import mask as coco_mask

from helpers.golden import golden_part
from oneref.data.transforms import (
    AugmentConfig,
    ObjMask,
    TrainTransform,
    eval_transform,
    letterbox_box,
    nearest_indices,
)

# The references below call pycocotools directly (numpy 2 deprecation noise from its Cython objects).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> Path:
    golden_part(golden_dir, "transforms")
    return golden_dir


@pytest.mark.parametrize("case", ["main", "small"])
def test_eval_transform_matches_official(golden: Path, case: str) -> None:
    spec = json.loads((golden / "transforms" / "cases.json").read_text())["cases"][case]
    want = torch.load(golden / "transforms" / "expected.pt", map_location="cpu")[case]
    img = Image.open(golden / spec["image_png"])
    mask = np.asarray(Image.open(golden / spec["mask_png"])) > 0
    box = np.asarray(spec["input_box_x1y1x2y2_pixels"], dtype=np.float32)
    out = eval_transform(img, box, ObjMask(full=mask), spec["imsize"])
    assert (out.top, out.left) == (spec["pad_top"], spec["pad_left"])
    assert out.pixels.shape[:2] == tuple(spec["resized_hw"])
    torch.testing.assert_close(out.image(), want["img"], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(out.box), want["box"], rtol=0, atol=1e-6)
    assert torch.equal(out.image_mask(), want["img_mask"])
    assert torch.equal(out.obj_mask(), want["obj_mask"])
    # writing into batch buffers gives the same tensors
    s = spec["imsize"]
    image, pad, obj = np.full((3, s, s), 7, np.float32), np.zeros((s, s), bool), np.ones((s, s), bool)
    out.write(image, pad, obj)
    assert torch.equal(torch.from_numpy(image), out.image())
    assert torch.equal(torch.from_numpy(pad), want["img_mask"]) and torch.equal(
        torch.from_numpy(obj), want["obj_mask"][0]
    )
    torch.testing.assert_close(
        torch.from_numpy(letterbox_box(box, img.height, img.width, s)), want["box"], rtol=0, atol=1e-6
    )


def test_nearest_indices_match_torch_interpolate() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_in, n_out = (int(v) for v in rng.integers(1, 700, size=2))
        src = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]
        ref = F.interpolate(src, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
        assert np.array_equal(nearest_indices(n_in, n_out), ref), (n_in, n_out)


def test_box_mask_equals_pycocotools_bbox_rasterisation() -> None:
    rng = np.random.default_rng(1)
    for k in range(300):
        h, w = (int(v) for v in rng.integers(5, 80, size=2))
        x, y = rng.uniform(-4, w + 2), rng.uniform(-4, h + 2)
        bw, bh = rng.uniform(0, 40, size=2)
        if k % 2:
            x, y, bw, bh = (float(int(v)) for v in (x, y, bw, bh))
        ref = coco_mask.decode(coco_mask.frPyObjects(np.array([[x, y, bw, bh]]), h, w))[..., 0].astype(bool)
        got = ObjMask.from_box_xywh(x, y, bw, bh, h, w).padded(max(h, w), 0, 0)[:h, :w]
        assert np.array_equal(got, ref), (h, w, x, y, bw, bh)


def test_polygon_mask_and_resize_follow_official_nearest() -> None:
    poly = [[10.5, 5.0, 60.0, 12.0, 40.0, 44.5, 8.0, 30.0]]
    full = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(poly, 50, 70))).astype(bool)
    m = ObjMask.from_segmentation(poly, 50, 70)
    m.resize(23, 31)
    ref = F.interpolate(torch.from_numpy(full)[None, None].float(), size=(23, 31), mode="nearest")[0, 0] > 0.5
    assert np.array_equal(m.padded(31, 0, 0)[:23], ref.numpy())


def _scene(w: int = 180, h: int = 120) -> tuple[Image.Image, np.ndarray, tuple[float, float, float, float]]:
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    box = (37.0, 21.0, 61.0, 52.0)  # xywh, integer as after the official truncation
    return Image.fromarray(arr), np.array([37, 21, 98, 73], dtype=np.float32), box


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("img_size", [64, 384])
@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_augmentation_invariants(img_size: int, backend: str) -> None:
    img, box, xywh = _scene()
    tf = TrainTransform(img_size, AugmentConfig(resize_backend=backend, color_jitter_p=1.0, aug_blur=True))
    branches = set()
    for seed in range(40):
        rng = np.random.default_rng([seed])
        phrase = "the dog" if seed % 4 else "the dog on the left"
        out = tf(img.copy(), box, ObjMask.from_box_xywh(*xywh, img.height, img.width), phrase, rng)
        s = img_size
        h, w = out.pixels.shape[:2]
        assert out.pixels.dtype == np.uint8 and max(h, w) in tf.scales
        # letterbox: the image sits at (top, left), padding is zero and flagged
        pad = out.image_mask().numpy()
        assert not pad[out.top : out.top + h, out.left : out.left + w].any()
        assert pad.sum() == s * s - h * w
        image = out.image().numpy()
        assert np.all(image[:, pad] == 0)
        # box (normalised cxcywh) agrees with the object mask to within the nearest-neighbour error
        obj = out.obj_mask().numpy()[0]
        assert not obj[pad].any()
        cx, cy, bw, bh = out.box * s
        if bw < 2 or bh < 2:  # the official crop may cut the object away
            continue
        x1, y1, x2, y2 = _mask_bbox(obj)
        scale = out.letterbox[0]
        tol = 1.0 + scale * (out.orig_size[0] / img.height if out.orig_size[0] != img.height else 1)
        assert abs(x1 - (cx - bw / 2)) <= tol and abs(x2 - (cx + bw / 2)) <= tol
        assert abs(y1 - (cy - bh / 2)) <= tol and abs(y2 - (cy + bh / 2)) <= tol
        branches.add(out.orig_size != (img.height, img.width))
    assert branches == {False, True}  # both RandomSelect branches were exercised


def test_augmentation_is_reproducible_per_seed() -> None:
    img, box, xywh = _scene()
    tf = TrainTransform(96)

    def run(seed: list[int]) -> tuple:
        out = tf(
            img.copy(), box, ObjMask.from_box_xywh(*xywh, 120, 180), "the dog", np.random.default_rng(seed)
        )
        return out.image(), out.box.copy(), out.obj_mask(), (out.top, out.left)

    a, b, c = run([0, 1, 2]), run([0, 1, 2]), run([0, 2, 2])
    assert all(torch.equal(x, y) if torch.is_tensor(x) else np.array_equal(x, y) for x, y in zip(a, b))
    assert not (torch.equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_spatial_words_never_take_the_crop_branch() -> None:
    tf = TrainTransform(384, AugmentConfig(crop_prob=1.0))
    for word in ("left", "right", "top", "bottom", "middle", "leftmost"):
        assert not any(tf.use_crop_branch(f"the {word} one", np.random.default_rng(s)) for s in range(20))
    assert all(tf.use_crop_branch("the dog", np.random.default_rng(s)) for s in range(20))
    assert not TrainTransform(384, AugmentConfig(aug_crop=False)).use_crop_branch(
        "the dog", np.random.default_rng(0)
    )


def test_scale_lists() -> None:
    t384 = TrainTransform(384)
    assert t384.scales == [384, 352, 320, 288, 256, 224, 192]
    assert (t384.short_sizes, t384.crop_min, t384.crop_max) == ([400, 500, 600], 384, 600)
    assert TrainTransform(480).scales == [480, 448, 416, 384, 352, 320, 288]  # official: S - 32 i
    t64 = TrainTransform(64)
    assert t64.scales == [64, 59, 53, 48, 43, 37, 32]  # S k / 12
    assert (t64.short_sizes, t64.crop_min, t64.crop_max) == ([67, 83, 100], 64, 100)
    assert TrainTransform(384, AugmentConfig(aug_scale=False)).scales == [384]


def test_disabled_augmentation_is_the_eval_transform() -> None:
    img, box, xywh = _scene()
    a = TrainTransform(64, AugmentConfig(enabled=False))(
        img, box, ObjMask.from_box_xywh(*xywh, 120, 180), "x", np.random.default_rng(0)
    )
    b = eval_transform(img, box, ObjMask.from_box_xywh(*xywh, 120, 180), 64)
    assert torch.equal(a.image(), b.image()) and np.array_equal(a.box, b.box)


def test_colour_jitter_equals_pillow_imageenhance_chain() -> None:
    """The LUT implementation of brightness/contrast gives Pillow's (torchvision's PIL path) bytes."""
    tf = TrainTransform(64, AugmentConfig(color_jitter_p=1.0))
    rng0 = np.random.default_rng(3)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for _ in range(20):
        px = rng0.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        seed = int(rng0.integers(1 << 30))
        out, lut = tf._photometric(px, np.random.default_rng(seed))
        got = out if lut is None else lut[out]
        r = np.random.default_rng(seed)
        r.random()
        factors, order = r.uniform(0.6, 1.4, size=3), r.permutation(3)
        ref = Image.fromarray(px)
        for k in order:
            ref = enhancers[k](ref).enhance(float(factors[k]))
        assert np.array_equal(got, np.asarray(ref))


def test_torch_resize_backend_is_within_one_grey_level_of_pillow() -> None:
    img, _, _ = _scene(333, 251)
    arr = np.asarray(img)
    tf = TrainTransform(384)
    for w, h in ((200, 151), (384, 289), (512, 386)):
        got = tf._resize(arr, w, h).astype(int)
        ref = np.asarray(img.resize((w, h), Image.BILINEAR)).astype(int)
        assert np.abs(got - ref).max() <= 1


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown augment option"):
        AugmentConfig.from_any({"aug_flip": True})
    with pytest.raises(ValueError, match="scale_mode"):
        TrainTransform(384, AugmentConfig(scale_mode="big"))
    assert AugmentConfig(color_jitter=True).color_jitter == 0.4  # a switch in configs
