"""Checkpoint conversion, validation and golden parity.

    python -m oneref.convert official IN.pth OUT_DIR [--format auto|official|mrefm|beit3] [--size S]
                                      [--img-size N] [--task rec|res|mrefm] [--tokenizer beit3.spm]
    python -m oneref.convert to-official IN OUT.pth      # IN: a folder or one of our Lightning .ckpt
    python -m oneref.convert validate DIR
    python -m oneref.convert parity GOLDEN_DIR
    python -m oneref.convert export CKPT OUT [--to onnx|torch_export] [--format auto|...]
                                      [--text-lengths LO HI] [--batch N] [--opset 18] [--no-verify]
    python -m oneref.convert push CKPT OWNER/NAME [--local-dir DIR] [--dry-run] [--private]
                                      [--revision BRANCH] [--tokenizer beit3.spm] [--format ...]

``--format`` always names the input checkpoint's format, in the one vocabulary of
``oneref.checkpoint.FORMATS`` (default auto: detected, oneref.checkpoint.Checkpoint.open); ``--to``
names what is written. See docs/checkpoints.md, docs/predict.md for export and docs/demo.md for
the Hub (push).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from oneref.checkpoint import (
    AUTO,
    FORMAT_NAMES,
    RUNNABLE_FORMATS,
    Checkpoint,
    CheckpointError,
    build_model,
    infer_config,
    load_into,
    save_folder,
    to_official,
    validate_folder,
)
from oneref.checkpoint.descriptor import allowed_missing
from oneref.checkpoint.export import ExportError
from oneref.checkpoint.folder import DEFAULT_MAX_QUERY_LEN
from oneref.checkpoint.formats import LAYOUT_FORMATS
from oneref.errors import UserError
from oneref.parity import PARITY_TOL, parity_rows


# -- official -> folder ----------------------------------------------------------------------------------
def cmd_official(args: argparse.Namespace) -> int:
    src = Path(args.input)
    ckpt = Checkpoint.open(src, args.format, model_key=args.model_key)
    if ckpt.format not in LAYOUT_FORMATS:
        raise CheckpointError(
            f"{src} is a {ckpt.format} checkpoint, not an official-layout file: it already describes itself "
            "(`to-official` writes the official layout, `export` another runtime's)"
        )
    arch, fmt = ckpt.arch, ckpt.format
    print(f"{src}: format {fmt} ({'detected' if ckpt.detected else 'given'})")
    if fmt == "beit3" and args.img_size is None:
        raise CheckpointError(
            "--img-size is required for --format beit3 (the released OneRef models use 384 or 480)"
        )
    task = args.task or ("rec" if fmt in ("mrefm", "beit3") else None)
    cfg = infer_config(arch, size=args.size, img_size=args.img_size, task=task, num_heads=args.num_heads)
    sd, cfg, report, _ = ckpt.read_weights(cfg, resize_positions=args.resize_positions)
    if report.unexpected:
        raise CheckpointError(
            f"{len(report.unexpected)} keys of {src} have no place in the {task or arch['task']} model: "
            f"{', '.join(report.unexpected[:8])}{' ...' if len(report.unexpected) > 8 else ''}; {'; '.join(report.notes)}"
        )
    if report.missing:  # e.g. heads absent from BEiT-3: initialise them exactly as training would
        allow = allowed_missing(fmt, cfg, None)
        torch.manual_seed(args.seed)
        model = build_model(cfg, initialise=bool(allow))
        load_into(
            model, sd, strict=not allow, allow_missing=allow, report=report
        )  # raises for format official
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
    sd, cfg, report, _ = Checkpoint.open(args.input, args.format).read_weights()
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


def cmd_parity(args: argparse.Namespace) -> int:
    try:
        rows, notes = parity_rows(args.golden_dir)
    except CheckpointError as e:
        print(f"FAILED to load the golden checkpoint through the converter:\n{e}")
        return 1
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


# -- export ---------------------------------------------------------------------------------------------
EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "torch_export"}


def cmd_export(args: argparse.Namespace) -> int:
    from oneref.checkpoint import load_model
    from oneref.checkpoint.export import EXPORT_FORMATS, export_model

    out = Path(args.output)
    fmt = args.to or EXPORT_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise CheckpointError(
            f"cannot tell the export format from {out.name!r}: pass --to {'|'.join(EXPORT_FORMATS)} "
            f"(or name the file {' / '.join(EXPORT_SUFFIXES)})"
        )
    if not Path(args.input).exists():
        raise CheckpointError(f"checkpoint {args.input} does not exist; check the path")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} exists; choose another name or pass --overwrite")
    lengths = None
    if args.text_lengths:
        lengths = args.text_lengths[0] if len(args.text_lengths) == 1 else tuple(args.text_lengths)
    model, _ = load_model(args.input, ckpt_format=args.format)
    model = model.to(args.device)
    try:
        report = export_model(
            model,
            out,
            fmt,
            text_lengths=lengths,
            batch=args.batch,
            opset=args.opset,
            verify=not args.no_verify,
        )
    except (ValueError, ImportError) as e:  # bad --text-lengths / --batch, or the export extra missing
        raise CheckpointError(str(e)) from e
    for f in report.files:
        print(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB)")
    print(report.summary())
    return 0


# -- the Hub --------------------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from oneref import hub

    if "@" in args.repo_id or hub.parse(args.repo_id) is None:
        raise hub.HubError(
            f"{args.repo_id!r} is not a repository id: write OWNER/NAME (a branch: --revision)"
        )
    if args.dry_run and not args.local_dir:
        raise CheckpointError("--dry-run writes the folder only: give it with --local-dir DIR")
    if not Path(args.input).exists():
        raise CheckpointError(f"checkpoint {args.input} does not exist; check the path")
    with tempfile.TemporaryDirectory() as tmp:
        out = hub.write_folder(
            args.input,
            args.local_dir or Path(tmp) / "folder",
            tokenizer=args.tokenizer,
            ckpt_format=args.format,
            overwrite=args.overwrite,
            repo_id=args.repo_id,
        )
        print(f"wrote {hub.describe(out)}")
        if args.dry_run:
            print(f"dry run: nothing uploaded to {args.repo_id}")
            return 0
        url = hub.upload(out, args.repo_id, private=args.private, revision=args.revision)
    print(f"uploaded to {args.repo_id}: {url}")
    return 0


# -- CLI ----------------------------------------------------------------------------------------------------
def add_format_argument(parser: argparse.ArgumentParser, formats: Sequence[str], help: str) -> None:
    """``--format``: the input checkpoint's format, in the one vocabulary (checkpoint/formats.py)."""
    parser.add_argument("--format", choices=[AUTO, *formats], default=AUTO, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oneref.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("official", help="official OneRef / MRefM / BEiT-3 file -> checkpoint folder")
    o.add_argument("input", help="official .pth file")
    o.add_argument("out_dir", help="checkpoint folder to write")
    add_format_argument(
        o,
        LAYOUT_FORMATS,
        "auto: detected (default); official: a released OneRef checkpoint; mrefm: MRefM pretraining (its "
        "MIM/MLM heads are dropped unless --task mrefm); beit3: a BEiT-3 pretrained checkpoint (heads initialised)",
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
        "--resize-positions",
        action="store_true",
        help="allow a different --img-size (bicubic, as official fine-tuning)",
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
    add_format_argument(t, FORMAT_NAMES, "the input's format (default: detected)")
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

    e = sub.add_parser("export", help="any checkpoint -> ONNX or a torch.export program (docs/predict.md)")
    e.add_argument("input", help="one of our .ckpt files, a checkpoint folder or an official .pth")
    e.add_argument("output", help="file to write (.onnx or .pt2)")
    e.add_argument(
        "--to", choices=["onnx", "torch_export"], help="what to write (default: from the suffix .onnx, .pt2)"
    )
    add_format_argument(e, RUNNABLE_FORMATS, "the checkpoint's format (default: detected)")
    e.add_argument(
        "--text-lengths",
        type=int,
        nargs="+",
        metavar="N",
        help="LO HI: dynamic text length in that range; N: that length only (default: 2 to the position table)",
    )
    e.add_argument("--batch", type=int, help="fixed batch size (default: dynamic)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset")
    e.add_argument("--device", default="cpu", help="device to export on (a .pt2 program runs on it)")
    e.add_argument("--no-verify", action="store_true", help="skip running the file against the eager model")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    h = sub.add_parser(
        "push", help="any checkpoint -> checkpoint folder + model card, uploaded to the Hub (docs/demo.md)"
    )
    h.add_argument("input", help="one of our .ckpt files, a checkpoint folder or an official .pth")
    h.add_argument("repo_id", help="OWNER/NAME on the Hugging Face Hub (created if missing)")
    h.add_argument("--local-dir", help="write the folder here (kept) instead of a temporary folder")
    h.add_argument("--dry-run", action="store_true", help="write the folder (--local-dir) and upload nothing")
    h.add_argument("--private", action="store_true", help="create the repository private")
    h.add_argument("--revision", help="upload to this branch (created if missing; default: main)")
    h.add_argument("--tokenizer", help="sentencepiece model, for a checkpoint that carries none (beit3.spm)")
    add_format_argument(h, RUNNABLE_FORMATS, "the checkpoint's format (default: detected)")
    h.add_argument("--overwrite", action="store_true", help="write into a --local-dir that is not empty")
    h.set_defaults(func=cmd_push)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
