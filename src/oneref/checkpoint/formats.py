"""The checkpoint formats: the one vocabulary of ``ckpt_format`` (config, Python API and
``python -m oneref.convert --format``), how each is recognised and what each carries.

:class:`oneref.checkpoint.descriptor.Checkpoint` applies these rules; nothing else decides what a
path is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from oneref.checkpoint.io import CheckpointError

AUTO = "auto"


class Format(NamedTuple):
    """One checkpoint format: its name, how it is recognised, what it carries."""

    name: str
    recognised: str
    carries: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "folder",
            "a directory with config.yaml and model.safetensors",
            "weights, architecture, task, preprocessing, tokenizer (a file or a path)",
        ),
        Format(
            "lightning",
            "a file with 'state_dict' and 'pytorch-lightning_version' (our .ckpt)",
            "weights, architecture, task, training facts (dataset, epoch), the embedded tokenizer",
        ),
        Format(
            "official",
            "any other torch file whose weights have the grounding head (a released OneRef .pth)",
            "weights only: the architecture is read off the shapes",
        ),
        Format(
            "mrefm",
            "named only (ckpt_format=mrefm): an MRefM pretraining file looks like an official one with MIM/MLM heads",
            "weights only; its MIM/MLM heads are dropped for a REC/RES model, the seg head starts from init",
        ),
        Format(
            "beit3",
            "an official-layout file with the BEiT-3 backbone and no grounding head",
            "backbone weights only: the image size and task come from the model config",
        ),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
# The formats that are an official-layout state dict (oneref.checkpoint.converters converts them).
LAYOUT_FORMATS: tuple[str, ...] = ("official", "mrefm", "beit3")
# A BEiT-3 pretrained file has no trained grounding head: it can be fine-tuned, not run.
RUNNABLE_FORMATS: tuple[str, ...] = ("folder", "lightning", "official", "mrefm")


def check_format(
    fmt: str | None, allowed: Iterable[str] = FORMAT_NAMES, knob: str = "ckpt_format"
) -> str | None:
    """``fmt`` checked against the vocabulary; None (and ``auto``) mean: detect."""
    if fmt is None or fmt == AUTO:
        return None
    allowed = tuple(allowed)
    if fmt not in allowed:
        raise CheckpointError(f"unknown {knob} {fmt!r}; choose one of {', '.join(allowed)} (or auto: detect)")
    return fmt
