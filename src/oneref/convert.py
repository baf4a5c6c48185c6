"""Checkpoint conversion, validation and golden parity.

    python -m oneref.convert official IN.pth OUT_DIR [--format oneref|mrefm|beit3] [--size S]
                                      [--img-size N] [--task rec|res|mrefm] [--tokenizer beit3.spm]
    python -m oneref.convert to-official IN OUT.pth      # IN: a folder or one of our Lightning .ckpt
    python -m oneref.convert validate DIR
    python -m oneref.convert parity GOLDEN_DIR

See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oneref.checkpoint import (
    CheckpointError,
    build_model,
    convert_beit3_pretrained,
    convert_mrefm,
    convert_official_oneref,
    extract_state_dict,
    infer_architecture,
    infer_config,
    load_checkpoint_file,
    load_into,
    load_model,
    read_weights,
    save_folder,
    to_official,
    validate_folder,
)
from oneref.checkpoint.folder import DEFAULT_MAX_QUERY_LEN, allowed_missing
from oneref.models.oneref import OneRef, OneRefConfig

PARITY_TOL = 1e-5
FORMATS = {"oneref": "official", "mrefm": "mrefm", "beit3": "beit3"}


# -- official -> folder ----------------------------------------------------------------------------------
def cmd_official(args: argparse.Namespace) -> int:
    src = Path(args.input)
    extracted = extract_state_dict(load_checkpoint_file(src, mmap=True), args.model_key, source=str(src))
    raw = extracted.state_dict
    arch = infer_architecture(raw)
    fmt = FORMATS[args.format]
    if fmt == "beit3" and args.img_size is None:
        raise CheckpointError(
            "--img-size is required for --format beit3 (the released OneRef models use 384 or 480)"
        )
    task = args.task or ("rec" if fmt in ("mrefm", "beit3") else None)
    cfg = infer_config(arch, size=args.size, img_size=args.img_size, task=task, num_heads=args.num_heads)
    if fmt == "official":
        sd, report = convert_official_oneref(
            raw, cfg, resize_positions=args.resize_positions, source=str(src)
        )
    elif fmt == "mrefm":
        sd, report = convert_mrefm(raw, cfg, resize_positions=args.resize_positions, source=str(src))
    else:
        sd, report = convert_beit3_pretrained(raw, cfg, source=str(src))
    if extracted.stripped_prefix:
        report.notes.append(f"stripped the prefix {extracted.stripped_prefix!r} from every key")
    if report.unexpected:
        raise CheckpointError(
            f"{len(report.unexpected)} keys of {src} have no place in the {task or arch['task']} model: "
            f"{', '.join(report.unexpected[:8])}{' ...' if len(report.unexpected) > 8 else ''}; {'; '.join(report.notes)}"
        )
    if report.missing:  # e.g. heads absent from BEiT-3: initialise them exactly as training would
        allow = allowed_missing(fmt, cfg, None)
        torch.manual_seed(args.seed)
        model = build_model(cfg, initialise=bool(allow))
        load_into(model, sd, strict=not allow, allow_missing=allow, report=report)  # raises for format oneref
        report.notes.append(f"missing tensors initialised with the official init, seed {args.seed}")
        sd = model.state_dict()
    out = save_folder(
        args.out_dir,
        sd,
        cfg,
        task=task or arch["task"],
        max_query_len=args.max_query_len,
        tokenizer=args.tokenizer,
        copy_tokenizer=not args.tokenizer_pointer,
        report=report,
        overwrite=args.overwrite,
    )
    size = arch["size"] or "custom"
    print(f"model: {size}, img_size {cfg.img_size}, task {task or arch['task']} -> {out}")
    print(report.summary())
    check = validate_folder(out)
    print(check)
    return 0


# -- ours -> official -------------------------------------------------------------------------------------
def cmd_to_official(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise CheckpointError(f"the output {out} is the input; write the official file elsewhere")
    sd, cfg, report, _ = read_weights(args.input, args.format)
    if report.unexpected or report.missing:
        raise CheckpointError(report.summary())
    official, _ = to_official(sd, cfg, epoch=args.epoch)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, out)
    print(f"wrote {out}: {len(official['model'])} tensors in the official layout {{'model', 'epoch'}}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    check = validate_folder(args.dir)
    print(check)
    return 0 if check.ok else 1


# -- golden parity ------------------------------------------------------------------------------------------
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


def _clip_loss() -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """The official ClipLoss value (before the extra /B), from the losses module when present."""
    try:
        from oneref.tasks import losses
    except ImportError:
        return None
    if hasattr(losses, "clip_loss"):
        return losses.clip_loss
    if hasattr(losses, "contrastive_loss"):
        return lambda v, t, s: losses.contrastive_loss(v, t, s) * v.shape[0]
    return None


def _max_abs(ours: Tensor, ref: Tensor) -> float:
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} vs golden {tuple(ref.shape)}")
    if not ref.is_floating_point():
        return 0.0 if torch.equal(ours.long(), ref.long()) else float("inf")
    return (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def parity_rows(golden_dir: str | Path) -> tuple[list[tuple[str, str, Any, str]], list[str]]:
    """Compare our model (loaded from the golden checkpoint through the converter) with every
    golden output. Returns rows (output, file, max-abs or None, note) and notes."""
    g = Path(golden_dir)
    cfg = golden_config(g)
    ckpt = g / "checkpoint.pth"
    inputs = torch.load(g / "inputs.pt", map_location="cpu", weights_only=True)
    image, ids = inputs["image"], inputs["text_ids"]
    pad = inputs["text_padding_mask"]
    rows: list[tuple[str, str, Any, str]] = []
    notes: list[str] = []
    clip = _clip_loss()

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
            if clip is not None:
                ours["contrast_loss"] = clip(out["vision_cls"], out["language_cls"], model.logit_scale)
            elif "contrast_loss" in ref:
                notes.append(
                    f"{file}: contrast_loss skipped (oneref.tasks.losses has no clip_loss/contrastive_loss)"
                )
            for name, value in ref.items():
                if name == "bn_state_after":
                    compare_bn(file, model, value)
                elif name in ours:
                    compare(name, file, ours[name], value)
                elif name != "contrast_loss" or clip is not None:
                    rows.append((name, file, None, "no counterpart in this model"))

        train_file("outputs_train_nomim.pt", None)
        if (g / "outputs_train.pt").is_file():
            if cfg.mim_codebook_size:
                train_file("outputs_train.pt", inputs["mim_masked_pos"])
            else:
                notes.append("outputs_train.pt skipped: the golden model has no MIM heads")
    return rows, notes


def cmd_parity(args: argparse.Namespace) -> int:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # the golden was computed single-threaded
    torch.use_deterministic_algorithms(True)
    try:
        rows, notes = parity_rows(args.golden_dir)
    except CheckpointError as e:
        print(f"FAILED to load the golden checkpoint through the converter:\n{e}")
        return 1
    finally:  # main() may run inside another process (tests): leave its settings as they were
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    width = max(len(r[0]) for r in rows)
    failed = 0
    print(f"{'output':<{width}}  {'file':<22}  {'max-abs':>10}  status")
    for name, file, err, note in rows:
        ok = err is not None and err <= args.tol
        failed += not ok
        shown = f"{err:10.3e}" if err is not None else f"{'-':>10}"
        print(f"{name:<{width}}  {file:<22}  {shown}  {'ok' if ok else 'FAIL'} {note}".rstrip())
    for note in notes:
        print(f"note: {note}")
    print(f"{len(rows) - failed}/{len(rows)} outputs within {args.tol:g}")
    return 1 if failed else 0


# -- CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oneref.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("official", help="official OneRef / MRefM / BEiT-3 file -> checkpoint folder")
    o.add_argument("input", help="official .pth file")
    o.add_argument("out_dir", help="checkpoint folder to write")
    o.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="oneref",
        help="oneref: a released OneRef checkpoint (default); mrefm: MRefM pretraining (its MIM/MLM heads are "
        "dropped unless --task mrefm); beit3: a BEiT-3 pretrained checkpoint (heads initialised)",
    )
    o.add_argument(
        "--size", choices=["tiny", "base", "large"], help="model size (default: read off the shapes)"
    )
    o.add_argument(
        "--img-size", type=int, help="image size (default: read off the position table; required for beit3)"
    )
    o.add_argument(
        "--task",
        choices=["rec", "res", "mrefm"],
        help="heads of the output model (default: those in the file)",
    )
    o.add_argument(
        "--num-heads", type=int, help="attention heads, only for widths that are no registered size"
    )
    o.add_argument(
        "--resize-positions", action="store_true", help="allow a different --img-size (bicubic, spec 2.3)"
    )
    o.add_argument("--tokenizer", help="beit3.spm to copy into the folder")
    o.add_argument(
        "--tokenizer-pointer", action="store_true", help="record the tokenizer's path instead of copying it"
    )
    o.add_argument("--max-query-len", type=int, default=DEFAULT_MAX_QUERY_LEN)
    o.add_argument(
        "--model-key",
        default="model|module",
        help="checkpoint entry holding the weights (official --model_key)",
    )
    o.add_argument("--seed", type=int, default=0, help="seed for heads a BEiT-3/MRefM file lacks")
    o.add_argument("--overwrite", action="store_true")
    o.set_defaults(func=cmd_official)

    t = sub.add_parser(
        "to-official", help="checkpoint folder or Lightning .ckpt -> official {'model': ...} file"
    )
    t.add_argument("input")
    t.add_argument("output")
    t.add_argument(
        "--format", choices=["folder", "lightning"], help="default: folder for a folder, else lightning"
    )
    t.add_argument(
        "--epoch", type=int, default=0, help="value of the 'epoch' entry (the official eval.py reads it)"
    )
    t.set_defaults(func=cmd_to_official)

    v = sub.add_parser("validate", help="say what a checkpoint folder lacks")
    v.add_argument("dir")
    v.set_defaults(func=cmd_validate)

    q = sub.add_parser("parity", help="compare our model with a golden set of official outputs")
    q.add_argument("golden_dir")
    q.add_argument("--tol", type=float, default=PARITY_TOL)
    q.set_defaults(func=cmd_parity)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
