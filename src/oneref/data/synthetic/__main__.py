"""``python -m oneref.data.synthetic ROOT [--num_train N ...]``: generate the synthetic dataset."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields

from oneref.data.synthetic.cache import ensure_synthetic
from oneref.data.synthetic.config import SPLIT_NAMES, SyntheticConfig

log = logging.getLogger("oneref.data.synthetic")


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the synthetic dataset into ROOT (nothing to do if it is there with these parameters)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m oneref.data.synthetic", description=main.__doc__)
    p.add_argument("root", help="cache folder, e.g. .cache/synthetic")
    p.add_argument("--workers", type=int, default=None, help="generator processes (default: up to 4)")
    for f in fields(SyntheticConfig):
        if isinstance(f.default, tuple):
            p.add_argument(f"--{f.name}", type=float, nargs=2, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None)
    args = vars(p.parse_args(argv))
    root = args.pop("root")
    workers = args.pop("workers")
    cfg = SyntheticConfig.from_any({k: v for k, v in args.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = ensure_synthetic(root, cfg, workers)
    for split in SPLIT_NAMES:
        log.info("%s: %d samples in %s", split, cfg.num_samples(split), paths.split_file(split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
