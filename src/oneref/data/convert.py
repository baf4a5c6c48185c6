"""Convert annotations between formats:
`python -m oneref.data.convert SRC DST --to oneref|refer|seqtr|mdetr [--from auto|oneref|refer|hf|seqtr|mdetr]`.

SRC and DST are split roots. Every dataset found in SRC (or those named) is read split by split,
as training would read it (`records.load_records`), and written to DST in the target format with
that format's writer (`oneref.data.formats.<format>.write`); `--to oneref` writes the official
split files, `<DST>/<official name>/<official name>_<split>.pth`. The records are kept exactly
(files, boxes, phrases, sizes, masks); ids the source does not carry are numbered anew.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from oneref.data import formats, records
from oneref.errors import UserError, report_user_errors

log = logging.getLogger("oneref.data.convert")

TARGETS = ("oneref", "refer", "seqtr", "mdetr")


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    frm: str = "auto",
    datasets: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> list[Path]:
    """Write every split of every dataset found in `src` to `dst` in format `to`; the files written."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise UserError(f"--to must be one of {list(TARGETS)}, got {to!r}")
    if not src.is_dir():
        raise UserError(f"source split root not found: {src}")
    names = list(datasets) if datasets else list(records.DATASETS)
    written: list[Path] = []
    for dataset in names:
        fmt = formats.resolve(frm, src, dataset) if frm != "auto" else formats.detect(src, dataset)
        if fmt is None or not formats.present(fmt, src, dataset):
            if datasets:
                raise UserError(f"no annotations of {dataset!r} in any format under {src}")
            continue
        splits = formats.available_splits(fmt, src, dataset)
        if fmt == "oneref" and dataset != "referit":
            splits = [s for s in splits if s != "trainval"]  # train + val, not a file of its own
        by_split = {
            s: records.load_records(src, dataset, s, format=fmt, cache_dir=cache_dir)[0] for s in splits
        }
        files = formats.READERS[to].write(dst, dataset, by_split)
        log.info("%s: %s -> %s, %s", dataset, fmt, to, {s: len(r) for s, r in by_split.items()})
        written += files
    if not written:
        raise UserError(f"no annotations found under {src} (formats tried: {list(formats.READERS)})")
    return written


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oneref.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="split root holding the annotations to convert")
    p.add_argument("dst", type=Path, help="split root to write")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--from", dest="frm", default="auto", choices=formats.FORMATS)
    p.add_argument(
        "--datasets", nargs="+", default=None, help=f"default: every one found of {list(records.DATASETS)}"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="parsed-records cache (default $ONEREF_CACHE)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for f in convert(args.src, args.dst, args.to, args.frm, args.datasets, args.cache_dir):
        log.info("wrote %s", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
