"""``Checkpoint.open``: what a checkpoint path is, decided once (format, architecture, task,
tokenizer, training facts), the tokenizer rule, and ``check_fits`` from keys and shapes only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers.compose import train_tiny_checkpoint
from helpers.models import tiny_config, tiny_model
from helpers.released import write_released_data
from oneref.checkpoint import (
    FORMAT_NAMES,
    Checkpoint,
    CheckpointError,
    load_model,
    official_keys,
    save_folder,
    to_official,
)
from oneref.data.tokenizer import train_sentencepiece
from oneref.errors import UserError

CORPUS_A = ["the red circle on the left", "a blue square", "the big green triangle", "left of the red one"]
CORPUS_B = ["zebra crossing at night", "quick brown fox jumps", "lazy dog sleeps", "over the hills far away"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file of every format, from the tiny model, and two different tokenizers."""
    root = tmp_path_factory.mktemp("formats")
    spm_a = train_sentencepiece(CORPUS_A * 20, root / "a.spm", vocab_size=40)
    spm_b = train_sentencepiece(CORPUS_B * 20, root / "b.spm", vocab_size=40)
    rec = tiny_model(seed=0)
    sd = rec.state_dict()
    torch.save(to_official(sd, rec.cfg)[0], root / "OneRef_T.pth")
    mrefm = tiny_model(seed=1, mim_codebook_size=16, mlm_head=True)
    torch.save({"model": mrefm.state_dict()}, root / "mrefm_T.pth")
    torch.save({"model": {k: v for k, v in sd.items() if k.startswith("beit3.")}}, root / "beit3_T.pth")
    save_folder(root / "folder", sd, rec.cfg, task="rec", max_query_len=20, tokenizer=spm_a)
    lightning = {
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "pytorch-lightning_version": "2.4.0",
        "epoch": 3,
        "global_step": 12,
        "hyper_parameters": {
            "model": {"size": "tiny"},
            "task": {"name": "rec", "frozen_backbone": False},
            "dataset": "refcoco",
            "architecture": rec.cfg.to_dict(),
        },
        "tokenizer": {"model": spm_a.read_bytes(), "max_query_len": 20, "source": str(spm_a)},
    }
    torch.save(lightning, root / "best.ckpt")
    return {
        "official": root / "OneRef_T.pth",
        "mrefm": root / "mrefm_T.pth",
        "beit3": root / "beit3_T.pth",
        "folder": root / "folder",
        "lightning": root / "best.ckpt",
        "spm_a": spm_a,
        "spm_b": spm_b,
    }


# -- detection --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_each_format_is_detected_from_the_content(files, fmt):
    ckpt = Checkpoint.open(files[fmt])
    # an MRefM file has the key groups of an official checkpoint with MIM/MLM heads: named only
    assert ckpt.format == ("official" if fmt == "mrefm" else fmt) and ckpt.detected
    if fmt == "mrefm":
        assert ckpt.task == "mrefm" and ckpt.config.mim_codebook_size == 16  # the heads it has
        named = Checkpoint.open(files[fmt], "mrefm")
        assert named.format == "mrefm" and named.task == "mrefm" and not named.config.mlm_head  # for REC
        return
    if fmt == "beit3":  # a backbone: the model to build comes from the config
        assert ckpt.config is None and "pass a config" in ckpt.config_problem and not ckpt.runnable
        return
    assert ckpt.config.embed_dim == 128 and ckpt.config.img_size == 64
    assert ckpt.task == "rec"
    assert (ckpt.carried_tokenizer is not None) == (fmt in ("folder", "lightning"))
    assert fmt in str(ckpt)


def test_a_lightning_checkpoint_records_its_training(files):
    ckpt = Checkpoint.open(files["lightning"])
    assert ckpt.dataset == "refcoco" and ckpt.setting == "single"
    assert ckpt.training["epoch"] == 3 and ckpt.training["size"] == "tiny" and ckpt.max_query_len == 20
    official = Checkpoint.open(files["official"])
    assert official.dataset is None and official.setting is None and official.training["size"] == "tiny"
    # resuming reads the same description
    from oneref.checkpoint.resume import checkpoint_step, resume_mismatch

    assert checkpoint_step(files["lightning"]) == (12, 3)
    assert resume_mismatch(files["lightning"], {"model": {"size": "tiny"}, "task": {"name": "res"}}) == [
        "task"
    ]
    with pytest.raises(CheckpointError, match="OneRef_T.pth is not a Lightning checkpoint"):
        checkpoint_step(files["official"])


def test_a_given_format_wins_and_a_contradiction_is_a_clear_error(files):
    named = Checkpoint.open(files["official"], "mrefm")
    assert named.format == "mrefm" and not named.detected
    assert Checkpoint.open(files["official"], "auto").detected
    with pytest.raises(
        CheckpointError, match=r"best.ckpt is a Lightning checkpoint, not ckpt_format='official'"
    ):
        Checkpoint.open(files["lightning"], "official")
    with pytest.raises(CheckpointError, match=r"folder is a checkpoint folder, not ckpt_format='lightning'"):
        Checkpoint.open(files["folder"], "lightning")
    with pytest.raises(CheckpointError, match=r"OneRef_T.pth is not a Lightning checkpoint"):
        Checkpoint.open(files["official"], "lightning")
    with pytest.raises(CheckpointError, match=r"OneRef_T.pth is a file, not a checkpoint folder"):
        Checkpoint.open(files["official"], "folder")
    with pytest.raises(
        CheckpointError, match=r"unknown ckpt_format 'oneref'; choose one of folder, lightning"
    ):
        Checkpoint.open(files["official"], "oneref")
    with pytest.raises(CheckpointError, match=r"nope.pth does not exist"):
        Checkpoint.open(files["official"].parent / "nope.pth")
    # a user's mistake: entry points print it and exit 2
    assert issubclass(CheckpointError, UserError)


def test_every_reader_gets_the_same_weights_from_every_format(files):
    cfg = tiny_config()
    want = tiny_model(seed=0).state_dict()
    for fmt in ("official", "folder", "lightning"):
        model, _ = load_model(files[fmt])
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items()), fmt
    model, report = load_model(files["beit3"], cfg)  # detected: heads start from initialisation
    assert set(report.missing) == {k for k in official_keys(cfg) if not k.startswith("beit3.")}


# -- tokenizer ---------------------------------------------------------------------------------------------
def test_a_checkpoint_runs_with_the_tokenizer_it_carries(files, tmp_path):
    ckpt = Checkpoint.open(files["lightning"])
    own = ckpt.choose_tokenizer(None)
    assert own.serialized() == files["spm_a"].read_bytes() and own.max_query_len == 20
    same = tmp_path / "copy.spm"
    shutil.copyfile(files["spm_a"], same)
    assert ckpt.choose_tokenizer(same).serialized() == own.serialized()  # the same pieces: accepted
    with pytest.raises(
        CheckpointError, match=r"tokenizer=.*b.spm .* is not the tokenizer .*best.ckpt was trained with"
    ):
        ckpt.choose_tokenizer(files["spm_b"])
    # a checkpoint that carries none takes the one given
    official = Checkpoint.open(files["official"])
    assert official.choose_tokenizer(None) is None
    assert official.choose_tokenizer(files["spm_b"], 20).model_path == str(files["spm_b"])


def test_the_data_tokenise_with_the_checkpoints_tokenizer(files, make_cfg):
    from oneref.factory import build_datamodule

    ckpt = Checkpoint.open(files["lightning"])
    # the dataset's default file is absent: the checkpoint's own is used, not an error
    cfg = make_cfg(f"ckpt_path={files['lightning']}", "data.tokenizer=/nonexistent/beit3.spm", name="eval")
    dm = build_datamodule(cfg, ckpt)
    assert dm.tokenizer.serialized() == files["spm_a"].read_bytes()
    assert dm.tokenizer.max_query_len == int(cfg.data.max_query_len)
    # another model named in the config: refused, naming both
    cfg = make_cfg(f"ckpt_path={files['lightning']}", f"data.tokenizer={files['spm_b']}", name="eval")
    with pytest.raises(CheckpointError, match=r"data.tokenizer=.*b.spm .*best.ckpt.*Set data.tokenizer=null"):
        build_datamodule(cfg, ckpt)


def test_eval_of_our_checkpoint_on_released_data_needs_no_beit3_spm(make_cfg, tmp_path, cache_dir):
    """The reported case: ``oneref.eval ckpt_path=best.ckpt data=refcoco`` asked for beit3.spm,
    and, when that file existed, used it instead of the model's own tokenizer."""
    from oneref.eval import evaluate

    ckpt = train_tiny_checkpoint("rec", tmp_path / "train", cache_dir)
    root = write_released_data(tmp_path / "released")
    (root / "beit3.spm").rename(root / "other.spm")
    overrides = (f"ckpt_path={ckpt}", "data=refcoco", f"paths.data_dir={root}")
    cfg = make_cfg(*overrides, name="eval")
    metrics = evaluate(cfg)
    accuracies = [
        v for k, v in metrics.items() if k.startswith(f"test/{cfg.data.dataset}/") and k.endswith("/acc@0.5")
    ]
    assert accuracies and all(0 <= v <= 1 for v in accuracies)
    (root / "other.spm").rename(root / "beit3.spm")  # another model: refused, naming both
    with pytest.raises(UserError, match=r"data.tokenizer=.*beit3.spm .*best.ckpt"):  # preflight or the load
        evaluate(make_cfg(*overrides, name="eval"))


# -- check_fits ----------------------------------------------------------------------------------------------
def test_check_fits_reads_keys_and_shapes_only(files, monkeypatch):
    import oneref.checkpoint.folder as folder_module

    def never(*args, **kwargs):
        raise AssertionError("check_fits read the weights")

    monkeypatch.setattr(folder_module, "load_file", never)
    cfg = tiny_config()
    for fmt in ("official", "folder", "lightning", "beit3"):
        assert Checkpoint.open(files[fmt]).check_fits(cfg) == [], fmt
    assert Checkpoint.open(files["mrefm"], "mrefm").check_fits(cfg) == []  # its MIM/MLM heads are dropped
    (heads,) = Checkpoint.open(files["mrefm"]).check_fits(cfg)  # as official: strict
    assert "unexpected" in heads and "mim_head.weight" in heads
    bigger = Checkpoint.open(files["official"]).check_fits(tiny_config(img_size=96))
    assert len(bigger) == 1 and "img_size 64" in bigger[0] and "resize_positions" in bigger[0]
    assert (
        Checkpoint.open(files["official"]).check_fits(tiny_config(img_size=96), resize_positions=True) == []
    )
    (res,) = Checkpoint.open(files["official"]).check_fits(tiny_config(seg_head=True))
    assert "does not fit" in res and "missing" in res and "seg_conv1.weight" in res
    (wide,) = Checkpoint.open(files["folder"]).check_fits(tiny_config(embed_dim=64, num_heads=2))
    assert "width 128" in wide and "width 64" in wide
