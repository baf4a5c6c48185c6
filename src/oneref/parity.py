"""Golden parity: our model, loaded through the real converter, against outputs of the official code.

A golden set (tests/golden/README.md) holds a checkpoint written by the official code, inputs, and
every output the official implementation computed from them. :func:`parity_rows` loads the
checkpoint strictly through :mod:`oneref.checkpoint`, runs the same inputs and reports the max-abs
difference of every output; ``python -m oneref.convert parity GOLDEN_DIR`` prints the rows. Sizes
are read from the set's ``config.json``, never assumed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oneref.checkpoint import load_model
from oneref.models.oneref import OneRef, OneRefConfig
from oneref.tasks.losses import clip_loss

PARITY_TOL = 1e-5


@contextlib.contextmanager
def golden_numerics() -> Iterator[None]:
    """One thread and deterministic algorithms, as the golden sets were computed; restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def golden_config(golden_dir: Path) -> OneRefConfig:
    """OneRefConfig from a golden set's config.json (architecture + the flags that add heads)."""
    meta = json.loads((golden_dir / "config.json").read_text())
    a, flags = meta["architecture"], meta.get("sys_args", {})
    return OneRefConfig(
        embed_dim=a["embed_dim"],
        num_heads=a["attention_heads"],
        depth=a["layers"],
        ffn_dim=a["ffn_dim"],
        img_size=a["img_size"],
        patch_size=a["patch_size"],
        vocab_size=a["vocab_size"],
        max_source_positions=a["max_source_positions"],
        layernorm_eps=a.get("layernorm_eps", 1e-5),
        drop_path_rate=float(a.get("drop_path_rate", 0.0)),
        seg_head="seg_head" in a or bool(flags.get("use_mask_loss")),
        mim_codebook_size=a["codebook_size"] if ("mim_head" in a or flags.get("enable_ref_mim")) else 0,
        mlm_head=bool(flags.get("enable_ref_mlm") or flags.get("enable_mrefm")),
    )


def _max_abs(ours: Tensor, ref: Tensor) -> float:
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} vs golden {tuple(ref.shape)}")
    if not ref.is_floating_point():
        return 0.0 if torch.equal(ours.long(), ref.long()) else float("inf")
    return (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def parity_rows(golden_dir: str | Path) -> tuple[list[tuple[str, str, Any, str]], list[str]]:
    """Compare our model (loaded from the golden checkpoint through the converter) with every
    golden output, single-threaded. Returns rows (output, file, max-abs or None, note) and notes."""
    with golden_numerics():
        return _parity_rows(Path(golden_dir))


def _parity_rows(g: Path) -> tuple[list[tuple[str, str, Any, str]], list[str]]:
    cfg = golden_config(g)
    ckpt = g / "checkpoint.pth"
    inputs = torch.load(g / "inputs.pt", map_location="cpu", weights_only=True)
    image, ids = inputs["image"], inputs["text_ids"]
    pad = inputs["text_padding_mask"]
    rows: list[tuple[str, str, Any, str]] = []
    notes: list[str] = []

    def fresh() -> OneRef:  # BatchNorm stats change in train mode: reload before each forward
        model, _ = load_model(ckpt, cfg, "official")
        return model

    def compare(name: str, file: str, ours: Tensor, ref: Tensor) -> None:
        try:
            rows.append((name, file, _max_abs(ours.detach(), ref), ""))
        except ValueError as e:
            rows.append((name, file, None, str(e)))

    def compare_bn(file: str, model: OneRef, ref: dict[str, Tensor]) -> None:
        state = model.state_dict()
        for key, value in ref.items():
            compare(f"bn_state_after.{key}", file, state[key], value)

    with torch.no_grad():
        model = fresh().eval()
        ev = torch.load(g / "outputs_eval.pt", map_location="cpu", weights_only=True)
        out = model(image, ids, pad, return_all_hiddens=True)
        ours = {
            "encoder_out": torch.cat([out["vision_tokens"], out["text_tokens"]], dim=1),
            # layer-major (layers+1, B, N, D), the golden's actual layout
            "encoder_states": torch.stack(out["hidden_states"], dim=0),
            "encoder_embedding": torch.cat(
                [model.beit3.vision_embed(image), model.beit3.text_embed(ids)], dim=1
            ),
            "encoder_padding_mask": torch.cat(
                [pad.new_zeros(pad.shape[0], cfg.num_vision_tokens), pad], dim=1
            ),
            "multiway_split_position": torch.tensor(cfg.num_vision_tokens),
            "pred_box": out["pred_box"],
            "vision_cls": out["vision_cls"],
            "language_cls": out["language_cls"],
        }
        if cfg.seg_head:
            ours["seg_mask"] = out["seg_mask"]
        for name, ref in ev.items():
            if name in ours:
                compare(name, "outputs_eval.pt", ours[name], ref)
            else:
                rows.append((name, "outputs_eval.pt", None, "no counterpart in this model"))

        def train_file(file: str, masked: Tensor | None) -> None:
            ref = torch.load(g / file, map_location="cpu", weights_only=True)
            model = fresh().train()
            out = model(image, ids, pad, mim_masked_pos=masked)
            ours = {"pred_box": out["pred_box"], "visu_token_similarity": out["visu_sim"]}
            if cfg.seg_head:
                ours["seg_mask"] = out["seg_mask"]
            if "encoder_out" in ref:
                ours["encoder_out"] = torch.cat([out["vision_tokens"], out["text_tokens"]], dim=1)
            if masked is not None:
                ours["mim_pred"] = out["mim_logits"][masked]
                ours["mim_vts_pred"] = out["mim_vts_pred"]
            ours["contrast_loss"] = clip_loss(out["vision_cls"], out["language_cls"], model.logit_scale)
            for name, value in ref.items():
                if name == "bn_state_after":
                    compare_bn(file, model, value)
                elif name in ours:
                    compare(name, file, ours[name], value)
                else:
                    rows.append((name, file, None, "no counterpart in this model"))

        train_file("outputs_train_nomim.pt", None)
        if (g / "outputs_train.pt").is_file():
            if cfg.mim_codebook_size:
                train_file("outputs_train.pt", inputs["mim_masked_pos"])
            else:
                notes.append("outputs_train.pt skipped: the golden model has no MIM heads")
    return rows, notes
