"""oneref.preflight: every input a run names is checked before anything is built, and every
problem is reported at once with the key to set and where the file is published."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from helpers.models import tiny_model
from helpers.released import write_released_data
from oneref import preflight
from oneref.checkpoint import to_official
from oneref.errors import UserError, report_user_errors
from oneref.preflight import PreflightError


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A fake copy of the released data (paths.data_dir), with tiny weights in the official formats."""
    return write_released_data(
        tmp_path_factory.mktemp("released"),
        weights=[("beit3_tiny.pth", "beit3"), ("mrefm_tiny.pth", "mrefm"), ("oneref_tiny.pth", "official")],
    )


@pytest.fixture
def no_model_built(monkeypatch):
    """Building a OneRef (on any device but meta, where only key names and shapes exist) fails."""
    from oneref.models.oneref import OneRef

    init = OneRef.__init__

    def guarded(self, cfg, *args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("preflight built a model")
        init(self, cfg, *args, **kwargs)

    monkeypatch.setattr(OneRef, "__init__", guarded)


def _problems(*cfgs) -> list[preflight.Problem]:
    with pytest.raises(PreflightError) as err:
        preflight.check(list(cfgs))
    return err.value.problems


def test_the_synthetic_default_needs_nothing(make_cfg, no_model_built):
    preflight.check([make_cfg()])


def test_everything_missing_is_reported_at_once(make_cfg, tmp_path, capsys):
    """Every problem listed with its key and source, exit 2, no traceback."""
    none = tmp_path / "none"
    rec = make_cfg(
        "data=refcoco",
        f"paths.data_dir={none}",
        f"init_from={none}/beit3_base_indomain_patch16_224.pth",
        "ckpt_format=beit3",
        "model=base",
    )
    mrefm = make_cfg(
        "task=mrefm",
        "data=mixup_refc_referit",
        f"paths.data_dir={none}",
        "model=base",
        f"data.mrefm.spacy_model={none}/en_core_web_md",
    )
    problems = _problems(rec, mrefm)
    text = str(PreflightError(problems))
    for key in (
        "data.tokenizer=",
        "data.split_root=",
        "data.data_root=",
        "paths.data_dir=",
        "init_from=",
        "task.vqkd.checkpoint=",
        "data.mrefm.spacy_model=",
    ):
        assert key in text, key
    for source in (
        "microsoft/unilm, folder beit3",
        "linhuixiao/OneRef",
        "beit2/README.md",
        "cocodataset.org",
    ):
        assert source in text, source
    whats = [p.what for p in problems]
    assert whats.count("tokenizer") == 1  # the same file for both stages: listed once, for both
    tok = next(p for p in problems if p.what == "tokenizer")
    assert len(tok.stages) == 2
    # refcoco: one entry naming both folders looked in, every split the run touches
    unc = next(p for p in problems if p.what == "split files" and "refcoco:" in p.detail)
    assert f"{none}/split/data/single_dataset/unc/: unc_train.pth, unc_val.pth, unc_testA.pth" in unc.detail
    assert f"{none}/split/data/unc/: unc_train.pth" in unc.detail and "unc_testB.pth" in unc.detail
    assert any(p.what == "images" and "referit/images" in p.detail for p in problems)

    @report_user_errors
    def run():
        preflight.check([rec, mrefm])

    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"preflight found {len(problems)} problems" in err
    assert issubclass(PreflightError, UserError)


def test_a_complete_release_passes_for_a_base_config(make_cfg, released, no_model_built):
    """The released layout with every file in place; the base model is checked without being built."""
    # the data of a base config (its released weights are far from tiny: their checks are below)
    preflight.check(
        [make_cfg("data=refcoco", "model=base", f"paths.data_dir={released}", "init_from=scratch")]
    )
    preflight.check([make_cfg("data=mixup_refc_referit", f"paths.data_dir={released}")])


def test_wrong_size_weights_are_found_from_shapes_alone(make_cfg, released, no_model_built, monkeypatch):
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ckpt = released / "checkpoints" / "oneref_tiny.pth"
    cfg = make_cfg(
        f"paths.data_dir={released}",
        "data=refcoco",
        "model=base",
        f"init_from={ckpt}",
        "ckpt_format=official",
    )
    (problem,) = _problems(cfg)
    assert problem.what == "initial weights" and "init_from=" in problem.fix
    assert "tiny (width 128, 3 layers" in problem.detail and "base (width 768, 12 layers" in problem.detail
    assert "released OneRef checkpoints" in problem.source
    weights = [c for c in calls if c.get("weights_only") and "mmap" in c]
    assert weights and all(c["mmap"] for c in weights)  # memory-mapped, never read whole


def test_weights_of_the_right_size_and_format(make_cfg, released, tmp_path):
    ck = released / "checkpoints"
    for name, fmt in (
        ("beit3_tiny.pth", "beit3"),
        ("mrefm_tiny.pth", "mrefm"),
        ("oneref_tiny.pth", "official"),
    ):
        preflight.check([make_cfg(f"init_from={ck / name}", f"ckpt_format={fmt}")])
    # an MRefM pretraining file (MIM/MLM heads) continues MRefM, but is no grounding checkpoint
    mrefm = make_cfg("task=mrefm")
    net = tiny_model(mim_codebook_size=int(mrefm.task.vqkd.codebook_size), mlm_head=True)
    pretrained = tmp_path / "mrefm_pretrained.pth"
    torch.save(to_official(net.state_dict(), net.cfg)[0], pretrained)
    preflight.check([make_cfg("task=mrefm", f"init_from={pretrained}", "ckpt_format=official")])
    (problem,) = _problems(make_cfg(f"init_from={pretrained}", "ckpt_format=official"))
    assert "unexpected" in problem.detail and "mim_head" in problem.detail
    # BEiT-3 weights as a finished grounding model: the heads are missing
    (problem,) = _problems(make_cfg(f"init_from={ck / 'beit3_tiny.pth'}", "ckpt_format=official"))
    assert "missing" in problem.detail and "bbox_embed" in problem.detail
    # not a checkpoint at all
    junk = tmp_path / "junk.pth"
    junk.write_text("<html>not found</html>")
    (problem,) = _problems(make_cfg(f"init_from={junk}"))
    assert "is not a PyTorch checkpoint" in problem.detail


def test_scratch_and_a_later_stages_init_from_an_earlier_export(make_cfg, tmp_path, no_model_built):
    preflight.check([make_cfg("init_from=scratch")])
    stage1 = make_cfg("run_name=s1")
    stage2 = make_cfg("run_name=s2", f"init_from={stage1.export_best}")
    preflight.check([stage1, stage2])  # stage 1 writes it
    (problem,) = _problems(stage2)  # alone, it is missing
    assert problem.what == "initial weights" and "run that stage first" in problem.source


def test_output_folder_must_be_writable(make_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.paths.output_dir = str(blocker / "run")
    (problem,) = _problems(cfg)
    assert problem.what == "output folder" and "is a file, not a folder" in problem.detail
    assert "hydra.run.dir=" in problem.fix


def test_missing_images_are_found_from_a_sample_of_one_file(make_cfg, released, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(released, root)
    coco = root / "image_data/other/images/mscoco/images/train2014"
    for image in coco.iterdir():
        image.unlink()
    reads: list[Path] = []
    from oneref.data import records

    load = records.load_split_file
    monkeypatch.setattr(records, "load_split_file", lambda p: reads.append(Path(p)) or load(p))
    stage1, stage2 = (make_cfg("data=refcoco", f"paths.data_dir={root}", f"run_name=s{i}") for i in (1, 2))
    problems = _problems(stage1, stage2)
    assert {p.what for p in problems} == {"images"}
    assert all("sampled images" in p.detail and "COCO_train2014_" in p.detail for p in problems)
    assert all(len(p.stages) == 2 for p in problems)
    assert len(reads) == 1  # one split file read, once for both stages


def test_unknown_split_names_and_datasets(make_cfg, released):
    cfg = make_cfg("data=refcoco", f"paths.data_dir={released}", "data.test_splits=[val,test]")
    (problem,) = _problems(cfg)
    assert "has no split test" in problem.detail and "data.test_splits=" in problem.fix
    cfg = make_cfg("data=refcoco", f"paths.data_dir={released}")
    with open_dict(cfg):
        cfg.data.dataset = "refclef"
    (problem,) = _problems(cfg)
    assert problem.what == "dataset" and "data=refcoco" in problem.fix


def test_check_eval_names_the_checkpoint(make_cfg, released, tmp_path, no_model_built):
    ckpt = released / "checkpoints" / "oneref_tiny.pth"
    preflight.check_eval(
        make_cfg(
            f"ckpt_path={ckpt}",
            "ckpt_format=official",
            "data=refcoco",
            f"paths.data_dir={released}",
            name="eval",
        )
    )
    cfg = make_cfg(
        f"ckpt_path={ckpt}", "ckpt_format=official", "model=base", f"paths.data_dir={tmp_path}", name="eval"
    )
    with pytest.raises(PreflightError) as err:
        preflight.check_eval(cfg)
    (problem,) = err.value.problems  # synthetic data needs nothing
    assert (
        problem.what == "checkpoint" and "ckpt_path=" in problem.fix and "base (width 768" in problem.detail
    )


def test_a_split_file_that_is_no_torch_file(make_cfg, released, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(released, root)
    bad = root / "split/data/single_dataset/unc/unc_testB.pth"
    bad.write_text("<html>rate limited</html>")
    (problem,) = _problems(make_cfg("data=refcoco", f"paths.data_dir={root}"))
    assert (
        problem.what == "split files"
        and str(bad) in problem.detail
        and "not a torch.save file" in problem.detail
    )


def test_a_misspelt_paper_row_is_found_before_the_run(make_cfg):
    (problem,) = _problems(make_cfg("paper_row=rec_mixup_huge"))
    assert problem.what == "paper row" and "rec_mixup_large" in problem.fix
    preflight.check([make_cfg("paper_row=rec_mixup_large")])


def test_check_eval_follows_our_checkpoints_image_size_and_tokenizer(make_cfg, released, tmp_path):
    """One of our .ckpt files brings its architecture; the data must be prepared at its size."""
    from helpers.compose import train_tiny_checkpoint

    ckpt = train_tiny_checkpoint("rec", tmp_path / "train", tmp_path / "cache")
    preflight.check_eval(make_cfg(f"ckpt_path={ckpt}", name="eval"))
    # it carries its tokenizer: the data need no beit3.spm
    no_spm = tmp_path / "no_spm"
    shutil.copytree(released, no_spm)
    (no_spm / "beit3.spm").unlink()
    preflight.check_eval(
        make_cfg(f"ckpt_path={ckpt}", "data=refcoco", f"paths.data_dir={no_spm}", name="eval")
    )
    # another tokenizer beside it is refused (the model's ids would mean other words)
    with pytest.raises(PreflightError) as err:
        preflight.check_eval(
            make_cfg(f"ckpt_path={ckpt}", "data=refcoco", f"paths.data_dir={released}", name="eval")
        )
    (problem,) = err.value.problems
    assert problem.what == "tokenizer" and problem.fix.startswith("data.tokenizer=null")
    official = released / "checkpoints" / "oneref_tiny.pth"  # carries none
    with pytest.raises(PreflightError, match="data.tokenizer="):
        preflight.check_eval(
            make_cfg(f"ckpt_path={official}", "data=refcoco", f"paths.data_dir={no_spm}", name="eval")
        )
    with pytest.raises(PreflightError) as err:
        preflight.check_eval(make_cfg(f"ckpt_path={ckpt}", "model=base", name="eval"))
    (problem,) = err.value.problems
    assert "64 px images" in problem.detail and "data.img_size=384" in problem.detail
    assert problem.fix.startswith("model=tiny")


def test_another_annotation_format_is_checked_for_its_splits(make_cfg, released):
    """data.format names a format whose files are not there: the splits it lacks are listed."""
    (problem,) = _problems(make_cfg("data=refcoco", f"paths.data_dir={released}", "data.format=refer"))
    assert problem.what == "annotations" and "refs(unc).p" in problem.detail and "data.format=" in problem.fix
