"""Checkpoints on the Hugging Face Hub (oneref.hub, python -m oneref.convert push), without a
network: a pushed folder is placed in a cache of the Hub's layout (models--owner--name/snapshots/
<commit>/..., refs/main) and read with HF_HUB_OFFLINE=1, as on a machine that downloaded it before.
The upload itself is not tested (docs/demo.md documents it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import oneref
from helpers.compose import train_tiny_checkpoint
from oneref import factory, hub
from oneref.checkpoint import load_checkpoint_file
from oneref.convert import main as convert
from oneref.errors import UserError

huggingface_hub = pytest.importorskip(
    "huggingface_hub", reason="the hf extra (huggingface_hub) is not installed"
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["the big blue square", "the small red circle left of the square"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cache_dir) -> Path:
    return train_tiny_checkpoint("rec", tmp_path_factory.mktemp("hub"), cache_dir)


@pytest.fixture(scope="module")
def pushed(ckpt, tmp_path_factory) -> Path:
    """What `convert push --dry-run` writes for the checkpoint."""
    out = tmp_path_factory.mktemp("push") / "folder"
    assert convert(["push", str(ckpt), "me/oneref-tiny", "--local-dir", str(out), "--dry-run"]) == 0
    return out


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline (the environment, and the constants huggingface_hub read from
    it when it was imported)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def place(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """``folder`` as the snapshot ``commit`` of ``repo_id`` in the cache, ``ref`` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def noise(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- ids -------------------------------------------------------------------------------------------
def test_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse("me/oneref-base-refcoco") == hub.HubId("me/oneref-base-refcoco")
    assert hub.parse("hf://me/name@v1.0") == hub.HubId("me/name", "v1.0")
    assert str(hub.HubId("me/name", "v1.0")) == "me/name@v1.0"
    for local in ("logs/best.ckpt", "OneRef_B_refcoco.pth", "/abs/path/folder", "a/b/c", "best"):
        assert not hub.is_hub_id(local), local
        assert hub.resolve(local) == local  # a local path, even a missing one, is left to the loader
    (tmp_path / "me" / "folder").mkdir(parents=True)
    assert not hub.is_hub_id("me/folder")  # an existing folder wins over a Hub id
    with pytest.raises(hub.HubError, match=r"'hf://me' is not a Hub id: write hf://owner/name"):
        hub.resolve("hf://me")


# -- push and load ------------------------------------------------------------------------------------
def test_push_dry_run_writes_the_self_describing_folder_and_a_model_card(pushed, capsys):
    files = sorted(p.name for p in pushed.iterdir())
    assert files == ["README.md", "config.yaml", "conversion.json", "model.safetensors", "tokenizer.spm"]
    config = yaml.safe_load((pushed / "config.yaml").read_text())
    assert config["format"] == "oneref-checkpoint" and config["task"] == "rec"
    assert config["tokenizer"] == {"file": "tokenizer.spm"}
    card = (pushed / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "oneref" and "visual-grounding" in meta["tags"]
    assert 'oneref.load("me/oneref-tiny")' in card
    assert "## Training data\n\nsynthetic" in card
    assert "Best `val/acc@0.5` during training:" in card
    assert "| `embed_dim` | 128 |" in card


def test_a_pushed_folder_in_the_cache_loads_by_name_offline_and_predicts_as_the_checkpoint(
    ckpt, pushed, offline_cache
):
    place(offline_cache, "me/oneref-tiny", pushed)
    ref = oneref.load(ckpt, device="cpu").predict(noise(70, 90), TEXTS)
    for name in (
        "me/oneref-tiny",
        "hf://me/oneref-tiny",
        "hf://me/oneref-tiny@main",
        f"me/oneref-tiny@{COMMIT}",
    ):
        model = oneref.load(name, device="cpu")
        assert f"snapshots/{COMMIT}" in model.source
        got = model.predict(noise(70, 90), TEXTS)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.box_xyxy, b.box_xyxy)


def test_init_from_a_hub_id_loads_the_weights(ckpt, pushed, offline_cache, make_cfg):
    place(offline_cache, "me/oneref-tiny", pushed)
    module = factory.build_module(make_cfg("task=rec"))
    factory.init_weights(module, "hf://me/oneref-tiny", None)
    saved = load_checkpoint_file(ckpt)["state_dict"]
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.{key}"], rtol=0, atol=0)


def test_the_predict_cli_takes_a_hub_id(ckpt, pushed, offline_cache, make_cfg, tmp_path):
    from oneref.predict import run

    place(offline_cache, "me/oneref-tiny", pushed)
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(noise(70, 90)).save(image)
    rows, _ = run(
        make_cfg("ckpt_path=me/oneref-tiny", f"image={image}", f"text='{TEXTS[0]}'", name="predict")
    )
    want = oneref.load(ckpt, device="cpu").predict(image, TEXTS[0]).to_dict()
    assert rows[0]["box_xyxy"] == want["box_xyxy"]


# -- bad input ------------------------------------------------------------------------------------------
def test_a_repository_not_in_the_cache_while_offline_says_what_to_do(
    offline_cache, make_cfg, tmp_path, capsys
):
    with pytest.raises(hub.HubError) as err:
        oneref.load("me/missing")
    msg = str(err.value)
    assert "me/missing is neither a local path nor in the Hugging Face cache" in msg
    assert str(offline_cache) in msg and "HF_HUB_OFFLINE=1" in msg and "`hf download me/missing`" in msg
    with pytest.raises(hub.HubError, match=r"`hf download me/missing --revision v2`"):
        oneref.load("hf://me/missing@v2")
    assert isinstance(err.value, UserError)
    # the CLI: one line, exit status 2
    from oneref.predict import cli

    (tmp_path / "x.png").write_bytes(b"")
    assert (
        cli(make_cfg("ckpt_path=me/missing", f"image={tmp_path / 'x.png'}", "text=dog", name="predict")) == 2
    )
    assert "error: me/missing is neither a local path" in capsys.readouterr().err


def test_a_repository_of_another_library_or_architecture_is_refused(pushed, offline_cache, tmp_path):
    other = tmp_path / "transformers"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"")
    place(offline_cache, "me/bert", other)
    with pytest.raises(
        hub.HubError, match=r"me/bert is not a oneref checkpoint: it has no config.yaml .*transformers"
    ):
        oneref.load("me/bert")

    foreign = tmp_path / "foreign"
    shutil.copytree(pushed, foreign)
    (foreign / "config.yaml").write_text(yaml.safe_dump({"format": "other-lib", "task": "rec"}))
    place(offline_cache, "me/foreign", foreign)
    with pytest.raises(
        hub.HubError, match=r"me/foreign is not a oneref checkpoint: its config.yaml has format 'other-lib'"
    ):
        oneref.load("me/foreign")

    newer = tmp_path / "newer"
    shutil.copytree(pushed, newer)
    config = yaml.safe_load((newer / "config.yaml").read_text())
    config["architecture"]["experts"] = 8  # an architecture this version does not know
    config["task"] = "detection"
    (newer / "config.yaml").write_text(yaml.safe_dump(config))
    place(offline_cache, "me/newer", newer)
    with pytest.raises(hub.HubError) as err:
        oneref.load("me/newer")
    assert "me/newer holds a checkpoint this version of oneref cannot use" in str(err.value)
    assert "unknown architecture fields ['experts']" in str(err.value)
    assert "task is 'detection'" in str(err.value)


def test_push_refuses_bad_ids_and_a_missing_checkpoint(ckpt, tmp_path, capsys):
    assert convert(["push", str(ckpt), "not-an-id", "--local-dir", str(tmp_path / "a"), "--dry-run"]) == 2
    assert "'not-an-id' is not a repository id: write OWNER/NAME" in capsys.readouterr().err
    assert (
        convert(
            ["push", str(tmp_path / "nope.ckpt"), "me/x", "--local-dir", str(tmp_path / "b"), "--dry-run"]
        )
        == 2
    )
    assert f"checkpoint {tmp_path / 'nope.ckpt'} does not exist" in capsys.readouterr().err
    assert convert(["push", str(ckpt), "me/x", "--dry-run"]) == 2
    assert "--dry-run writes the folder only: give it with --local-dir DIR" in capsys.readouterr().err


def test_the_card_quotes_the_papers_row_only_for_a_published_kind_of_model():
    from oneref.models.registry import model_config

    section = hub.published_numbers(model_config("base"), "rec", "refcoco")
    assert section.startswith("## Published numbers") and "OneRef-B (BEiT3-B)" in section
    assert "| acc@0.5 | unc | val | 88.75 |" in section
    assert "| unc+ |" not in section  # single-dataset rows: only the training dataset's numbers
    assert hub.published_numbers(model_config("tiny"), "rec", "synthetic") == ""
