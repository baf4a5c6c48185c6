"""Checkpoint loading, conversion and folders and the errors for bad ones.

Official-layout state dicts are built from the official key list (tests/golden/official-keys-base384.txt)
and the size notes in it, never from our model, so the converter is checked against the official layout.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from helpers.golden import KEY_FILE
from oneref.checkpoint import (
    CheckpointError,
    LoadError,
    build_model,
    convert_state_dict,
    infer_architecture,
    load_checkpoint_file,
    load_into,
    load_model,
    load_pretrained,
    official_keys,
    read_folder,
    resize_vision_positions,
    save_folder,
    to_official,
    validate_folder,
)
from oneref.convert import main as convert_main
from oneref.models import OneRef, OneRefConfig, model_config

KEYFILE = KEY_FILE

BASE = dict(width=768, ffn=3072, depth=12, pos_rows=579, vocab=64010, codebook=8192)


# -- official layout from the key file ---------------------------------------------------------------
def read_keyfile() -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    sections: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    current = None
    for line in KEYFILE.read_text().splitlines():
        m = re.match(r"## SECTION (\w)", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif line and not line.startswith("#") and current:
            key, shape, dtype = line.split("\t")
            sections[current].append((key, tuple(json.loads(shape)), dtype))
    return sections


def mrefm_layer_keys(d: int) -> list[tuple[str, tuple[int, ...], str]]:
    """The MRefM MLP heads (mim_vts_head.layers.{0,1} [D,D], .2 [4,D];
    mlm_sts_head the same with [1,D]); Section C counts them but lists only the Linear heads."""
    out = []
    for head, last in (("mim_vts_head", 4), ("mlm_sts_head", 1)):
        for j, o in enumerate((d, d, last)):
            out += [
                (f"{head}.layers.{j}.weight", (o, d), "float32"),
                (f"{head}.layers.{j}.bias", (o,), "float32"),
            ]
    return out


def official_layout(
    sections: str = "A",
    *,
    width: int = 768,
    ffn: int = 3072,
    depth: int = 12,
    pos_rows: int = 579,
    vocab: int = 64010,
    codebook: int = 8192,
    fill: str = "random",
    seed: int = 0,
) -> dict[str, Tensor]:
    """An official state dict: key names and shapes from the key file, dims substituted for other
    sizes, layer 0's keys repeated for every layer. fill='random' draws values; 'expand' makes
    zero-stride views (shapes only, tiny files) for tests that must fail before reading values."""
    data = read_keyfile()
    rows = [r for s in sections if s != "C" for r in data[s]]
    if "C" in sections:
        rows += data["C"] + mrefm_layer_keys(768)
    dims = {768: width, 3072: ffn, 579: pos_rows, 64010: vocab, 8192: codebook}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape, dtype in rows:
        m = re.match(r"beit3\.encoder\.layers\.(\d+)\.(.*)", key)
        names = (
            [key]
            if not m
            else (
                [] if m.group(1) != "0" else [f"beit3.encoder.layers.{i}.{m.group(2)}" for i in range(depth)]
            )
        )
        new_shape = tuple(dims.get(s, s) for s in shape)
        for name in names:
            if dtype == "int64":
                out[name] = torch.randint(1, 50, new_shape, generator=gen)
            elif fill == "expand":
                out[name] = torch.zeros(()).expand(new_shape)
            elif name.endswith("running_var"):
                out[name] = torch.rand(new_shape, generator=gen) + 0.5
            else:
                out[name] = torch.randn(new_shape, generator=gen)
    return out


def save_official(path: Path, state_dict: dict[str, Tensor]) -> Path:
    """The official file layout (train_oneref.py:339-357), an argparse.Namespace under args."""
    torch.save(
        {
            "model": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "lr_scheduler": {"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [None]},
            "epoch": 3,
            "args": argparse.Namespace(model="beit3_base_patch16_384", imsize=384, max_query_len=64, lr=1e-4),
            "val_accu": 0.8125,
        },
        path,
    )
    return path


def tiny_cfg(**kw) -> OneRefConfig:
    base = dict(embed_dim=32, num_heads=2, depth=2, ffn_dim=64, img_size=64, vocab_size=100)
    return OneRefConfig(**{**base, **kw})


def tiny_layout(cfg: OneRefConfig, sections: str = "A", seed: int = 0) -> dict[str, Tensor]:
    return official_layout(
        sections,
        width=cfg.embed_dim,
        ffn=cfg.ffn_dim,
        depth=cfg.depth,
        pos_rows=cfg.num_vision_tokens + 2,
        vocab=cfg.vocab_size,
        codebook=cfg.mim_codebook_size or 16,
        seed=seed,
    )


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, Tensor]) -> None:
    """Bitwise, so that uninitialised memory (NaN included) compares equal to itself."""
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), (
            f"{k} changed"
        )


def inputs(cfg: OneRefConfig, batch: int = 2, length: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 0
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, 5:] = True
    return image, ids, pad


# -- the key table -------------------------------------------------------------------------------------
def test_official_keys_match_the_official_key_file() -> None:
    data = read_keyfile()
    cfg = model_config("base", seg_head=True, mim_codebook_size=8192, mlm_head=True)
    ours = {k: tuple(s) for k, (s, _) in official_keys(cfg).items()}
    a_b = [(k, s) for k, s, _ in data["A"] + data["B"]]
    assert len(data["A"]) == 504 and len(data["B"]) == 18
    assert [(k, ours[k]) for k, _ in a_b] == a_b  # same keys, shapes and relative order
    c = {k: s for k, s, _ in data["C"] + mrefm_layer_keys(768)}
    assert len(c) == 16 and all(ours[k] == s for k, s in c.items())
    assert len(ours) == 504 + 18 + 16
    assert ours["logit_scale"] == ()
    assert official_keys(cfg)["bn1.num_batches_tracked"][1] == torch.int64


@pytest.mark.parametrize("heads", [{}, {"seg_head": True}, {"mim_codebook_size": 16, "mlm_head": True}])
def test_official_keys_match_our_model(heads: dict) -> None:
    cfg = tiny_cfg(**heads)
    model = OneRef(cfg)
    expected = [(k, tuple(s), dt) for k, (s, dt) in official_keys(cfg).items()]
    assert expected == [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


# -- official checkpoints: base-384 from the key file, large-384 from the size notes ---------------------
def test_base384_official_checkpoint_converts_and_loads_strictly(tmp_path: Path) -> None:
    sd = official_layout("ABCD", **BASE, seed=3)
    path = save_official(tmp_path / "best_checkpoint.pth", sd)
    del sd
    cfg = model_config("base", img_size=384, seg_head=True, mim_codebook_size=8192, mlm_head=True)
    model, report = load_model(path, cfg, "official")
    assert set(report.dropped) == {"layer_norm.weight", "layer_norm.bias"}  # mim_mid_layer, not built
    assert "mim_mid_layer" in report.dropped["layer_norm.weight"]
    assert not report.missing and not report.unexpected and len(report.mapped) == 538
    raw = load_checkpoint_file(path)["model"]
    loaded = model.state_dict()
    assert set(loaded) == set(raw) - {"layer_norm.weight", "layer_norm.bias"}
    for key, value in loaded.items():
        assert value.dtype == raw[key].dtype and torch.equal(value, raw[key]), key


def test_infer_architecture_from_shapes() -> None:
    base480 = official_layout("AB", **{**BASE, "pos_rows": 903}, fill="expand")
    arch = infer_architecture(base480)
    assert (arch["size"], arch["img_size"], arch["task"], arch["num_heads"]) == ("base", 480, "res", 12)
    large = official_layout("AC", width=1024, ffn=4096, depth=24, pos_rows=579, fill="expand")
    arch = infer_architecture(large)
    assert (arch["size"], arch["depth"], arch["img_size"], arch["task"]) == ("large", 24, 384, "mrefm")
    assert arch["mim_codebook_size"] == 8192 and arch["mlm_head"]


@pytest.mark.slow
def test_large384_official_checkpoint_converts_and_loads_strictly(tmp_path: Path) -> None:
    sd = official_layout("A", width=1024, ffn=4096, depth=24, pos_rows=579, seed=4)
    assert len(sd) == 984  # size notes: 984 tensors in the REC config
    path = save_official(tmp_path / "large.pth", sd)
    del sd
    model, report = load_model(path, model_config("large", img_size=384), "official")
    assert len(report.mapped) == 984 and not report.dropped
    raw = load_checkpoint_file(path)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_converted_outputs_equal_a_model_loaded_straight_from_the_state_dict(tmp_path: Path) -> None:
    cfg = tiny_cfg(seg_head=True, mim_codebook_size=16, mlm_head=True)
    sd = tiny_layout(cfg, "ABC", seed=5)
    direct = OneRef(cfg)
    direct.load_state_dict(sd, strict=True)
    converted = OneRef(cfg)
    report = load_pretrained(converted, save_official(tmp_path / "ck.pth", sd), "official")  # in place
    assert len(report.mapped) == len(sd)
    image, ids, pad = inputs(cfg)
    masked = torch.zeros(2, cfg.num_patches, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        for model in (direct, converted):
            model.eval()
        a = direct(image, ids, pad, mim_masked_pos=masked)
        b = converted(image, ids, pad, mim_masked_pos=masked)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.isfinite(a[key]).all() and torch.equal(a[key], b[key]), key


# -- position resize ---------------------------------------------------------------------------------------
def cubic_matrix(n_in: int, n_out: int) -> Tensor:
    """Keys' cubic convolution (a = -0.75) as an (n_out, n_in) matrix, half-pixel centres
    (align_corners=False), border samples clamped: the definition, written out independently."""
    a = -0.75

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += k(src - j)
    return w


def test_position_resize_224_to_384_matches_an_independent_bicubic() -> None:
    d = 6
    table = torch.randn(3 + 14 * 14, d, generator=torch.Generator().manual_seed(7))
    out = resize_vision_positions(table, 24)
    assert out.shape == (3 + 24 * 24, d)
    assert torch.equal(out[:3], table[:3])  # 2 unused rows + cls kept
    w = cubic_matrix(14, 24)
    grid = table[3:].double().reshape(14, 14, d)  # row-major patch grid, channels last
    ref = torch.einsum("ia,jb,abd->ijd", w, w, grid).reshape(24 * 24, d)
    torch.testing.assert_close(out[3:].double(), ref, rtol=0, atol=1e-5)


def test_beit3_checkpoint_is_resized_and_heads_reported(tmp_path: Path) -> None:
    cfg = tiny_cfg(img_size=384, seg_head=True)
    pre = {
        k: v for k, v in tiny_layout(tiny_cfg(img_size=224), "A", seed=8).items() if k.startswith("beit3.")
    }
    pre["beit3.pretraining_only.weight"] = torch.ones(3)  # e.g. a pretraining-only tensor
    table = pre["beit3.encoder.embed_positions.A.weight"]
    assert table.shape[0] == 3 + 14 * 14
    sd, report = convert_state_dict(pre, cfg, "beit3")
    assert report.resized and report.resized[0]["from"] == [199, 32] and report.resized[0]["to"] == [579, 32]
    assert torch.equal(sd["beit3.encoder.embed_positions.A.weight"], resize_vision_positions(table, 24))
    assert torch.equal(
        sd["beit3.encoder.embed_positions.B.weight"], pre["beit3.encoder.embed_positions.B.weight"]
    )
    heads = {k for k in official_keys(cfg) if not k.startswith("beit3.")}
    assert (
        set(report.missing) == heads and "bbox_embed.layers.2.weight" in heads and "seg_conv1.weight" in heads
    )
    assert "beit3.pretraining_only.weight" in report.dropped
    with pytest.raises(LoadError, match="ckpt_format='beit3'"):
        load_into(OneRef(cfg), sd)  # strict: heads missing
    path = tmp_path / "beit3_tiny_patch16_224.pth"
    torch.save({"model": pre}, path)
    model, report = load_model(path, cfg, "beit3")
    assert set(report.missing) == heads
    assert set(load_model(path, cfg)[1].missing) == heads  # detected: no grounding head
    state = model.state_dict()
    assert torch.equal(
        state["beit3.encoder.layers.1.ffn.B.fc2.weight"], pre["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    )


def test_resize_positions_flag_for_official_checkpoints(tmp_path: Path) -> None:
    cfg96 = tiny_cfg(img_size=96)
    sd = tiny_layout(cfg96, "A", seed=9)
    cfg64 = tiny_cfg(img_size=64)
    with pytest.raises(CheckpointError, match="img_size 96.*resize_positions=True"):
        convert_state_dict(sd, cfg64)
    out, report = convert_state_dict(sd, cfg64, resize_positions=True)
    assert out["beit3.encoder.embed_positions.A.weight"].shape == (3 + 16, 32)
    assert report.resized[0]["key"] == "beit3.encoder.embed_positions.A.weight"


# -- MRefM ----------------------------------------------------------------------------------------------------
def test_mrefm_heads_are_dropped_and_listed(tmp_path: Path) -> None:
    src_cfg = tiny_cfg(mim_codebook_size=16, mlm_head=True)
    sd = tiny_layout(src_cfg, "AC", seed=10)
    rec = tiny_cfg()
    out, report = convert_state_dict(sd, rec, "mrefm")
    dropped = {k for k in sd if k.startswith(("mim_", "mlm_"))}
    assert set(report.dropped) == dropped and len(dropped) == 16
    assert all("MRefM" in why for why in report.dropped.values())
    load_into(OneRef(rec), out)  # strict
    # the same file as an official OneRef checkpoint: strict, and the error says what to do
    path = save_official(tmp_path / "mrefm.pth", sd)
    model = OneRef(rec)
    before = snapshot(model)
    with pytest.raises(LoadError, match="format 'mrefm'"):
        load_pretrained(model, path, "official")
    assert_unchanged(model, before)
    # MRefM -> RES: the seg head is expected to be missing and is reported
    res = tiny_cfg(seg_head=True)
    model, report = load_model(path, res, "mrefm")
    assert {k for k in report.missing} == {k for k in official_keys(res) if k.startswith(("seg_conv", "bn"))}


# -- round trips ----------------------------------------------------------------------------------------------
def test_round_trip_ours_official_ours_is_bit_identical(tmp_path: Path) -> None:
    cfg = tiny_cfg(seg_head=True, mim_codebook_size=16, mlm_head=True)
    torch.manual_seed(11)
    model = OneRef(cfg)
    with torch.no_grad():
        model.bn2.running_var.uniform_(0.5, 2.0)
        model.bn2.num_batches_tracked.fill_(17)
    ours = model.state_dict()
    official, _ = to_official(ours, cfg, epoch=5)
    assert set(official) == {"model", "epoch"} and list(official["model"]) == list(official_keys(cfg))
    path = tmp_path / "exported.pth"
    torch.save(official, path)
    back, report = load_model(path, cfg, "official")
    assert not report.missing and not report.dropped
    for key, value in back.state_dict().items():
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
    with pytest.raises(CheckpointError, match="missing"):
        to_official({k: v for k, v in ours.items() if k != "visu_proj.bias"}, cfg)


def test_folder_round_trip_and_cli_to_official(tmp_path: Path) -> None:
    cfg = tiny_cfg(seg_head=True)
    torch.manual_seed(12)
    model = OneRef(cfg)
    tok = tmp_path / "beit3.spm"
    tok.write_bytes(b"sentencepiece stand-in")
    folder = save_folder(tmp_path / "ck", model.state_dict(), cfg, task="res", tokenizer=tok)
    check = validate_folder(folder)
    assert check.ok, str(check)
    opened = read_folder(folder)
    assert (
        opened.cfg == cfg
        and opened.tokenizer == folder / "beit3.spm"
        and opened.preprocessing["img_size"] == 64
    )
    loaded, report = load_model(folder)
    assert report.source_format == "folder"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    in_place = OneRef(cfg)
    report = load_pretrained(in_place, folder)
    assert len(report.mapped) == len(model.state_dict()) and "folder" in str(report)
    assert all(torch.equal(in_place.state_dict()[k], v) for k, v in model.state_dict().items())
    assert convert_main(["to-official", str(folder), str(tmp_path / "out.pth")]) == 0
    exported = load_checkpoint_file(tmp_path / "out.pth")
    assert all(torch.equal(exported["model"][k], v) for k, v in model.state_dict().items())


# -- folders ---------------------------------------------------------------------------------------------------
def test_cli_official_writes_a_valid_folder_and_validate_names_what_is_missing(
    golden_dir: Path, tmp_path: Path, capsys
) -> None:
    meta = json.loads((golden_dir / "config.json").read_text())["architecture"]
    tok = tmp_path / "beit3.spm"
    tok.write_bytes(b"sentencepiece stand-in")
    out = tmp_path / "golden_folder"
    ck = str(golden_dir / "checkpoint.pth")
    assert convert_main(["official", ck, str(out)]) == 2  # no registered size: heads unknown
    assert "--num-heads" in capsys.readouterr().err
    heads, query_len = str(meta["attention_heads"]), str(meta["text_tokens"])
    assert (
        convert_main(
            [
                "official",
                ck,
                str(out),
                "--num-heads",
                heads,
                "--tokenizer",
                str(tok),
                "--max-query-len",
                query_len,
            ]
        )
        == 0
    )
    assert convert_main(["validate", str(out)]) == 0
    report = json.loads((out / "conversion.json").read_text())
    raw = load_checkpoint_file(golden_dir / "checkpoint.pth")["model"]
    assert report["counts"]["mapped"] == len(raw) and report["source_format"] == "official"
    model, _ = load_model(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())
    capsys.readouterr()

    (out / "beit3.spm").unlink()
    assert convert_main(["validate", str(out)]) == 1
    text = capsys.readouterr().out
    assert "beit3.spm" in text and "--tokenizer" in text
    (out / "model.safetensors").unlink()
    (out / "config.yaml").unlink()
    check = validate_folder(out)
    joined = "\n".join(check.problems)
    assert (
        "model.safetensors" in joined
        and "config.yaml" in joined
        and "python -m oneref.convert official" in joined
    )
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_model(out)


def test_folder_refuses_weights_that_do_not_match_its_config(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    sd = OneRef(cfg).state_dict()
    sd.pop("visu_proj.bias")
    with pytest.raises(CheckpointError, match="visu_proj.bias"):
        save_folder(tmp_path / "bad", sd, cfg, task="rec")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_official(tmp_path: Path) -> tuple[OneRefConfig, Path]:
    cfg = tiny_cfg(seg_head=True)
    return cfg, save_official(tmp_path / "tiny.pth", tiny_layout(cfg, "AB", seed=13))


def test_truncated_file_is_a_clear_error_and_loads_nothing(tiny_official, tmp_path: Path) -> None:
    cfg, path = tiny_official
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    model = OneRef(cfg)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"cut\.pth is truncated or corrupt"):
        load_pretrained(model, cut, "official")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "content, match",
    [(b"<html>404 Not Found</html>", "is not a PyTorch checkpoint"), (b"", "is empty")],
)
def test_non_checkpoint_file_is_a_clear_error(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    model = OneRef(tiny_cfg())
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(model, path, "official")
    assert_unchanged(model, before)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")


class _Exploit:
    def __reduce__(self):  # would create a marker file if it were ever unpickled
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = _Exploit()
    bomb.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.ones(1)}, "args": bomb}, path)
    with pytest.raises(CheckpointError, match="outside the safe allow-list"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_official_namespace_and_ddp_prefix(tiny_official, tmp_path: Path) -> None:
    cfg, path = tiny_official
    obj = load_checkpoint_file(path)
    assert isinstance(obj["args"], argparse.Namespace) and obj["epoch"] == 3
    ddp = tmp_path / "ddp.pth"
    torch.save({"module": {f"module.{k}": v for k, v in obj["model"].items()}}, ddp)
    model, report = load_model(ddp, cfg, "official")
    assert any("module." in n for n in report.notes) and any("'module'" in n for n in report.notes)


def test_large_checkpoint_into_base_model_is_refused(tmp_path: Path) -> None:
    path = save_official(
        tmp_path / "large.pth", official_layout("A", width=1024, ffn=4096, depth=24, fill="expand")
    )
    model = build_model(model_config("base"), initialise=False)
    before = snapshot(model)
    with pytest.raises(
        CheckpointError,
        match=r"is a large \(width 1024, 24 layers.*but the model .* base \(width 768.*size=large",
    ):
        load_pretrained(model, path, "official")
    assert_unchanged(model, before)


def test_480_checkpoint_into_384_model_needs_resize(tmp_path: Path) -> None:
    path = save_official(
        tmp_path / "base480.pth", official_layout("A", **{**BASE, "pos_rows": 903}, fill="expand")
    )
    model = build_model(model_config("base", img_size=384), initialise=False)
    before = snapshot(model)
    with pytest.raises(
        CheckpointError, match=r"img_size 480 .*903 rows.*img_size 384.*resize_positions=True"
    ):
        load_pretrained(model, path, "official")
    assert_unchanged(model, before)


def test_load_into_lists_every_problem_with_shapes_and_loads_nothing() -> None:
    cfg = tiny_cfg()
    sd = tiny_layout(cfg, "A", seed=14)
    del sd["visu_proj.bias"]
    sd["bbox_embed.layers.2.weight"] = torch.zeros(5, 32)
    sd["extra.weight"] = torch.zeros(1)
    model = OneRef(cfg)
    before = snapshot(model)
    with pytest.raises(LoadError) as err:
        load_into(model, sd)
    msg = str(err.value)
    assert "missing (1): visu_proj.bias" in msg and "unexpected (1): extra.weight" in msg
    assert "bbox_embed.layers.2.weight: checkpoint [5, 32] vs model [4, 32]" in msg
    assert "unchanged" in msg and err.value.missing == ["visu_proj.bias"]
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="allow_missing"):
        load_into(model, sd, strict=False)


def test_seg_checkpoint_into_rec_model_names_the_fix(tiny_official) -> None:
    _, path = tiny_official
    model = OneRef(tiny_cfg())
    before = snapshot(model)
    with pytest.raises(LoadError, match=r"task=res"):
        load_pretrained(model, path, "official")
    assert_unchanged(model, before)


# -- our Lightning checkpoints -------------------------------------------------------------------------------
def test_lightning_checkpoint_loads_under_weights_only(tmp_path: Path) -> None:
    import lightning as L

    cfg = tiny_cfg(depth=1)

    class Module(L.LightningModule):
        def __init__(self, architecture: dict, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = OneRef(OneRefConfig(**architecture))
            self.register_buffer("ema_steps", torch.zeros(()))  # state outside the network

        def training_step(self, batch, _):
            image, ids, pad = batch
            return self.model(image, ids, pad)["pred_box"].sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    module = Module(cfg.to_dict(), 1e-4)
    data = [inputs(cfg, batch=1)]
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    obj = torch.load(path, weights_only=True)  # plain containers only
    assert obj["hyper_parameters"]["architecture"] == cfg.to_dict()
    model, report = load_model(path)  # format and architecture from the checkpoint itself
    assert report.source_format == "lightning" and "ema_steps" in report.dropped
    for key, value in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_cli_beit3_and_mrefm_formats(tmp_path: Path, capsys) -> None:
    pre = {
        k: v for k, v in tiny_layout(tiny_cfg(img_size=224), "A", seed=15).items() if k.startswith("beit3.")
    }
    src = tmp_path / "beit3_tiny_patch16_224.pth"
    torch.save({"model": pre}, src)
    out = tmp_path / "from_beit3"
    args = ["official", str(src), str(out), "--format", "beit3", "--num-heads", "2", "--task", "res"]
    assert convert_main(args) == 2 and "--img-size is required" in capsys.readouterr().err
    assert convert_main([*args, "--img-size", "64"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["resized"][0]["to"] == [3 + 16, 32]
    assert "seg_conv1.weight" in report["missing"] and "bbox_embed.layers.0.weight" in report["missing"]
    check = validate_folder(out, require_tokenizer=False)
    assert check.ok and any("tokenizer" in w for w in check.warnings)
    model, _ = load_model(out)
    assert model.cfg.seg_head and model.cfg.img_size == 64

    mrefm = save_official(
        tmp_path / "mrefm.pth", tiny_layout(tiny_cfg(mim_codebook_size=16, mlm_head=True), "AC")
    )
    out = tmp_path / "from_mrefm"
    assert convert_main(["official", str(mrefm), str(out), "--format", "mrefm", "--num-heads", "2"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["counts"]["dropped"] == 16 and not report["missing"]
    # the same file as format oneref into a REC model: refused with the fix named
    assert (
        convert_main(["official", str(mrefm), str(tmp_path / "x"), "--num-heads", "2", "--task", "rec"]) == 2
    )
    assert "mrefm" in capsys.readouterr().err
