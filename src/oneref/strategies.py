"""Distributed strategies from config: DDP and FSDP are declared, not coded."""

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
