"""Does MRefM pretraining help REC on the synthetic set? MRefM then REC against REC from scratch,
at the same total number of training steps, over several seeds:

    python scripts/synthetic_mrefm_chain.py --steps 1250 --seeds 0 1 2 --out mrefm_chain.json [OVERRIDES]

For each seed: (a) ``rec``: ``task=rec`` for ``--steps`` steps from scratch; (b) ``mrefm+rec``:
``task=mrefm`` for ``--mrefm-share`` of the steps, then ``task=rec`` for the rest with
``init_from`` the exported MRefM checkpoint; (c) ``rec-short``: ``task=rec`` from scratch for only
as many steps as (b) fine-tunes, which tells whether the MRefM initialisation helps per REC step.
``--conditions`` picks some of them. The REC runs use the tiny model's synthetic recipe
(conf/recipe/rec_tiny.yaml) with ``trainer.max_time`` off and the schedule stretched to their own
number of steps. Writes one
JSON record per run (test metrics, wall time) and prints a summary; the README reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from oneref.config import config_dir
from oneref.train import train

METRIC = "test/synthetic/test/acc@0.5"
CONDITIONS = ("rec", "mrefm+rec", "rec-short")


def run(overrides: list[str], out_dir: Path) -> tuple[dict[str, float], float]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir.parent / "logs")
        cfg.logger = {}
        for name in ("rich_progress_bar", "model_summary", "val_images"):
            cfg.callbacks.pop(name, None)
    start = time.perf_counter()
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    return metrics, time.perf_counter() - start


def steps_overrides(steps: int) -> list[str]:
    # one epoch of the synthetic training set is 625 steps at batch 32; max_steps decides
    return [
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        "trainer.max_time=null",
        "ckpt_path=null",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1250, help="total training steps per condition")
    p.add_argument("--mrefm-share", type=float, default=0.5, help="share of the steps spent on MRefM")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="mrefm_chain.json")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.batch_size=64")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="mrefm_chain_"))
    cache = os.environ.get("ONEREF_CACHE", str(Path(".cache").absolute()))
    common = [f"paths.cache_dir={cache}", "report_baseline=false", *args.overrides]
    pre = round(args.steps * args.mrefm_share)
    records = []

    def record(seconds: float, metrics: dict[str, float], **fields) -> None:
        records.append({**fields, METRIC: metrics[METRIC], "seconds": seconds})
        print(json.dumps(records[-1]), flush=True)

    for seed in args.seeds:
        base = [*common, f"seed={seed}"]
        if "rec" in args.conditions:
            metrics, secs = run([*base, *steps_overrides(args.steps)], work / f"rec_seed{seed}")
            record(secs, metrics, seed=seed, condition="rec", steps=args.steps)
        if "mrefm+rec" in args.conditions:
            _, pre_secs = run([*base, "task=mrefm", *steps_overrides(pre)], work / f"mrefm_seed{seed}")
            exported = work / "logs" / "mrefm_tiny_synthetic" / "last.ckpt"
            metrics, secs = run(
                [*base, *steps_overrides(args.steps - pre), f"init_from={exported}"],
                work / f"mrefm_rec_seed{seed}",
            )
            record(
                pre_secs + secs, metrics, seed=seed, condition="mrefm+rec", steps=args.steps, mrefm_steps=pre
            )
        if "rec-short" in args.conditions:
            short = args.steps - pre
            metrics, secs = run([*base, *steps_overrides(short)], work / f"rec_short_seed{seed}")
            record(secs, metrics, seed=seed, condition="rec-short", steps=short)
    Path(args.out).write_text(json.dumps(records, indent=1))
    for condition in args.conditions:
        values = [r[METRIC] for r in records if r["condition"] == condition]
        secs = [r["seconds"] for r in records if r["condition"] == condition]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{condition:>10}: {METRIC} {statistics.mean(values):.3f} +- {spread:.3f} {values}, "
              f"{statistics.mean(secs):.0f} s per run")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
