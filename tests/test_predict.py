"""`python -m oneref.predict`: our own images and expressions through a trained checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import oneref
from helpers.compose import train_tiny_checkpoint
from oneref.checkpoint import CheckpointError, load_checkpoint_file, save_folder, to_official
from oneref.predict import cli as predict_cli
from oneref.predict import predict
from oneref.tasks.grounding import GroundingModule


@pytest.fixture(scope="module", params=["rec", "res"])
def trained(request, tmp_path_factory, cache_dir) -> tuple[str, Path, Path]:
    """A tiny model trained for two steps, and two images of other sizes than the training ones."""
    task = request.param
    out = tmp_path_factory.mktemp(f"predict_{task}")
    ckpt = train_tiny_checkpoint(task, out, cache_dir)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.jpg": (120, 70), "tall.png": (50, 90)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out / name)
    return task, ckpt, out


def _cfg(make_cfg, task: str, *overrides: str):
    return make_cfg(f"task={task}", *overrides, name="predict")


def test_one_query_box_in_image_pixels_json_and_drawing(make_cfg, tmp_path, trained):
    task, ckpt, imgs = trained
    cfg = _cfg(make_cfg, task, f"ckpt_path={ckpt}", f"image={imgs / 'wide.jpg'}", "text='the red circle'")
    rows = predict(cfg)
    assert len(rows) == 1
    assert json.loads((tmp_path / "predictions.json").read_text()) == rows
    drawn = Image.open(rows[0]["drawn"])
    assert drawn.width == 120 and drawn.height > 70  # the image plus a caption strip
    if task == "res":
        mask = np.asarray(Image.open(rows[0]["mask_png"])) > 0
        assert mask.shape == (70, 120) and rows[0]["mask_area"] == int(mask.sum())
        # the box of a RES model is its mask's bounding box (pixel edges), null for an empty mask
        ys, xs = np.nonzero(mask)
        want = None if not len(xs) else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert rows[0]["box_xyxy"] == want
    if rows[0]["box_xyxy"] is not None:
        x1, y1, x2, y2 = rows[0]["box_xyxy"]
        assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 70


def test_batch_file_matches_single_queries_and_the_model(make_cfg, tmp_path, trained):
    """Several queries in one batch give what each gives alone; a REC box equals the model's own
    output mapped back through the letterbox."""
    task, ckpt, imgs = trained
    lines = [
        {"image": "wide.jpg", "text": "the big blue square"},
        {"image": str(imgs / "tall.png"), "text": "the shape on the left"},
    ]
    (imgs / "q.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    batched = predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"inputs={imgs / 'q.jsonl'}", "draw=false"))
    assert [Path(r["image"]).name for r in batched] == ["wide.jpg", "tall.png"]
    alone = predict(
        _cfg(
            make_cfg,
            task,
            f"ckpt_path={ckpt}",
            f"image={imgs / 'tall.png'}",
            "text='the shape on the left'",
            "draw=false",
        )
    )
    if task == "res":  # the box is the mask's (test above); the masks agree batched or alone
        assert batched[1]["box_xyxy"] == alone[0]["box_xyxy"]
        assert batched[1]["mask_area"] == alone[0]["mask_area"]
        return
    np.testing.assert_allclose(batched[1]["box_xyxy"], alone[0]["box_xyxy"], atol=0.02)
    # independent reference: the tall image (50x90) letterboxed to 64: ratio 64/90, left pad round(((64 - 36) / 2) - 0.1)
    module = GroundingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    from oneref.data.tokenizer import Tokenizer

    cfg = _cfg(make_cfg, task, f"ckpt_path={ckpt}")
    from hydra.utils import instantiate

    tok: Tokenizer = instantiate(cfg.data, _convert_="all").tokenizer
    img = Image.open(imgs / "tall.png").convert("RGB").resize((36, 64), Image.BILINEAR)
    x = (
        torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    padded = torch.zeros(1, 3, 64, 64)
    left = round(28 / 2 - 0.1)
    padded[0, :, :, left : left + 36] = x
    ids, pad = tok.encode_batch(["the shape on the left"])
    with torch.no_grad():
        cx, cy, w, h = module.model(padded, ids, pad)["pred_box"][0].tolist()
    ratio = 64 / 90
    want = [
        ((cx - w / 2) * 64 - left) / ratio,
        (cy - h / 2) * 64 / ratio,
        ((cx + w / 2) * 64 - left) / ratio,
        (cy + h / 2) * 64 / ratio,
    ]
    want = [min(max(v, 0), lim) for v, lim in zip(want, (50, 90, 50, 90))]
    np.testing.assert_allclose(alone[0]["box_xyxy"], want, atol=0.05)


def test_folder_and_official_file(make_cfg, tmp_path, trained):
    task, ckpt, imgs = trained
    module = GroundingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    spm = tmp_path / "tiny.spm"
    spm.write_bytes(load_checkpoint_file(ckpt)["tokenizer"]["model"])
    folder = save_folder(
        tmp_path / "folder",
        module.model.state_dict(),
        module.model.cfg,
        task=task,
        max_query_len=20,
        tokenizer=spm,
    )
    official, _ = to_official(module.model.state_dict(), module.model.cfg)
    torch.save(official, tmp_path / "OneRef_T.pth")
    query = (f"image={imgs / 'wide.jpg'}", "text='the red circle'", "draw=false")
    ours = predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", *query))
    from_folder = predict(_cfg(make_cfg, task, f"ckpt_path={folder}", *query))
    assert from_folder[0]["box_xyxy"] == ours[0]["box_xyxy"]
    # an official file is built as model= and task= say (model=tiny: the architecture it was trained with)
    pth = f"ckpt_path={tmp_path / 'OneRef_T.pth'}"
    from_pth = predict(
        _cfg(make_cfg, task, pth, "ckpt_format=official", f"tokenizer={spm}", "data.max_query_len=20", *query)
    )
    assert from_pth[0]["box_xyxy"] == ours[0]["box_xyxy"]
    # never paired with the synthetic set's tokenizer behind the user's back
    with pytest.raises(CheckpointError, match="no tokenizer found for .*OneRef_T.pth: .*pass tokenizer=PATH"):
        predict(_cfg(make_cfg, task, pth, *query))


def test_cli_and_api_give_the_same_boxes(make_cfg, tmp_path, trained):
    """The CLI is a layer over the API: same queries (one photo EXIF-rotated), same boxes and masks."""
    task, ckpt, imgs = trained
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(imgs / "wide.jpg").save(tmp_path / "rotated.jpg", exif=exif)
    lines = [
        {"image": str(imgs / "wide.jpg"), "text": "the big blue square"},
        {"image": "rotated.jpg", "text": "the shape on the left"},
        {"image": str(imgs / "tall.png"), "text": "the red circle"},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    rows = predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"inputs={tmp_path / 'q.jsonl'}", "draw=false"))
    paths = [imgs / "wide.jpg", tmp_path / "rotated.jpg", imgs / "tall.png"]
    api = oneref.load(ckpt, device="cpu").predict(paths, [r["text"] for r in lines])
    assert [r["box_xyxy"] for r in rows] == [p.to_dict()["box_xyxy"] for p in api]
    assert [r["image_size"] for r in rows] == [[120, 70], [70, 120], [50, 90]]
    if task == "res":
        for row, p in zip(rows, api):
            np.testing.assert_array_equal(np.asarray(Image.open(row["mask_png"])) > 0, p.mask)


def test_exif_rotated_photo_is_drawn_upright(make_cfg, tmp_path, trained):
    """The reported case: a JPEG stored 300 x 500 tagged "rotate 90" is shown 500 x 300; the box,
    the mask and the drawing are in that frame."""
    task, ckpt, _ = trained
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "phone.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (500, 300, 3), dtype=np.uint8)).save(
        photo, exif=exif
    )
    (row,) = predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"image={photo}", "text='the red circle'"))
    assert row["image_size"] == [500, 300]
    assert row["box_xyxy"][2] <= 500 and row["box_xyxy"][3] <= 300
    drawn = Image.open(row["drawn"])
    assert drawn.width == 500 and drawn.height > 300  # the upright picture plus a caption strip
    # what is drawn on is the upright picture: untouched pixels (away from the box / mask) equal it
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB")).astype(int)
    untouched = np.ones((300, 500), bool)
    if task == "res":
        mask = np.asarray(Image.open(row["mask_png"])) > 0
        assert mask.shape == (300, 500)
        untouched = ~np.pad(mask, 1)[:-2, 1:-1] & ~np.pad(mask, 1)[2:, 1:-1] & ~mask  # not on the outline
    same = (np.asarray(drawn.convert("RGB"))[:300].astype(int) == upright).all(-1)
    assert untouched.sum() > 1000 and same[untouched].mean() > 0.9


def test_a_downscaled_photo_is_reported_in_its_own_pixels(make_cfg, tmp_path, trained):
    task, ckpt, imgs = trained
    query = (f"image={imgs / 'wide.jpg'}", "text='the red circle'")
    (row,) = predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", *query, "photo.max_pixels=2100"))
    assert row["image_size"] == [120, 70] and row["box_xyxy"][2] <= 120
    drawn = Image.open(row["drawn"])
    assert drawn.width == 60  # drawn on the copy the model saw, 60 x 35: a quarter of the pixels
    if task == "res":
        assert np.asarray(Image.open(row["mask_png"])).shape == (70, 120)


def test_bad_queries_are_clear_errors(make_cfg, tmp_path, trained, capsys):
    task, ckpt, imgs = trained
    with pytest.raises(ValueError, match="give image=PATH"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}"))
    with pytest.raises(FileNotFoundError, match="image=: image not found: .*nope.jpg"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", "image=nope.jpg", "text='x'"))
    with pytest.raises(ValueError, match="image=: the expression ' ' for .*wide.jpg is empty"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"image={imgs / 'wide.jpg'}", "text=' '"))
    (tmp_path / "bad.jsonl").write_text('{"image": "wide.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with 'image' and 'text'"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"inputs={tmp_path / 'bad.jsonl'}"))
    wide = str(imgs / "wide.jpg")
    rows = [{"image": wide, "text": "x"}, None, {"image": wide, "text": ""}]  # line 2 blank: skipped
    (tmp_path / "empty.jsonl").write_text("\n".join(json.dumps(r) if r else "" for r in rows))
    with pytest.raises(ValueError, match=r"empty.jsonl:3: the expression '' for .*wide.jpg is empty"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"inputs={tmp_path / 'empty.jsonl'}"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="query 0: .*broken.jpg: not an image file Pillow can read"):
        predict(_cfg(make_cfg, task, f"ckpt_path={ckpt}", f"image={tmp_path / 'broken.jpg'}", "text='x'"))
    with pytest.raises(FileNotFoundError, match="ckpt_path not found: .*nope.ckpt"):
        predict(
            _cfg(
                make_cfg,
                task,
                f"ckpt_path={tmp_path / 'nope.ckpt'}",
                f"image={imgs / 'wide.jpg'}",
                "text='x'",
            )
        )
    # the command prints one line, not a traceback
    assert predict_cli(_cfg(make_cfg, task, f"ckpt_path={ckpt}", "image=nope.jpg", "text='x'")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image=: image not found") and "Traceback" not in err


@pytest.mark.parametrize("trained", ["rec"], indirect=True)  # one task is enough
def test_cli(tmp_path, trained, cache_dir):
    import os

    task, ckpt, imgs = trained

    env = {
        **os.environ,
        "ONEREF_ROOT": str(tmp_path),
        "ONEREF_CACHE": str(cache_dir),
        "WANDB_MODE": "disabled",
    }
    cmd = [sys.executable, "-m", "oneref.predict", f"ckpt_path={ckpt}", f"image={imgs / 'wide.jpg'}", "text='the red circle'",
           "data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "predictions" in out.stdout and "wide.jpg" in out.stdout
    assert list((tmp_path / "logs").rglob("predictions.json"))
