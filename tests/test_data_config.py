"""DataConfig (the ``data`` node, typed and checked) and the one name of each dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from helpers.compose import compose_config
from oneref import factory
from oneref.config import config_dir
from oneref.data.config import DataConfig, DataConfigError
from oneref.data.datamodule import RefDataModule
from oneref.data.records import DATASETS, OFFICIAL_NAMES, split_file_candidates
from oneref.errors import UserError

DATA_CONFIGS = sorted(
    p.stem for p in (Path(config_dir()) / "data").glob("*.yaml") if not p.stem.startswith("_")
)


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_round_trips(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"data={name}"], tmp_path, tmp_path / "cache", shrink=False)
    config = DataConfig.from_dict(cfg.data)
    assert config.dataset == name  # each dataset is called by its config's name
    assert DataConfig.from_dict(config.as_dict()) == config
    plain = config.as_dict()
    for key in ("img_size", "max_query_len", "batch_size", "eval_batch_size", "seg_masks", "format"):
        assert plain[key] == cfg.data[key], key
    assert plain["test_splits"] == list(cfg.data.test_splits)
    assert plain["mrefm"]["spacy_model"] == cfg.data.mrefm.spacy_model
    assert (config.synthetic is not None) == (name == "synthetic")


def test_hydra_builds_the_datamodule_with_its_options_under_one_key(make_cfg) -> None:
    cfg = make_cfg("data.batch_size=3", "data.text_buckets=[8,20]")
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, RefDataModule) and dm.config == DataConfig.from_dict(cfg.data)
    assert dm.config.batch_size == 3 and dm.config.text_buckets == (8, 20)
    # one key: it never clashes with the LightningModule's (model, task, optim, dataset, ...)
    assert list(dm.hparams) == ["data"] and dm.hparams["data"] == dm.config.as_dict()
    assert dm.hparams["data"]["dataset"] == "synthetic"


def test_unknown_option_is_an_error_naming_it(make_cfg) -> None:
    with pytest.raises(
        DataConfigError, match=r"unknown data option\(s\) data\.batchsize; valid: .*'batch_size'"
    ):
        DataConfig.from_dict({"dataset": "synthetic", "batchsize": 4})
    cfg = make_cfg("+data.bogus=1")
    with pytest.raises(UserError, match=r"data\.bogus"):
        factory.build_datamodule(cfg)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bad_samples": "ignore"}, "data.bad_samples must be one of"),
        ({"num_workers": -1}, "data.num_workers must be an int >= 0 or 'auto'"),
        ({"text_buckets": [8, 16], "max_query_len": 20}, "must reach data.max_query_len=20"),
        ({"text_buckets": [20], "max_query_len": 20, "pad_to_max_len": True}, "set one"),
        ({"augment": {"crop": True}}, r"unknown augment option\(s\) \['crop'\]"),
        ({"mrefm": {"mlm_slots": -1}}, "data.mrefm.mlm_slots must be >= 0"),
    ],
)
def test_bad_values_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(DataConfigError, match=match):
        DataConfig.from_dict(options)


def test_datasets_have_one_name_and_official_names_only_name_files(tmp_path: Path) -> None:
    assert set(DATASETS) == set(DATA_CONFIGS)
    assert OFFICIAL_NAMES == {
        "refcoco": "unc",
        "refcoco_plus": "unc+",
        "refcocog_google": "gref",
        "refcocog_umd": "gref_umd",
        "referit": "referit",
        "flickr": "flickr",
        "mixup_refc": "mixup_with_refc",
        "mixup_refc_referit": "mixup_with_refc_referit",
        "synthetic": "synthetic",
    }
    assert split_file_candidates(tmp_path, "refcoco_plus", "testA") == [
        tmp_path / "single_dataset/unc+/unc+_testA.pth",
        tmp_path / "unc+/unc+_testA.pth",
    ]
    assert split_file_candidates(tmp_path, "mixup_refc", "val") == [
        tmp_path / "mixup_with_refc/mixup/mixup_val.pth",
        tmp_path / "mixup_with_refc/mixup_with_refc_val.pth",
    ]
    # an official name is not a dataset name; the error says which one to use
    with pytest.raises(
        DataConfigError, match="'gref_umd' is the official name of 'refcocog_umd': use refcocog_umd"
    ):
        DataConfig(dataset="gref_umd")
    with pytest.raises(ValueError, match="unknown dataset 'unc'"):
        split_file_candidates(tmp_path, "unc", "val")


def test_a_checkpoint_reads_its_data_options_under_the_one_key(tmp_path: Path) -> None:
    """What the DataModule saved (``datamodule_hyper_parameters["data"]``) describes the checkpoint's
    data; a checkpoint written before that (options at the top level) reads the same."""
    import torch

    from helpers.models import tiny_model
    from oneref.checkpoint import Checkpoint

    model = tiny_model(seed=0)
    config = DataConfig(dataset="refcoco", max_query_len=17)
    base = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"model": {"size": "tiny"}, "task": {"name": "rec"}},
    }
    for saved in ({"data": config.as_dict()}, {"dataset": "refcoco", "max_query_len": 17}):
        torch.save({**base, "datamodule_hyper_parameters": saved}, tmp_path / "best.ckpt")
        ckpt = Checkpoint.open(tmp_path / "best.ckpt")
        assert ckpt.training["dataset"] == "refcoco" and ckpt.training["max_query_len"] == 17
