"""Serve a model in the browser:

    python -m oneref.demo                       # the checkpoint `make demo` trains (logs/rec_tiny_synthetic/best.ckpt)
    python -m oneref.demo ckpt_path=CKPT        # any checkpoint oneref.predict takes, or a Hub id user/name
    python -m oneref.demo server.host=0.0.0.0 server.port=7860

The page is built by :func:`oneref.app.build_app` (the ``demo`` extra: ``pip install -e ".[demo]"``);
the model is loaded as ``oneref.predict`` loads it (:func:`oneref.factory.load_predictor`).
Requests are queued (``server.concurrency`` at a time). See docs/demo.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from oneref.config import config_dir
from oneref.errors import UserError, report_user_errors
from oneref.reporting import quiet_third_party

log = logging.getLogger(__name__)

TRAIN_HINT = "train it with `make demo` (python -m oneref.train{overrides}), or pass ckpt_path=CKPT"


def check_checkpoint(cfg: DictConfig) -> None:
    """A missing checkpoint says which command makes it (a Hub id is left to the Hub)."""
    from oneref import hub

    path = Path(str(cfg.ckpt_path)).expanduser()
    if path.exists() or hub.is_hub_id(str(cfg.ckpt_path)):
        return
    overrides = "".join(
        f" {k}={v}"
        for k, v, default in (
            ("task", cfg.task.name, "rec"),
            ("model", cfg.model.size, "tiny"),
            ("data", cfg.data.dataset, "synthetic"),
        )
        if v != default
    )
    raise UserError(f"no checkpoint at {path}; {TRAIN_HINT.format(overrides=overrides)}")


def load_examples(cfg: DictConfig, predictor: Any) -> list:
    """The examples of the page: synthetic test queries the model gets right and wrong."""
    from oneref.app import pick_examples
    from oneref.data.records import load_split_file
    from oneref.data.synthetic import SyntheticPaths

    ex = cfg.get("examples")
    if not ex or cfg.data.dataset != "synthetic":
        return []
    paths = SyntheticPaths(Path(str(cfg.data.data_root)).expanduser())
    split = paths.split_file(str(ex.split))
    if not split.is_file():
        log.info("no examples: %s has not been generated (python -m oneref.train generates it)", split)
        return []
    return pick_examples(
        predictor,
        load_split_file(split),
        paths.image_dir,
        candidates=int(ex.candidates),
        right=int(ex.right),
        wrong=int(ex.wrong),
    )


def build(cfg: DictConfig) -> Any:
    """The queued Blocks for ``cfg`` (not launched)."""
    try:
        from oneref.app import build_app
    except ImportError as e:
        raise UserError(f"the demo needs Gradio ({e}); install it with pip install -e '.[demo]'") from e
    from oneref import factory

    check_checkpoint(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        predictor = factory.load_predictor(cfg)
    except (FileNotFoundError, ValueError) as e:  # a bad checkpoint or setting: the message says what
        raise UserError(str(e)) from e
    examples = load_examples(cfg, predictor)
    blocks = build_app(
        predictor,
        examples,
        title=f"OneRef: {Path(str(cfg.ckpt_path)).name}",
        max_expressions=int(cfg.max_expressions),
    )
    server = cfg.server
    return blocks.queue(default_concurrency_limit=int(server.concurrency), max_size=int(server.max_queue))


@report_user_errors
def serve(cfg: DictConfig) -> None:
    from oneref.app import launch

    blocks = build(cfg)
    server = cfg.server
    launch(
        blocks,
        server_name=str(server.host),
        server_port=None if server.port is None else int(server.port),
        share=bool(server.share),
        inbrowser=bool(server.open_browser),
        max_file_size=str(server.max_file_size),
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="demo")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    serve(cfg)


if __name__ == "__main__":
    main()
