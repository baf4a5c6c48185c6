"""Distributed strategies from config: DDP and FSDP are declared, not coded.

Order of the wrappers (the FSDP docs' and open_clip's): compile each block, then activation
checkpointing around it, then shard. ``OneRefModule.configure_model`` compiles each encoder
layer in place (``model.runtime.compile``) before Lightning wraps the model for the strategy; checkpointing
is either ours (``model.runtime.grad_checkpointing``: ``torch.utils.checkpoint`` around each compiled
layer call) or FSDP's (``activation_checkpointing_layers``: a wrapper around each compiled
layer), never both (each layer would be recomputed twice); FSDP then wraps each layer.
"""

from __future__ import annotations

from typing import Any


def build_strategy(name: str = "auto", **kwargs: Any) -> Any:
    """``auto`` -> Lightning's choice; ``ddp`` -> DDPStrategy; ``fsdp`` -> FSDPStrategy wrapping
    (and optionally checkpointing) each Multiway encoder layer."""
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**kwargs)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from oneref.models.beit3 import EncoderLayer

        wrap = kwargs.pop("auto_wrap_layers", True)
        ckpt = kwargs.pop("activation_checkpointing_layers", False)
        return FSDPStrategy(
            auto_wrap_policy={EncoderLayer} if wrap else None,
            activation_checkpointing_policy={EncoderLayer} if ckpt else None,
            **kwargs,
        )
    raise ValueError(f"unknown strategy {name!r}; choose auto, ddp or fsdp")
