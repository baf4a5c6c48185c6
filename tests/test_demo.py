"""The demo app (oneref.app, python -m oneref.demo): what it shows is what ``oneref.load(ckpt)
.predict`` returns, in a real browser (headless Chromium driven by Playwright) and through the API
(gradio_client); the patch-similarity map; the examples; bad input as a message in the page.

The browser tests (marker ``browser``) need the demo extra (Gradio), Playwright and a Chromium at
``$ONEREF_CHROMIUM`` or /usr/bin/chromium; they skip cleanly without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oneref
from helpers.cli import run_cli
from helpers.compose import compose_config, train_tiny_checkpoint
from helpers.models import tiny_model
from oneref.data.synthetic import SyntheticPaths
from oneref.data.tokenizer import Tokenizer
from oneref.errors import UserError
from oneref.predictor import Predictor

gr = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")

from oneref import app, demo  # noqa: E402  (needs gradio)

TEXT = "the big blue square"
CHROMIUM = Path(os.environ.get("ONEREF_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A tiny REC model trained for two steps, where `make demo` would leave it (its log_dir)."""
    return train_tiny_checkpoint("rec", tmp_path_factory.mktemp("demo"), cache_dir)


@pytest.fixture(scope="session")
def predictor(trained) -> Predictor:
    return oneref.load(trained, device="cpu", workers=0)


@pytest.fixture(scope="session")
def synthetic(trained, cache_dir) -> SyntheticPaths:
    return SyntheticPaths(cache_dir / "synthetic")


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def demo_config(trained: Path, cache_dir: Path, *overrides: str):
    return compose_config("demo", [f"ckpt_path={trained}", *overrides], trained.parent, cache_dir)


# -- the page's action, without a browser --------------------------------------------------------------
def test_the_page_shows_what_predict_returns(predictor, photo):
    page = app.Demo(predictor)
    tiles, heat, table, rows, _ = page.run(photo, f"{TEXT}\n\n  the small red circle  \n")
    want = predictor.predict(photo, [TEXT, "the small red circle"])
    assert rows == [{**p.to_dict(), "image": "photo.png"} for p in want]  # predictions.json's rows
    assert [c for _, c in tiles] == [TEXT, "the small red circle"] == [c for _, c in heat]
    zoom = app.MIN_SHOWN_SIDE // 90
    assert heat[0][0].shape == (70 * zoom, 90 * zoom, 3)
    assert tiles[0][0].shape[1] == 90 * zoom
    x1, y1, x2, y2 = want[0].box_xyxy
    assert f"| 1 | {TEXT} | {x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f} | - |" in table


def test_similarity_is_the_patch_map_over_the_image(predictor, photo):
    plain = predictor.predict(photo, TEXT)
    pred = predictor.predict(photo, TEXT, similarity=True)
    assert plain.similarity is None
    np.testing.assert_array_equal(pred.box_xyxy, plain.box_xyxy)  # asking for it changes nothing else
    # 90x70 letterboxed into 64x64: the image is 64 wide and round(70 * 64 / 90) = 50 high
    assert pred.similarity.shape == (50, 64) and pred.similarity.dtype == np.float32
    assert np.all(np.abs(pred.similarity) <= 1 + 1e-5)  # cosines
    # a square image fills the letterbox: the map is the 8x8 patch grid, bilinearly upsampled
    square = predictor.predict(np.zeros((64, 64, 3), np.uint8), TEXT, similarity=True).similarity
    assert square.shape == (64, 64)
    grid = square.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    assert np.corrcoef(grid.ravel(), square[3::8, 3::8].ravel())[0, 1] > 0.9


def test_a_res_model_shows_its_mask(cache_dir, synthetic, photo):
    tok = Tokenizer(synthetic.tokenizer, 20)
    res = Predictor(tiny_model(seg_head=True), tok, device="cpu", workers=0)
    tiles, _, table, rows, _ = app.Demo(res).run(photo, TEXT)
    want = res.predict(photo, TEXT).to_dict()
    assert rows[0]["mask_area"] == want["mask_area"] and rows[0]["box_xyxy"] == want["box_xyxy"]
    assert f"| {want['mask_area']} |" in table


def test_examples_are_test_queries_the_model_gets_right_and_wrong(predictor, synthetic):
    from oneref.data.records import load_split_file

    records = load_split_file(synthetic.split_file("test"))
    examples = app.pick_examples(predictor, records, synthetic.image_dir, candidates=16, right=2, wrong=2)
    assert 0 < len(examples) <= 4
    by_text = {(synthetic.image_dir / r[0], r[3]): r for r in records[:16]}
    for e in examples:
        r = by_text[(e.image, e.text)]
        x, y, w, h = r[2]
        box = predictor.predict(e.image, e.text).box_xyxy
        iw = max(0.0, min(box[2], x + w) - max(box[0], x))
        ih = max(0.0, min(box[3], y + h) - max(box[1], y))
        inter = iw * ih
        iou = inter / ((box[2] - box[0]) * (box[3] - box[1]) + w * h - inter)
        assert e.iou == pytest.approx(iou, abs=1e-4)
        assert e.label.startswith("right" if iou >= 0.5 else "wrong")
    right = [e for e in examples if e.iou >= 0.5]
    assert examples == right + [e for e in examples if e.iou < 0.5]  # the right ones first


# -- bad input --------------------------------------------------------------------------------------------
def test_bad_input_is_a_message_in_the_page(predictor, trained, photo, tmp_path):
    page = app.Demo(predictor, max_expressions=3)
    with pytest.raises(gr.Error, match="give an image"):
        page.answer(None, TEXT)
    with pytest.raises(gr.Error, match="type an expression"):
        page.answer({"path": str(photo)}, " \n ")
    with pytest.raises(gr.Error, match="4 expressions; give at most 3"):
        page.answer({"path": str(photo)}, "a\nb\nc\nd")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(gr.Error) as err:
        page.answer({"path": str(text_file)}, TEXT)
    assert "notes.png" in str(err.value) and str(tmp_path) not in str(
        err.value
    )  # its name, not the upload folder
    small = app.Demo(oneref.load(trained, device="cpu", workers=0, photo={"hard_max_pixels": 1000}))
    with pytest.raises(gr.Error, match=r"photo.png.*(6300|pixels)"):
        small.answer({"path": str(photo)}, TEXT)


def test_an_expression_over_the_models_length_is_truncated_with_a_note(predictor, photo):
    limit = predictor.tokenizer.max_query_len - 2
    long = "the small red circle left of the big blue square " * 4
    notes = app.truncation_notes(predictor, [TEXT, long])
    assert len(notes) == 1 and notes[0].startswith("expression 2 has")
    assert f"the model reads at most {limit} (max_query_len - 2): truncated to" in notes[0]
    answer = app.Demo(predictor).run(photo, f"{TEXT}\n{long}")
    assert answer.notes == notes and f"> note: {notes[0]}" in answer.table
    rows = answer.rows
    assert rows[1]["text"] == long.strip()  # the text as given, as predict reports it


def test_a_missing_checkpoint_says_which_command_makes_it(tmp_path, cache_dir):
    out = run_cli("oneref.demo", [], tmp_path, cache_dir, check=False, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    want = f"error: no checkpoint at {tmp_path / 'logs' / 'rec_tiny_synthetic' / 'best.ckpt'}; train it with `make demo`"
    assert want in out.stderr and "Traceback" not in out.stderr
    cfg = demo_config(tmp_path / "nope.ckpt", cache_dir, "task=res")
    with pytest.raises(UserError, match=r"python -m oneref.train task=res\), or pass ckpt_path=CKPT"):
        demo.build(cfg)


# -- a real browser and the API -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(trained, cache_dir):
    """The app of `python -m oneref.demo` for the trained checkpoint, serving on a free port."""
    blocks = demo.build(demo_config(trained, cache_dir))
    _, url, _ = app.launch(blocks, prevent_thread_lock=True, quiet=True)
    yield url
    blocks.close()


@pytest.mark.browser
def test_in_a_browser_the_box_shown_is_the_apis(served, trained, synthetic, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ONEREF_CHROMIUM)")
    sync_playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed"
    ).sync_playwright
    image = sorted(synthetic.image_dir.glob("test_*"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(served)
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#expressions textarea").fill(TEXT)
            page.locator("#run").click()
            cells = page.locator("#summary table td")
            cells.first.wait_for(timeout=120_000)
            shown = [c.inner_text() for c in cells.all()]
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    pred = oneref.load(trained, device="cpu").predict(image, TEXT)
    assert shown[:3] == ["1", TEXT, ", ".join(f"{v:.2f}" for v in pred.box_xyxy)]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


@pytest.mark.browser
def test_the_api_returns_the_rows_of_predictions_json(served, trained, photo):
    client_mod = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
    client = client_mod.Client(served, verbose=False)
    texts = [TEXT, "the small red circle"]
    drawn, heat, table, rows = client.predict(
        client_mod.handle_file(str(photo)), "\n".join(texts), api_name="/predict"
    )
    want = oneref.load(trained, device="cpu").predict(photo, texts)
    assert rows == [{**p.to_dict(), "image": "photo.png"} for p in want]
    assert len(drawn) == len(heat) == 2 and Path(drawn[0]["image"]).is_file()
    with pytest.raises(Exception, match="type an expression"):
        client.predict(client_mod.handle_file(str(photo)), "", api_name="/predict")
