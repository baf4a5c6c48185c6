"""How the model runs, as opposed to what it is: ``model.runtime`` (conf/model/runtime/default.yaml).

The architecture (``model.size`` and the OneRefConfig fields) decides the weights; these options
only decide how the same weights compute (torch.compile, activation checkpointing, the attention
kernel), so they never enter a checkpoint's architecture. :func:`split_model_options` is the one
place that tells the two apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from oneref.errors import UserError
from oneref.models.beit3 import ATTENTION_KINDS
from oneref.models.oneref import OneRef, OneRefConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ModelRuntime:
    """``compile``: torch.compile each encoder layer (``compile_mode`` is torch's ``mode``);
    ``grad_checkpointing``: recompute each Multiway block in the backward; ``attention``: the
    kernel for batches with text padding (see oneref.models.beit3.ATTENTION_KINDS)."""

    compile: bool = False
    compile_mode: str = "default"
    grad_checkpointing: bool = False
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise UserError(
                f"model.runtime.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(
                f"model.runtime.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> ModelRuntime:
        node = dict(node or {})
        unknown = sorted(set(node) - set(cls.names()))
        if unknown:
            raise UserError(f"model.runtime: unknown key(s) {unknown}; known: {list(cls.names())}")
        if node.get("compile_mode") is None:
            node.pop("compile_mode", None)  # null = torch's default
        return cls(**node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, model: OneRef) -> None:
        """Activation checkpointing and the attention kernel; compiling waits for
        ``LightningModule.configure_model`` (:meth:`compile_model`)."""
        if self.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.beit3.set_attention(self.attention)

    def compile_model(self, model: OneRef) -> None:
        if self.compile:
            model.compile_layers(self.compile_mode)


def split_model_options(model: Mapping[str, Any]) -> tuple[str, dict[str, Any], ModelRuntime]:
    """``cfg.model`` -> (size, architecture overrides: OneRefConfig fields, runtime).

    Our ``.ckpt`` files written before ``model.runtime`` existed carry the runtime keys at the top
    level of ``model``: they are read as runtime options."""
    options = dict(model)
    if "size" not in options:
        raise UserError("model: no 'size' (tiny | base | large); compose a conf/model file, e.g. model=base")
    size = str(options.pop("size"))
    runtime = dict(options.pop("runtime", None) or {})
    for key in ModelRuntime.names():
        if key in options:
            value = options.pop(key)
            if key in runtime and runtime[key] != value:
                raise UserError(
                    f"model.{key}={value!r} and model.runtime.{key}={runtime[key]!r} disagree: keep one"
                )
            runtime[key] = value
    known = {f.name for f in fields(OneRefConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"model: unknown key(s) {unknown}; the architecture takes size and {sorted(known)}, "
            f"and model.runtime takes {list(ModelRuntime.names())}"
        )
    return size, options, ModelRuntime.from_config(runtime)


def join_model_options(size: str, architecture: Mapping[str, Any], runtime: ModelRuntime) -> dict[str, Any]:
    """The inverse of :func:`split_model_options`: the ``model`` mapping as the config spells it."""
    return {"size": size, **architecture, "runtime": runtime.to_dict()}
